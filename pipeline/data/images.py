"""Decode any image file to RGB uint8 (H, W, 3), whatever it is on disk."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class ImageReadError(OSError):
    """The file is missing or could not be decoded as an image."""


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        # Composite transparent pixels on white, as viewers show them, instead of dropping alpha.
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        bgr = img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return cv2.cvtColor(np.round(bgr).astype(np.uint8), cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)


def _read_with_pil(path: Path) -> np.ndarray | None:
    # OpenCV cannot decode some files (GIF, odd TIFF/palette variants); Pillow is a fallback.
    try:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB"))[
                :, :, [2, 1, 0, 3] if (im.mode == "RGBA" or "transparency" in im.info) else [2, 1, 0]
            ]
    except Exception:
        return None


def read_image(path: str | Path) -> np.ndarray:
    """Read ``path`` as RGB uint8 (grayscale, RGBA, palette, 16-bit, JPEG/PNG/WebP/BMP/TIFF).

    Raises:
        ImageReadError: the file is missing or not a decodable image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        img = _read_with_pil(path)
    if img is None or img.size == 0:
        raise ImageReadError(f"{path}: not a readable image (corrupt or unsupported format)")
    return _to_rgb_uint8(img)


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) without decoding the pixels where Pillow can; None if unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:
        return None
