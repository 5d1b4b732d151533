"""Decode any image file to RGB uint8 (H, W, 3), whatever it is on disk.

OpenCV decodes; Pillow is the fallback for the few files OpenCV refuses (some TIFF and palette
variants, animated GIFs on builds without GIF support). What a Kaggle folder holds and how it
comes out:

- grayscale (1-bit, 8-bit, 16-bit): replicated into three channels;
- 16-bit (PNG, TIFF): scaled to 8 bits by its top byte;
- transparency (RGBA, grayscale+alpha, palette with a transparent index, WebP with alpha):
  composited on white, as image viewers show it, instead of exposing whatever colour the
  transparent pixels happen to hold;
- JPEG: EXIF orientation applied (again as viewers show it), CMYK converted to RGB.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class ImageReadError(OSError):
    """The file is missing or could not be decoded as an image."""


_JPEG_MAGIC = b"\xff\xd8"


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * 255
    if np.issubdtype(img.dtype, np.floating):
        img = np.nan_to_num(img.astype(np.float32))
        # Float images are either 0..1 or 0..255 by convention.
        scale = 255.0 if img.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(img * scale, 0, 255).astype(np.uint8)
    # Other integer depths (int32 TIFF, Pillow's "I" mode) have no fixed range: stretch to 0..255.
    return cv2.normalize(img.astype(np.float64), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.round(color.astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _bgr_any_to_rgb(img: np.ndarray) -> np.ndarray:
    """OpenCV's ``IMREAD_UNCHANGED`` result (gray, gray+alpha, BGR, BGRA; any depth) -> RGB uint8."""
    img = _to_uint8(img)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:
        return cv2.cvtColor(_on_white(img[:, :, 0], img[:, :, 1]), cv2.COLOR_GRAY2RGB)
    if channels == 4:
        return cv2.cvtColor(_on_white(img[:, :, :3], img[:, :, 3]), cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)


def _decode_cv2(data: np.ndarray) -> np.ndarray | None:
    try:
        if data[:2].tobytes() == _JPEG_MAGIC:
            # IMREAD_COLOR applies the EXIF orientation and converts CMYK/grey JPEGs; JPEG has no
            # alpha or 16-bit data that IMREAD_UNCHANGED would keep.
            bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
            return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    return None if img is None or img.size == 0 else _bgr_any_to_rgb(img)


def _decode_pil(path: Path) -> np.ndarray | None:
    try:
        from PIL import Image, ImageOps

        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return cv2.cvtColor(_to_uint8(np.asarray(im)), cv2.COLOR_GRAY2RGB)
            if "A" in im.getbands() or "transparency" in im.info:
                rgba = np.asarray(im.convert("RGBA"))
                return _on_white(rgba[:, :, :3], rgba[:, :, 3])
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except Exception:  # Pillow raises many kinds for a bad file; the caller reports one message
        return None


def read_image(path: str | Path) -> np.ndarray:
    """Read ``path`` as RGB uint8 of shape (H, W, 3).

    Raises:
        ImageReadError: the file is missing, unreadable or not a decodable image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    try:
        # np.fromfile + imdecode instead of cv2.imread: imread cannot open non-ASCII paths on Windows.
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    img = _decode_cv2(data)
    if img is None:
        img = _decode_pil(path)
    if img is None or img.size == 0:
        raise ImageReadError(f"{path}: not a readable image (corrupt or unsupported format)")
    return img


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file header where Pillow can read it; None if unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:
        return None
