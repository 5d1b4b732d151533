"""The main job: every stage, every fold, in order, skipping what is complete and up to date.

``python -m pipeline.run`` (with no argument: the embedded default competition)

1. the resized-image cache when ``cache.size`` is set (``pipeline.prepare``), then dedup + folds
   (``pipeline.folds.ensure_folds``): each made again only when inputs or settings change;
2. train each fold (skipped when its ``metrics.json`` is complete, its saved config matches the
   current one and its OOF rows are the fold's rows of folds.csv);
3. predict each fold with TTA (skipped when made from the same checkpoint and TTA settings);
4. ensemble every complete experiment of the competition (or ``ensemble.experiments``) and write a
   submission (skipped when the newest submission was made from the same predictions and settings);
5. a summary: CV scores, the submission, and its score against the hidden solution when the
   competition has one (the embedded default does).

A second run with nothing changed does no work and prints the same summary. Under torchrun the
training is distributed; folds, prediction and ensembling run on rank 0 only.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import Config, add_config_args, config_from_args
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import read_json


@dataclass
class RunSummary:
    experiment: str
    cv: dict[str, Any]
    submission: Path | None
    solution_score: float | None
    weights: dict[str, float]
    trained: list[int]
    skipped: list[int]
    wall_time_s: float


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _chosen_folds(all_folds: list[int], only: list[int] | None) -> list[int]:
    if not only:
        return all_folds
    bad = [k for k in only if k not in all_folds]
    if bad:
        raise PipelineError(f"--folds {bad[0]}: folds.csv has folds {all_folds}; choose among them (folds.k sets how many)")
    return sorted(set(only))


def run_all(cfg: Config, name: str | None = None, only_folds: list[int] | None = None, partial: bool = False,
            force: bool = False, wait: bool = True) -> RunSummary:
    """Run every stage of ``cfg.experiment`` in order; see the module docstring.

    Args:
        only_folds: train and predict these folds alone (a quick look); no submission then unless
            every fold is complete or ``partial`` (a submission from these folds, named ``*_partial``).
        wait: with launcher.kind=submitit, False returns once the folds are submitted (``--no-wait``).
        force: replace an experiment of this name trained with other settings instead of keeping it
            as ``runs/<experiment>@<time>/``.
    """
    from pipeline.data import load_competition
    from pipeline.data.cache import resolve_size
    from pipeline.engine.budget import parse_duration, start_run_clock, stop_run_clock
    from pipeline.engine.distributed import barrier, init_distributed
    from pipeline.ensemble import ensure_submission, format_table
    from pipeline.experiments import Members, announce_members, choose_members
    from pipeline.finetune import resolve_training_config
    from pipeline.folds import ensure_folds
    from pipeline.predict import predict_fold
    from pipeline.prepare import ensure_cache
    from pipeline.seeds import average_members, mark_member, member_configs
    from pipeline.train import fold_is_current, sync_validation_labels

    start = time.time()
    dist = init_distributed(cfg.device)
    say = print if dist.is_main else (lambda *a, **k: None)
    # finetune.* and train.img_size: auto resolved here too, so the up-to-date check sees what trains.
    cfg = resolve_training_config(cfg, quiet=not dist.is_main)
    # seeds: [..]: every stage up to prediction runs for each seed's member run; the experiment
    # itself then holds their average (pipeline/seeds.py), which is what gets blended.
    members = member_configs(cfg)

    t = time.time()
    cached = ""
    if dist.is_main:
        comp = load_competition(cfg.competition)
        if resolve_size(cfg.cache, cfg.train) is not None:
            # First, so that dedup, training and prediction all read the resized images.
            cache = ensure_cache(cfg)
            cached = f", {cache.folder.name} ({cache.format})"
        folds = ensure_folds(cfg)
    barrier(dist)
    if not dist.is_main:
        comp = load_competition(cfg.competition, build=False)
        folds = ensure_folds(cfg)
    all_ks = sorted(int(k) for k in folds["fold"].unique() if k >= 0)
    ks = _chosen_folds(all_ks, only_folds)
    say(f"[1/4] data+folds  {comp.slug}: {len(comp.train)} train / {len(comp.test)} test images, "
        f"{len(folds)} in folds.csv, {len(all_ks)} folds{f' (this run: {ks})' if ks != all_ks else ''}{cached} "
        f"({_fmt_time(time.time() - t)})")

    if dist.is_main:
        # The blend's other members are checked now, not after hours of training.
        announce_members(cfg, folds, say=say)

    t = time.time()
    from pipeline.launch import in_process, train_folds

    trained, skipped = [], []
    budget_s = parse_duration(cfg.train.time_budget)
    for i, run in enumerate(members or [cfg]):
        if dist.is_main and members:
            mark_member(cfg, run)
        if dist.is_main and budget_s:  # this run's folds share its part of what is left of the budget
            left = (budget_s - (time.time() - start)) / (len(members or [cfg]) - i)
            start_run_clock(max(left, 1.0), paths.run_dir(run),
                            [k for k in ks if not fold_is_current(run, k, folds)[0]])
        todo = []
        for k in ks:
            current = fold_is_current(run, k, folds)[0]
            if current and dist.is_main and sync_validation_labels(run, k, folds):
                say(f"        fold {k}: validation labels corrected (competition.relabel) in its oof.csv; "
                    "nothing it trained on changed, so it is not retrained")
            (skipped if current else todo).append(k)
        if todo and not in_process(cfg):
            say(f"        train fold(s) {', '.join(map(str, todo))}{f' of {run.experiment}' if members else ''} "
                f"with the {cfg.launcher.kind} launcher")
        # Each fold while holding its lock; launcher.* says where (pipeline/launch.py).
        launched = train_folds(run, todo, wait=wait, say=say, force=force)
        trained += launched.trained
        skipped = sorted(skipped + launched.current)
        launched.raise_if_failed(run)
        if launched.pending:
            say(f"[2/4] train       {run.experiment}: fold(s) {', '.join(map(str, launched.pending))} still queued "
                "or running (--no-wait); run the same command again to pick them up, predict and blend")
            return RunSummary(cfg.experiment, {}, None, None, {}, trained, skipped, time.time() - start)
        if dist.is_main and budget_s:
            stop_run_clock(paths.run_dir(run))  # a fold trained on its own later has its own clock
        accs = []
        for k in ks:
            m = paths.fold_dir(run, k) / paths.METRICS
            accs.append(read_json(m).get("val_acc", float("nan")) if m.is_file() else float("nan"))
        say(f"[2/4] train       {run.experiment}: {len(trained)} fold(s) trained, {len(skipped)} up to date; "
            f"fold val acc {' '.join(f'{a:.4f}' for a in accs)} ({_fmt_time(time.time() - t)})")
    if not dist.is_main:
        # Released now rather than held in a barrier while rank 0 predicts and blends (minutes on a
        # large test set, past NCCL's watchdog); torchrun waits for every process anyway.
        return RunSummary(cfg.experiment, {}, None, None, {}, trained, skipped, time.time() - start)

    t = time.time()
    from pipeline.locks import FoldLock

    infos = {}
    for run in members or [cfg]:
        for k in ks:
            with FoldLock(run, k, say=say):  # a fold job of another run may be writing this fold's predictions
                infos[k] = predict_fold(run, k, quiet=True)
    if members:
        infos = average_members(cfg, members, ks)["folds"]
        say(f"        seeds       {cfg.experiment}: the average of {len(members)} seeds "
            f"({', '.join(str(m.seed) for m in members)}) is the experiment's prediction")
    gain = [infos[k]["oof_acc_tta"] - infos[k]["oof_acc"] for k in ks]
    say(f"[3/4] predict     TTA [{', '.join(infos[ks[0]]['tta'])}]: mean OOF acc gain {sum(gain) / len(gain):+.4f} "
        f"({_fmt_time(time.time() - t)})")

    t = time.time()
    missing = [k for k in all_ks if k not in ks and not fold_is_current(cfg, k, folds)[0]] if only_folds else []
    if missing and not partial:
        say(f"[4/4] ensemble    skipped: fold(s) {missing} of {cfg.experiment} are not trained; no submission "
            "until every fold is (run without --folds), or add --partial for one from these folds")
        for k in ks:
            say(f"  fold {k}: val acc {infos[k].get('oof_acc', float('nan')):.4f}, TTA {infos[k]['oof_acc_tta']:.4f}")
        barrier(dist)
        return RunSummary(cfg.experiment, {}, None, None, {}, trained, skipped, time.time() - start)
    if missing:
        done = [k for k in all_ks if k not in missing]
        blend_members = Members([cfg.experiment], {}, {cfg.experiment: done})
        say(f"        ensemble: --partial: {cfg.experiment} alone, from fold(s) {done} of {all_ks}")
    else:
        blend_members = choose_members(cfg, folds=folds)
    for left_out, why in blend_members.skipped.items():
        say(f"        ensemble: skipping {left_out}: {why}")
    names = blend_members.names
    result, made = ensure_submission(cfg, blend_members, name=name, quiet=True)
    sub_path, weights, score, cv = result.submission, result.weights, result.solution_score, result.meta["cv"]
    if made:
        say(f"[4/4] ensemble    {len(names)} experiment(s), {cfg.ensemble.method} weights -> {sub_path} "
            f"({_fmt_time(time.time() - t)})")
    else:
        say(f"[4/4] ensemble    up to date: {sub_path} (from the same predictions and settings)")
    say(format_table(result.table))

    wall = time.time() - start
    blend = cv.get("blend", {})
    best = blend.get("acc_tta") if blend.get("acc_tta") is not None else blend.get("acc")
    ll = blend.get("logloss_tta") if blend.get("logloss_tta") is not None else blend.get("logloss")
    say("summary")
    say(f"  CV (out-of-fold, blend): accuracy {best:.4f}, log loss {ll:.4f}")
    say(f"  weights: {', '.join(f'{n}={w:.3f}' for n, w in weights.items())}")
    say(f"  submission: {sub_path}")
    if score is not None:
        metric = cfg.competition.metric if cfg.competition.submission_form == "label" else "log_loss"
        say(f"  score against the hidden solution ({cfg.competition.solution}): {metric} {score:.4f}")
    say(f"  wall time: {_fmt_time(wall)}")
    return RunSummary(cfg.experiment, cv, sub_path, score, weights, trained, skipped, wall)


def main(argv: list[str] | None = None) -> RunSummary:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--name", help="submission file name prefix (default: ensemble.name, the experiment or 'blend')")
    parser.add_argument("--folds", type=int, nargs="+", metavar="K",
                        help="train and predict only these folds, for a quick look (no submission unless every fold "
                             "is complete or --partial)")
    parser.add_argument("--partial", action="store_true",
                        help="with --folds: write a submission from the complete folds alone (named *_partial)")
    parser.add_argument("--force", action="store_true",
                        help="replace an experiment of this name trained with other settings (default: it is kept "
                             "as runs/<experiment>@<time>/)")
    parser.add_argument("--launcher", choices=["local", "submitit"],
                        help="how the folds are trained (launcher.kind): local processes or a Slurm job array")
    parser.add_argument("--no-wait", action="store_true",
                        help="submitit: submit the folds and return; a later run picks up what finished")
    args = parser.parse_args(argv)
    if args.launcher:
        args.overrides = [*args.overrides, f"launcher.kind={args.launcher}"]
    cfg = config_from_args(args)
    try:
        return run_all(cfg, name=args.name, only_folds=args.folds, partial=args.partial, force=args.force,
                       wait=not args.no_wait)
    finally:
        from pipeline.engine.distributed import DistInfo, cleanup

        cleanup(DistInfo(world_size=int(os.environ.get("WORLD_SIZE", "1"))))


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
