"""Anchors from the data (``model.anchors: auto``): k-means on the training boxes' shapes with an
IoU distance (as YOLO's autoanchor and YOLOv2's dimension clusters do), per feature map on the
boxes that suit its grid, and the best-possible recall (BPR) of the anchors before and after.

BPR here counts a training box as reachable when some anchor, at its real place on its feature
map's grid, overlaps it at IoU >= ``train.iou_threshold``: shape alone (YOLO's ratio test) would
call a 10-px box covered by a 10-px anchor on a 32-px grid that never lands on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from pipeline.detect.anchors import anchors_per_location, explicit_anchors, level_shapes_d2l

_MIN_CELLS = 1.0  # an object under one cell of the finest feature map is too small for it
_CELLS = 4.0      # a fitted anchor spans about this many cells of its feature map


def wh_iou(wh: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """IoU of boxes and cluster shapes aligned at one corner: ``(N, 2)`` x ``(K, 2)`` -> ``(N, K)``."""
    inter = np.minimum(wh[:, None, 0], centres[None, :, 0]) * np.minimum(wh[:, None, 1], centres[None, :, 1])
    return inter / (wh[:, None].prod(-1) + centres[None].prod(-1) - inter)


def kmeans_iou(wh: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> np.ndarray:
    """``k`` box shapes that maximise the mean best IoU with ``wh``, sorted by area.

    scipy and scikit-learn cluster by Euclidean distance, which lets large boxes dominate; the
    distance 1 - IoU treats a 5-px and a 50-px misfit alike, so it is written here (k-means++
    seeding, median update).
    """
    rng = np.random.default_rng(seed)
    wh = wh.astype(np.float64)
    uniq = np.unique(wh, axis=0)
    if len(uniq) <= k:  # fewer distinct shapes than anchors: take them all, pad with copies
        centres = np.concatenate([uniq, uniq[rng.integers(len(uniq), size=k - len(uniq))]])
        return centres[np.argsort(centres.prod(1), kind="stable")]
    centres = wh[[rng.integers(len(wh))]]
    for _ in range(1, k):
        d = 1 - wh_iou(wh, centres).max(1)
        p = d ** 2 / (d ** 2).sum() if d.sum() > 0 else None
        centres = np.concatenate([centres, wh[[rng.choice(len(wh), p=p)]]])
    assign = None
    for _ in range(iters):
        new = wh_iou(wh, centres).argmax(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = wh[assign == j]
            centres[j] = np.median(members, 0) if len(members) else wh[rng.integers(len(wh))]
    return centres[np.argsort(centres.prod(1), kind="stable")]


def best_possible_recall(boxes: torch.Tensor, anchors: torch.Tensor, iou_threshold: float,
                         chunk: int = 2048) -> tuple[float, float]:
    """Share of ``boxes`` (normalised xyxy) with an anchor at IoU >= threshold, and their mean best IoU."""
    if len(boxes) == 0:
        return float("nan"), float("nan")
    best = torch.cat([box_iou(boxes[i:i + chunk], anchors).max(1).values for i in range(0, len(boxes), chunk)])
    return float((best >= iou_threshold).float().mean()), float(best.mean())


@dataclass
class AnchorFit:
    shapes: list[list[list[float]]]  # per feature map, per anchor: [width, height] normalised
    source: str                      # "k-means" or "default" (when the default reached more boxes)
    bpr_default: float
    bpr_fitted: float
    bpr_chosen: float
    mean_iou_default: float
    mean_iou_chosen: float
    small_share: float               # share of boxes under one cell of the finest feature map
    suggested_img_size: int | None


def assign_levels(wh: np.ndarray, shapes: list[tuple[int, int]], cells: float = _CELLS) -> np.ndarray:
    """The feature map each box belongs to: the one on which it spans about ``cells`` grid cells
    (FPN's rule, in log scale). An anchor must span a few cells for some cell's anchor to overlap
    a box wherever it lies; the d2l defaults span 3-6."""
    strides = np.array([1.0 / max(h, w) for h, w in shapes])
    side = np.sqrt(wh.prod(1))
    return np.abs(np.log(side[:, None] / (cells * strides[None, :]))).argmin(1)


def fit_anchors(boxes: np.ndarray, shapes: list[tuple[int, int]], per_level: int, default_shapes,
                img_size: int, iou_threshold: float, seed: int = 0) -> AnchorFit:
    """Fit ``per_level`` anchor shapes to each feature map from ``boxes`` (normalised xyxy, ``(N, 4)``)
    and compare with ``default_shapes`` (the same layout, the d2l anchors).

    Each box goes to the feature map it suits (:func:`assign_levels`); k-means runs per map on its
    boxes; a map with fewer boxes than anchors keeps its default shapes. The fitted set is used
    only if it reaches at least as many boxes as the defaults.
    """
    boxes_t = torch.as_tensor(boxes, dtype=torch.float32)
    wh = np.clip(boxes[:, 2:] - boxes[:, :2], 1e-4, None)
    level = assign_levels(wh, shapes)
    fitted = []
    for i in range(len(shapes)):
        mine = wh[level == i]
        if len(mine) < per_level:
            fitted.append([[round(float(v), 5) for v in s] for s in default_shapes[i]])
            continue
        fitted.append([[round(float(w), 5), round(float(h), 5)] for w, h in kmeans_iou(mine, per_level, seed)])
    bpr_d, iou_d = best_possible_recall(boxes_t, explicit_anchors(shapes, default_shapes), iou_threshold)
    bpr_f, iou_f = best_possible_recall(boxes_t, explicit_anchors(shapes, fitted), iou_threshold)
    use_fit = (bpr_f, iou_f) >= (bpr_d, iou_d)
    small, _, suggest = small_objects(boxes, shapes, img_size)
    return AnchorFit(fitted if use_fit else [list(map(list, lv)) for lv in default_shapes],
                     "k-means" if use_fit else "default", bpr_d, bpr_f, bpr_f if use_fit else bpr_d,
                     iou_d, iou_f if use_fit else iou_d, small, suggest)


def feature_shapes(model_cfg, num_classes: int) -> list[tuple[int, int]]:
    """``(height, width)`` of each feature map the detector puts anchors on, at ``img_size``."""
    from pipeline.detect.models import create_detector

    model = create_detector(model_cfg, num_classes).eval()
    with torch.no_grad():
        feats = model.features(torch.zeros(1, 3, model_cfg.img_size, model_cfg.img_size))
    return [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]


def normalised_boxes(split) -> np.ndarray:
    """Every box of ``split`` as fractions of its image (what it becomes after the square resize)."""
    out = [b / np.array([w, h, w, h], np.float32) for b, (w, h) in zip(split.boxes, split.sizes) if len(b)]
    return np.concatenate(out) if out else np.zeros((0, 4), np.float32)


def resolve_anchors(cfg, train_split, num_classes: int, verbose: bool = True):
    """``cfg`` with ``model.anchor_shapes`` fitted when ``model.anchors`` is auto (and not fitted yet);
    prints the best-possible recall of the anchors and warns when objects are too small."""
    m = cfg.model
    boxes = normalised_boxes(train_split)
    if len(boxes) == 0:
        return cfg
    shapes = feature_shapes(m, num_classes)
    thr = cfg.train.iou_threshold
    say = print if verbose else (lambda *a, **k: None)
    if m.anchors != "auto" or m.anchor_shapes:
        anchors = make_model_anchors(m, shapes)
        bpr, mean_iou = best_possible_recall(torch.as_tensor(boxes), anchors, thr)
        say(f"anchors ({m.anchors}): {bpr:.1%} of {len(boxes)} training boxes have one at IoU >= {thr:g} "
            f"(mean best IoU {mean_iou:.2f})")
        _warn_small(boxes, shapes, m.img_size, say)
        return cfg
    per_level = anchors_per_location("d2l", 2, m.ratios)
    default = level_shapes_d2l(len(shapes), m.min_size, m.max_size, m.ratios)
    fit = fit_anchors(boxes, shapes, per_level, default, m.img_size, thr, seed=cfg.seed)
    say(f"anchors (auto): {len(boxes)} training boxes at IoU >= {thr:g}: d2l defaults reach {fit.bpr_default:.1%} "
        f"(mean best IoU {fit.mean_iou_default:.2f}), k-means shapes {fit.bpr_fitted:.1%}; using the "
        f"{fit.source} shapes ({fit.bpr_chosen:.1%}, mean best IoU {fit.mean_iou_chosen:.2f})")
    _warn_small(boxes, shapes, m.img_size, say)
    return cfg.model_copy(update={"model": m.model_copy(update={"anchor_shapes": fit.shapes})})


def make_model_anchors(model_cfg, shapes: list[tuple[int, int]]) -> torch.Tensor:
    from pipeline.detect.anchors import make_anchors

    s = model_cfg.img_size
    return make_anchors(model_cfg.anchors, shapes, model_cfg.min_size, model_cfg.max_size, model_cfg.ratios,
                        (s, s), model_cfg.anchor_shapes)


def small_objects(boxes: np.ndarray, shapes: list[tuple[int, int]], img_size: int) -> tuple[float, float, int | None]:
    """Share of boxes under one cell of the finest feature map, that cell in pixels, and an input
    size that would lift the 10th percentile of object sizes to one cell (None if few are small)."""
    stride = img_size / max(shapes[0])
    side = np.sqrt(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(1)) * img_size
    share = float((side < _MIN_CELLS * stride).mean())
    if share <= 0.1:
        return share, stride, None
    p10 = max(float(np.quantile(side, 0.1)), 1e-3)
    return share, stride, int(min(2048, math.ceil(img_size * _MIN_CELLS * stride / p10 / 32) * 32))


def _warn_small(boxes: np.ndarray, shapes, img_size: int, say) -> None:
    share, stride, suggest = small_objects(boxes, shapes, img_size)
    if suggest:
        say(f"warning: {share:.0%} of training boxes are smaller than one cell ({stride:.0f} px) of the finest "
            f"feature map at model.img_size={img_size}; few anchors can reach them. model.img_size={suggest} "
            "would make 90% of them at least one cell wide")
