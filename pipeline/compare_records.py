"""Run records read from disk: ``runs/<experiment>/`` as :class:`RunRecord` and one row per run.

Reading is kept apart from rendering (:mod:`pipeline.compare` prints tables, :mod:`pipeline.compare_plots`
draws), so both import the records and neither imports the other. Nothing here raises on a
partial run: a fold still training, killed, or with a half-written file is marked incomplete
and the problem becomes a note.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline import paths
from pipeline.compare_wandb import WandbRun, find_wandb_runs
from pipeline.errors import PipelineError

FOLD_DIR = re.compile(r"^fold(\d+)$")


@dataclass
class FoldRecord:
    """One ``fold<K>/`` folder as found on disk."""

    fold: int
    path: Path
    status: str  # "complete", "incomplete" or "missing" (folder not created yet)
    metrics: dict[str, Any] | None = None
    history: pd.DataFrame | None = None
    predict: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def score(self) -> float:
        """Validation accuracy of a complete fold (NaN otherwise)."""
        if not self.complete:
            return math.nan
        return _float(self.metrics.get("val_acc"))

    @property
    def epochs_done(self) -> int:
        return 0 if self.history is None else len(self.history)

    @property
    def tta_gain(self) -> float:
        p = self.predict or {}
        return _float(p.get("oof_acc_tta")) - _float(p.get("oof_acc"))


@dataclass
class RunRecord:
    """One ``runs/<experiment>/`` folder: its resolved config, folds and W&B runs."""

    experiment: str
    path: Path
    config: dict[str, Any]
    folds: list[FoldRecord]
    wandb: list[WandbRun] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def complete_folds(self) -> list[FoldRecord]:
        return [f for f in self.folds if f.complete]

    @property
    def is_complete(self) -> bool:
        return bool(self.folds) and all(f.complete for f in self.folds)

    @property
    def competition(self) -> str:
        """The competition's folder name under ``paths.work`` (``competition.name``, else the root's name)."""
        return competition_of(self.config)

    @property
    def metric(self) -> str:
        """The competition's metric (``accuracy`` or ``log_loss``) the run was scored by."""
        return str(self.get("competition.metric") or "accuracy")

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``model.backbone``)."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def competition_of(config: dict[str, Any]) -> str:
    """The competition slug of a saved run config (as ``CompetitionConfig.slug``); "?" without one."""
    comp = config.get("competition") if isinstance(config.get("competition"), dict) else {}
    return str(comp.get("name") or Path(str(comp.get("root") or "")).name or "?")


