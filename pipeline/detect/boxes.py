"""Box coding (weights 10, 10, 5, 5) and anchor matching, vectorised over the batch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torchvision.ops import box_convert

WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# As torchvision's BoxCoder: stops exp() overflowing on wild early predictions.
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def encode(anchors: torch.Tensor, boxes: torch.Tensor, weights=WEIGHTS, eps: float = 1e-6) -> torch.Tensor:
    """Offsets that move ``anchors`` onto ``boxes`` (both xyxy, broadcastable)."""
    a = box_convert(anchors, "xyxy", "cxcywh")
    b = box_convert(boxes, "xyxy", "cxcywh")
    wx, wy, ww, wh = weights
    dxy = (b[..., :2] - a[..., :2]) / a[..., 2:] * a.new_tensor([wx, wy])
    dwh = torch.log((b[..., 2:] + eps) / a[..., 2:]) * a.new_tensor([ww, wh])
    return torch.cat([dxy, dwh], dim=-1)


def decode(anchors: torch.Tensor, offsets: torch.Tensor, weights=WEIGHTS) -> torch.Tensor:
    """Inverse of :func:`encode`: xyxy boxes from anchors and predicted offsets."""
    a = box_convert(anchors, "xyxy", "cxcywh").to(offsets.dtype)
    wx, wy, ww, wh = weights
    cxy = offsets[..., :2] / offsets.new_tensor([wx, wy]) * a[..., 2:] + a[..., :2]
    dwh = (offsets[..., 2:] / offsets.new_tensor([ww, wh])).clamp(max=_MAX_LOG_SCALE)
    wh_ = torch.exp(dwh) * a[..., 2:]
    return box_convert(torch.cat([cxy, wh_], dim=-1), "cxcywh", "xyxy")


def pairwise_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of ``(M, 4)`` boxes with ``(A, 4)`` anchors, ``(M, A)``, as ``torchvision.ops.box_iou``.

    Written out on coordinate columns with in-place steps, without ``box_iou``'s ``(M, A, 2)``
    temporaries, in the same arithmetic (the values are box_iou's, tests/test_detect_ops.py).
    Anchors laid out on grids go faster through :meth:`AnchorGrid.iou`.
    """
    bx0, by0, bx1, by1 = (c.unsqueeze(1) for c in boxes.unbind(-1))
    ax0, ay0, ax1, ay1 = anchors.unbind(-1)
    iw = torch.minimum(bx1, ax1).sub_(torch.maximum(bx0, ax0)).clamp_(min=0)
    ih = torch.minimum(by1, ay1).sub_(torch.maximum(by0, ay0)).clamp_(min=0)
    inter = iw.mul_(ih)
    union = ((bx1 - bx0) * (by1 - by0)) + ((ax1 - ax0) * (ay1 - ay0))
    return inter.div_(union.sub_(inter))


@dataclass(frozen=True)
class _Level:
    start: int
    h: int
    w: int
    k: int
    x0: torch.Tensor  # (W, K): the x-interval of anchor k in column x (the same on every row)
    x1: torch.Tensor
    y0: torch.Tensor  # (H, K): the y-interval of anchor k in row y (the same in every column)
    y1: torch.Tensor


