"""Our COCO-style mAP against pycocotools' COCOeval on the same predictions."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from pipeline.detect.metrics import ImageBoxes, evaluate_detections


def _random_case(rng: np.random.Generator, n_images: int = 30, num_classes: int = 3):
    gts, dets = [], []
    for i in range(n_images):
        n = rng.integers(0, 5)
        xy = rng.uniform(0, 150, (n, 2))
        wh = rng.uniform(10, 80, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, num_classes - (1 if i % 2 else 0), n)  # class 2 rarer
        gts.append(ImageBoxes(boxes, labels))
        # detections: jittered copies (some relabelled), plus random false positives
        jitter = boxes + rng.normal(0, rng.uniform(1, 12), boxes.shape)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        d_labels = np.where(rng.random(n) < 0.15, rng.integers(0, num_classes, n), labels)
        m = rng.integers(0, 6)
        fxy = rng.uniform(0, 150, (m, 2))
        fp = np.concatenate([fxy, fxy + rng.uniform(5, 60, (m, 2))], 1)
        d_boxes = np.concatenate([jitter, fp])
        d_lab = np.concatenate([d_labels, rng.integers(0, num_classes, m)])
        scores = rng.uniform(0.01, 1.0, len(d_boxes)).round(2)  # rounding makes ties, as real scores have
        dets.append(ImageBoxes(d_boxes, d_lab, scores))
    return gts, dets


def _coco(gts, dets, num_classes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, (g, d) in enumerate(zip(gts, dets), start=1):
        images.append({"id": i, "width": 256, "height": 256})
        for b, lab in zip(g.boxes, g.labels):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(lab) + 1, "iscrowd": 0,
                         "bbox": [float(b[0]), float(b[1]), float(w), float(h)], "area": float(w * h)})
        for b, lab, s in zip(d.boxes, d.labels, d.scores):
            results.append({"image_id": i, "category_id": int(lab) + 1, "score": float(s),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_equals_pycocotools(seed):
    pytest.importorskip("pycocotools")
    gts, dets = _random_case(np.random.default_rng(seed))
    ours = evaluate_detections(gts, dets, num_classes=3)
    ev = _coco(gts, dets, 3)
    assert abs(ours["map_50_95"] - ev.stats[0]) < 1e-3
    assert abs(ours["map_50"] - ev.stats[1]) < 1e-3
    # per class: COCO's precision array is [T, R, K, area, maxDets]
    for k in range(3):
        p = ev.eval["precision"][:, :, k, 0, 2]
        assert abs(ours["ap_50_95"][k] - p.mean()) < 1e-3
    assert 0.0 < ours["map_50_95"] < ours["map_50"] < 1.0


def test_perfect_and_empty_predictions():
    box = np.array([[10.0, 10, 50, 60]])
    gts = [ImageBoxes(box, np.array([0]))]
    perfect = evaluate_detections(gts, [ImageBoxes(box, np.array([0]), np.array([0.9]))], 2)
    assert perfect["map_50"] == pytest.approx(1.0) and perfect["map_50_95"] == pytest.approx(1.0)
    assert perfect["ap_50"][1] is None  # no ground truth of class 1: left out of the mean
    assert perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    empty = evaluate_detections(gts, [ImageBoxes(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))], 2)
    assert empty["map_50"] == 0.0 and empty["recall"] == 0.0
