"""Reading the resized-image cache, and the preprocessing it applies (the one training saw).

``python -m pipeline.prepare`` (``pipeline/prepare.py``) decodes every train and test image once,
resizes its short side to ``cache.size`` (aspect kept, never enlarged, EXIF orientation applied by
:func:`~pipeline.data.images.read_image`) and stores it under ``work/<competition>/cache_<size>/``:

- ``cache.json``: settings, the fingerprint of the sources, counts; written last, so a folder
  without it is not a cache;
- ``index.csv``: one row per image (``image`` as in the competition tables, ``height``, ``width``
  of the cached image, ``orig_height``, ``orig_width``, ``pixel_hash`` of the original pixels, and
  ``file`` or ``offset``);
- ``jpeg``/``png``: one file per image under ``files/`` (the image path plus ``.jpg``/``.png``);
  ``memmap``: ``images.u8``, every image's RGB bytes one after another (read without decoding).

:func:`preprocess` is what a cached image is (resize, then for ``jpeg`` the encode/decode round
trip): code that reads originals without the cache, such as a Kaggle inference notebook, applies
it to see exactly the pixels training saw.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath

import cv2
import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import CacheConfig, TrainConfig
from pipeline.data.images import ImageReadError, read_image
from pipeline.errors import PipelineError

CACHE_VERSION = 1
META_FILE, INDEX_FILE, ARRAY_FILE, FILES_DIR = paths.CACHE_META, paths.CACHE_INDEX, paths.CACHE_ARRAY, paths.CACHE_FILES
SUFFIX = {"jpeg": ".jpg", "png": ".png"}
AUTO_FACTOR = 1.15  # auto size: 15% above the training size leaves random crops pixels to spare


def resolve_size(cache: CacheConfig, train: TrainConfig) -> int | None:
    """The cache's short side in pixels, or None when the cache is off."""
    if cache.size is None:
        return None
    if cache.size == "auto":
        if not isinstance(train.img_size, int):
            raise PipelineError("cache.size: auto needs train.img_size resolved first (train.img_size: auto is "
                                "resolved by pipeline.run and pipeline.train); set cache.size to pixels here")
        img_size = int(train.img_size)
        # The eval transform resizes the short side to img_size / eval_crop_pct: never below that.
        return max(int(round(AUTO_FACTOR * img_size)), math.ceil(img_size / train.augment.eval_crop_pct))
    return int(cache.size)


def settings(cache: CacheConfig, size: int) -> dict:
    """What the cached pixels depend on (a change remakes the cache)."""
    out = {"version": CACHE_VERSION, "size": size, "format": cache.format, "resize": "short_side_inter_area"}
    if cache.format == "jpeg":
        out["jpeg_quality"] = cache.jpeg_quality
    return out


def resize_short_side(rgb: np.ndarray, size: int) -> np.ndarray:
    """Shrink so the short side is ``size`` (aspect kept); smaller images are returned unchanged."""
    h, w = rgb.shape[:2]
    short = min(h, w)
    if short <= size:
        return rgb
    scale = size / short
    new = (max(size, int(round(w * scale))) if w > h else size, max(size, int(round(h * scale))) if h > w else size)
    # INTER_AREA averages the pixels each output pixel covers: no aliasing when shrinking a lot.
    return cv2.resize(rgb, new, interpolation=cv2.INTER_AREA)


def encode(rgb: np.ndarray, fmt: str, jpeg_quality: int = 95) -> bytes:
    """The bytes of a cached image file (``jpeg`` or ``png``)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if fmt == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(SUFFIX[fmt], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ImageReadError(f"OpenCV could not encode a {rgb.shape} image as {fmt}")
    return buf.tobytes()


def decode(data: bytes | np.ndarray) -> np.ndarray | None:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def preprocess(rgb: np.ndarray, cache: CacheConfig, train: TrainConfig) -> np.ndarray:
    """The image as the cache holds it: what training and prediction saw when ``cache.size`` is set.

    Identity when the cache is off. Bit-identical to reading the cache (same OpenCV build).
    """
    size = resolve_size(cache, train)
    if size is None:
        return rgb
    small = resize_short_side(rgb, size)
    if cache.format == "jpeg":
        return decode(encode(small, "jpeg", cache.jpeg_quality))
    return small


def read_preprocessed(path: str | Path, cache: CacheConfig, train: TrainConfig) -> np.ndarray:
    """Read an original image and apply :func:`preprocess` (for code that has no cache folder)."""
    return preprocess(read_image(path), cache, train)


@dataclass
class CacheInfo:
    """An opened, complete cache folder."""

    folder: Path
    meta: dict
    index: pd.DataFrame

    @property
    def format(self) -> str:
        return self.meta["settings"]["format"]

    def reader(self, root: str | Path) -> CacheReader:
        """A picklable ``path -> RGB array`` for images under the competition folder ``root``."""
        return CacheReader(self.folder, self.format, self.index, root)

    def pixel_hashes(self, images: list[str]) -> list[str]:
        """SHA-1 of each original image's decoded pixels (computed while the cache was made)."""
        by_image = dict(zip(self.index["image"], self.index["pixel_hash"]))
        return [by_image[i] for i in images]