@dataclass(frozen=True)
class AnchorGrid:
    """What matching needs of a model's anchors, computed once: their areas, centres and sizes,
    and their layout as per-level grids (location-major, ``k`` anchors per cell, as
    :func:`pipeline.detect.anchors.make_anchors` builds all three styles).

    On such a grid an anchor's x-interval depends only on its column and shape, its y-interval
    only on its row and shape, so the intersection with a box is an outer product of one
    ``(W, K)`` and one ``(H, K)`` overlap: :meth:`iou` makes one pass over the ``(M, A)`` output
    for the intersections and three for union and division, where :func:`pairwise_iou` makes
    about twelve. The arithmetic is the same, so the values are equal to the last bit.
    """

    anchors: torch.Tensor
    area: torch.Tensor     # (A,)
    centre: torch.Tensor   # (A, 2)
    size: torch.Tensor     # (A, 2)
    levels: tuple[_Level, ...]
    _work: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def build(anchors: torch.Tensor, levels) -> AnchorGrid | None:
        """The grid of ``anchors`` given per level ``(height, width, anchors per cell)``, or None
        when they do not lie on such grids (matching then takes :func:`pairwise_iou`)."""
        levels = [tuple(int(v) for v in lv) for lv in levels]
        if sum(h * w * k for h, w, k in levels) != anchors.shape[0] or anchors.ndim != 2:
            return None
        out, start = [], 0
        for h, w, k in levels:
            g = anchors[start:start + h * w * k].view(h, w, k, 4)
            xs, ys = g[..., 0::2], g[..., 1::2]
            if not (torch.equal(xs, xs[:1].expand_as(xs)) and torch.equal(ys, ys[:, :1].expand_as(ys))):
                return None
            out.append(_Level(start, h, w, k, g[0, :, :, 0].contiguous(), g[0, :, :, 2].contiguous(),
                              g[:, 0, :, 1].contiguous(), g[:, 0, :, 3].contiguous()))
            start += h * w * k
        ax0, ay0, ax1, ay1 = anchors.unbind(-1)
        c = box_convert(anchors, "xyxy", "cxcywh")
        return AnchorGrid(anchors, (ax1 - ax0) * (ay1 - ay0), c[:, :2].contiguous(), c[:, 2:].contiguous(),
                          tuple(out))

    def iou(self, boxes: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """``pairwise_iou(boxes, self.anchors)``, the same values, in fewer passes.

        Args:
            reuse: write into buffers kept for the next call of the same size (no fresh pages
                to fault in on the CPU); the result is then only valid until that call.
        """
        m, num_a = boxes.shape[0], self.anchors.shape[0]
        bx0, by0, bx1, by1 = (c.view(m, 1, 1) for c in boxes.unbind(-1))
        if reuse:
            wkey = (m, boxes.dtype, boxes.device)
            if wkey not in self._work:
                self._work.clear()
                self._work[wkey] = boxes.new_empty(2, m, num_a)
            out, union = self._work[wkey].unbind(0)
        else:
            out, union = boxes.new_empty(m, num_a), None
        for lv in self.levels:
            iw = torch.minimum(bx1, lv.x1).sub_(torch.maximum(bx0, lv.x0)).clamp_(min=0)  # (M, W, K)
            ih = torch.minimum(by1, lv.y1).sub_(torch.maximum(by0, lv.y0)).clamp_(min=0)  # (M, H, K)
            torch.mul(iw.unsqueeze(1), ih.unsqueeze(2),
                      out=out[:, lv.start:lv.start + lv.h * lv.w * lv.k].view(m, lv.h, lv.w, lv.k))
        union = torch.add(((bx1 - bx0) * (by1 - by0)).view(m, 1), self.area, out=union)
        return out.div_(union.sub_(out))


def match_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor,
                  iou_threshold: float = 0.5, grid: AnchorGrid | None = None,
                  sync_free: bool | None = None) -> torch.Tensor:
    """Assign each anchor a ground-truth box index, or -1 for background: the course's assignment.

    Every valid box gets an anchor by the course's greedy rule (the pair of highest IoU over all
    boxes and anchors, then the next highest among the boxes and anchors left, ...; ties to the
    lower anchor index, then the lower box index); then every other anchor whose best IoU reaches
    ``iou_threshold`` takes its best box (the lower index among equals).

    The greedy rule is computed in rounds over the whole padded batch at once: a pair is taken as
    soon as it is the best of both its box's and its anchor's remaining pairs (such a pair is
    always in the greedy answer). The first rounds read each box's best anchor and that anchor's
    column of IoUs, ``(B, N, N)``: a box takes its best anchor once no box still waiting overlaps
    it more. Boxes whose best anchor went to another go through further rounds among their ``N``
    best anchors (``N`` = padded boxes per image), which always hold the greedy's anchor for them,
    since at most ``N - 1`` anchors are taken before it. Exact unless equal IoUs straddle a box's
    ``N``-th best anchor and it reaches that far (``topk`` picks among equals freely).

    No Python loop over images or boxes. ``sync_free`` (default: on any device but the CPU) keeps
    every step on the device, the host never waiting for it: the per-anchor best box is taken
    densely and the ``N - 1`` further rounds always run, on small tensors (beyond
    ``SYNC_FREE_ROUNDS`` + 1 boxes per image the host asks, once per later round, whether any box
    still waits: one read-back costs less than ~20 kernel launches a round). On the CPU,
    where reading a value back costs nothing, the best box is taken only for anchors above the
    threshold and rounds run only while they settle something. Both give the same answer.

    Args:
        anchors: ``(A, 4)``.
        gt_boxes: ``(B, N, 4)`` padded boxes.
        gt_valid: ``(B, N)`` bool, False on padding rows (they are never matched).
        grid: ``AnchorGrid.build(anchors, levels)`` when the model gives it: the same result, faster.

    Returns:
        ``(B, A)`` long tensor of box indices into dim 1 of ``gt_boxes``.
    """
    b, n = gt_valid.shape
    num_a = anchors.shape[0]
    device = anchors.device
    if n == 0:
        return torch.full((b, num_a), -1, dtype=torch.long, device=device)
    if sync_free is None:
        sync_free = device.type != "cpu"
    # padding rows become empty boxes: IoU 0 with every anchor, so below any threshold (> 0)
    boxes = (gt_boxes * gt_valid.unsqueeze(-1)).reshape(-1, 4)
    iou = (grid.iou(boxes, reuse=True) if grid is not None else pairwise_iou(boxes, anchors)).view(b, n, num_a)
    spare = b * num_a  # writes that must not land go to a slot past the end: no boolean indexing
    flat = torch.full((spare + 1,), -1, dtype=torch.long, device=device)

    # every anchor at or above the threshold: its best box (amax + first equal: max(dim=1) with
    # indices is ~10x slower on the CPU)
    best_iou = iou.amax(dim=1)  # (B, A)
    above = best_iou >= iou_threshold
    if sync_free:
        rev = torch.arange(n, 0, -1, device=device, dtype=iou.dtype).view(1, n, 1)
        best_gt = n - torch.where(iou == best_iou.unsqueeze(1), rev, 0).amax(dim=1).long()
        flat[:-1].view(b, num_a).copy_(torch.where(above, best_gt, -1))
    else:
        bi, ai = above.nonzero(as_tuple=True)
        flat[bi * num_a + ai] = iou[bi, :, ai].max(dim=1).indices

    # rounds on each box's best anchor: a box takes it while it is free and no box still waiting
    # overlaps it more (or as much, with a lower index); one round on a GPU, as many as help on the CPU
    n_range = torch.arange(n, device=device)
    gt_anchor = iou.max(dim=2).indices  # (B, N): each box's best anchor (the lowest index among equals)
    column = iou.gather(2, gt_anchor.unsqueeze(1).expand(b, n, n))  # [b, m, j]: box m at box j's best anchor
    key = torch.arange(b, device=device).unsqueeze(1) * num_a + gt_anchor
    won_keys = torch.full_like(key, spare)
    pending = gt_valid
    for _ in range(1 if sync_free else n):
        free = (key.unsqueeze(2) != won_keys.unsqueeze(1)).all(dim=2)
        best = torch.where(pending.unsqueeze(2), column, -1.0).max(dim=1).indices
        win = pending & free & (best == n_range)
        won_keys = torch.where(win, key, won_keys)
        pending = pending & ~win
        if not sync_free and not (bool(win.any()) and bool(pending.any())):
            break
    flat.scatter_(0, won_keys.view(-1), n_range.expand(b, n).reshape(-1))
    # boxes whose best anchor went to another: further rounds among their N best anchors
    if n > 1:
        if sync_free:
            _later_rounds(iou, flat, pending, won_keys, torch.arange(b, device=device), rounds=n - 1)
        elif bool(pending.any()):
            imgs = pending.any(dim=1).nonzero().flatten()
            _later_rounds(iou[imgs], flat, pending[imgs], won_keys[imgs], imgs, rounds=n - 1, early_exit=True)
    return flat[:-1].view(b, num_a)


