"""Banana-layout reading: bad rows reported together, class ids, resizing, collate, the shapes set."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.detect.config import DetectConfig
from pipeline.detect.data import (
    DetectionDataset,
    class_names,
    collate,
    eval_transform,
    load_split,
    train_transform,
)
from pipeline.errors import PipelineError


def _banana(root: Path, rows: list[tuple], sizes: dict[str, tuple[int, int]]) -> DetectConfig:
    img_dir = root / "train" / "images"
    img_dir.mkdir(parents=True)
    for name, (w, h) in sizes.items():
        cv2.imwrite(str(img_dir / name), np.full((h, w, 3), 120, np.uint8))
    pd.DataFrame(rows, columns=["img_name", "label", "xmin", "ymin", "xmax", "ymax"]).to_csv(
        root / "train" / "label.csv", index=False)
    return DetectConfig(competition={"root": str(root)}, data={"build": None, "test_labels": None})


def test_bad_rows_are_reported_together(tmp_path):
    rows = [
        ("a.png", "banana", 10, 10, 50, 40),   # fine
        ("a.png", "banana", 50, 10, 50, 40),   # xmax <= xmin
        ("a.png", "banana", 10, 10, 120, 40),  # outside the 100 x 80 image
        ("zz.png", "banana", 1, 1, 5, 5),      # unknown image
        ("b.png", "banana", 1, "x", 5, 5),     # not a number
    ]
    cfg = _banana(tmp_path, rows, {"a.png": (100, 80), "b.png": (60, 60)})
    with pytest.raises(PipelineError) as err:
        load_split(cfg, "train", ["banana"])
    msg = str(err.value)
    assert "4 bad row(s)" in msg and "label.csv" in msg
    for where in ("row 3", "row 4", "row 5", "row 6"):
        assert where in msg
    assert "row 2" not in msg and "zz.png" in msg and "outside the 100x80 image" in msg


def test_missing_column_and_unknown_label(tmp_path):
    cfg = _banana(tmp_path, [("a.png", "cat", 1, 1, 5, 5)], {"a.png": (20, 20)})
    with pytest.raises(PipelineError, match=r"row 2 \(a.png\): unknown label 'cat'"):
        load_split(cfg, "train", ["dog"])
    pd.DataFrame({"img_name": ["a.png"], "xmin": [1]}).to_csv(tmp_path / "train" / "label.csv", index=False)
    with pytest.raises(PipelineError, match="missing column"):
        load_split(cfg, "train", ["dog"])


def test_ids_several_boxes_and_resizing(tmp_path):
    rows = [("a.png", 0, 0, 0, 100, 40), ("a.png", 1, 50, 40, 200, 100), ("b.png", 1, 10, 10, 20, 30)]
    cfg = _banana(tmp_path, rows, {"a.png": (200, 100), "b.png": (50, 50)})
    classes = class_names(cfg)
    assert classes == ["0", "1"]
    split = load_split(cfg, "train", classes)
    assert split.images == ["a.png", "b.png"] and split.labels[0].tolist() == [0, 1]
    ds = DetectionDataset(split, 64, eval_transform(cfg.train.augment))
    img, boxes, labels, idx = ds[0]
    assert img.shape == (3, 64, 64)
    assert torch.allclose(boxes, torch.tensor([[0.0, 0.0, 0.5, 0.4], [0.25, 0.4, 1.0, 1.0]]))
    images, b, lab, ids = collate([ds[0], ds[1]])
    assert b.shape == (2, 2, 4) and lab.tolist() == [[0, 1], [1, -1]] and ids.tolist() == [0, 1]
    # names in data.classes with ids in the file: the id is the position in the list
    named = cfg.model_copy(update={"data": cfg.data.model_copy(update={"classes": ["apple", "banana"]})})
    assert load_split(named, "train", ["apple", "banana"]).labels[1].tolist() == [1]


def test_train_augmentation_keeps_boxes_valid(tmp_path):
    rows = [("a.png", "x", 5, 5, 60, 50), ("a.png", "y", 70, 20, 100, 80)]
    cfg = _banana(tmp_path, rows, {"a.png": (120, 90)})
    split = load_split(cfg, "train", ["x", "y"])
    aug = cfg.train.augment.model_copy(update={"crop": 1.0, "zoom_out": 1.0, "hflip": 0.5})
    ds = DetectionDataset(split, 48, train_transform(48, aug))
    for _ in range(20):
        _, boxes, labels, _ = ds[0]
        assert len(boxes) == len(labels) >= 1
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 1).all()


def test_shapes_set_is_built_in_banana_layout(tmp_path):
    from pipeline.detect.shapes import CLASSES, build_shapes, private_dir

    root = build_shapes(tmp_path / "shapes", splits={"train": 6, "val": 3, "test": 3})
    table = pd.read_csv(root / "train" / "label.csv")
    assert set(table.columns) == {"img_name", "label", "xmin", "ymin", "xmax", "ymax"}
    assert set(table["label"]) <= set(CLASSES) and table["img_name"].nunique() == 6
    assert not (root / "test" / "label.csv").exists()
    assert (private_dir(root) / "test" / "label.csv").is_file()
    cfg = DetectConfig(competition={"root": str(root)},
                       data={"test_labels": str(private_dir(root) / "test" / "label.csv")})
    split = load_split(cfg, "train", CLASSES)  # every generated box passes the checks
    assert sum(len(b) for b in split.boxes) == len(table)
    sizes = {s for s in split.sizes}
    assert len(sizes) > 1  # images of several sizes
