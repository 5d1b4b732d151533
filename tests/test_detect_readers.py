"""COCO, YOLO and VOC readers: the shapes set converted to each reads back as the banana reader
reads it (same boxes, same mAP from the same model), and every bad box, missing image or
unknown class is listed in one error with its file and line or id."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.detect.config import DetectConfig
from pipeline.detect.data import class_names, load_split
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from pipeline.detect.shapes import build_shapes

    return build_shapes(tmp_path_factory.mktemp("readers") / "shapes", splits={"train": 12, "val": 6})


def _cfg(root: Path, fmt: str, *extra: str, runs: Path | None = None) -> DetectConfig:
    base = [f"competition.root={root}", f"competition.format={fmt}", "data.build=null", "data.test=null",
            "data.test_labels=null", "wandb.mode=disabled", "model.img_size=64", "train.batch_size=6",
            "predict.batch_size=6", "train.epochs=1", "train.lr=0.01"]
    if runs is not None:
        base += [f"paths.runs={runs}", f"paths.submissions={runs.parent / 'subs'}"]
    return load_config(REPO / "configs/banana_ssd.yaml", base + list(extra), schema=DetectConfig)


def _convert(shapes: Path, out: Path) -> dict[str, Path]:
    """The banana shapes set written as COCO (images left in place), YOLO and VOC folders."""
    from pipeline.detect.coco import write_coco
    from pipeline.detect.voc import write_voc
    from pipeline.detect.yolo import write_yolo

    banana = _cfg(shapes, "banana")
    classes = class_names(banana)
    roots = {f: out / f for f in ("coco", "yolo", "voc")}
    for split in ("train", "val"):
        s = load_split(banana, split, classes)
        write_coco(s, classes, roots["coco"] / "annotations" / f"instances_{split}.json")
        write_yolo(s, classes, roots["yolo"] / split / "images", roots["yolo"] / split / "labels")
        shutil.copytree(shapes / split / "images", roots["voc"] / split / "JPEGImages")
        write_voc(s, classes, roots["voc"] / split / "Annotations")
    (roots["yolo"] / "data.yaml").write_text("names:\n" + "".join(f"  {k}: {c}\n" for k, c in enumerate(classes)))
    return roots


def test_every_format_reads_the_same_boxes(shapes, tmp_path):
    roots = _convert(shapes, tmp_path)
    banana = _cfg(shapes, "banana")
    classes = class_names(banana)
    configs = {
        # COCO with the images where the banana set keeps them: data.images overrides the place
        "coco": _cfg(roots["coco"], "coco", f"data.images={shapes}/{{split}}/images"),
        "yolo": _cfg(roots["yolo"], "yolo"),
        "voc": _cfg(roots["voc"], "voc"),
    }
    for fmt, cfg in configs.items():
        assert class_names(cfg) == classes, fmt
        for split in ("train", "val"):
            ref, got = load_split(banana, split, classes), load_split(cfg, split, classes)
            assert got.images == ref.images and got.sizes == ref.sizes and got.labelled, fmt
            for a, b, la, lb in zip(ref.boxes, got.boxes, ref.labels, got.labels):
                assert np.array_equal(la, lb), fmt
                if fmt == "yolo":  # normalised text: equal to well under a pixel
                    np.testing.assert_allclose(b, a, atol=1e-3)
                else:
                    assert np.array_equal(a, b), fmt


def test_same_model_same_map_on_every_format(shapes, tmp_path):
    from pipeline.detect.evaluate import evaluate
    from pipeline.detect.train import train

    roots = _convert(shapes, tmp_path / "conv")
    runs = tmp_path / "runs"
    train(_cfg(shapes, "banana", runs=runs))
    ref = evaluate(_cfg(shapes, "banana", runs=runs), split="val", picture=0)
    assert ref["n_gt"] > 0 and ref["map_50"] > 0  # a model that finds something, so equality means something
    for fmt, extra in (("coco", [f"data.images={shapes}/{{split}}/images"]), ("yolo", []), ("voc", [])):
        got = evaluate(_cfg(roots[fmt], fmt, *extra, runs=runs), split="val", picture=0)
        assert got["n_gt"] == ref["n_gt"], fmt
        assert got["map_50"] == pytest.approx(ref["map_50"], abs=1e-6), fmt
        assert got["map_50_95"] == pytest.approx(ref["map_50_95"], abs=1e-6), fmt
    # the same run through TTA (it trained with flips: both views, fused) and as a PredictionString file
    assert ref["tta"] == ["x1", "x1+hflip"]
    plain = evaluate(_cfg(shapes, "banana", runs=runs), split="val", picture=0, tta=False)
    assert plain["tta"] == ["x1"] and plain["n_gt"] == ref["n_gt"]
    from pipeline.detect.predict import predict

    names = sorted(p.stem for p in (shapes / "val" / "images").iterdir())[::-1]
    pd.DataFrame({"image_id": names, "PredictionString": ""}).to_csv(tmp_path / "sample.csv", index=False)
    sub = predict(_cfg(shapes, "banana", "submission.form=prediction_string", "post.score_threshold=0.01",
                       f"submission.sample_submission={tmp_path / 'sample.csv'}", runs=runs), split="val")
    table = pd.read_csv(sub, keep_default_na=False)
    assert table["image_id"].tolist() == names and table["PredictionString"].str.len().sum() > 0
    fields = table["PredictionString"][table["PredictionString"] != ""].iloc[0].split()
    assert len(fields) % 5 == 0 and 0 < float(fields[0]) <= 1  # score x y w h, repeated
    assert json.loads(sub.with_suffix(".json").read_text())["tta"] == ["x1", "x1+hflip"]


def _image(path: Path, w: int = 100, h: int = 80) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


def test_coco_lists_every_problem_with_its_id(tmp_path):
    _image(tmp_path / "train" / "images" / "a.jpg")
    _image(tmp_path / "train" / "images" / "b.jpg", 50, 50)
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 60, "height": 50},      # size disagrees
                   {"id": 3, "file_name": "gone.jpg", "width": 10, "height": 10}],  # missing
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]},   # fine
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [90, 5, 30, 20]},  # outside
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [5, 5, 20, 20]},   # unknown category
            {"id": 13, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 20]},    # empty
            {"id": 14, "image_id": 9, "category_id": 1, "bbox": [5, 5, 5, 5]},     # unknown image
            {"id": 15, "image_id": 1, "category_id": 1, "bbox": [0, 0, 500, 500], "iscrowd": 1},  # ignored
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    cfg = _cfg(tmp_path, "coco")
    assert class_names(cfg) == ["cat", "dog"]
    with pytest.raises(PipelineError) as err:
        load_split(cfg, "train", ["cat", "dog"])
    msg = str(err.value)
    assert "instances_train.json: 6 problem(s)" in msg
    for piece in ("image id 2 (b.jpg): the JSON says 60x50 but the file is 50x50",
                  "image id 3 (gone.jpg): image not found", "annotation id 11 (a.jpg)", "outside the 100x80 image",
                  "annotation id 12 (a.jpg): category_id 7 is not in 'categories'", "annotation id 13 (a.jpg)",
                  "annotation id 14: image_id 9 is not in 'images'"):
        assert piece in msg, piece
    assert "annotation id 10" not in msg and "annotation id 15" not in msg
    # a category the run's classes do not know
    with pytest.raises(PipelineError, match=r"annotation id 10 \(a.jpg\): unknown class 'cat'"):
        load_split(cfg, "train", ["dog"])


def test_yolo_lists_every_bad_line_and_orphan_label(tmp_path):
    img, lab = tmp_path / "train" / "images", tmp_path / "train" / "labels"
    _image(img / "a.jpg")
    _image(img / "bg.jpg")  # no label file: an image with no object
    lab.mkdir(parents=True)
    (lab / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n5 0.5 0.5 0.2 0.2\n0 1.5 0.5 0.2 0.2\n"
                               "0 0.5 0.5 0 0.2\n\n1 0.1 0.1 0.3 0.1 0.3 0.4\n")
    (lab / "lost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    cfg = _cfg(tmp_path, "yolo")
    assert class_names(cfg) == ["cat", "dog"]
    with pytest.raises(PipelineError) as err:
        load_split(cfg, "train", ["cat", "dog"])
    msg = str(err.value)
    assert "5 problem(s)" in msg
    for piece in ("a.txt:2: expected 'class cx cy w h'", "a.txt:3: unknown class id 5", "a.txt:4: coordinates must be",
                  "a.txt:5: empty box", "lost.txt: no image lost.* in"):
        assert piece in msg, piece
    assert "a.txt:1" not in msg and "a.txt:7" not in msg  # a polygon line is a box around its points
    (lab / "lost.txt").unlink()
    (lab / "a.txt").write_text("0 0.5 0.5 0.2 0.25\n1 0.1 0.1 0.3 0.1 0.3 0.4\n")
    split = load_split(cfg, "train", ["cat", "dog"])
    assert split.images == ["a.jpg", "bg.jpg"] and split.labels[0].tolist() == [0, 1] and len(split.boxes[1]) == 0
    np.testing.assert_allclose(split.boxes[0], [[40, 30, 60, 50], [10, 8, 30, 32]], atol=1e-4)


def test_voc_unknown_class_and_missing_image(tmp_path):
    from pipeline.detect.data import Split
    from pipeline.detect.voc import write_voc

    _image(tmp_path / "train" / "JPEGImages" / "a.jpg")
    two = Split("train", ["a.jpg", "b.jpg"], [], [np.array([[1, 2, 30, 40]], np.float32)] * 2,
                [np.array([0]), np.array([1])], [(100, 80)] * 2, True)
    write_voc(two, ["cat", "dog"], tmp_path / "train" / "Annotations")
    cfg = _cfg(tmp_path, "voc")
    assert class_names(cfg) == ["cat", "dog"]
    with pytest.raises(PipelineError) as err:
        load_split(cfg, "train", ["dog"])
    msg = str(err.value)
    assert "2 problem(s)" in msg and "a.xml object 1: unknown class 'cat'" in msg
    assert "b.xml: image 'b.jpg' not found" in msg
    (tmp_path / "train" / "Annotations" / "b.xml").unlink()
    split = load_split(cfg, "train", ["cat", "dog"])
    assert split.images == ["a.jpg"] and split.boxes[0].tolist() == [[1, 2, 30, 40]]


@pytest.mark.parametrize("name", ["coco_ssd.yaml", "yolo_ssd.yaml", "voc_ssd.yaml", "banana_ssd.yaml"])
def test_every_detection_recipe_validates(name):
    cfg = load_config(REPO / "configs" / name, schema=DetectConfig)
    fmt = name.split("_")[0]
    assert cfg.data.format == ("banana" if fmt == "banana" else fmt)
    if fmt != "banana":  # the recipes for a user's own folder fit the anchors and train to a budget
        assert cfg.model.anchors == "auto" and cfg.train.time_budget and cfg.data.build is None
