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


def _grid_anchors(style: str):
    from pipeline.detect.anchors import explicit_anchors
    from pipeline.detect.boxes import AnchorGrid

    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    if style == "auto":
        wh = [[[0.1, 0.2], [0.3, 0.15], [0.2, 0.2]]] * len(shapes)
        anchors = explicit_anchors(shapes, wh)
    else:
        anchors = make_anchors(style, shapes, 0.2, 0.88, [1, 2, 0.5], (64, 64))
    k = anchors.shape[0] // sum(h * w for h, w in shapes)
    return anchors, AnchorGrid.build(anchors, [(h, w, k) for h, w in shapes])


@pytest.mark.parametrize("style", ["d2l", "torchvision", "auto"])
def test_grid_iou_equals_pairwise_iou_and_box_iou_to_the_bit(style):
    from torchvision.ops import box_iou

    from pipeline.detect.boxes import AnchorGrid, pairwise_iou

    anchors, grid = _grid_anchors(style)
    assert grid is not None
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(30, 2, generator=g) * 0.8
    boxes = torch.cat([xy, xy + 0.01 + torch.rand(30, 2, generator=g) * 0.4], -1).clamp(max=1)
    boxes[3] = 0  # a padding row
    ref = box_iou(boxes, anchors)
    assert torch.equal(pairwise_iou(boxes, anchors), ref)
    assert torch.equal(grid.iou(boxes), ref) and torch.equal(grid.iou(boxes, reuse=True), ref)
    # anchors that are not grids (shuffled) get no grid, and matching falls back to pairwise_iou
    assert AnchorGrid.build(anchors[torch.randperm(len(anchors), generator=g)],
                            [(lv.h, lv.w, lv.k) for lv in grid.levels]) is None


@pytest.mark.parametrize(("sync_free", "n"), [(False, 8), (True, 8), (True, 12)])
def test_batched_matching_equals_the_course_greedy_assignment_with_conflicts(sync_free, n):
    anchors, grid = _grid_anchors("d2l")
    g = torch.Generator().manual_seed(5)
    b = 48
    xy = torch.rand(b, n, 2, generator=g) * 0.3 + 0.3  # crowded: boxes contest the same anchors
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(b, n, 2, generator=g) * 0.2], -1).clamp(max=1)
    boxes[0, 1] = boxes[0, 2] = boxes[0, 0]  # three identical boxes need three rounds
    valid = torch.rand(b, n, generator=g) > 0.2
    valid[0, :3] = True
    valid[1] = False  # an image without boxes
    matched = match_anchors(anchors, boxes, valid, 0.5, grid, sync_free=sync_free)
    assert torch.equal(match_anchors(anchors, boxes, valid, 0.5, None, sync_free=not sync_free), matched)
    for i in range(b):
        keep = valid[i].nonzero().flatten()
        if len(keep) == 0:
            assert (matched[i] == -1).all()
            continue
        ref = _greedy_reference(anchors, boxes[i, keep], 0.5)
        ref = torch.where(ref >= 0, keep[ref.clamp(min=0)], ref)  # back to padded box indices
        assert torch.equal(matched[i], ref), i


def test_greedy_chain_a_box_that_loses_its_anchor_takes_the_next_best_pair():
    """Box 1 loses its best anchor (1) to box 2, then takes anchor 3 from box 0, whose best anchor
    it was (box 1 overlaps it more): the greedy's order, which one round of best anchors gets wrong."""
    anchors = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.3, 0.0, 0.7, 0.4], [0.0, 0.5, 0.4, 0.9], [0.5, 0.5, 0.9, 0.9]])
    gt = torch.tensor([[[0.35, 0.35, 0.7, 0.6], [0.5, 0.15, 0.95, 0.6], [0.4, 0.15, 0.85, 0.45]]])
    ref = _greedy_reference(anchors, gt[0], 0.5)
    assert ref.tolist() == [-1, 2, 0, 1]
    for sync_free in (False, True):
        got = match_anchors(anchors, gt, torch.ones(1, 3, dtype=torch.bool), 0.5, sync_free=sync_free)
        assert got[0].tolist() == ref.tolist()


