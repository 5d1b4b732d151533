"""A torch Dataset over image paths, through an albumentations pipeline."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.images import read_image


class ImageDataset(Dataset):
    """Returns ``(tensor, target)``; ``target`` is -1 where labels are unknown (test rows).

    Args:
        paths: image files.
        targets: class indices, or None for unlabelled images.
        transform: albumentations pipeline ending in ``ToTensorV2``, or None for raw HWC uint8.
        cache: keep decoded images in RAM (small competitions: decode once, not every epoch).
            With DataLoader workers, call :meth:`preload` first: images cached inside a worker
            live only as long as that worker.
        reader: ``path -> RGB uint8``; default :func:`read_image` (the original file). The
            resized-image cache passes its reader (:func:`pipeline.data.cache.image_reader`).
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | None = None, transform=None,
                 cache: bool = False, reader: Callable[[str], np.ndarray] | None = None):
        self.paths = [str(p) for p in paths]
        self.targets = np.full(len(self.paths), -1, np.int64) if targets is None else np.asarray(targets, np.int64)
        if len(self.targets) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.targets)} targets")
        self.transform = transform
        self.cache = cache
        self.reader = reader or read_image
        self._images: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        img = self._images.get(index)
        if img is None:
            img = self.reader(self.paths[index])
            if self.cache:
                self._images[index] = img
        return img

    def preload(self) -> None:
        """Decode every image now (before DataLoader workers fork, so they share the cache)."""
        self.cache = True
        for i in range(len(self)):
            self.load(i)

    def __getitem__(self, index: int):
        img = self.load(index)
        x = self.transform(image=img)["image"] if self.transform is not None else torch.from_numpy(img)
        return x, int(self.targets[index])
