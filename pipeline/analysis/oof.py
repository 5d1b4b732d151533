"""The out-of-fold predictions an analysis reads: one experiment's folds, or the submitted blend."""
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
class Oof:
    """Out-of-fold probabilities with their given labels, rows sorted by image."""

    source: str                 # what the predictions are, for the report ("digits_resnet10t, TTA")
    experiments: list[str]
    weights: dict[str, float]
    classes: list[str]
    images: list[str]
    labels: np.ndarray          # index of the given label, per row
    probs: np.ndarray           # (N, C) softmax probabilities
    folds: np.ndarray           # the fold each row was validated in (-1 for a blend of other fold sets)

    @property
    def label_names(self) -> list[str]:
        return [self.classes[i] for i in self.labels]

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)


def _read_fold_file(path: Path, classes: list[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"image": str, "label": str}, keep_default_na=False)
    except Exception as exc:  # pandas raises many kinds; the user needs the file name
        raise PipelineError(f"{path} could not be read as CSV ({exc}); train or predict that fold again") from None
    expected = ["image", "label", *classes]
    if list(df.columns) != expected:
        raise PipelineError(f"{path} has columns {list(df.columns)[:5]}...; expected image, label and one column "
                            "per class of classes.json: train or predict that fold again")
    return df


def experiment_oof(cfg: Config, name: str, use_tta: bool = True) -> tuple[pd.DataFrame, list[str], bool]:
    """One experiment's OOF rows over every fold (after TTA when every fold has ``oof_tta.csv``).

    Returns:
        (rows with a ``fold`` column, classes, whether the TTA predictions were used).
    """
    from pipeline.ensemble import experiment_folds

    run = paths.run_dir(cfg, name)
    if not (run / paths.CLASSES).is_file():
        raise PipelineError(f"{run / paths.CLASSES} does not exist; train experiment {name!r} first "
                            f"(python -m pipeline.run --set experiment={name})")
    classes = list(read_json(run / paths.CLASSES)["classes"])
    ks = experiment_folds(cfg, name)
    missing = [k for k in ks if not (paths.fold_dir(cfg, k, name) / paths.OOF).is_file()]
    if missing:
        raise PipelineError(f"experiment {name!r} has no OOF predictions for fold(s) {missing} "
                            f"({paths.fold_dir(cfg, missing[0], name) / paths.OOF}); finish training them first: "
                            f"python -m pipeline.run --set experiment={name}")
    tta = use_tta and all((paths.fold_dir(cfg, k, name) / paths.OOF_TTA).is_file() for k in ks)
    file = paths.OOF_TTA if tta else paths.OOF
    parts = [_read_fold_file(paths.fold_dir(cfg, k, name) / file, classes) for k in ks]
    rows = pd.concat(parts, ignore_index=True)
    # Built whole, not inserted: a column added to a frame of hundreds of class columns fragments it.
    rows = pd.concat([rows, pd.Series(np.repeat(ks, [len(p) for p in parts]), name="fold")], axis=1)
    rows = rows.sort_values("image", ignore_index=True)
    if rows["image"].duplicated().any():
        dup = rows.loc[rows["image"].duplicated(), "image"].iloc[0]
        raise PipelineError(f"{dup!r} is in the OOF predictions of two folds of {name!r}; folds.csv changed "
                            "between folds: retrain the experiment")
    return rows, classes, tta


def _to_oof(rows: pd.DataFrame, classes: list[str], source: str, experiments: list[str],
            weights: dict[str, float], probs: np.ndarray | None = None) -> Oof:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise PipelineError(f"OOF labels {unknown[:5]} are not classes of classes.json; retrain the experiment")
    p = rows[classes].to_numpy(np.float64) if probs is None else probs
    return Oof(source, experiments, weights, classes, rows["image"].tolist(),
               rows["label"].map(index).to_numpy(), p, rows["fold"].to_numpy(int))


def load_experiment_oof(cfg: Config, name: str | None = None) -> Oof:
    name = name or cfg.experiment
    rows, classes, tta = experiment_oof(cfg, name)
    return _to_oof(rows, classes, f"{name} ({'after TTA' if tta else 'no TTA'})", [name], {name: 1.0})


def latest_blend(cfg: Config) -> tuple[Path, dict]:
    """The newest submission JSON of this competition (what the ensemble stage blended, with weights)."""
    folder = paths.submissions_dir(cfg)
    found = []
    for js in folder.glob("*.json") if folder.is_dir() else []:
        try:
            meta = read_json(js)
        except (OSError, ValueError):
            continue
        if meta.get("competition") == cfg.competition.slug and meta.get("weights"):
            found.append((meta.get("created", ""), js.stat().st_mtime_ns, js, meta))
    if not found:
        raise PipelineError(f"no submission of competition {cfg.competition.slug!r} in {folder}/ to analyse; "
                            "run python -m pipeline.ensemble (or pipeline.run) first, or analyse one "
                            "experiment with --experiment NAME")
    _, _, js, meta = max(found, key=lambda f: (f[0], f[1]))
    return js, meta


def load_blend_oof(cfg: Config) -> Oof:
    """The OOF predictions of the newest submission's blend, with its weights (and its TTA choice)."""
    js, meta = latest_blend(cfg)
    weights = {n: float(w) for n, w in meta["weights"].items()}
    rows_ref, classes, probs = None, None, None
    for name, w in weights.items():
        rows, cls, _ = experiment_oof(cfg, name, use_tta=bool(meta.get("used_tta_oof", True)))
        if rows_ref is None:
            rows_ref, classes, probs = rows, cls, np.zeros((len(rows), len(cls)))
        elif cls != classes or not rows["image"].equals(rows_ref["image"]):
            raise PipelineError(f"{js} blends {name!r}, whose OOF images or classes differ from "
                                f"{next(iter(weights))!r}; run python -m pipeline.ensemble again")
        probs += w * rows[classes].to_numpy(np.float64)
    assert rows_ref is not None and classes is not None
    source = f"blend of {', '.join(f'{n} x{w:.3f}' for n, w in weights.items())} ({js.name})"
    return _to_oof(rows_ref, classes, source, list(weights), weights, probs / max(sum(weights.values()), 1e-12))
