"""Anchors, matching, box coding, loss and NMS of the detection track."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.detect.anchors import level_sizes, make_anchors, multibox_prior
from pipeline.detect.boxes import decode, encode, match_anchors, targets_for
from pipeline.detect.config import DetectModelConfig
from pipeline.detect.loss import MultiBoxLoss
from pipeline.detect.models import create_detector
from pipeline.detect.postprocess import postprocess

COURSE_SIZES = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]


def test_multibox_prior_matches_course_example():
    # the course: a 561 x 728 image, sizes 0.75/0.5/0.25, ratios 1/2/0.5 -> 5 boxes per pixel
    boxes = multibox_prior(561, 728, [0.75, 0.5, 0.25], [1, 2, 0.5], aspect=561 / 728)
    assert boxes.shape == (561 * 728 * 5, 4) == (2042040, 4)
    centre = boxes.reshape(561, 728, 5, 4)[250, 250, 0]
    assert torch.allclose(centre, torch.tensor([0.06, 0.07, 0.63, 0.82]), atol=0.005)


def test_tinyssd_has_5444_anchors_at_256():
    assert level_sizes(5, 0.2, 0.88) == COURSE_SIZES
    model = create_detector(DetectModelConfig(arch="tiny_ssd", img_size=256), num_classes=1).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 256, 256))
    assert out["anchors"].shape == (5444, 4)
    assert out["cls_logits"].shape == (2, 5444, 2)
    assert out["box_offsets"].reshape(2, -1).shape == (2, 21776)


def test_torchvision_default_boxes():
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    a = make_anchors("torchvision", shapes, 0.2, 0.9, [1, 2, 0.5], (64, 64))
    assert a.shape == (4 * (64 + 16 + 4 + 1), 4)  # 2 squares + (2, 1/2) per location
    first = a[:4]
    centre = (first[:, :2] + first[:, 2:]) / 2
    assert torch.allclose(centre, torch.full_like(centre, 0.5 / 8))
    assert make_anchors("torchvision", shapes, 0.2, 0.9, [1, 2, 0.5], (64, 64)) is a  # cached


def test_timm_ssd_features_only():
    cfg = DetectModelConfig(arch="timm_ssd", backbone="resnet10t", img_size=64, extra_blocks=2, extra_channels=32)
    model = create_detector(cfg, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    # strides 16 and 32 of the backbone, then two stride-2 blocks: 4x4, 2x2, 1x1, 1x1
    assert out["anchors"].shape[0] == 4 * (16 + 4 + 1 + 1)
    assert out["cls_logits"].shape == (1, out["anchors"].shape[0], 4)


def test_unknown_backbone_names_close_timm_models():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="resnet18"):
        create_detector(DetectModelConfig(arch="timm_ssd", backbone="resnet18x"), 2)


def test_every_box_gets_an_anchor_and_padding_is_ignored():
    anchors = make_anchors("d2l", [(8, 8), (4, 4), (2, 2), (1, 1)], 0.2, 0.88, [1, 2, 0.5], (64, 64))
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4, 6, 2, generator=g) * 0.8
    boxes = torch.cat([xy, xy + 0.02 + torch.rand(4, 6, 2, generator=g) * 0.2], -1).clamp(max=1)
    boxes[0, 1] = boxes[0, 0]  # identical boxes both need an anchor of their own
    boxes[1, 2] = torch.tensor([0.5, 0.5, 0.51, 0.51])  # tiny: overlaps no anchor by 0.5
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[2, 4:] = False
    valid[3, :] = False  # an image without boxes
    matched = match_anchors(anchors, boxes, valid, 0.5)
    assert matched.shape == (4, anchors.shape[0])
    for b in range(4):
        for n in range(6):
            count = int((matched[b] == n).sum())
            assert count >= 1 if valid[b, n] else count == 0
    assert (matched[3] == -1).all()
    # batched matching equals matching each image alone
    for b in range(3):
        alone = match_anchors(anchors, boxes[b:b + 1], valid[b:b + 1], 0.5)
        assert torch.equal(alone[0], matched[b])


def test_matching_threshold_adds_anchors():
    anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.05, 0.0, 0.55, 0.5], [0.6, 0.6, 1.0, 1.0]])
    gt = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])
    m = match_anchors(anchors, gt, torch.ones(1, 1, dtype=torch.bool), 0.5)
    assert m.tolist() == [[0, 0, -1]]  # best anchor plus the one above 0.5 IoU; the far one background


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(1)
    a_xy = torch.rand(50, 2, generator=g) * 0.7
    anchors = torch.cat([a_xy, a_xy + 0.05 + torch.rand(50, 2, generator=g) * 0.25], -1)
    b_xy = torch.rand(50, 2, generator=g) * 0.7
    boxes = torch.cat([b_xy, b_xy + 0.01 + torch.rand(50, 2, generator=g) * 0.3], -1)
    off = encode(anchors, boxes)
    assert torch.allclose(decode(anchors, off), boxes, atol=1e-5)
    # weights (10, 10, 5, 5): a centre shift of one tenth of the anchor width is offset 1
    a = torch.tensor([[0.0, 0.0, 0.4, 0.2]])
    assert torch.allclose(encode(a, a + torch.tensor([0.04, 0.0, 0.04, 0.0])), torch.tensor([[1.0, 0, 0, 0]]), atol=1e-4)


def test_targets_label_background_zero():
    anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    gt = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]])
    cls_t, box_t = targets_for(anchors, gt, torch.tensor([[2, -1]]))
    assert cls_t.tolist() == [[3, 0]]
    assert torch.allclose(box_t, torch.zeros_like(box_t), atol=1e-4)


def test_hard_negative_mining_uses_three_negatives_per_positive():
    cls_t = torch.zeros(2, 100, dtype=torch.long)
    cls_t[0, :5] = 1
    cls_t[1, :2] = 2
    logits = torch.zeros(2, 100, 3)  # every anchor's CE is ln 3
    box = torch.zeros(2, 100, 4)
    out = MultiBoxLoss("hard_negative", neg_pos_ratio=3)(logits, box, cls_t, box)
    assert out["cls_loss"].item() == pytest.approx(4 * math.log(3), rel=1e-5)  # (7 + 21) * ln3 / 7
    plain = MultiBoxLoss("plain")(logits, box, cls_t, box)
    assert plain["cls_loss"].item() == pytest.approx(math.log(3), rel=1e-5)
    focal = MultiBoxLoss("focal")(logits, box, cls_t, box)
    assert torch.isfinite(focal["loss"]) and focal["cls_loss"] > 0


def _logits_for(scores: list[list[float]]) -> torch.Tensor:
    # log-probabilities give exactly these softmax scores (background takes the rest)
    p = torch.tensor(scores)
    return torch.log(torch.cat([1 - p.sum(-1, keepdim=True), p], -1)).unsqueeze(0)


def test_per_class_nms_keeps_overlapping_boxes_of_other_classes():
    anchors = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.11, 0.1, 0.51, 0.5]])
    logits = _logits_for([[0.9, 0.0], [0.0, 0.8], [0.7, 0.0]])  # class 0, class 1, class 0 again
    offsets = torch.zeros(1, 3, 4)
    kept = postprocess(logits, offsets, anchors, score_threshold=0.3, nms_iou=0.5)[0]
    assert sorted(kept["labels"].tolist()) == [0, 1]  # the second class-0 box is suppressed
    assert kept["scores"][0] == pytest.approx(0.9, abs=1e-4)
    agnostic = postprocess(logits, offsets, anchors, score_threshold=0.3, nms_iou=0.5, class_agnostic=True)[0]
    assert agnostic["labels"].tolist() == [0]


def test_postprocess_threshold_topk_and_max_detections():
    anchors = make_anchors("d2l", [(4, 4)], 0.2, 0.88, [1, 2, 0.5], (32, 32))
    logits = torch.randn(2, anchors.shape[0], 4, generator=torch.Generator().manual_seed(0)) * 3
    dets = postprocess(logits, torch.zeros(2, anchors.shape[0], 4), anchors, score_threshold=0.2,
                       pre_nms_topk=10, max_detections=5)
    for d in dets:
        assert len(d["boxes"]) <= 5 and (d["scores"] > 0.2).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= 1).all()


def test_pairwise_iou_equals_torchvision_box_iou():
    from torchvision.ops import box_iou

    from pipeline.detect.boxes import pairwise_iou

    g = torch.Generator().manual_seed(3)
    xy = torch.rand(40, 2, generator=g)
    a = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 0.5], -1)
    xy = torch.rand(300, 2, generator=g)
    b = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 0.3], -1)
    assert torch.allclose(pairwise_iou(a, b), box_iou(a, b), atol=1e-6)


def _greedy_reference(anchors, boxes, thr):
    """The course's assignment for one image: threshold, then the global best pair, row and column out."""
    from torchvision.ops import box_iou

    iou = box_iou(anchors, boxes)
    best, idx = iou.max(dim=1)
    out = torch.where(best >= thr, idx, torch.full_like(idx, -1))
    work = iou.clone()
    for _ in range(boxes.shape[0]):
        k = int(work.argmax())
        a, n = divmod(k, boxes.shape[0])
        out[a] = n
        work[:, n] = -1.0
        work[a, :] = -1.0
    return out


