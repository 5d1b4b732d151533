"""Where each stage reads and writes (design.md, "Files between stages")."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Config


def work_dir(cfg: Config) -> Path:
    return Path(cfg.paths.work) / cfg.competition.slug


def dedup_csv(cfg: Config) -> Path:
    return work_dir(cfg) / "dedup.csv"


def dedup_report(cfg: Config) -> Path:
    return work_dir(cfg) / "dedup_report.json"


def folds_csv(cfg: Config) -> Path:
    return work_dir(cfg) / "folds.csv"


def run_dir(cfg: Config, experiment: str | None = None) -> Path:
    return Path(cfg.paths.runs) / (experiment or cfg.experiment)


def fold_dir(cfg: Config, fold: int, experiment: str | None = None) -> Path:
    return run_dir(cfg, experiment) / f"fold{fold}"


def submissions_dir(cfg: Config) -> Path:
    return Path(cfg.paths.submissions)
