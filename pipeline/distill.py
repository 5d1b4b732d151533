"""Distillation targets: the teacher blend's OOF probabilities for a student fold's training images.

``distill: {teacher: [experiments], alpha, temperature}``. Any timm backbone can be the student; it
learns from ``(1 - alpha) * CE(label) + alpha * T^2 * KL(teacher_T || student_T)``
(:class:`pipeline.engine.soft_targets.DistillationLoss`).

The soft target of a training image is the teacher's **out-of-fold** probability for it, so a
teacher never hands over an image's own memorised label. A leak remains: the student's training
image in fold j was predicted by the teacher's fold-j model, which trained on the student's
validation fold k; what it learned from fold k's labels reaches the student. The student's CV is
therefore slightly optimistic; ``benchmarks/second_round.py`` measures by how much (student CV
against its score on the hidden solution). The teacher blend's weights are fit without fold k.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config

LEAK_NOTE = ("teacher OOF probabilities of fold j come from the teacher's fold-j model, which trained on "
             "this fold's validation images: the student's CV is slightly optimistic")


def distill_targets(cfg: Config, fold: int, classes: list[str], folds: pd.DataFrame, images: list[str]
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Teacher-blend OOF probabilities for ``images`` (the fold's training rows).

    Returns:
        (probs (n, C), has_teacher (n,) bool, record). Rows without an OOF prediction (fold -1:
        always trained, never validated) have ``has_teacher`` False and zero rows.
    """
    from pipeline.teachers import load_teachers, teacher_weights

    names = list(cfg.distill.teacher)
    teachers = load_teachers(cfg, names, classes, folds)
    weights = teacher_weights(teachers, folds, classes, exclude_fold=fold)
    blend: dict[str, np.ndarray] = {}
    for w, t in zip(weights, teachers):
        for f in t.folds.values():
            for image, p in zip(f.oof_images, f.oof):
                blend[image] = blend.get(image, 0.0) + w * p
    probs = np.zeros((len(images), len(classes)), np.float32)
    has = np.zeros(len(images), bool)
    for i, image in enumerate(images):
        if image in blend:
            probs[i], has[i] = blend[image], True
    record = {"teachers": names, "weights": [float(w) for w in weights], "alpha": cfg.distill.alpha,
              "temperature": cfg.distill.temperature, "n_with_teacher": int(has.sum()), "n_rows": len(images),
              "leak": LEAK_NOTE}
    return probs, has, record
