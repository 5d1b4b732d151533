"""Detection TTA: views from the config, flipped boxes mapped back, weighted box fusion of views
and of several models."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.detect.config import DetectConfig
from pipeline.detect.data import Split
from pipeline.detect.inference import predict_split
from pipeline.detect.tta import View, detect_views, fuse, unflip, view_size


def test_views_follow_training_flips_unless_set():
    flipped = DetectConfig(train={"augment": {"hflip": 0.5}}, tta={"scales": [1.0, 1.25]})
    assert [v.name for v in detect_views(flipped)] == ["x1", "x1.25", "x1+hflip", "x1.25+hflip"]
    never = DetectConfig(train={"augment": {"hflip": 0.0}})
    assert detect_views(never) == [View()]  # a model that never saw mirrored objects is not shown them
    assert detect_views(never.model_copy(update={"tta": never.tta.model_copy(update={"hflip": True})}))[-1].hflip
    assert view_size(128, 1.25) == 160 and view_size(100, 1.0) == 96


def test_unflip_and_fusion():
    b = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)
    assert np.allclose(unflip(b), [[0.7, 0.2, 0.9, 0.4]]) and np.allclose(unflip(unflip(b)), b)
    one = (np.array([[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.8, 0.8]]), np.array([0.9, 0.8]), np.array([0, 1]))
    two = (np.array([[0.12, 0.1, 0.32, 0.3], [0.6, 0.6, 0.8, 0.8]]), np.array([0.7, 0.6]), np.array([0, 0]))
    boxes, scores, labels = fuse([one, two], None, 0.55, 0.0, "avg")
    # the two class-0 boxes merge, corners weighted by score; the class-1 and class-0 boxes at 0.6 do not
    assert len(boxes) == 3 and labels.tolist().count(0) == 2 and (np.diff(scores) <= 0).all()
    merged = boxes[(labels == 0) & (boxes[:, 0] < 0.5)][0]
    assert np.allclose(merged[0], (0.1 * 0.9 + 0.12 * 0.7) / 1.6, atol=1e-6)
    assert np.isclose(scores[labels == 1][0], 0.8 / 2)  # found by one view of two: half its score
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    assert len(fuse([empty, empty], None, 0.55, 0.0, "avg")[0]) == 0


class _BrightColumn(torch.nn.Module):
    """A stand-in detector: one confident box on the brightest of 8 vertical strips of its input."""

    num_classes = 1

    def forward(self, x):
        b = x.shape[0]
        strips = x.mean(dim=(1, 2)).reshape(b, 8, -1).mean(-1)
        anchors = torch.stack([torch.arange(8) / 8, torch.zeros(8), torch.arange(1, 9) / 8, torch.full((8,), 0.5)], 1)
        logits = torch.tensor([5.0, -5.0]).repeat(b, 8, 1)  # background everywhere
        logits[torch.arange(b), strips.argmax(1)] = torch.tensor([-5.0, 5.0])
        return {"cls_logits": logits, "box_offsets": torch.zeros(b, 8, 4), "anchors": anchors}


def test_flipped_view_maps_back_onto_the_object(tmp_path):
    import cv2

    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 8:16] = 255  # bright strip 1 of 8
    cv2.imwrite(str(tmp_path / "a.png"), img)
    split = Split("t", ["a.png"], [tmp_path / "a.png"], [np.zeros((0, 4), np.float32)], [np.zeros(0, np.int64)],
                  [(64, 64)], False)
    cfg = DetectConfig(model={"img_size": 64}, train={"augment": {"hflip": 0.5}}, predict={"batch_size": 1})
    plain = predict_split(_BrightColumn(), split, cfg, torch.device("cpu"), 0.3)[0]
    fused = predict_split(_BrightColumn(), split, cfg, torch.device("cpu"), 0.3, tta=True)[0]
    assert np.allclose(plain.boxes, [[8, 0, 16, 32]], atol=1e-4)
    # the flipped view saw the strip on the right; mapped back, it agrees, and fusion keeps one box
    assert len(fused.boxes) == 1 and np.allclose(fused.boxes, plain.boxes, atol=1e-3)
    # two models (members) that agree give one box too, at full score
    two = predict_split(_BrightColumn(), split, cfg, torch.device("cpu"), 0.3, tta=True,
                        members=[(_BrightColumn(), cfg, 1.0), (_BrightColumn(), cfg, 2.0)])[0]
    assert len(two.boxes) == 1 and np.isclose(two.scores[0], fused.scores[0], atol=1e-4)
