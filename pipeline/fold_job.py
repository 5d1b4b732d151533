"""One unit of work of the launchers: fold K of an experiment trained (unless current) and predicted,
while holding the fold's lock (:mod:`pipeline.locks`).

``python -m pipeline.fold_job --fold K --config-json runs/<experiment>/launch/config.json`` is what the
local launcher starts for each fold (under torchrun when ``launcher.gpus_per_fold`` > 1); the submitit
launcher calls :func:`run_fold` inside its Slurm jobs. It reads and writes what ``pipeline.train
--fold K`` and ``pipeline.predict --fold K`` do. The config comes as JSON, already resolved by the
``pipeline.run`` that launched it, so every fold runs with exactly its settings.

Environment (set by the local launcher): ``PIPELINE_CPUS`` pins the process to those cores, and the
usual ``OMP_NUM_THREADS`` / ``CUDA_VISIBLE_DEVICES`` give it its share of threads or GPUs.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pipeline import paths
from pipeline.config import Config, build_config
from pipeline.errors import cli_entry
from pipeline.io import read_json

Outcome = Literal["trained", "current", "busy"]


def _is_current(cfg: Config, fold: int) -> tuple[bool, str]:
    from pipeline.folds import ensure_folds
    from pipeline.train import fold_is_current

    return fold_is_current(cfg, fold, ensure_folds(cfg))


def run_fold(cfg: Config, fold: int, *, predict: bool = True, resume: bool = False, wait: bool = True,
             force: bool = False, say: Callable[[str], Any] = print) -> Outcome:
    """Train fold ``fold`` unless it is current, then (``predict``) write its TTA predictions.

    The fold's lock is held throughout, and whether the fold is current is decided once the lock is
    ours: a process that waited finds the work done by the one it waited for.

    Args:
        resume: continue from ``last.pt`` when there is one (a requeued Slurm job).
        wait: wait for a fold that another process holds; False returns ``"busy"`` at once.
        force: as ``pipeline.train --force`` (replace an experiment trained with other settings).

    Returns:
        ``"trained"``, ``"current"`` (nothing to train) or ``"busy"`` (held elsewhere, ``wait`` False).
    """
    from pipeline.engine.distributed import all_gather_object, init_distributed
    from pipeline.locks import FoldLock

    info = init_distributed(cfg.device)
    lock = FoldLock(cfg, fold, say=say)
    decision: tuple[str, str] = ("busy", "")
    try:
        if info.is_main:  # one lock per unit of work: rank 0 holds it for every rank of a DDP fold
            if wait:
                lock.acquire()
            if lock.held or lock.try_acquire():
                current, reason = _is_current(cfg, fold)
                decision = ("current", reason) if current else ("train", reason)
        decision = tuple(all_gather_object(decision, info)[0])
        if decision[0] == "busy":
            return "busy"
        if decision[0] == "train":
            from pipeline.train import train_fold

            last = paths.fold_dir(cfg, fold) / paths.LAST
            resume = resume and last.is_file()
            if info.is_main:
                say(f"        train fold {fold}: {decision[1]}; {'resuming' if resume else 'training'} "
                    f"{cfg.model.backbone} for {cfg.train.epochs} epochs")
            train_fold(cfg, fold, resume=resume, force=force)
        if predict and info.is_main:
            from pipeline.predict import predict_fold

            predict_fold(cfg, fold, quiet=True)
        return "trained" if decision[0] == "train" else "current"
    finally:
        lock.release()


def _pin_cpus() -> None:
    cpus = os.environ.get("PIPELINE_CPUS")
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def main(argv: list[str] | None = None) -> Outcome:
    parser = argparse.ArgumentParser(prog="python -m pipeline.fold_job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--config-json", required=True, type=Path, help="the resolved config (written by the launcher)")
    parser.add_argument("--resume", action="store_true", help="continue from last.pt when there is one")
    parser.add_argument("--force", action="store_true", help="as pipeline.train --force")
    args = parser.parse_args(argv)
    _pin_cpus()
    cfg = build_config(read_json(args.config_json), Config, source=str(args.config_json))
    try:
        outcome = run_fold(cfg, args.fold, resume=args.resume, force=args.force)
        print(f"fold_job: fold {args.fold} {outcome}", flush=True)  # the launcher reads this line
        return outcome
    finally:
        from pipeline.engine.distributed import DistInfo, cleanup

        cleanup(DistInfo(world_size=int(os.environ.get("WORLD_SIZE", "1"))))


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
