"""model.anchors: auto: k-means with an IoU distance finds the shapes the boxes have, anchors sit
on their grids, best-possible recall rises on small objects, and a run trained with fitted
anchors keeps them for evaluation and prediction."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.detect.anchor_fit import best_possible_recall, fit_anchors, kmeans_iou, small_objects
from pipeline.detect.anchors import explicit_anchors, level_shapes_d2l, make_anchors
from pipeline.detect.config import DetectModelConfig
from pipeline.detect.models import create_detector
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]


def test_kmeans_iou_recovers_the_shapes_of_three_groups():
    rng = np.random.default_rng(0)
    true = np.array([[0.05, 0.05], [0.1, 0.3], [0.4, 0.2]])
    wh = np.concatenate([t * rng.uniform(0.92, 1.08, size=(200, 2)) for t in true])
    centres = kmeans_iou(wh, 3, seed=1)
    np.testing.assert_allclose(centres, true, rtol=0.05)  # sorted by area, as true is
    assert np.array_equal(kmeans_iou(wh, 3, seed=1), centres)  # deterministic for a seed


def test_explicit_anchors_sit_on_the_grid_and_d2l_shapes_agree():
    a = explicit_anchors([(2, 2)], [[[0.5, 0.25]]])
    assert torch.allclose(a[0], torch.tensor([0.0, 0.125, 0.5, 0.375]))
    assert torch.allclose(a[3], torch.tensor([0.5, 0.625, 1.0, 0.875]))
    # the d2l shapes written out explicitly give the d2l anchors, in the same order
    shapes = [(4, 4), (2, 2), (1, 1)]
    d2l = make_anchors("d2l", shapes, 0.2, 0.88, [1, 2, 0.5], (64, 64))
    assert torch.allclose(explicit_anchors(shapes, level_shapes_d2l(3, 0.2, 0.88, [1, 2, 0.5])), d2l, atol=1e-6)


def test_fit_reaches_small_boxes_the_defaults_miss():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.9, size=(400, 2))
    wh = rng.uniform(0.08, 0.14, size=(400, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    default = level_shapes_d2l(5, 0.2, 0.88, [1, 2, 0.5])
    fit = fit_anchors(boxes, shapes, 4, default, 128, 0.5)
    assert fit.source == "k-means" and fit.bpr_fitted > fit.bpr_default + 0.3
    assert fit.bpr_default == pytest.approx(best_possible_recall(
        torch.as_tensor(boxes), make_anchors("d2l", shapes, 0.2, 0.88, [1, 2, 0.5], (128, 128)), 0.5)[0])
    assert len(fit.shapes) == 5 and all(len(level) == 4 for level in fit.shapes)
    assert fit.small_share == 0 and fit.suggested_img_size is None
    # 5-10 px objects at 128 px under 8-px cells: most are too small; a larger input is suggested
    share, stride, suggest = small_objects(boxes * 0.5, shapes, 128)
    assert stride == 8 and share > 0.5 and suggest is not None and suggest > 128 and suggest % 32 == 0


def test_auto_model_needs_fitted_shapes():
    with pytest.raises(PipelineError, match="anchor_shapes"):
        create_detector(DetectModelConfig(anchors="auto", img_size=64), 2)(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="width, height"):
        DetectModelConfig(anchors="auto", anchor_shapes=[[[0.1, 0.1]], [[0.2]]])


def test_training_with_auto_anchors_keeps_them(tmp_path, capsys):
    from pipeline.config import load_config
    from pipeline.detect.config import DetectConfig
    from pipeline.detect.evaluate import evaluate
    from pipeline.detect.inference import load_trained
    from pipeline.detect.shapes import build_shapes
    from pipeline.detect.train import train

    root = build_shapes(tmp_path / "small", splits={"train": 8, "val": 4}, object_scale=0.5)
    cfg = load_config(REPO / "configs/banana_ssd.yaml", [
        f"competition.root={root}", "data.build=null", "data.test=null", "data.test_labels=null", "wandb.mode=disabled",
        f"paths.runs={tmp_path / 'runs'}", "model.img_size=64", "model.anchors=auto", "train.epochs=1",
        "train.batch_size=8", "predict.batch_size=8"], schema=DetectConfig)
    train(cfg)
    out = capsys.readouterr().out
    assert "anchors (auto):" in out and "k-means shapes" in out
    model, _, trained = load_trained(cfg)
    assert trained.model.anchors == "auto" and trained.model.anchor_shapes
    n_anchors = sum(h * w * len(level) for (h, w), level in zip([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)],
                                                                trained.model.anchor_shapes))
    assert model(torch.zeros(1, 3, 64, 64))["anchors"].shape[0] == n_anchors
    assert 0 <= evaluate(cfg, split="val", picture=0)["map_50"] <= 1
    # training again resumes (the fitted shapes are the same), instead of refusing another model config
    assert train(cfg)["epochs_run"] == 1
