"""Pictures of detections: boxes with class and score drawn on the original images."""
from __future__ import annotations

import cv2
import numpy as np

from pipeline.detect.metrics import ImageBoxes

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def draw_detections(img: np.ndarray, dets: ImageBoxes, classes: list[str], gt: ImageBoxes | None = None,
                    min_score: float = 0.0) -> np.ndarray:
    """A copy of RGB ``img`` with ground truth in thin white and detections in class colours."""
    out = img.copy()
    thick = max(1, round(min(img.shape[:2]) / 200))
    if gt is not None:
        for b in gt.boxes:
            x0, y0, x1, y1 = (int(round(v)) for v in b)
            cv2.rectangle(out, (x0, y0), (x1, y1), (255, 255, 255), 1, cv2.LINE_AA)
    for b, lab, s in zip(dets.boxes, dets.labels, dets.scores):
        if s < min_score:
            continue
        colour = _PALETTE[int(lab) % len(_PALETTE)]
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, thick + 1, cv2.LINE_AA)
        text = f"{classes[int(lab)]} {s:.2f}"
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        ty = max(y0, th + 3)
        cv2.rectangle(out, (x0, ty - th - 3), (x0 + tw + 2, ty), colour, -1)
        cv2.putText(out, text, (x0 + 1, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def grid(images: list[np.ndarray], cols: int = 4, cell: int = 320) -> np.ndarray:
    """Tile RGB images (each fitted into ``cell`` x ``cell``) into one picture."""
    rows = (len(images) + cols - 1) // cols
    canvas = np.full((rows * cell, cols * cell, 3), 40, np.uint8)
    for i, im in enumerate(images):
        s = cell / max(im.shape[:2])
        small = cv2.resize(im, (int(im.shape[1] * s), int(im.shape[0] * s)), interpolation=cv2.INTER_AREA)
        r, c = divmod(i, cols)
        canvas[r * cell:r * cell + small.shape[0], c * cell:c * cell + small.shape[1]] = small
    return canvas
