"""The experiments under ``runs/``: which belong in a blend, and keeping an old one aside.

A blend needs experiments trained on the current ``folds.csv`` (same images in the same folds,
same labels). After a label fix, another dedup policy or new images, older experiments no longer
match; they are skipped with one line each that says why and what to do, so one stale folder
never blocks every later submission.

``ensemble.experiments`` means the current experiment plus the ones listed (a round-2 config lists
its teachers); with an empty list every complete experiment of the competition is blended.
Members are checked before training starts (:func:`announce_members`) and again before blending
(:func:`choose_members`).

An experiment whose training settings change under the same name is moved to
``runs/<experiment>@<time>/`` (:func:`set_aside`) instead of being overwritten. Such folders
are kept for ``compare`` and are never blended unless named.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import PipelineError

SET_ASIDE_MARK = "@"  # runs/<experiment>@<time>/: an earlier experiment of that name, kept


@dataclass
class Members:
    """The experiments of a blend and the ones left out (name -> one line: why and what to do)."""

    names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    folds: dict[str, list[int]] = field(default_factory=dict)  # a member's folds when not all (run --partial)


def saved_config(cfg: Config, name: str) -> dict[str, Any] | None:
    """``runs/<name>/config.yaml`` as a dict, or None when missing or unreadable."""
    try:
        data = yaml.safe_load((paths.run_dir(cfg, name) / paths.CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def competition_of(data: dict[str, Any]) -> str:
    comp = data.get("competition") if isinstance(data.get("competition"), dict) else {}
    return str(comp.get("name") or Path(str(comp.get("root") or "")).name)


def experiment_folds(cfg: Config, name: str) -> list[int]:
    """The folds an experiment was trained with (``folds.k`` of its saved config)."""
    data = saved_config(cfg, name)
    if data is None:
        raise PipelineError(f"{paths.run_dir(cfg, name) / paths.CONFIG} is missing or unreadable; "
                            f"train experiment {name!r} first (python -m pipeline.run --set experiment={name})")
    return list(range(int((data.get("folds") or {}).get("k", cfg.folds.k))))


def missing_predictions(cfg: Config, name: str, folds: list[int] | None = None) -> list[str]:
    """What experiment ``name`` lacks for blending (empty when every fold, or each of ``folds``, has
    OOF and test files)."""
    missing = []
    for k in folds or experiment_folds(cfg, name):
        d = paths.fold_dir(cfg, k, name)
        missing += [f"{paths.fold_name(k)}/{f}" for f in (paths.OOF, paths.TEST) if not (d / f).is_file()]
    return missing


def read_current_folds(cfg: Config) -> pd.DataFrame | None:
    """``folds.csv`` of the config's competition, or None before the folds stage has run."""
    path = paths.folds_csv(cfg)
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"image": str, "label": str}, keep_default_na=False)


def folds_mismatch(cfg: Config, name: str, folds: pd.DataFrame) -> str | None:
    """Why experiment ``name`` was not trained on ``folds`` (None when every fold's OOF rows are
    exactly that fold's images with their current labels)."""
    moved = relabelled = 0
    example = None
    for k in experiment_folds(cfg, name):
        path = paths.fold_dir(cfg, k, name) / paths.OOF
        try:
            oof = pd.read_csv(path, usecols=["image", "label"], dtype=str, keep_default_na=False)
        except (OSError, ValueError) as exc:
            return f"{path} is unreadable ({exc})"
        want = folds.loc[folds["fold"] == k, ["image", "label"]]
        have_labels = dict(zip(oof["image"], oof["label"]))
        want_labels = dict(zip(want["image"], want["label"]))
        diff = set(have_labels) ^ set(want_labels)
        changed = [i for i in set(have_labels) & set(want_labels) if have_labels[i] != want_labels[i]]
        moved += len(diff)
        relabelled += len(changed)
        example = example or next(iter(sorted(diff) or sorted(changed)), None)
    if not moved and not relabelled:
        return None
    parts = [f"{moved} image(s) in other folds or not in it" if moved else "",
             f"{relabelled} label(s) changed" if relabelled else ""]
    return (f"trained on another folds.csv ({', '.join(p for p in parts if p)}, e.g. {example!r}: a label fix, "
            "dedup policy or new images since)")


def _way_out(cfg: Config, name: str) -> str:
    run = paths.run_dir(cfg, name)
    return (f"retrain it on the current data with python -m pipeline.run --config {run / paths.CONFIG}, "
            f"or move {run}/ away to stop this line")


