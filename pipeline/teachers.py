"""Teacher experiments for the second round: their per-fold predictions, checked against our folds.

Pseudo-labelling and distillation learn from earlier experiments of the same competition. Both
need a teacher's predictions *per fold*, so that what trains fold k can be chosen by where it came
from: :func:`load_teachers` reads each teacher's ``fold<k>/oof[_tta].csv`` and ``fold<k>/test.csv``
as the predict stage wrote them, and checks that every teacher was trained on the same folds as
the student (fold k's validation images are the same images), which fold safety rests on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io import read_json


@dataclass
class TeacherFold:
    """One teacher's fold k: its OOF rows (images of fold k) and its test predictions."""

    oof_images: list[str]
    oof: np.ndarray          # (n_k, C) after TTA when the fold has oof_tta.csv
    test_images: list[str]
    test: np.ndarray         # (T, C)
    model: str               # the checkpoint the test predictions came from
    checkpoint_stamp: list[int] | None  # best.pt [size, mtime_ns] recorded by predict


@dataclass
class Teacher:
    name: str
    classes: list[str]
    folds: dict[int, TeacherFold]


def _read(path: Path, classes: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; a teacher needs OOF and test predictions for every fold: "
                            f"python -m pipeline.run --set experiment={path.parent.parent.name}")
    df = pd.read_csv(path, dtype={"image": str, "label": str}, keep_default_na=False)
    missing = [c for c in ["image"] + classes if c not in df.columns]
    if missing:
        raise PipelineError(f"{path} lacks columns {missing[:4]}; predict that fold again")
    return df


def load_teacher(cfg: Config, name: str, classes: list[str], folds: pd.DataFrame) -> Teacher:
    """Every fold of teacher ``name``, checked to have our classes and our folds."""
    run = paths.run_dir(cfg, name)
    if name == cfg.experiment:
        raise PipelineError(f"experiment {name!r} names itself as its teacher; name an earlier experiment")
    if not (run / "classes.json").is_file():
        raise PipelineError(f"teacher {name!r}: {run}/classes.json is missing; train and predict it first "
                            f"(python -m pipeline.run --set experiment={name} ...)")
    if list(read_json(run / "classes.json")["classes"]) != list(classes):
        raise PipelineError(f"teacher {name!r} has other classes than this competition; it cannot teach here")
    ks = sorted(int(k) for k in folds["fold"].unique() if k >= 0)
    out = {}
    for k in ks:
        d = paths.fold_dir(cfg, k, name)
        oof = _read(d / "oof_tta.csv" if (d / "oof_tta.csv").is_file() else d / "oof.csv", classes)
        ours = set(folds.loc[folds["fold"] == k, "image"])
        if set(oof["image"]) != ours:
            raise PipelineError(f"teacher {name!r} fold {k} validated other images than this experiment's fold {k} "
                                f"({len(set(oof['image']) ^ ours)} differ): fold-safe pseudo-labels and distillation "
                                "need the teacher's folds; train both with the same folds.k, folds.seed and dedup "
                                "settings (the same folds.csv)")
        test = _read(d / "test.csv", classes)
        stamp = None
        if (d / "predict.json").is_file():
            stamp = read_json(d / "predict.json").get("settings", {}).get("checkpoint")
        out[k] = TeacherFold(oof["image"].tolist(), oof[classes].to_numpy(np.float64), test["image"].tolist(),
                             test[classes].to_numpy(np.float64), str(d / "best.pt"), stamp)
    return Teacher(name, list(classes), out)


def load_teachers(cfg: Config, names: list[str], classes: list[str], folds: pd.DataFrame) -> list[Teacher]:
    if len(set(names)) != len(names):
        raise PipelineError(f"teachers listed twice: {names}")
    teachers = [load_teacher(cfg, n, classes, folds) for n in names]
    for t in teachers[1:]:
        for k, f in t.folds.items():
            if f.test_images != teachers[0].folds[k].test_images:
                raise PipelineError(f"teachers {teachers[0].name!r} and {t.name!r} predicted different test images "
                                    f"in fold {k}; predict both again on the current competition")
    return teachers


def teacher_weights(teachers: list[Teacher], folds: pd.DataFrame, classes: list[str], exclude_fold: int | None
                    ) -> np.ndarray:
    """Blend weights of the teachers (SLSQP on OOF log loss, as the ensemble's default), fit on the OOF
    rows of every fold but ``exclude_fold``: the labels of the fold a student validates on never
    choose the weights of what teaches it."""
    from pipeline.ensemble import optimize_weights

    if len(teachers) == 1:
        return np.ones(1)
    index = {c: i for i, c in enumerate(classes)}
    label_of = dict(zip(folds["image"], folds["label"]))
    probs, y = [], None
    for t in teachers:
        images, rows = [], []
        for k, f in sorted(t.folds.items()):
            if k == exclude_fold:
                continue
            images += f.oof_images
            rows.append(f.oof)
        order = np.argsort(images)
        probs.append(np.concatenate(rows)[order])
        if y is None:
            y = np.array([index[label_of[images[i]]] for i in order])
    return optimize_weights(np.stack(probs), y)
