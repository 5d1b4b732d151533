"""Time our anchor matching and NMS against direct Python-loop versions of the course's
``assign_anchor_to_bbox`` / ``multibox_target`` and ``nms``, on the same inputs; print the ratios.

    python benchmarks/detect_ops.py [--batch 32] [--boxes 4] [--nms-boxes 2000] [--repeat 5]

The baselines below are written from the course's description (greedy per-box assignment in
a loop over boxes and over images; NMS that pops the best box and filters the rest each step).
"""
from __future__ import annotations

import argparse
import time

import torch
from torchvision.ops import box_iou

from pipeline.detect.anchors import make_anchors
from pipeline.detect.boxes import encode, match_anchors, targets_for
from pipeline.detect.postprocess import postprocess


def course_assign(ground_truth: torch.Tensor, anchors: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """Baseline: one image; anchors above the threshold, then one greedy pass per ground-truth box."""
    num_anchors, num_gt = anchors.shape[0], ground_truth.shape[0]
    jaccard = box_iou(anchors, ground_truth)
    anchors_bbox_map = torch.full((num_anchors,), -1, dtype=torch.long)
    max_ious, indices = torch.max(jaccard, dim=1)
    anc_i = torch.nonzero(max_ious >= iou_threshold).reshape(-1)
    anchors_bbox_map[anc_i] = indices[max_ious >= iou_threshold]
    col_discard = torch.full((num_anchors,), -1.0)
    row_discard = torch.full((num_gt,), -1.0)
    for _ in range(num_gt):
        max_idx = torch.argmax(jaccard)
        box_idx = (max_idx % num_gt).long()
        anc_idx = (max_idx // num_gt).long()
        anchors_bbox_map[anc_idx] = box_idx
        jaccard[:, box_idx] = col_discard
        jaccard[anc_idx, :] = row_discard
    return anchors_bbox_map


def course_targets(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor):
    """Baseline ``multibox_target``: a Python loop over the images of the batch."""
    cls_out, box_out = [], []
    for b in range(gt_boxes.shape[0]):
        valid = gt_labels[b] >= 0
        boxes, labels = gt_boxes[b][valid], gt_labels[b][valid]
        m = course_assign(boxes, anchors)
        pos = m >= 0
        cls = torch.zeros(anchors.shape[0], dtype=torch.long)
        cls[pos] = labels[m[pos]] + 1
        assigned = torch.zeros_like(anchors)
        assigned[pos] = boxes[m[pos]]
        box_out.append(encode(anchors, assigned) * pos[:, None])
        cls_out.append(cls)
    return torch.stack(cls_out), torch.stack(box_out)


def course_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Baseline NMS: keep the best box, drop the ones overlapping it, repeat."""
    order = torch.argsort(scores, dim=-1, descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        if order.numel() == 1:
            break
        iou = box_iou(boxes[i].reshape(-1, 4), boxes[order[1:]].reshape(-1, 4)).reshape(-1)
        order = order[1:][iou <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


def course_detection(cls_logits: torch.Tensor, offsets: torch.Tensor, anchors: torch.Tensor, nms_iou: float):
    """Baseline ``multibox_detection``: class-agnostic loop NMS over every anchor of each image."""
    from pipeline.detect.boxes import decode

    probs = cls_logits.softmax(-1)
    out = []
    for b in range(cls_logits.shape[0]):
        conf, cls = probs[b, :, 1:].max(-1)
        boxes = decode(anchors, offsets[b])
        keep = course_nms(boxes, conf, nms_iou)
        out.append((boxes[keep], conf[keep], cls[keep]))
    return out


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--boxes", type=int, default=4, help="ground-truth boxes per image")
    parser.add_argument("--nms-boxes", type=int, default=2000, help="candidate boxes per image for NMS alone")
    parser.add_argument("--det-batch", type=int, default=4, help="images for the post-processing comparison")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    s = args.img_size
    shapes = [(s // 8, s // 8), (s // 16, s // 16), (s // 32, s // 32), (s // 64, s // 64), (1, 1)]
    anchors = make_anchors("d2l", shapes, 0.2, 0.88, [1, 2, 0.5], (s, s))
    xy = torch.rand(args.batch, args.boxes, 2) * 0.7
    gt = torch.cat([xy, xy + 0.05 + torch.rand(args.batch, args.boxes, 2) * 0.25], -1).clamp(max=1)
    labels = torch.randint(0, 3, (args.batch, args.boxes))
    labels[::2, -1] = -1  # padding rows in every other image, as a real batch has
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; TinySSD anchors at {s}px: "
          f"{anchors.shape[0]}, batch {args.batch}, {args.boxes} boxes per image")

    # same inputs, same answers before timing anything
    ours_cls, ours_box = targets_for(anchors, gt, labels)
    base_cls, base_box = course_targets(anchors, gt, labels)
    agree = (ours_cls == base_cls).float().mean().item()
    rows = []
    t_ours = timed(lambda: targets_for(anchors, gt, labels), args.repeat)
    t_base = timed(lambda: course_targets(anchors, gt, labels), args.repeat)
    rows.append(("matching + targets (batch)", t_base, t_ours))
    t_m = timed(lambda: match_anchors(anchors, gt, labels >= 0), args.repeat)

    # NMS alone on many overlapping candidates
    n = args.nms_boxes
    c = torch.rand(n, 2) * 0.8
    boxes = torch.cat([c, c + 0.05 + torch.rand(n, 2) * 0.15], -1)
    scores = torch.rand(n)
    from torchvision.ops import nms

    same = torch.equal(nms(boxes, scores, 0.45), course_nms(boxes, scores, 0.45))
    t_base_nms = timed(lambda: course_nms(boxes, scores, 0.45), args.repeat)
    t_tv_nms = timed(lambda: nms(boxes, scores, 0.45), args.repeat)
    rows.append((f"NMS of {n} boxes (one image)", t_base_nms, t_tv_nms))

    # full post-processing of a batch of raw outputs
    logits = torch.randn(args.det_batch, anchors.shape[0], 4) * 2
    offsets = torch.randn(args.det_batch, anchors.shape[0], 4) * 0.5
    t_base_det = timed(lambda: course_detection(logits, offsets, anchors, 0.5), 1)
    t_ours_det = timed(lambda: postprocess(logits, offsets, anchors, score_threshold=0.01, nms_iou=0.5),
                       args.repeat)
    rows.append((f"post-processing ({args.det_batch} images)", t_base_det, t_ours_det))

    print(f"\n{'operation':40s} {'course loop':>12s} {'ours':>10s} {'speed-up':>9s}")
    for name, base, ours in rows:
        print(f"{name:40s} {base * 1e3:10.1f}ms {ours * 1e3:8.2f}ms {base / ours:8.1f}x")
    print(f"\nmatch_anchors alone: {t_m * 1e3:.2f} ms per batch")
    print(f"same class targets as the course's assignment on {agree:.2%} of anchors; "
          f"torchvision NMS keeps the same boxes as the loop: {same}")
    print("(post-processing: ours is per-class NMS after score threshold 0.01 and top-400; the course runs "
          "class-agnostic loop NMS over every anchor, so the work differs as the methods do)")


if __name__ == "__main__":
    main()
