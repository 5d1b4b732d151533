"""``seeds: [0, 1, 2]``: one recipe under several seeds, as members of one experiment.

Each seed trains the whole experiment (every fold; the folds stay fixed, since ``folds.seed`` is
not the run's seed) as a member run ``runs/<experiment>-seed<s>/`` marked by ``member_of.json``.
The experiment's own folder then holds the members' **average**: per fold ``oof.csv``,
``oof_tta.csv`` and ``test.csv`` (the mean of the members' probabilities, row for row) and
``predict.json``, plus ``seeds.json`` (members and their scores). The ensemble stage therefore
sees one experiment, averaged before blending, and never the members themselves.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import Config, save_config
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_csv, atomic_write_json, read_json
from pipeline.metrics import accuracy, log_loss


def member_name(experiment: str, seed: int) -> str:
    return f"{experiment}-seed{seed}"


def is_member(cfg: Config, experiment: str) -> bool:
    """Whether ``experiment`` is a seed member of another experiment (never blended on its own)."""
    return (paths.run_dir(cfg, experiment) / paths.MEMBER_OF).is_file()


def member_configs(cfg: Config) -> list[Config]:
    """The member runs of ``cfg`` (empty when ``seeds`` is not set)."""
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise PipelineError(f"seeds {cfg.seeds} lists a seed twice")
    out = []
    for s in cfg.seeds:
        m = cfg.model_copy(deep=True)
        m.experiment, m.seed, m.seeds = member_name(cfg.experiment, s), int(s), []
        out.append(m)
    return out


def mark_member(cfg: Config, member: Config) -> None:
    atomic_write_json(paths.run_dir(member) / paths.MEMBER_OF, {"experiment": cfg.experiment, "seed": member.seed})


def _mean_frames(frames: list[pd.DataFrame], classes: list[str], where: str) -> pd.DataFrame:
    first = frames[0]
    for f in frames[1:]:
        if not f["image"].equals(first["image"]):
            raise PipelineError(f"seed members predicted other rows for {where}; run the experiment again")
    out = first.copy()
    out[classes] = sum(f[classes].to_numpy(np.float64) for f in frames) / len(frames)
    return out


def average_members(cfg: Config, members: list[Config], folds: list[int]) -> dict[str, Any]:
    """Write the experiment's per-fold average of its members' predictions; returns seeds.json."""
    run = paths.run_dir(cfg)
    classes = list(read_json(paths.run_dir(members[0]) / paths.CLASSES)["classes"])
    save_config(cfg, run / paths.CONFIG)
    atomic_write_json(run / paths.CLASSES, {"classes": classes})
    index = {c: i for i, c in enumerate(classes)}
    summary: dict[str, Any] = {"members": [m.experiment for m in members], "seeds": [m.seed for m in members],
                               "folds": {}}
    for k in folds:
        d = paths.fold_dir(cfg, k)
        read = {}
        for name in (paths.OOF, paths.OOF_TTA, paths.TEST):
            frames = [pd.read_csv(paths.fold_dir(m, k) / name, dtype={"image": str, "label": str},
                                  keep_default_na=False) for m in members]
            read[name] = _mean_frames(frames, classes, f"fold{k}/{name}")
            atomic_write_csv(d / name, read[name])
        y = read[paths.OOF]["label"].map(index).to_numpy()
        member_acc = [read_json(paths.fold_dir(m, k) / paths.PREDICT).get("oof_acc_tta") for m in members]
        tta = read_json(paths.fold_dir(members[0], k) / paths.PREDICT).get("tta", [])
        info = {"tta": tta, "seeds": [m.seed for m in members],
                "oof_acc": accuracy(read[paths.OOF][classes].to_numpy(), y),
                "oof_logloss": log_loss(read[paths.OOF][classes].to_numpy(), y),
                "oof_acc_tta": accuracy(read[paths.OOF_TTA][classes].to_numpy(), y),
                "oof_logloss_tta": log_loss(read[paths.OOF_TTA][classes].to_numpy(), y),
                "member_oof_acc_tta": member_acc}
        atomic_write_json(d / paths.PREDICT, info)
        summary["folds"][k] = info
    atomic_write_json(run / paths.SEEDS, summary)
    return summary
