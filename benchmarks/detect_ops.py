"""Time our anchor matching and NMS against direct Python-loop versions of the course's
``assign_anchor_to_bbox`` / ``multibox_target`` and ``nms``, on the same inputs; print the ratios.

    python benchmarks/detect_ops.py [--batch 32] [--boxes 4] [--nms-boxes 2000] [--repeat 7] [--rounds 3]
                                    [--threads 1] [--stat median|min]

Each op is also set against its floor: matching against the IoU of every padded box with every
anchor, computed once for the batch (the work any exact dense matcher must do; timed with our
fastest kernel, ``AnchorGrid.iou``, and with torchvision's ``box_iou``), NMS against the kernel,
post-processing against its one ``batched_nms`` call.

The baselines below are written from the course's description (greedy per-box assignment in
a loop over boxes and over images; NMS that pops the best box and filters the rest each step).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
from torchvision.ops import box_iou

from pipeline.detect.anchors import make_anchors
from pipeline.detect.boxes import AnchorGrid, encode, match_anchors, targets_for
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


def course_match(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> list[torch.Tensor]:
    """Baseline for matching alone: the course's assignment in a Python loop over the images."""
    return [course_assign(gt_boxes[b][gt_labels[b] >= 0], anchors) for b in range(gt_boxes.shape[0])]


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


STAT = statistics.median


