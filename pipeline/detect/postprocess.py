"""From raw SSD outputs to detections: scores, threshold, top-k, per-class NMS, max detections."""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms

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

    Every (anchor, class) pair is a candidate, so one anchor may give boxes of several classes; each
    image keeps its ``pre_nms_topk`` best above ``score_threshold``; NMS runs per image and class
    (per image only if ``class_agnostic``, the course's behaviour) in one call for the whole batch.
    """
    scores_all = class_scores(cls_logits, sigmoid)
    boxes_all = decode(anchors.unsqueeze(0), box_offsets.float()).clamp(0.0, 1.0)
    b, num_a, num_classes = scores_all.shape
    k = min(pre_nms_topk, num_a * num_classes)
    top, idx = scores_all.reshape(b, -1).topk(k, dim=1)  # the top-k of those above the threshold
    anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
    labels = idx % num_classes
    boxes = boxes_all.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))
    ok = (top > score_threshold) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    image = torch.arange(b, device=top.device).unsqueeze(1).expand(b, k)
    image, boxes, top, labels = image[ok], boxes[ok], top[ok], labels[ok]
    group = image if class_agnostic else image * num_classes + labels
    kept = batched_nms(boxes, top, group, nms_iou)  # best first over the batch
    # per image, best first, at most max_detections: a stable sort by image keeps the score order
    kept = kept[torch.sort(image[kept], stable=True).indices]
    counts = torch.bincount(image[kept], minlength=b)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(kept), device=kept.device) - start[image[kept]]
    kept = kept[rank < max_detections]
    per_image = torch.bincount(image[kept], minlength=b).tolist()  # the one host sync
    return [{"boxes": bx, "scores": sc, "labels": lb} for bx, sc, lb in
            zip(boxes[kept].split(per_image), top[kept].split(per_image), labels[kept].split(per_image))]
