"""Test-time views for detection and weighted box fusion of their boxes (and of several models).

A view is an input scale (a multiple of ``model.img_size``) with or without a horizontal flip.
Each view's boxes are mapped back to the unflipped image in normalised coordinates, then all
views of all models are merged by weighted box fusion (``ensemble_boxes``, Solovyev et al.):
overlapping boxes of one class become one box whose corners are the score-weighted mean, where
NMS would keep one box and drop the others' evidence.

``tta.hflip: null`` flips only when training flipped (``train.augment.hflip > 0``): a model that
never saw mirrored objects may not know them (flipped digits or text are other objects).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class View:
    scale: float = 1.0
    hflip: bool = False

    @property
    def name(self) -> str:
        return f"x{self.scale:g}" + ("+hflip" if self.hflip else "")


def detect_views(cfg) -> list[View]:
    """The views ``cfg.tta`` asks for: every scale, and each flipped too when flips are on."""
    hflip = cfg.tta.hflip if cfg.tta.hflip is not None else cfg.train.augment.hflip > 0
    views = [View(float(s), False) for s in cfg.tta.scales]
    if hflip:
        views += [View(float(s), True) for s in cfg.tta.scales]
    return views


def view_size(img_size: int, scale: float) -> int:
    """Input side for a view: ``img_size * scale`` on a multiple of 32, so every map's grid stays whole."""
    return max(32, int(round(img_size * scale / 32)) * 32)


def unflip(boxes: np.ndarray) -> np.ndarray:
    """Normalised xyxy boxes found on the mirrored image, put back on the original."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = 1.0 - boxes[:, 2], 1.0 - boxes[:, 0]
    return out


def fuse(members: list[tuple[np.ndarray, np.ndarray, np.ndarray]], weights: list[float] | None, iou: float,
         skip_score: float, conf_type: str, method: str = "wbf") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge one image's detections from several views/models into one set.

    Args:
        members: per view (or model), ``(boxes (K, 4) normalised xyxy, scores (K,), labels (K,))``.
        method: ``wbf`` (weighted box fusion) or ``nms`` (keep the best of each overlapping group).

    Returns:
        fused ``(boxes, scores, labels)``, best first.
    """
    from ensemble_boxes import nms as eb_nms
    from ensemble_boxes import weighted_boxes_fusion

    if not any(len(m[0]) for m in members):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    boxes = [np.clip(m[0], 0.0, 1.0).astype(np.float64) for m in members]
    scores = [m[1].astype(np.float64) for m in members]
    labels = [m[2].astype(np.float64) for m in members]
    if method == "nms":
        b, s, lab = eb_nms(boxes, scores, labels, weights=weights, iou_thr=iou)
    else:
        b, s, lab = weighted_boxes_fusion(boxes, scores, labels, weights=weights, iou_thr=iou,
                                          skip_box_thr=skip_score, conf_type=conf_type)
    order = np.argsort(-s, kind="stable")
    return b[order].astype(np.float32), s[order].astype(np.float32), lab[order].astype(np.int64)