class CacheReader:
    """Reads images from a cache folder by their original path (absolute or under ``root``).

    Picklable for DataLoader workers: the memory map is opened lazily in each process.
    """

    def __init__(self, folder: Path, fmt: str, index: pd.DataFrame, root: str | Path):
        self.folder, self.format = Path(folder), fmt
        self.roots = [PurePath(root), PurePath(os.path.abspath(root)), PurePath(Path(root).resolve())]
        if fmt == "memmap":
            self.entries = {img: (int(o), int(h), int(w)) for img, o, h, w in
                            zip(index["image"], index["offset"], index["height"], index["width"])}
        else:
            self.entries = dict(zip(index["image"], index["file"]))
        self._array: np.ndarray | None = None

    # Image decoding needs no RAM copy of the whole set: workers share the page cache of images.u8.
    needs_preload = property(lambda self: self.format != "memmap")

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    def key(self, path: str | Path) -> str:
        p = PurePath(path)
        for root in self.roots:
            try:
                return p.relative_to(root).as_posix()
            except ValueError:
                continue
        return p.as_posix()

    def __contains__(self, path: str | Path) -> bool:
        return self.key(path) in self.entries

    def __call__(self, path: str | Path) -> np.ndarray:
        key = self.key(path)
        entry = self.entries.get(key)
        if entry is None:
            raise PipelineError(f"{key}: not in the image cache {self.folder}; the competition changed since it "
                                "was made: run python -m pipeline.prepare")
        if self.format == "memmap":
            if self._array is None:
                self._array = np.memmap(self.folder / ARRAY_FILE, dtype=np.uint8, mode="r")
            offset, h, w = entry
            # A copy: augmentations may write in place, and the map is read-only.
            return np.array(self._array[offset:offset + h * w * 3]).reshape(h, w, 3)
        file = self.folder / FILES_DIR / entry
        try:
            img = decode(np.fromfile(file, dtype=np.uint8))
        except OSError as exc:
            raise ImageReadError(f"{file}: cannot be read ({exc}); run python -m pipeline.prepare --force") from None
        if img is None:
            raise ImageReadError(f"{file}: a damaged cache file; run python -m pipeline.prepare --force")
        return img


def open_cache(folder: Path) -> CacheInfo:
    """Open a complete cache folder (no check that it is current: ``pipeline.prepare`` decides that)."""
    from pipeline.io import read_json

    meta = read_json(folder / META_FILE)
    index = pd.read_csv(folder / INDEX_FILE, dtype={"image": str, "file": str, "pixel_hash": str},
                        keep_default_na=False)
    return CacheInfo(folder, meta, index)


def image_reader(cfg, root: str | Path, cache: CacheConfig | None = None,
                 train: TrainConfig | None = None, build: bool = True) -> Callable[[str], np.ndarray]:
    """``path -> RGB uint8`` for images of the competition at ``root``: from the cache when
    ``cache.size`` is set (made first when missing or stale, if ``build``), else the original files.

    Args:
        cfg: the run's config (where ``work/`` is).
        cache, train: the settings the images are for (default ``cfg``'s); prediction passes the
            checkpoint's, so it sees what training saw.
    """
    cache = cache if cache is not None else cfg.cache
    train = train if train is not None else cfg.train
    if resolve_size(cache, train) is None:
        return read_image
    from pipeline.prepare import ensure_cache, locate_cache

    info = ensure_cache(cfg, cache, train) if build else locate_cache(cfg, cache, train)
    return info.reader(root)