@pytest.mark.parametrize("style", ["d2l", "torchvision"])
def test_targets_are_encode_of_the_matched_boxes_on_both_paths(style):
    from torchvision.ops import box_iou  # noqa: F401  (the reference below is written from scratch)

    anchors, grid = _grid_anchors(style)
    g = torch.Generator().manual_seed(6)
    xy = torch.rand(5, 6, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(5, 6, 2, generator=g) * 0.3], -1).clamp(max=1)
    labels = torch.randint(0, 3, (5, 6), generator=g)
    labels[2, 4:] = -1
    labels[4] = -1
    matched = match_anchors(anchors, boxes, labels >= 0, 0.5)
    pos = matched >= 0
    idx = matched.clamp(min=0)
    want_cls = torch.where(pos, torch.gather(labels, 1, idx) + 1, 0)
    want_box = encode(anchors.unsqueeze(0), torch.gather(boxes, 1, idx.unsqueeze(-1).expand(-1, -1, 4)))
    want_box = want_box * pos.unsqueeze(-1)
    for kw in ({}, {"grid": grid}, {"grid": grid, "sync_free": True}, {"sync_free": True}):
        cls_t, box_t = targets_for(anchors, boxes, labels, 0.5, **kw)
        assert torch.equal(cls_t, want_cls) and torch.equal(box_t, want_box), kw
    assert (want_cls[4] == 0).all() and pos.sum() > 20


def _masked_loss_reference(logits, offsets, cls_t, box_t, ratio=3.0):
    """The hard-negative SSD loss written with boolean selections, as before it was made sync-free."""
    import torch.nn.functional as F

    pos = cls_t > 0
    num_pos = pos.sum().clamp(min=1).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), cls_t.reshape(-1), reduction="none").view(cls_t.shape)
    neg = ce.detach().masked_fill(pos, float("-inf"))
    n_neg = (pos.sum(1, keepdim=True) * ratio).long().clamp(min=1)
    hard = (neg.argsort(1, descending=True).argsort(1) < n_neg) & ~pos
    cls = (ce[pos].sum() + ce[hard].sum()) / num_pos
    box = F.smooth_l1_loss(offsets[pos], box_t[pos], reduction="sum") / num_pos
    return cls + box


def test_loss_without_selections_equals_the_selecting_one_values_and_gradients():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 400, 4, generator=g, requires_grad=True)
    offsets = torch.randn(3, 400, 4, generator=g, requires_grad=True)
    cls_t = torch.where(torch.rand(3, 400, generator=g) < 0.05, torch.randint(1, 4, (3, 400), generator=g), 0)
    cls_t[1] = 0  # an image without positives still mines one negative
    box_t = torch.randn(3, 400, 4, generator=g) * (cls_t > 0).unsqueeze(-1)
    want = _masked_loss_reference(logits, offsets, cls_t, box_t)
    got = MultiBoxLoss("hard_negative")(logits, offsets, cls_t, box_t)["loss"]
    assert torch.allclose(got, want, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (logits, offsets)), torch.autograd.grad(want, (logits, offsets))):
        assert torch.allclose(a, b, atol=1e-7)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that make the host wait for the device on a GPU: reading a value
    (``.item()``, ``bool()``), and results whose size depends on the data (``nonzero``,
    boolean-mask indexing): what ``torch.cuda.set_sync_debug_mode("error")`` catches there."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
               "aten::_unique2", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masks = [a for a in (args[1] if name.startswith("aten::index") and len(args) > 1 else [])
                 if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
        if name in self.SYNCING or masks:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_detection_matching_and_loss_read_nothing_back_off_the_cpu():
    model = create_detector(DetectModelConfig(arch="tiny_ssd", img_size=64), num_classes=2)
    g = torch.Generator().manual_seed(8)
    xy = torch.rand(2, 5, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(2, 5, 2, generator=g) * 0.3], -1)
    labels = torch.randint(0, 2, (2, 5), generator=g)
    labels[0, 3:] = -1
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64, generator=g))
    criterion = MultiBoxLoss("hard_negative")
    want = criterion(out["cls_logits"], out["box_offsets"], *targets_for(out["anchors"], boxes, labels, 0.5))
    with _HostReads() as reads:  # what detection's loss function runs off the CPU (sync_free)
        cls_t, box_t = targets_for(out["anchors"], boxes, labels, 0.5, grid=out["anchor_grid"], sync_free=True)
        got = criterion(out["cls_logits"], out["box_offsets"], cls_t, box_t)
    assert reads.seen == []
    assert all(isinstance(v, torch.Tensor) for v in got.values())
    assert torch.allclose(got["loss"], want["loss"], rtol=1e-6) and (cls_t > 0).sum() >= 8
    with _HostReads() as reads:  # the CPU path reads back (free there): the check sees it
        targets_for(out["anchors"], boxes, labels, 0.5, grid=out["anchor_grid"], sync_free=False)
    assert "aten::nonzero" in reads.seen


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
