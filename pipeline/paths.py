"""Where each stage reads and writes (README, "Files between stages").

Every file name between stages is spelled here once; the stage that writes a file also decides
whether it is current (``train.fold_is_current``, ``predict.prediction_is_current``,
``ensemble.latest_matching_submission``). Functions take any run config that has ``paths`` and
``experiment`` (classification and detection alike).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# runs/<experiment>/
CONFIG = "config.yaml"
CLASSES = "classes.json"
# runs/<experiment>/fold<K>/ (detection keeps the same names at the top of its run folder)
BEST = "best.pt"
LAST = "last.pt"
HISTORY = "history.csv"
METRICS = "metrics.json"
OOF = "oof.csv"
TEST = "test.csv"
OOF_TTA = "oof_tta.csv"
PREDICT = "predict.json"
DETECTIONS = "predictions.csv"
SWA = "swa.pt"                      # train.swa's running average (kept apart from last.pt)
SECOND_ROUND = "second_round.json"  # what pseudo-labels / distillation taught the fold
MEMBER_OF = "member_of.json"        # runs/<experiment>-seed<s>/: a seed member of <experiment>
SEEDS = "seeds.json"                # runs/<experiment>/: its seed members and their scores
# runs/<experiment>/analysis/ (work/<competition>/analysis/ for a blend): pipeline.analyze
ANALYSIS = "analysis"
LABEL_ISSUES = "label_issues.csv"
EXCLUDE_DRAFT = "exclude.csv"
RELABEL_DRAFT = "relabel.csv"
ANALYSIS_SUMMARY = "summary.json"
# every file a fold's training makes or that was made from its weights (removed on a retrain)
FOLD_OUTPUTS = (BEST, LAST, HISTORY, OOF, METRICS, TEST, OOF_TTA, PREDICT, SWA, SECOND_ROUND)


def checkpoint_name(which: str) -> str:
    """``best`` or ``last`` -> the checkpoint's file name."""
    return {"best": BEST, "last": LAST}[which]


def work_dir(cfg: Any) -> Path:
    return Path(cfg.paths.work) / cfg.competition.slug


def dedup_csv(cfg: Any) -> Path:
    return work_dir(cfg) / "dedup.csv"


def dedup_report(cfg: Any) -> Path:
    return work_dir(cfg) / "dedup_report.json"


def dedup_sheet(cfg: Any) -> Path:
    return work_dir(cfg) / "dedup_sheet.png"


def folds_csv(cfg: Any) -> Path:
    return work_dir(cfg) / "folds.csv"


def folds_json(cfg: Any) -> Path:
    return work_dir(cfg) / "folds.json"


def run_dir(cfg: Any, experiment: str | None = None) -> Path:
    return Path(cfg.paths.runs) / (experiment or cfg.experiment)


def fold_dir(cfg: Any, fold: int, experiment: str | None = None) -> Path:
    return run_dir(cfg, experiment) / fold_name(fold)


def fold_name(fold: int) -> str:
    return f"fold{fold}"


def submissions_dir(cfg: Any) -> Path:
    return Path(cfg.paths.submissions)


def analysis_dir(cfg: Any, experiment: str | None = None, blend: bool = False) -> Path:
    """``runs/<experiment>/analysis/``, or ``work/<competition>/analysis/`` for the blend."""
    return work_dir(cfg) / ANALYSIS if blend else run_dir(cfg, experiment) / ANALYSIS


def package_dir(cfg: Any, name: str) -> Path:
    """``packages/<name>/``: an inference package (its inside is named by pipeline.package_files)."""
    return Path(cfg.paths.packages) / name


def rehearsal_dir(cfg: Any, name: str) -> Path:
    """Where ``pipeline.package --rehearse`` builds its fresh venv and replicated test set."""
    return work_dir(cfg) / "rehearsal" / name


# work/<competition>/cache_<size>/ (pipeline.prepare): cache.json last, so a folder without it is no cache
CACHE_META = "cache.json"
CACHE_INDEX = "index.csv"
CACHE_ARRAY = "images.u8"  # cache.format memmap
CACHE_FILES = "files"  # cache.format jpeg / png


def cache_dir(cfg: Any, size: int) -> Path:
    """The resized-image cache of short side ``size`` (written by ``pipeline.prepare``)."""
    return work_dir(cfg) / f"cache_{size}"


def fold_lock(cfg: Any, fold: int, seed: int, experiment: str | None = None) -> Path:
    """The lock of one unit of work (pipeline/locks.py); its holder is in ``<name>.holder.json``."""
    return run_dir(cfg, experiment) / "locks" / f"seed{seed}-fold{fold}.lock"


def launch_dir(cfg: Any, experiment: str | None = None) -> Path:
    """The launchers' files: the config fold jobs read, one log per fold, submitit's job folders."""
    return run_dir(cfg, experiment) / "launch"


def fold_log(cfg: Any, fold: int, experiment: str | None = None) -> Path:
    return launch_dir(cfg, experiment) / f"{fold_name(fold)}.log"