def test_batched_matching_equals_the_course_greedy_assignment_with_conflicts():
    anchors = make_anchors("d2l", [(8, 8), (4, 4), (2, 2), (1, 1)], 0.2, 0.88, [1, 2, 0.5], (64, 64))
    g = torch.Generator().manual_seed(5)
    b, n = 16, 8
    xy = torch.rand(b, n, 2, generator=g) * 0.3 + 0.3  # crowded: boxes contest the same anchors
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(b, n, 2, generator=g) * 0.2], -1).clamp(max=1)
    boxes[0, 1] = boxes[0, 2] = boxes[0, 0]  # three identical boxes need three rounds
    valid = torch.rand(b, n, generator=g) > 0.2
    valid[0, :3] = True
    matched = match_anchors(anchors, boxes, valid, 0.5)
    for i in range(b):
        keep = valid[i].nonzero().flatten()
        ref = _greedy_reference(anchors, boxes[i, keep], 0.5)
        ref = torch.where(ref >= 0, keep[ref.clamp(min=0)], ref)  # back to padded box indices
        assert torch.equal(matched[i], ref), i


def test_batched_postprocess_equals_one_image_at_a_time():
    from torchvision.ops import batched_nms

    from pipeline.detect.boxes import decode

    anchors = make_anchors("d2l", [(8, 8), (4, 4), (2, 2), (1, 1)], 0.2, 0.88, [1, 2, 0.5], (64, 64))
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, anchors.shape[0], 4, generator=g) * 3
    logits[3, :, 1:] = -20  # an image with nothing above the threshold
    offsets = torch.randn(5, anchors.shape[0], 4, generator=g) * 0.3
    for agnostic in (False, True):
        got = postprocess(logits, offsets, anchors, score_threshold=0.3, nms_iou=0.5, pre_nms_topk=60,
                          max_detections=7, class_agnostic=agnostic)
        for i in range(5):  # the same steps for one image alone
            scores = logits[i].softmax(-1)[:, 1:]
            boxes = decode(anchors, offsets[i]).clamp(0, 1)
            flat = scores.flatten()
            keep = (flat > 0.3).nonzero().flatten()
            keep = keep[flat[keep].topk(min(60, len(keep))).indices]
            bx, sc, lb = boxes[keep // 3], flat[keep], keep % 3
            ok = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
            bx, sc, lb = bx[ok], sc[ok], lb[ok]
            kept = batched_nms(bx, sc, torch.zeros_like(lb) if agnostic else lb, 0.5)[:7]
            assert torch.equal(got[i]["labels"], lb[kept]) and torch.allclose(got[i]["scores"], sc[kept])
            assert torch.allclose(got[i]["boxes"], bx[kept])
        assert len(got[3]["boxes"]) == 0 and sum(len(d["boxes"]) for d in got) > 10
