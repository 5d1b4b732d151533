"""Detection data: the banana reader (label tables checked row by row; COCO, YOLO and VOC are in
``readers.py``, chosen by ``competition.format``), a dataset with bbox-aware albumentations, and a
collate that pads boxes per batch.

Banana layout: ``<root>/<split>/images/*`` and ``<root>/<split>/label.csv`` with columns
``img_name,label,xmin,ymin,xmax,ymax`` (pixels, one row per box, label a class name or id).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from pipeline.data.images import ImageReadError, image_size, read_image
from pipeline.detect.config import DetectAugmentConfig, DetectConfig
from pipeline.detect.layout import candidates
from pipeline.errors import PipelineError

COLUMNS = ["img_name", "label", "xmin", "ymin", "xmax", "ymax"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
_MAX_LISTED = 20


@dataclass
class Split:
    """One split: image paths, and per image the pixel boxes and class ids (empty for unlabelled)."""

    name: str
    images: list[str]
    paths: list[Path]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    sizes: list[tuple[int, int]]  # (width, height) of the original files
    labelled: bool


def ensure_dataset(cfg: DetectConfig) -> None:
    """Build the embedded default set on first use when ``data.build`` asks for it."""
    root = cfg.competition.root
    if cfg.data.build == "shapes" and not (Path(root) / cfg.data.train / "label.csv").is_file():
        from pipeline.detect.shapes import build_shapes

        print(f"building the embedded detection set in {root} (first use)")
        build_shapes(root)


def _sort_classes(names: list[str]) -> list[str]:
    try:
        return [str(v) for v in sorted({int(n) for n in names})]
    except ValueError:
        return sorted(set(names))


def read_label_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"label file {path} does not exist; expected columns {','.join(COLUMNS)}")
    try:
        table = pd.read_csv(path, dtype={"img_name": str, "label": str})
    except Exception as exc:
        raise PipelineError(f"{path} is not a readable CSV file ({exc})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, table.columns))}; "
                            f"expected {','.join(COLUMNS)}")
    return table


def class_names(cfg: DetectConfig) -> list[str]:
    """``data.classes`` if given, else the sorted labels of the train split (numeric order for ids);
    other formats: what their files say (``readers.read_classes``)."""
    if cfg.data.classes:
        return list(cfg.data.classes)
    if cfg.competition.format != "banana":
        from pipeline.detect.readers import read_classes

        return read_classes(cfg)
    table = read_label_table(candidates(cfg, cfg.data.train, "labels")[0])
    return _sort_classes(table["label"].dropna().astype(str).str.strip().tolist())


def _class_index(label: str, classes: list[str]) -> int | None:
    if label in classes:
        return classes.index(label)
    # ids in the file against names in data.classes: the id is the position in that list
    if label.lstrip("-").isdigit() and not any(c.lstrip("-").isdigit() for c in classes):
        i = int(label)
        return i if 0 <= i < len(classes) else None
    return None


def load_split(cfg: DetectConfig, split: str, classes: list[str], labels_path: Path | None = None) -> Split:
    """Read and check one split; every bad row is reported in one error.

    Args:
        split: split name (``data.train``, ``data.val``, ``data.test``): a folder under ``competition.root``
            in the banana layout; for other formats see ``layout.py``.
        labels_path: labels kept elsewhere (``data.test_labels``); default: the format's place.
            Without labels, a split with an image folder is unlabelled (all its images).
    """
    if cfg.competition.format != "banana":
        from pipeline.detect.readers import read_split

        return read_split(cfg, split, classes, labels_path)
    img_dir = candidates(cfg, split, "images")[0]
    labels_path = labels_path or candidates(cfg, split, "labels")[0]
    if not labels_path.is_file():
        if not img_dir.is_dir():
            raise PipelineError(f"split {split!r}: neither {labels_path} nor {img_dir} exists; "
                                f"check competition.root={cfg.competition.root!r} and the split names in data.*")
        return unlabelled_split(img_dir, split)

    table = read_label_table(labels_path)
    problems: list[str] = []
    size_cache: dict[str, tuple[int, int] | None] = {}
    per_image: dict[str, list[tuple]] = {}
    for i, row in enumerate(table.itertuples(index=False)):
        where = f"row {i + 2}"  # line number in the file, after the header
        name = str(row.img_name).strip() if isinstance(row.img_name, str) else ""
        if not name:
            problems.append(f"{where}: empty img_name")
            continue
        if name not in size_cache:
            size_cache[name] = image_size(img_dir / name)
        size = size_cache[name]
        if size is None:
            problems.append(f"{where}: image {name!r} not found or unreadable in {img_dir}")
            continue
        try:
            x0, y0, x1, y1 = (float(getattr(row, c)) for c in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            problems.append(f"{where} ({name}): coordinates are not numbers")
            continue
        if not np.isfinite([x0, y0, x1, y1]).all():
            problems.append(f"{where} ({name}): empty or non-finite coordinate")
            continue
        if x1 <= x0 or y1 <= y0:
            problems.append(f"{where} ({name}): xmax <= xmin or ymax <= ymin ({x0:g},{y0:g},{x1:g},{y1:g})")
            continue
        w, h = size
        if x0 < -0.5 or y0 < -0.5 or x1 > w + 0.5 or y1 > h + 0.5:
            problems.append(f"{where} ({name}): box ({x0:g},{y0:g},{x1:g},{y1:g}) outside the {w}x{h} image")
            continue
        label = str(row.label).strip()
        k = _class_index(label, classes)
        if k is None:
            problems.append(f"{where} ({name}): unknown label {label!r}; classes are {classes} "
                            "(from the train split, or list them all in data.classes)")
            continue
        per_image.setdefault(name, []).append((k, min(max(x0, 0), w), min(max(y0, 0), h),
                                               min(max(x1, 0), w), min(max(y1, 0), h)))
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise PipelineError(f"{labels_path}: {len(problems)} bad row(s); fix or remove them:\n  {listed}{more}")
    if not per_image:
        raise PipelineError(f"{labels_path} has no boxes")
    names = sorted(per_image)
    return Split(
        split, names, [img_dir / n for n in names],
        [np.array([r[1:] for r in per_image[n]], np.float32) for n in names],
        [np.array([r[0] for r in per_image[n]], np.int64) for n in names],
        [size_cache[n] for n in names], labelled=True,
    )


def unlabelled_split(img_dir: Path, split: str) -> Split:
    """Every image of ``img_dir`` with no boxes (a test split)."""
    names = sorted(p.name for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise PipelineError(f"{img_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    sizes = [image_size(img_dir / n) for n in names]
    bad = [n for n, s in zip(names, sizes) if s is None]
    if bad:
        raise PipelineError(f"{len(bad)} unreadable image(s) in {img_dir}: {', '.join(bad[:_MAX_LISTED])}")
    empty = [np.zeros((0, 4), np.float32)] * len(names)
    return Split(split, names, [img_dir / n for n in names], empty, [np.zeros(0, np.int64)] * len(names),
                 sizes, labelled=False)


def train_transform(img_size: int, aug: DetectAugmentConfig) -> A.Compose:
    """Zoom-out, box-safe crop, flip and colour jitter on the resized image; boxes follow."""
    steps: list = []
    if aug.zoom_out > 0:
        steps.append(A.Affine(scale=(0.6, 1.0), keep_ratio=True, border_mode=cv2.BORDER_CONSTANT,
                              fill=tuple(int(m * 255) for m in aug.mean), p=aug.zoom_out))
    if aug.crop > 0:
        # keeps every box whole (erosion 0), so no object is cut into an unlabelled fragment
        steps.append(A.RandomSizedBBoxSafeCrop(img_size, img_size, erosion_rate=0.0, p=aug.crop))
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4), p=0.8))
    steps += [A.Normalize(mean=aug.mean, std=aug.std), ToTensorV2()]
    return A.Compose(steps, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"],
                                                     min_visibility=0.3, clip=True))


def eval_transform(aug: DetectAugmentConfig) -> A.Compose:
    return A.Compose([A.Normalize(mean=aug.mean, std=aug.std), ToTensorV2()])


class DetectionDataset(Dataset):
    """Images resized to ``img_size`` squared (boxes scaled alike), then ``transform``.

    Returns ``(image tensor, boxes (N, 4) normalised xyxy, labels (N,), index)``.
    """

    def __init__(self, split: Split, img_size: int, transform: A.Compose, cache: bool = True) -> None:
        self.split, self.img_size, self.transform, self.cache = split, img_size, transform, cache
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.split.paths)

    def _image(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        try:
            img = read_image(self.split.paths[i])
        except ImageReadError as exc:
            raise PipelineError(f"{exc}; remove it from {self.split.name} or replace the file") from None
        img = cv2.resize(img, (self.img_size, self.img_size), interpolation=cv2.INTER_AREA)
        if self.cache:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int):
        img = self._image(i)
        w, h = self.split.sizes[i]
        scale = np.array([self.img_size / w, self.img_size / h] * 2, np.float32)
        boxes = (self.split.boxes[i] * scale).clip(0, self.img_size)
        out = self.transform(image=img, bboxes=boxes, labels=self.split.labels[i])
        b = np.asarray(out["bboxes"], np.float32).reshape(-1, 4) / self.img_size
        return out["image"], torch.from_numpy(b), torch.as_tensor(np.asarray(out["labels"], np.int64)), i


def collate(batch):
    """Stack images; pad boxes to the batch's largest count with label -1 (ignored by matching)."""
    images = torch.stack([b[0] for b in batch])
    n = max(1, max(len(b[2]) for b in batch))
    boxes = torch.zeros(len(batch), n, 4)
    labels = torch.full((len(batch), n), -1, dtype=torch.long)
    for j, (_, bx, lb, _) in enumerate(batch):
        boxes[j, :len(lb)] = bx
        labels[j, :len(lb)] = lb
    return images, boxes, labels, torch.tensor([b[3] for b in batch])