# Sync-free rounds before the host first asks whether any box still waits: chains of conflicts are
# rarely longer, and with many boxes per image (N - 1 rounds of ~20 small kernels each) one read-back
# costs less than launching every round.
SYNC_FREE_ROUNDS = 8


def _later_rounds(iou: torch.Tensor, flat: torch.Tensor, pending: torch.Tensor, won_keys: torch.Tensor,
                  imgs: torch.Tensor, rounds: int, early_exit: bool = False) -> None:
    """The greedy rounds after the first for the images ``imgs`` (``iou`` and ``pending`` are
    theirs), among each box's ``N`` best anchors; writes into ``flat``, the ``(B * A + 1,)``
    assignment with its spare last slot, whose anchors taken so far are ``won_keys``.

    ``early_exit`` (the CPU) stops as soon as no box waits; otherwise the first
    :data:`SYNC_FREE_ROUNDS` rounds run without asking (no host sync for up to that many + 1
    boxes per image), and only later ones ask."""
    p, n, num_a = iou.shape
    device = iou.device
    spare = flat.shape[0] - 1
    k = min(n, num_a)
    cand_v, cand_a = iou.topk(k, dim=2)  # (p, N, K)
    # equal IoUs in the order the greedy takes them: lower anchor index first
    order = cand_a.argsort(dim=2)
    cand_v, cand_a = cand_v.gather(2, order), cand_a.gather(2, order)
    cand_v, order = cand_v.sort(dim=2, descending=True, stable=True)
    cand_a = cand_a.gather(2, order)
    key = cand_a + imgs.view(p, 1, 1) * num_a  # into flat
    local = cand_a + torch.arange(p, device=device).view(p, 1, 1) * num_a  # into this call's (p * A) tables
    taken = torch.zeros(spare + 1, dtype=torch.bool, device=device)
    taken[won_keys.reshape(-1)] = True
    n_range = torch.arange(n, device=device).view(1, n, 1).expand(p, n, k)
    low = torch.tensor(-1.0, dtype=cand_v.dtype, device=device)
    for r in range(rounds):  # at most one per box
        if (early_exit or r >= SYNC_FREE_ROUNDS) and not bool(pending.any()):
            break
        ok = pending.unsqueeze(-1) & ~taken[key]  # (p, N, K) pairs still open
        # each anchor's best open pair (highest IoU, then lowest box index) ...
        col = torch.full((p * num_a,), -1.0, dtype=cand_v.dtype, device=device)
        col.scatter_reduce_(0, local.reshape(-1), torch.where(ok, cand_v, low).reshape(-1), "amax")
        top = ok & (cand_v == col[local])
        first = torch.full((p * num_a,), n, dtype=torch.long, device=device)
        first.scatter_reduce_(0, local.reshape(-1), torch.where(top, n_range, n).reshape(-1), "amin")
        # ... that is also its box's best open pair (the first open candidate)
        j = ok.to(torch.uint8).argmax(dim=2, keepdim=True)
        choice = local.gather(2, j).squeeze(2)  # (p, N)
        win = pending & top.gather(2, j).squeeze(2) & (first[choice] == n_range[..., 0])
        target = torch.where(win, key.gather(2, j).squeeze(2), spare).view(-1)
        flat.scatter_(0, target, n_range[..., 0].reshape(-1))
        taken[target] = True
        pending = pending & ~win


