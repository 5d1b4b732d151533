"""The epoch loop both tracks share: resume, train, validate, keep the best, save, log, stop.

A track (classification in ``pipeline.train``, detection in ``pipeline.detect.train``) builds its
:class:`Parts` and passes two functions: ``train_epoch(epoch, num_updates)`` (one pass of
:func:`pipeline.engine.loop.train_one_epoch` with the track's loss function) and
``evaluate(epoch)`` (its validation, returning a :class:`Validation`). Everything else is here,
once: EMA weights saved beside the model, ``best.pt`` when the validation score improves,
``last.pt`` after every epoch with what an exact resume needs (optimizer, scheduler, AMP scaler,
every rank's RNG state, history, early-stopping state, the W&B run id), ``history.csv``, the W&B
log, throughput, early stopping and a wall-time limit decided on rank 0 for every rank.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline import paths, progress
from pipeline.engine.budget import EpochBudget
from pipeline.engine.checkpoint import rng_state, save_checkpoint, set_rng_state
from pipeline.engine.distributed import DistInfo, all_gather_object, broadcast_from_main
from pipeline.engine.loop import TrainStats
from pipeline.io import atomic_write_csv


@dataclass
class Parts:
    """What trains and what a checkpoint holds."""

    model: torch.nn.Module        # the module that trains (DDP-wrapped and/or compiled)
    bare: torch.nn.Module         # unwrapped: its state_dict has no module./_orig_mod. prefixes
    optimizer: torch.optim.Optimizer
    scheduler: Any                # timm scheduler stepped per update, or None
    scaler: torch.amp.GradScaler
    ema: Any = None               # timm ModelEmaV3, or None


@dataclass
class Validation:
    """One validation of a track: ``score`` orders epochs (larger is better, compared as a tuple),
    ``metric`` is the number reported as best, ``row`` goes into the history, ``keep`` (tensors)
    is saved in last.pt with the best epoch (e.g. the OOF probabilities)."""

    score: tuple[float, ...]
    metric: float
    row: dict[str, float]
    keep: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitSpec:
    epochs: int
    out_dir: Path                 # best.pt, last.pt and history.csv go here
    meta: dict[str, Any]          # saved in every checkpoint (config, classes, metric ...)
    history_columns: list[str]
    patience: int = 0             # evaluations without a better score before stopping (0: off)
    eval_every: int = 1
    time_limit_s: float | None = None  # stop after the first evaluated epoch past this training time
    name: str = "train"           # for messages ("fold 0")
    budget: EpochBudget | None = None  # train.time_budget: chooses ``epochs`` from timed epochs
    on_plan: Callable[[int], None] | None = None  # told the new epoch count (to stretch the schedule)


@dataclass
class FitState:
    """Where training stands; all of it is saved in last.pt."""

    epoch: int = 0                # the next epoch to run
    num_updates: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: list[float] | None = None
    best_epoch: int = -1
    best_metric: float = math.nan
    best_keep: dict[str, Any] = field(default_factory=dict)
    train_time_s: float = 0.0
    wandb_id: str | None = None
    finished: bool = False
    stop_reason: str = ""
    planned_epochs: int | None = None  # chosen by a time budget; a resumed run keeps its schedule

    def to_checkpoint(self) -> dict[str, Any]:
        return {"history": self.history, "num_updates": self.num_updates, "bad_epochs": self.bad_epochs,
                "best_score": self.best_score, "best_epoch": self.best_epoch, "best_metric": self.best_metric,
                "best_keep": self.best_keep, "train_time_s": self.train_time_s, "wandb_id": self.wandb_id,
                "finished": self.finished, "stop_reason": self.stop_reason, "planned_epochs": self.planned_epochs}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> FitState:
        return cls(epoch=int(ckpt["epoch"]) + 1, num_updates=int(ckpt["num_updates"]),
                   bad_epochs=int(ckpt["bad_epochs"]), history=list(ckpt["history"]),
                   best_score=None if ckpt["best_score"] is None else list(ckpt["best_score"]),
                   best_epoch=int(ckpt["best_epoch"]), best_metric=float(ckpt["best_metric"]),
                   best_keep=dict(ckpt.get("best_keep") or {}), train_time_s=float(ckpt.get("train_time_s", 0.0)),
                   wandb_id=ckpt.get("wandb_id"), finished=bool(ckpt.get("finished")),
                   stop_reason=str(ckpt.get("stop_reason", "")), planned_epochs=ckpt.get("planned_epochs"))


def _cpu(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k: v.detach().cpu() for k, v in state.items()}


def restore(parts: Parts, ckpt: dict[str, Any], info: DistInfo) -> FitState:
    """Load a last.pt (already on the CPU) into ``parts`` and this rank's RNG; returns the state.

    The scaler state is skipped when empty (a CPU-made or bf16 checkpoint has no fp16 scale), and
    only this rank's RNG state is restored: a run resumed on other hardware or with another world
    size still resumes (with other random numbers), and one resumed as it was is exact.
    """
    parts.bare.load_state_dict(ckpt["model"])
    if parts.ema is not None and ckpt.get("ema") is not None:
        parts.ema.module.load_state_dict(ckpt["ema"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    if parts.scheduler is not None and ckpt.get("scheduler") is not None:
        parts.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") and parts.scaler.is_enabled():
        parts.scaler.load_state_dict(ckpt["scaler"])
    ranks = ckpt.get("rng_ranks") or []
    set_rng_state(ranks[info.rank] if len(ranks) == info.world_size else ckpt["rng"], info.device)
    return FitState.from_checkpoint(ckpt)


def _stop_reason(state: FitState, spec: FitSpec, evaluated: bool, info: DistInfo) -> str:
    """Why to stop after this epoch ('' to go on), decided on rank 0 for all ranks: clocks differ
    between ranks, and one rank leaving alone would hang the others in their next collective."""
    reason = ""
    if spec.patience and state.bad_epochs >= spec.patience:
        reason = f"no better score for {spec.patience} evaluation(s) (best epoch {state.best_epoch + 1})"
    elif (spec.time_limit_s and evaluated and state.train_time_s > spec.time_limit_s
          and state.epoch < spec.epochs):
        reason = f"the time limit of {spec.time_limit_s / 60:g} min was reached"
    return broadcast_from_main(reason, info)


def _save(parts: Parts, state: FitState, spec: FitSpec, info: DistInfo, epoch: int, improved: bool) -> None:
    rng_ranks = all_gather_object(rng_state(info.device), info)  # every rank's, so each resumes its own stream
    if not info.is_main:
        return
    weights = {"model": _cpu(parts.bare.state_dict()),
               "ema": _cpu(parts.ema.module.state_dict()) if parts.ema is not None else None,
               **spec.meta, "epoch": epoch, "used_ema": parts.ema is not None}
    if improved:
        # best.pt is weights only, and only the weights that were validated (the EMA's when EMA is
        # on, as the tracks judge it): the optimizer and the other copy live in last.pt alone.
        judged = weights["ema"] if weights["ema"] is not None else weights["model"]
        save_checkpoint(spec.out_dir / paths.BEST, {**weights, "model": judged, "ema": None,
                                                    "weights": "ema" if weights["ema"] is not None else "model",
                                                    "best_metric": state.best_metric})
    save_checkpoint(spec.out_dir / paths.LAST, {
        **weights, **state.to_checkpoint(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
        "scaler": parts.scaler.state_dict(), "rng": rng_ranks[0], "rng_ranks": rng_ranks,
        "world_size": info.world_size,
    })
    atomic_write_csv(spec.out_dir / paths.HISTORY, pd.DataFrame(state.history, columns=spec.history_columns))


def fit(parts: Parts, state: FitState, spec: FitSpec, info: DistInfo, *,
        train_epoch: Callable[[int, int], TrainStats],
        evaluate: Callable[[int], Validation],
        wandb_run: Any,
        describe: Callable[[dict[str, float], bool], str] | None = None) -> FitState:
    """Train from ``state.epoch`` to ``spec.epochs`` (or an earlier stop); returns the final state.

    Args:
        train_epoch: ``(epoch, num_updates) -> TrainStats``; its losses become history columns
            (``loss`` as ``train_loss``, the others by name).
        evaluate: ``epoch -> Validation``, run every ``spec.eval_every`` epochs and after the last.
        describe: the one-line report of an epoch (row, improved) printed by rank 0.

    Raises:
        NonFiniteLossError: from ``train_epoch``; last.pt then holds the last finished epoch.
    """
    spec.out_dir.mkdir(parents=True, exist_ok=True) if info.is_main else None
    budget = spec.budget
    clock = budget.clock if budget is not None else time.perf_counter
    if budget is not None and state.planned_epochs:  # resumed: keep the schedule the budget chose
        budget.planned, budget.frozen = state.planned_epochs, True
        budget.started = clock() - state.train_time_s
        _replan(spec, state.planned_epochs)
    epoch = state.epoch
    while epoch < spec.epochs:
        t0 = clock()
        stats = train_epoch(epoch, state.num_updates)
        state.num_updates = stats.num_updates
        # under a budget every epoch is validated: its time is measured, and any epoch may turn out the last
        evaluated = (epoch + 1) % spec.eval_every == 0 or epoch + 1 == spec.epochs or budget is not None
        t_val = clock()
        val = evaluate(epoch) if evaluated else None
        val_s = clock() - t_val
        improved = val is not None and (state.best_score is None or tuple(val.score) > tuple(state.best_score))
        if improved:
            state.best_score, state.best_epoch, state.best_metric = list(val.score), epoch, float(val.metric)
            state.best_keep, state.bad_epochs = dict(val.keep), 0
        elif val is not None:
            state.bad_epochs += 1
        epoch_time = clock() - t0
        state.train_time_s += epoch_time
        # Epochs count from 1 in history.csv, metrics.json and on the console alike.
        row = {"epoch": epoch + 1, "train_loss": stats.loss,
               **{k: v for k, v in stats.losses.items() if k != "loss"},
               **(val.row if val is not None else {}),
               "lr": stats.lr, "images_per_s": stats.images_per_s, "epoch_time_s": epoch_time}
        state.history.append({c: row.get(c, math.nan) for c in spec.history_columns})
        state.epoch = epoch + 1
        if budget is not None:
            planned, message = budget.after_epoch(state.epoch, epoch_time, val_s)
            planned, message = broadcast_from_main((planned, message), info)  # rank 0's clock decides
            if message and info.is_main:
                progress.line(message)
            _replan(spec, planned)
            state.planned_epochs = planned
        state.stop_reason = _stop_reason(state, spec, evaluated, info)
        state.finished = bool(state.stop_reason) or state.epoch >= spec.epochs
        _save(parts, state, spec, info, epoch, improved)
        if info.is_main:
            wandb_run.log({k: v for k, v in state.history[-1].items()
                           if k != "epoch" and not (isinstance(v, float) and math.isnan(v))} | {"epoch": epoch + 1},
                          step=epoch)
            if describe is not None:
                progress.line(describe(state.history[-1], improved))
        if state.stop_reason:
            if info.is_main:
                print(f"{spec.name}: stopped after epoch {epoch + 1}: {state.stop_reason}")
            break
        epoch += 1
    return state


def _replan(spec: FitSpec, epochs: int) -> None:
    if epochs != spec.epochs:
        spec.epochs = epochs
        if spec.on_plan is not None:
            spec.on_plan(epochs)