def disk_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (checkpoints dominate: the figure to watch on a 20 GB disk)."""
    total = 0
    for f in path.rglob("*"):
        try:
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
        except OSError:  # a file removed while we walk (a fold still training)
            continue
    return total


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path} is half-written or damaged ({exc}); shown as incomplete")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} does not hold a JSON object; ignored")
        return None
    return data


def _read_history(path: Path, problems: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        problems.append(f"{path} could not be read ({exc}); learning curve left out")
        return None
    if "epoch" not in df.columns:
        problems.append(f"{path} has no 'epoch' column (columns: {list(df.columns)}); learning curve left out")
        return None
    return df


def load_fold(path: Path, fold: int) -> FoldRecord:
    """Read one fold folder; every problem becomes a note and the fold is marked incomplete."""
    if not path.is_dir():
        return FoldRecord(fold=fold, path=path, status="missing")
    problems: list[str] = []
    metrics = _read_json(path / paths.METRICS, problems)
    history = _read_history(path / paths.HISTORY, problems)
    predict = _read_json(path / paths.PREDICT, problems)
    complete = bool(metrics and metrics.get("complete") is True)
    if metrics and not complete:
        problems.append(f"{path / 'metrics.json'} is not marked complete; shown as incomplete")
    return FoldRecord(fold=fold, path=path, status="complete" if complete else "incomplete",
                      metrics=metrics, history=history, predict=predict, problems=problems)


def is_run_folder(path: Path) -> bool:
    """A classification run: ``fold<K>/`` folders, or a ``config.yaml`` before the first fold starts.

    Detection runs (``pipeline.detect``) keep history.csv, metrics.json and checkpoints at the top
    of their folder instead of per fold; they are not comparable here and are left out.
    """
    if not path.is_dir():
        return False
    if any(FOLD_DIR.match(p.name) and p.is_dir() for p in path.iterdir()):
        return True
    return (path / paths.CONFIG).is_file() and not any(
        (path / name).exists() for name in (paths.METRICS, paths.HISTORY, paths.LAST, paths.BEST))


def load_run(path: str | Path) -> RunRecord:
    """Read ``runs/<experiment>/`` (config, every fold, W&B runs) without raising on partial runs."""
    path = Path(path)
    problems: list[str] = []
    config: dict[str, Any] = {}
    cfg_path = path / paths.CONFIG
    if cfg_path.is_file():
        try:
            loaded = yaml.safe_load(cfg_path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
            if not isinstance(loaded, dict):
                problems.append(f"{cfg_path} does not hold a mapping of keys; config columns left empty")
        except (OSError, yaml.YAMLError) as exc:
            problems.append(f"{cfg_path} could not be read ({exc}); config columns left empty")
    else:
        problems.append(f"{cfg_path} is missing (training has not written it yet)")

    found = {int(m.group(1)): p for p in path.iterdir() if p.is_dir() and (m := FOLD_DIR.match(p.name))}
    k = config.get("folds", {}).get("k") if isinstance(config.get("folds"), dict) else None
    # folds.k says how many folds make the run; a smoke run of fold 0 alone is then 1/k complete
    total = max(k if isinstance(k, int) and k > 0 else 0, max(found) + 1 if found else 0)
    folds = [load_fold(found.get(i, path / paths.fold_name(i)), i) for i in range(total)]
    for f in folds:
        problems.extend(f.problems)
    return RunRecord(experiment=path.name, path=path, config=config, folds=folds,
                     wandb=find_wandb_runs(path), problems=problems)


def load_runs(runs_root: str | Path, experiments: list[str] | None = None) -> list[RunRecord]:
    """Every run folder under ``runs_root``, or those named (shell-style patterns allowed).

    Raises:
        PipelineError: no runs at all, or a name that matches no run folder.
    """
    root = Path(runs_root)
    available = sorted(p.name for p in root.iterdir() if is_run_folder(p)) if root.is_dir() else []
    if not available:
        raise PipelineError(f"no runs found under {root}/; train one first (python -m pipeline.train --fold 0) "
                            "or point paths.runs at your runs folder with --set paths.runs=PATH")
    if experiments:
        chosen: list[str] = []
        for name in experiments:
            hits = fnmatch.filter(available, name)
            if not hits:
                close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise PipelineError(f"no run folder {root / name}.{hint} Runs there: {', '.join(available)}")
            chosen.extend(h for h in hits if h not in chosen)
    else:
        chosen = available
    return [load_run(root / name) for name in chosen]


def augment_summary(run: RunRecord) -> str:
    """The augmentations that change results most, in a few characters (``mixup0.2 cutmix1 ls0.1 ema``)."""
    parts = []
    for key, short in (("train.mixup_alpha", "mixup"), ("train.cutmix_alpha", "cutmix"),
                       ("train.label_smoothing", "ls")):
        v = _float(run.get(key))
        if v > 0:
            parts.append(f"{short}{v:g}")
    if run.get("train.ema") is True:
        parts.append("ema")
    return " ".join(parts) or "none"


def summarize(runs: list[RunRecord]) -> pd.DataFrame:
    """One row per run with raw values (numbers stay numbers; NaN where a run has none)."""
    k_max = max((len(r.folds) for r in runs), default=0)
    rows = []
    for r in runs:
        done = r.complete_folds
        scores = [f.score for f in done]
        gains = [g for g in (f.tta_gain for f in done) if not math.isnan(g)]
        losses = [v for v in (_float(f.metrics.get("val_loss")) for f in done) if not math.isnan(v)]
        speeds = [_float(f.metrics.get("images_per_s")) for f in done]
        row: dict[str, Any] = {
            "experiment": r.experiment,
            "competition": r.competition,
            "metric": r.metric,
            "backbone": r.get("model.backbone"),
            "img_size": r.get("train.img_size"),
            "epochs": r.get("train.epochs"),
            "augment": augment_summary(r),
            "cv_mean": float(np.mean(scores)) if scores else math.nan,
            # sample std over folds (ddof=1): the spread a new fold would show; NaN with one fold
            "cv_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else math.nan,
            "cv_loss": float(np.mean(losses)) if losses else math.nan,
        }
        for i in range(k_max):
            row[f"fold{i}"] = r.folds[i].score if i < len(r.folds) else math.nan
        row.update({
            "tta_gain": float(np.mean(gains)) if gains else math.nan,
            "train_time_s": float(np.nansum([_float(f.metrics.get("train_time_s")) for f in done])) if done
            else math.nan,
            "images_per_s": float(np.nanmean(speeds)) if speeds and not all(map(math.isnan, speeds)) else math.nan,
            "folds_complete": len(done),
            "folds_total": len(r.folds),
            "status": "complete" if r.is_complete else "incomplete",
            "wandb_runs": len(r.wandb),
            "wandb_unsynced": sum(1 for w in r.wandb if w.offline and not w.synced),
            "disk_bytes": disk_bytes(r.path),
        })
        rows.append(row)
    return pd.DataFrame(rows)
