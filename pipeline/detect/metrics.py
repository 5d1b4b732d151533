"""COCO-style detection metrics: mAP@0.5, mAP@0.5:0.95 and per-class AP (101-point interpolation,
IoU thresholds .50:.05:.95, 100 detections per image and class, area 'all').

Written here because pycocotools needs its JSON structures, is slow to build per epoch and is
only a dev dependency; ``tests/test_detect_metrics.py`` checks this code against its ``COCOeval``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


@dataclass
class ImageBoxes:
    """Boxes of one image in pixels, xyxy; ``scores`` only for detections."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _match(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Greedy COCO matching of score-sorted detections: ``(T, D)`` bool, True where a TP."""
    t_n, (d_n, g_n) = len(thresholds), ious.shape
    tp = np.zeros((t_n, d_n), dtype=bool)
    if d_n == 0 or g_n == 0:
        return tp
    # Detections that overlap no box by 0.5 are false positives at every threshold: skip them.
    candidates = np.nonzero(ious.max(axis=1) >= thresholds.min())[0]
    for ti, t in enumerate(thresholds):
        taken = np.zeros(g_n, dtype=bool)
        for d in candidates:
            row = np.where(taken, -1.0, ious[d])
            # COCO keeps the last box among equal IoUs; search the reversed row to do the same.
            g = g_n - 1 - int(np.argmax(row[::-1]))
            if row[g] >= min(t, 1 - 1e-10):
                taken[g] = True
                tp[ti, d] = True
    return tp


def evaluate_detections(gts: Sequence[ImageBoxes], dets: Sequence[ImageBoxes], num_classes: int,
                        score_threshold: float = 0.5, max_dets: int = 100) -> dict:
    """Metrics over paired lists of ground truth and detections (same image order).

    Returns:
        ``map_50``, ``map_50_95`` (means over classes that have ground truth), ``ap_50`` and
        ``ap_50_95`` per class (None without ground truth), and ``precision`` / ``recall`` /
        ``f1`` at IoU 0.5 of the detections scoring at least ``score_threshold``.
    """
    if len(gts) != len(dets):
        raise ValueError(f"{len(gts)} ground-truth images but {len(dets)} detection images")
    precision = np.full((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), num_classes), -1.0)
    tp_thr = fp_thr = n_gt_total = 0
    for c in range(num_classes):
        scores_c, tps_c, n_gt = [], [], 0
        for gt, dt in zip(gts, dets):
            g = gt.boxes[gt.labels == c]
            sel = dt.labels == c
            d, s = dt.boxes[sel], dt.scores[sel]
            order = np.argsort(-s, kind="mergesort")[:max_dets]
            d, s = d[order], s[order]
            tp = _match(_iou(d, g), IOU_THRESHOLDS)
            n_gt += len(g)
            scores_c.append(s)
            tps_c.append(tp)
            above = s >= score_threshold
            tp_thr += int(tp[0, above].sum())
            fp_thr += int((~tp[0, above]).sum())
        n_gt_total += n_gt
        if n_gt == 0:
            continue
        scores = np.concatenate(scores_c)
        order = np.argsort(-scores, kind="mergesort")
        tps = np.concatenate(tps_c, axis=1)[:, order]
        tp_sum = np.cumsum(tps, axis=1, dtype=float)
        fp_sum = np.cumsum(~tps, axis=1, dtype=float)
        for ti in range(len(IOU_THRESHOLDS)):
            rc = tp_sum[ti] / n_gt
            pr = tp_sum[ti] / (tp_sum[ti] + fp_sum[ti] + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope, as COCO
            q = np.zeros(len(RECALL_THRESHOLDS))
            idx = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
            ok = idx < len(pr)
            q[ok] = pr[idx[ok]]
            precision[ti, :, c] = q
    has_gt = precision[0, 0, :] > -1
    ap_50_95 = [float(precision[:, :, c].mean()) if has_gt[c] else None for c in range(num_classes)]
    ap_50 = [float(precision[0, :, c].mean()) if has_gt[c] else None for c in range(num_classes)]
    prec = tp_thr / (tp_thr + fp_thr) if tp_thr + fp_thr else 0.0
    rec = tp_thr / n_gt_total if n_gt_total else 0.0
    return {
        "map_50": float(np.mean([a for a in ap_50 if a is not None])) if has_gt.any() else 0.0,
        "map_50_95": float(np.mean([a for a in ap_50_95 if a is not None])) if has_gt.any() else 0.0,
        "ap_50": ap_50,
        "ap_50_95": ap_50_95,
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "score_threshold": score_threshold,
        "n_images": len(gts),
        "n_gt": n_gt_total,
    }
