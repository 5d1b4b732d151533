"""From raw SSD outputs to detections: scores, threshold, top-k, per-class NMS, max detections."""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms, nms

from pipeline.detect.boxes import decode


def class_scores(cls_logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Foreground class scores ``(B, A, C)``: softmax without the background column, or sigmoids (focal)."""
    if sigmoid:
        return cls_logits[..., 1:].float().sigmoid()
    return cls_logits.float().softmax(dim=-1)[..., 1:]


@torch.no_grad()
def postprocess(cls_logits: torch.Tensor, box_offsets: torch.Tensor, anchors: torch.Tensor, *,
                score_threshold: float = 0.01, nms_iou: float = 0.45, pre_nms_topk: int = 400,
                max_detections: int = 100, sigmoid: bool = False,
                class_agnostic: bool = False) -> list[dict[str, torch.Tensor]]:
    """Detections per image: ``boxes`` (K, 4) normalised xyxy clipped to [0, 1], ``scores``, ``labels``
    (0-based foreground class ids), best first.

    Every (anchor, class) pair above ``score_threshold`` is a candidate, so one anchor may give boxes
    of several classes; NMS runs per class unless ``class_agnostic`` (the course's behaviour).
    """
    scores_all = class_scores(cls_logits, sigmoid)
    boxes_all = decode(anchors.unsqueeze(0), box_offsets.float()).clamp(0.0, 1.0)
    num_classes = scores_all.shape[-1]
    out = []
    for scores, boxes in zip(scores_all, boxes_all):
        flat = scores.flatten()
        keep = (flat > score_threshold).nonzero(as_tuple=True)[0]
        if keep.numel() > pre_nms_topk:
            keep = keep[flat[keep].topk(pre_nms_topk).indices]
        sc = flat[keep]
        anchor_idx = torch.div(keep, num_classes, rounding_mode="floor")
        labels = keep % num_classes
        bx = boxes[anchor_idx]
        ok = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
        bx, sc, labels = bx[ok], sc[ok], labels[ok]
        kept = nms(bx, sc, nms_iou) if class_agnostic else batched_nms(bx, sc, labels, nms_iou)
        kept = kept[:max_detections]
        out.append({"boxes": bx[kept], "scores": sc[kept], "labels": labels[kept]})
    return out