def timed(fn, repeat: int) -> float:
    """Median (``--stat min``: least) seconds of ``repeat`` calls after a warm-up (allocations, lazy init)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return STAT(times)


def candidates_for_nms(logits: torch.Tensor, offsets: torch.Tensor, anchors: torch.Tensor, topk: int = 400,
                       threshold: float = 0.01):
    """What ``postprocess`` hands to its one ``batched_nms`` call (for the floor of that call)."""
    from pipeline.detect.boxes import decode

    scores = logits.softmax(-1)[..., 1:]
    b, _, c = scores.shape
    top, idx = scores.reshape(b, -1).topk(topk, dim=1)
    boxes = decode(anchors.unsqueeze(0), offsets).clamp(0, 1).gather(1, (idx // c).unsqueeze(-1).expand(-1, -1, 4))
    ok = top > threshold
    group = (torch.arange(b).unsqueeze(1) * c + idx % c)[ok]
    return boxes[ok], top[ok], group


def one_round(args, anchors, grid, gt, labels, boxes, scores, logits, offsets) -> dict[str, float]:
    from torchvision.ops import batched_nms, box_iou, nms

    from pipeline.detect.boxes import pairwise_iou

    r = args.repeat
    flat_gt = gt.reshape(-1, 4)
    valid = labels >= 0
    cand = candidates_for_nms(logits, offsets, anchors)
    return {
        "course_targets": timed(lambda: course_targets(anchors, gt, labels), r),
        "course_match": timed(lambda: course_match(anchors, gt, labels), r),
        "targets": timed(lambda: targets_for(anchors, gt, labels, grid=grid), r),
        "targets_sync_free": timed(lambda: targets_for(anchors, gt, labels, grid=grid, sync_free=True), r),
        "match": timed(lambda: match_anchors(anchors, gt, valid, grid=grid), r),
        "match_no_grid": timed(lambda: match_anchors(anchors, gt, valid), r),
        "match_sync_free": timed(lambda: match_anchors(anchors, gt, valid, grid=grid, sync_free=True), r),
        "grid_iou": timed(lambda: grid.iou(flat_gt, reuse=True), r),
        "box_iou": timed(lambda: box_iou(flat_gt, anchors), r),
        "pairwise_iou": timed(lambda: pairwise_iou(flat_gt, anchors), r),
        "course_nms": timed(lambda: course_nms(boxes, scores, 0.45), r),
        "nms": timed(lambda: nms(boxes, scores, 0.45), r),
        "course_post": timed(lambda: course_detection(logits, offsets, anchors, 0.5), 1),
        "post": timed(lambda: postprocess(logits, offsets, anchors, score_threshold=0.01, nms_iou=0.5), r),
        "post_floor": timed(lambda: batched_nms(*cand, 0.5), r),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--boxes", type=int, default=4, help="ground-truth boxes per image")
    parser.add_argument("--nms-boxes", type=int, default=2000, help="candidate boxes per image for NMS alone")
    parser.add_argument("--det-batch", type=int, default=4, help="images for the post-processing comparison")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=7, help="calls per timing (their median is taken)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every timing (median and spread shown)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady on a shared machine; the course loops gain little from more)")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="of each op's repeats: min estimates the uncontended time on a busy machine")
    args = parser.parse_args(argv)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = args.img_size
    shapes = [(s // 8, s // 8), (s // 16, s // 16), (s // 32, s // 32), (s // 64, s // 64), (1, 1)]
    anchors = make_anchors("d2l", shapes, 0.2, 0.88, [1, 2, 0.5], (s, s))
    grid = AnchorGrid.build(anchors, [(h, w, 4) for h, w in shapes])  # as the model hands it to training
    xy = torch.rand(args.batch, args.boxes, 2) * 0.7
    gt = torch.cat([xy, xy + 0.05 + torch.rand(args.batch, args.boxes, 2) * 0.25], -1).clamp(max=1)
    labels = torch.randint(0, 3, (args.batch, args.boxes))
    labels[::2, -1] = -1  # padding rows in every other image, as a real batch has
    n = args.nms_boxes
    c = torch.rand(n, 2) * 0.8
    boxes = torch.cat([c, c + 0.05 + torch.rand(n, 2) * 0.15], -1)
    scores = torch.rand(n)
    logits = torch.randn(args.det_batch, anchors.shape[0], 4) * 2
    offsets = torch.randn(args.det_batch, anchors.shape[0], 4) * 0.5
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.stat} of {args.repeat} calls, "
          f"{args.rounds} rounds; TinySSD anchors at {s}px: "
          f"{anchors.shape[0]}, batch {args.batch}, {args.boxes} boxes per image")

    # same inputs, same answers before timing anything
    from torchvision.ops import nms

    agree = (targets_for(anchors, gt, labels, grid=grid)[0] == course_targets(anchors, gt, labels)[0]).float().mean().item()
    same = torch.equal(nms(boxes, scores, 0.45), course_nms(boxes, scores, 0.45))

    rounds = [one_round(args, anchors, grid, gt, labels, boxes, scores, logits, offsets) for _ in range(args.rounds)]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def spread(num: str, den: str) -> str:
        ratios = sorted(r[num] / r[den] for r in rounds)
        return f"{statistics.median(ratios):6.1f}x [{ratios[0]:.1f}-{ratios[-1]:.1f}]"

    print(f"\n{'operation':34s} {'course loop':>11s} {'ours':>9s} {'speed-up [spread]':>19s} "
          f"{'floor':>9s} {'ours/floor':>10s}")
    table = [
        ("matching + targets (batch)", "course_targets", "targets", "grid_iou"),
        ("matching alone (batch)", "course_match", "match", "grid_iou"),
        (f"NMS of {n} boxes (one image)", "course_nms", "nms", "nms"),
        (f"post-processing ({args.det_batch} images)", "course_post", "post", "post_floor"),
    ]
    for name, base, ours, floor in table:
        print(f"{name:34s} {med(base) * 1e3:9.1f}ms {med(ours) * 1e3:7.2f}ms {spread(base, ours):>19s} "
              f"{med(floor) * 1e3:7.2f}ms {med(ours) / med(floor):9.2f}x")
    print(f"\nfloors: matching's is the IoU of the batch's {args.batch * args.boxes} padded boxes x {anchors.shape[0]} "
          f"anchors, once: {med('grid_iou') * 1e3:.2f} ms by AnchorGrid.iou (one pass for the intersections on "
          f"the anchor grids), {med('pairwise_iou') * 1e3:.2f} ms by pairwise_iou, {med('box_iou') * 1e3:.2f} ms "
          f"by torchvision's box_iou (matching alone = {med('match') / med('box_iou'):.2f}x box_iou); "
          "NMS's the kernel itself; post-processing's one batched_nms over the batch's candidates")
    print(f"other paths, same answers: matching without the grid (pairwise_iou) {med('match_no_grid') * 1e3:.2f} ms "
          f"({spread('course_match', 'match_no_grid').strip()}); the GPU's sync-free path run here: matching "
          f"{med('match_sync_free') * 1e3:.2f} ms, + targets {med('targets_sync_free') * 1e3:.2f} ms")
    print(f"same class targets as the course's assignment on {agree:.2%} of anchors; "
          f"torchvision NMS keeps the same boxes as the loop: {same}")
    print("(post-processing: ours is per-class NMS after score threshold 0.01 and top-400; the course runs "
          "class-agnostic loop NMS over every anchor, so the work differs as the methods do)")


if __name__ == "__main__":
    main()
