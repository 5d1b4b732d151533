"""Albumentations presets: random-resized-crop training pipeline and resize/center-crop eval.

Both end in uint8 ``(C, H, W)`` tensors: normalisation happens on the device, per batch
(:class:`pipeline.data.device_input.DeviceInput`). ``normalize=True`` gives the float32 CPU-normalised
pipeline instead (what the loaders sent before; kept for comparison and for callers without a device step).
"""
from __future__ import annotations

import albumentations as A
from albumentations.pytorch import ToTensorV2

from pipeline.config import AugmentConfig


def _to_tensor(aug: AugmentConfig, normalize: bool) -> list[A.BasicTransform]:
    return [A.Normalize(mean=aug.mean, std=aug.std), ToTensorV2()] if normalize else [ToTensorV2()]


def train_transform(img_size: int, aug: AugmentConfig, normalize: bool = False) -> A.Compose:
    """Random resized crop, flips, rotation and colour jitter as configured; uint8 out unless ``normalize``."""
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(img_size, img_size), scale=(aug.scale_min, 1.0),
                            ratio=(aug.ratio_min, aug.ratio_max)),
    ]
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        steps.append(A.VerticalFlip(p=aug.vflip))
    if aug.rotate > 0:
        steps.append(A.Rotate(limit=aug.rotate, border_mode=0, p=0.5))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4), p=0.8))
    return A.Compose(steps + _to_tensor(aug, normalize))


def eval_transform(img_size: int, aug: AugmentConfig, normalize: bool = False) -> A.Compose:
    """Resize the short side to ``img_size / eval_crop_pct``, center crop; uint8 out unless ``normalize``."""
    resize_to = int(round(img_size / aug.eval_crop_pct))
    return A.Compose([
        A.SmallestMaxSize(max_size=resize_to),
        A.CenterCrop(height=img_size, width=img_size),
        *_to_tensor(aug, normalize),
    ])
