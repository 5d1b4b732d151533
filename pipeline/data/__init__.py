"""Reading competitions: tables, images, datasets and transforms."""
from pipeline.data.competition import Competition, DataError, load_competition
from pipeline.data.dataset import ImageDataset
from pipeline.data.images import ImageReadError, read_image

__all__ = ["Competition", "DataError", "ImageDataset", "ImageReadError", "load_competition", "read_image"]
