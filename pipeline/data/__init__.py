"""Reading competitions: tables, images, datasets and transforms.

The names below are imported on first use (PEP 562), so that ``python -m pipeline.data.digits``
and other torch-free parts (tables, image reading) start without importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.data.competition import Competition, DataError, load_competition
    from pipeline.data.dataset import ImageDataset
    from pipeline.data.images import ImageReadError, read_image

_WHERE = {
    "Competition": "pipeline.data.competition",
    "DataError": "pipeline.data.competition",
    "load_competition": "pipeline.data.competition",
    "ImageDataset": "pipeline.data.dataset",
    "ImageReadError": "pipeline.data.images",
    "read_image": "pipeline.data.images",
}

__all__ = ["Competition", "DataError", "ImageDataset", "ImageReadError", "load_competition", "read_image"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
