"""Albumentations presets: random-resized-crop training pipeline and resize/center-crop eval."""
from __future__ import annotations

import albumentations as A
from albumentations.pytorch import ToTensorV2

from pipeline.config import AugmentConfig


def train_transform(img_size: int, aug: AugmentConfig) -> A.Compose:
    """Random resized crop, flips, rotation and colour jitter as configured, then normalize."""
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
    steps += [A.Normalize(mean=aug.mean, std=aug.std), ToTensorV2()]
    return A.Compose(steps)


def eval_transform(img_size: int, aug: AugmentConfig) -> A.Compose:
    """Resize the short side to ``img_size / eval_crop_pct``, center crop, normalize."""
    resize_to = int(round(img_size / aug.eval_crop_pct))
    return A.Compose([
        A.SmallestMaxSize(max_size=resize_to),
        A.CenterCrop(height=img_size, width=img_size),
        A.Normalize(mean=aug.mean, std=aug.std),
        ToTensorV2(),
    ])
