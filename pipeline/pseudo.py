"""Pseudo-labels for one fold: confident teacher predictions on test images, fold-safe.

``pseudo: {from: [teacher experiments], threshold, soft, weight}``. Fold k of the student trains on
its own training rows plus the test images whose teacher-blend probability reaches ``threshold``.
Those predictions come **only from each teacher's fold-k model** (``runs/<teacher>/fold<k>/test.csv``),
which never saw fold k's validation images: had they come from all folds' models, fold k's labels
would reach fold k's student through the test images' pseudo-labels and its CV would be optimistic.
The teacher blend's weights are fit on the teachers' OOF rows outside fold k for the same reason.

``from: submissions/<name>.json`` takes a blended submission instead (every fold mixed). It is
accepted with a warning, recorded in ``fold<k>/pseudo.json``, that the CV is then optimistic.

``soft: true`` trains on the teacher probabilities instead of the one-hot argmax; ``weight`` scales
the loss of pseudo-labelled rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import Config
from pipeline.engine.soft_targets import one_hot
from pipeline.errors import PipelineError
from pipeline.io import read_json

LEAK_WARNING = ("pseudo-labels from a submission mix every fold's models: fold k's validation labels reach "
                "fold k's student through them, so this experiment's CV is optimistic; name the teacher "
                "experiments in pseudo.from for fold-safe pseudo-labels")


@dataclass
class PseudoSet:
    """The pseudo-labelled test images of one fold and where they came from."""

    images: list[str]            # test image ids as in the prediction files
    targets: np.ndarray          # (n, C) label distributions
    weight: float
    record: dict[str, Any] = field(default_factory=dict)


def _is_submission(source: list[str] | str) -> bool:
    return isinstance(source, str) and source.endswith(".json")


def _from_teachers(cfg: Config, fold: int, classes: list[str], folds: pd.DataFrame) -> tuple[list[str], np.ndarray,
                                                                                           dict[str, Any]]:
    from pipeline.teachers import load_teachers, teacher_weights

    names = [cfg.pseudo.source] if isinstance(cfg.pseudo.source, str) else list(cfg.pseudo.source)
    teachers = load_teachers(cfg, names, classes, folds)
    weights = teacher_weights(teachers, folds, classes, exclude_fold=fold)
    used = []
    for t in teachers:
        tf = t.folds[fold]
        best = Path(tf.model)
        if best.is_file() and tf.checkpoint_stamp is not None:
            st = best.stat()
            if [st.st_size, st.st_mtime_ns] != list(tf.checkpoint_stamp):
                raise PipelineError(f"teacher {t.name!r} fold {fold}: test.csv was predicted from an older best.pt; "
                                    f"predict it again: python -m pipeline.predict --all-folds --set experiment={t.name}")
        used.append({"teacher": t.name, "fold": fold, "model": tf.model, "predictions": str(best.parent / "test.csv")})
    probs = sum(w * t.folds[fold].test for w, t in zip(weights, teachers))
    record = {"source": "experiments", "teachers": names, "weights": [float(w) for w in weights],
              "models": used, "fold_safe": True}
    return teachers[0].folds[fold].test_images, probs, record


def _from_submission(cfg: Config, classes: list[str]) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    path = Path(str(cfg.pseudo.source))
    if not path.is_file():
        raise PipelineError(f"pseudo.from = {str(path)!r}: no such submission .json; name a file under "
                            f"{paths.submissions_dir(cfg)}/ or teacher experiments")
    meta = read_json(path)
    weights = meta.get("weights") or {}
    if not weights:
        raise PipelineError(f"{path} records no experiment weights; it was not written by pipeline.ensemble")
    images, total = None, None
    for name, w in weights.items():
        run = paths.run_dir(cfg, name)
        tests = sorted(run.glob("fold*/test.csv"))
        if not tests:
            raise PipelineError(f"{path} blends {name!r}, which has no fold*/test.csv under {run}; predict it again")
        frames = [pd.read_csv(t, dtype={"image": str}, keep_default_na=False).set_index("image") for t in tests]
        images = images or list(frames[0].index)
        mean = sum(f.loc[images, classes].to_numpy(np.float64) for f in frames) / len(frames)
        total = w * mean if total is None else total + w * mean
    print(f"warning: {LEAK_WARNING}")
    record = {"source": "submission", "submission": str(path), "weights": weights, "fold_safe": False,
              "warning": LEAK_WARNING}
    return images, total, record


def pseudo_labels(cfg: Config, fold: int, classes: list[str], folds: pd.DataFrame) -> PseudoSet | None:
    """The pseudo-labelled test images for fold ``fold`` (None when ``pseudo.from`` is not set)."""
    p = cfg.pseudo
    if not p.enabled:
        return None
    if _is_submission(p.source):
        images, probs, record = _from_submission(cfg, classes)
    else:
        images, probs, record = _from_teachers(cfg, fold, classes, folds)
    keep = probs.max(1) >= p.threshold
    kept = probs[keep]
    targets = (kept / kept.sum(1, keepdims=True) if p.soft else
               one_hot(kept.argmax(1), len(classes), cfg.train.label_smoothing))
    chosen = [i for i, k in zip(images, keep) if k]
    record.update({"fold": fold, "threshold": p.threshold, "soft": p.soft, "weight": p.weight,
                   "n_test": len(images), "n_pseudo": int(keep.sum()),
                   "per_class": {c: int(n) for c, n in zip(classes, np.bincount(kept.argmax(1), minlength=len(classes)))}})
    return PseudoSet(chosen, targets.astype(np.float32), p.weight, record)