def targets_for(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                iou_threshold: float = 0.5, grid: AnchorGrid | None = None,
                sync_free: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class targets (0 = background, k + 1 = class k) and box offsets for every anchor.

    The offsets are :func:`encode`'s, from each box's centre and size taken once per box and the
    anchors' taken once per grid, rather than from ``(B, A, 4)`` gathered corner boxes; the values
    are the same to the last bit. With ``sync_free`` (default: off the CPU) every anchor is
    encoded and masked, with no host sync; on the CPU only the matched anchors are (a few percent).

    Args:
        gt_labels: ``(B, N)`` class ids, -1 on padding rows.
        grid, sync_free: see :func:`match_anchors`.

    Returns:
        ``cls_t`` ``(B, A)`` long and ``box_t`` ``(B, A, 4)`` (zeros where background).
    """
    if sync_free is None:
        sync_free = anchors.device.type != "cpu"
    b, n = gt_labels.shape
    num_a = anchors.shape[0]
    matched = match_anchors(anchors, gt_boxes, gt_labels >= 0, iou_threshold, grid, sync_free)
    if grid is None:
        a = box_convert(anchors, "xyxy", "cxcywh")
        a_centre, a_size = a[:, :2], a[:, 2:]
    else:
        a_centre, a_size = grid.centre, grid.size
    g = box_convert(gt_boxes, "xyxy", "cxcywh").reshape(-1, 4)  # per box, then taken per anchor
    g = torch.cat([g[:, :2], g[:, 2:] + 1e-6], dim=-1)  # encode()'s eps, added per box
    if sync_free:
        pos = matched >= 0
        rows = (matched.clamp(min=0) + torch.arange(b, device=anchors.device).unsqueeze(1) * n).view(-1)
        cls_t = torch.where(pos, gt_labels.view(-1)[rows].view(b, num_a) + 1, 0)
        box_t = _encode_from(g[rows].view(b, num_a, 4), a_centre, a_size) * pos.unsqueeze(-1)
        return cls_t, box_t
    bi, ai = (matched >= 0).nonzero(as_tuple=True)
    rows = bi * n + matched[bi, ai]
    cls_t = torch.zeros(b, num_a, dtype=torch.long, device=anchors.device)
    cls_t[bi, ai] = gt_labels.view(-1)[rows] + 1
    box_t = torch.zeros(b, num_a, 4, dtype=a_size.dtype, device=anchors.device)
    box_t[bi, ai] = _encode_from(g[rows], a_centre[ai], a_size[ai])
    return cls_t, box_t


def _encode_from(g: torch.Tensor, a_centre: torch.Tensor, a_size: torch.Tensor) -> torch.Tensor:
    """:func:`encode` from boxes as centre + (size + eps) and anchors as centre and size."""
    wx, wy, ww, wh = WEIGHTS
    dxy = (g[..., :2] - a_centre) / a_size * a_size.new_tensor([wx, wy])
    dwh = torch.log(g[..., 2:] / a_size) * a_size.new_tensor([ww, wh])
    return torch.cat([dxy, dwh], dim=-1)
