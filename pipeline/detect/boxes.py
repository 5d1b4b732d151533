"""Box coding (weights 10, 10, 5, 5) and anchor matching, vectorised over the batch."""
from __future__ import annotations

import math

import torch
from torchvision.ops import box_convert, box_iou

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


def match_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor,
                  iou_threshold: float = 0.5) -> torch.Tensor:
    """Assign each anchor a ground-truth box index, or -1 for background.

    Every valid box first gets its best anchor (conflicts, two boxes wanting one anchor, are
    resolved in rounds with the taken anchors removed, so each box keeps one of its own);
    then every other anchor whose best IoU reaches ``iou_threshold`` takes that box.

    Args:
        anchors: ``(A, 4)``.
        gt_boxes: ``(B, N, 4)`` padded boxes.
        gt_valid: ``(B, N)`` bool, False on padding rows (they are never matched).

    Returns:
        ``(B, A)`` long tensor of box indices into dim 1 of ``gt_boxes``.
    """
    b, n = gt_valid.shape
    num_a = anchors.shape[0]
    if n == 0:
        return torch.full((b, num_a), -1, dtype=torch.long, device=anchors.device)
    # torchvision's box_iou is 2-D; one call over all boxes of the batch keeps it loop-free.
    iou = box_iou(anchors, gt_boxes.reshape(-1, 4)).reshape(num_a, b, n).permute(1, 0, 2)
    iou = iou.masked_fill(~gt_valid[:, None, :], -1.0)
    best_iou, best_gt = iou.max(dim=2)
    matched = torch.where(best_iou >= iou_threshold, best_gt, torch.full_like(best_gt, -1))

    pending = gt_valid.clone()
    work = iou.clone()
    for _ in range(n):  # rounds, not boxes: almost always one
        if not pending.any():
            break
        bi, ni = pending.nonzero(as_tuple=True)
        ai = work[bi, :, ni].argmax(dim=1)
        val = work[bi, ai, ni]
        key = bi * num_a + ai
        # Several boxes may claim one anchor: the highest IoU wins, ties go to the lowest box index;
        # the losers try again next round with the taken anchors removed.
        best_val = _scatter(key, val, b * num_a, "amax", -2.0)
        tied = val >= best_val[key]
        first_n = _scatter(key[tied], ni[tied].float(), b * num_a, "amin", float(n))
        win = tied & (ni.float() == first_n[key])
        matched[bi[win], ai[win]] = ni[win]
        pending[bi[win], ni[win]] = False
        work[bi[win], ai[win], :] = -1.0
    return matched


def _scatter(index: torch.Tensor, values: torch.Tensor, size: int, reduce: str, fill: float) -> torch.Tensor:
    out = torch.full((size,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index, values, reduce=reduce, include_self=False)


def targets_for(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                iou_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Class targets (0 = background, k + 1 = class k) and box offsets for every anchor.

    Args:
        gt_labels: ``(B, N)`` class ids, -1 on padding rows.

    Returns:
        ``cls_t`` ``(B, A)`` long and ``box_t`` ``(B, A, 4)`` (zeros where background).
    """
    valid = gt_labels >= 0
    matched = match_anchors(anchors, gt_boxes, valid, iou_threshold)
    pos = matched >= 0
    idx = matched.clamp(min=0)
    lab = torch.gather(gt_labels, 1, idx)
    cls_t = torch.where(pos, lab + 1, torch.zeros_like(lab))
    boxes = torch.gather(gt_boxes, 1, idx.unsqueeze(-1).expand(-1, -1, 4))
    box_t = encode(anchors.unsqueeze(0), boxes) * pos.unsqueeze(-1)
    return cls_t, box_t