def member_problem(cfg: Config, name: str, folds: pd.DataFrame | None) -> str | None:
    """Why ``name`` cannot be blended now (one line with what to do), or None when it can."""
    data = saved_config(cfg, name)
    if data is None:
        return (f"no {paths.run_dir(cfg, name) / paths.CONFIG} (not trained yet): train it with "
                f"python -m pipeline.run --set experiment={name}, or take it out of ensemble.experiments")
    if competition_of(data) != cfg.competition.slug:
        return (f"it belongs to competition {competition_of(data)!r}, not {cfg.competition.slug!r}; take it out "
                "of ensemble.experiments")
    missing = missing_predictions(cfg, name)
    if missing:
        return (f"no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: finish it with "
                f"python -m pipeline.run --config {paths.run_dir(cfg, name) / paths.CONFIG}")
    if folds is not None:
        why = folds_mismatch(cfg, name, folds)
        if why:
            return f"{why}; {_way_out(cfg, name)}"
    return None


def candidates(cfg: Config) -> list[str]:
    """The current experiment plus ``ensemble.experiments``; with an empty list, every experiment of
    the competition under ``paths.runs`` (folders set aside with ``@`` only when listed)."""
    if cfg.ensemble.experiments:
        return list(dict.fromkeys([cfg.experiment, *cfg.ensemble.experiments]))
    root = Path(cfg.paths.runs)
    found = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if SET_ASIDE_MARK in run.name or not (run / paths.CONFIG).is_file():
            continue
        if (run / paths.MEMBER_OF).is_file():
            continue  # a seed member: blended through its experiment's average (pipeline/seeds.py)
        data = saved_config(cfg, run.name)
        if data is not None and competition_of(data) == cfg.competition.slug:
            found.append(run.name)
    return found


def choose_members(cfg: Config, explicit: list[str] | None = None, folds: pd.DataFrame | None = None) -> Members:
    """The experiments to blend now and the ones skipped (with why).

    Args:
        cfg: the config (``experiment``, ``ensemble.experiments``, ``paths``, ``competition``).
        explicit: names given on the command line (``--experiments``): exactly these, and any that
            cannot be blended is an error rather than a skip.
        folds: the current ``folds.csv`` (read when omitted).
    """
    folds = read_current_folds(cfg) if folds is None else folds
    if explicit:
        if len(set(explicit)) != len(explicit):
            raise PipelineError(f"--experiments lists a name twice: {explicit}")
        for name in explicit:
            why = member_problem(cfg, name, folds)
            if why:
                raise PipelineError(f"experiment {name!r} cannot be blended: {why}")
        return Members(list(explicit))
    members = Members([])
    for name in candidates(cfg):
        why = member_problem(cfg, name, folds)
        if why:
            members.skipped[name] = why
        else:
            members.names.append(name)
    return members


def announce_members(cfg: Config, folds: pd.DataFrame | None = None, say=print) -> Members:
    """Before training: which listed experiments will join the blend and which cannot (so a typo in
    ``ensemble.experiments`` shows in the first second, not after hours of training)."""
    listed = [n for n in cfg.ensemble.experiments if n != cfg.experiment]
    members = Members([])
    folds = read_current_folds(cfg) if folds is None else folds
    for name in listed:
        why = member_problem(cfg, name, folds)
        if why:
            members.skipped[name] = why
            say(f"        ensemble: {name} (in ensemble.experiments) will be left out: {why}")
        else:
            members.names.append(name)
    if listed:
        say(f"        ensemble: {cfg.experiment} + {len(members.names)} listed experiment(s) "
            f"{members.names} will be blended")
    return members


def set_aside(cfg: Config, why: str) -> Path | None:
    """Move ``runs/<experiment>/`` to ``runs/<experiment>@<time>/`` and say so; None when absent."""
    run = paths.run_dir(cfg)
    if not run.is_dir():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run.with_name(f"{run.name}{SET_ASIDE_MARK}{stamp}")
    n = 1
    while target.exists():  # two set-asides within a second
        target = run.with_name(f"{run.name}{SET_ASIDE_MARK}{stamp}-{n}")
        n += 1
    run.rename(target)
    print(f"train: kept the earlier {cfg.experiment} in {target}/ ({why}); it stays in compare, and "
          "--force replaces an experiment instead")
    return target


def discover_experiments(cfg: Config, verbose: bool = True) -> list[str]:
    """The experiments a blend of ``cfg`` takes now (:func:`choose_members`), saying why others are left out."""
    members = choose_members(cfg)
    if verbose:
        for name, why in members.skipped.items():
            print(f"ensemble: skipping {name}: {why}")
    return members.names
