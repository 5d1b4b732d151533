"""``train.time_budget``: wall time for a whole run, turned into a number of epochs.

Both tracks use it the same way through ``engine/fit.py``: the first epochs are timed (training
and validation), the epochs that fit in what is left of the budget (less what must still run
after training: the final validation, prediction, TTA) are chosen, and the cosine schedule is
stretched or shrunk to end at that epoch. The plan is revised while the first half of it runs
(the first epoch is often slow: image caches fill, kernels are tuned), then kept, so the
learning rate does not jump late; if an epoch would still overrun, training stops after the
last one that fits. The run's best checkpoint (best validation score seen) is what it keeps.

For classification the budget is the wall time of the whole ``pipeline.run`` of the experiment:
``pipeline.run`` starts the clock in ``runs/<experiment>/budget.json`` and each fold takes an
equal share of what is left (folds running side by side share a lane), less the prediction and
TTA of that fold. A fold or a detector trained on its own starts its own clock.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import atomic_write_json

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smh])")
BUDGET_FILE = "budget.json"


def parse_duration(value: str | float | int | None) -> float | None:
    """Seconds in ``"10m"``, ``"1h30m"``, ``"90s"``, ``"1.5h"`` or a plain number of seconds; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"{value!r} is not a duration; write e.g. 90s, 10m, 1h30m or 1.5h") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r}: a time budget must be a positive duration, e.g. 10m")
    return seconds


def fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass
class EpochBudget:
    """Chooses the number of epochs of one training from the time it is given.

    Args:
        seconds: wall time this training may take, from ``start()`` to the end of ``reserve``.
        configured: ``train.epochs``, reported when the budget changes it.
        reserve: ``validation seconds -> seconds`` still needed after the last epoch (final
            validation of the best weights, prediction, TTA), from a measured validation pass.
        max_epochs: never plan more than this (a schedule of thousands of epochs helps no one).
        clock: seconds, monotonic (a fake one in tests).
    """

    seconds: float
    configured: int
    reserve: Callable[[float], float] = lambda val_s: val_s
    max_epochs: int = 1000
    name: str = "train"
    clock: Callable[[], float] = time.perf_counter
    started: float | None = None
    epoch_times: list[float] = field(default_factory=list)
    val_times: list[float] = field(default_factory=list)
    planned: int | None = None
    frozen: bool = False
    notes: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.started = self.clock()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started

    def _epoch_cost(self) -> float:
        # the latest epochs predict the next ones best: the first is slowed by warm-up (caches, autotune)
        times = self.epoch_times[1:] or self.epoch_times
        recent = times[-3:]
        return max(sum(recent) / len(recent), 1e-6)

    def after_epoch(self, epochs_done: int, epoch_s: float, val_s: float) -> tuple[int, str]:
        """Record an epoch; returns the total epochs to run now and a message ('' when unchanged)."""
        self.epoch_times.append(epoch_s)
        if val_s > 0:
            self.val_times.append(val_s)
        cost = self._epoch_cost()
        reserve = self.reserve(self.val_times[-1] if self.val_times else 0.0)
        left = self.seconds - self.elapsed() - reserve
        fits_more = max(0, int(left // cost))
        message = ""
        if not self.frozen:
            total = max(epochs_done, min(self.max_epochs, epochs_done + fits_more))
            total = max(total, 1)
            if total != self.planned:
                first = self.planned is None
                self.planned = total
                message = (f"{self.name}: time budget {fmt(self.seconds)}: an epoch takes {fmt(cost)}, "
                           f"{fmt(reserve)} kept for what follows training; "
                           f"{'planning' if first else 're-planning to'} {total} epoch(s)"
                           + (f" (train.epochs={self.configured}" + (", CUT" if total < self.configured else "")
                              + ")" if total != self.configured else ""))
                if total < self.configured and first:
                    self.notes.append(f"time budget cut {self.configured} epochs to {total}")
            # the schedule stays put once half of it has run: a late change would jolt the learning rate
            self.frozen = epochs_done * 2 >= self.planned
        elif epochs_done < self.planned and left < max(cost, epoch_s):  # the latest epoch, if slower, rules
            message = (f"{self.name}: stopping after epoch {epochs_done} of {self.planned}: the next would overrun "
                       f"the time budget ({fmt(self.elapsed())} of {fmt(self.seconds)} used)")
            self.notes.append(f"stopped after {epochs_done} of {self.planned} planned epochs")
            self.planned = epochs_done
        return self.planned, message


def retarget_scheduler(scheduler, epochs: int, updates_per_epoch: int) -> None:
    """Make a timm scheduler (stepped per update) end its cosine after ``epochs``, warm-up unchanged."""
    if scheduler is None or not hasattr(scheduler, "t_initial"):
        return
    total = epochs * updates_per_epoch
    if getattr(scheduler, "warmup_prefix", False):  # the cosine starts after the warm-up
        total -= getattr(scheduler, "warmup_t", 0)
    scheduler.t_initial = max(1, total)


@dataclass
class RunClock:
    """The clock of one ``pipeline.run`` under a budget, shared with its folds through a file."""

    started: float  # time.time() when the run began
    seconds: float
    folds: list[int]
    lanes: int = 1  # folds trained side by side

    def write(self, run_dir: Path) -> Path:
        return atomic_write_json(run_dir / BUDGET_FILE, {"started": self.started, "seconds": self.seconds,
                                                        "folds": self.folds, "lanes": self.lanes})

    @classmethod
    def read(cls, run_dir: Path) -> RunClock | None:
        path = run_dir / BUDGET_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            return cls(float(d["started"]), float(d["seconds"]), [int(f) for f in d["folds"]], int(d.get("lanes", 1)))
        except (ValueError, KeyError, TypeError):
            return None

    def active(self, now: float | None = None) -> bool:
        """Whether this is the clock of a run still in progress. ``pipeline.run`` removes it after
        training; one left by a killed run is stale once it has run out by its whole length again.
        A run that has overrun its budget leaves its last folds nothing: they train one epoch."""
        now = time.time() if now is None else now
        return self.started <= now < self.started + 2 * self.seconds

    def fold_share(self, fold: int, folds_left: int, now: float | None = None) -> float:
        """Seconds for one fold: what is left of the run, split over the folds still to train
        (this one included), per lane."""
        now = time.time() if now is None else now
        left = self.seconds - (now - self.started)
        rounds = math.ceil(max(1, folds_left) / max(1, self.lanes))
        return max(0.0, left / rounds)


def fold_budget(seconds: float | None, run_dir: Path, fold: int, fold_done: Callable[[int, float], bool],
                configured: int, reserve: Callable[[float], float], name: str,
                verbose: bool = True) -> EpochBudget | None:
    """The budget of one fold: its share of a ``pipeline.run`` in progress under the same budget
    (``budget.json``), or the whole budget when the fold is trained on its own.

    Args:
        fold_done: ``(fold, since) -> bool``, whether a fold finished training after ``since``
            (``time.time()``), so a run's folds not yet trained are counted.
    """
    if seconds is None:
        return None
    clock = RunClock.read(run_dir)
    if clock is not None and clock.active():
        left = [k for k in clock.folds if k == fold or not fold_done(k, clock.started)]
        share = clock.fold_share(fold, len(left))
        where = f"its share of the run's {fmt(seconds)} ({len(left)} fold(s) left)"
    else:
        share, where = seconds, "the whole budget (trained on its own)"
    budget = EpochBudget(share, configured, reserve=reserve, name=name)
    budget.start()
    if verbose:
        print(f"{name}: time budget {fmt(share)}: {where}")
    return budget


def stop_run_clock(run_dir: Path) -> None:
    (run_dir / BUDGET_FILE).unlink(missing_ok=True)


def start_run_clock(seconds: float | None, run_dir: Path, folds: list[int], lanes: int = 1,
                    started: float | None = None) -> RunClock | None:
    """Start the clock of a ``pipeline.run`` under a budget (None without one) at ``started``
    (``time.time()``, default now): the folds to train share what is left of it."""
    if seconds is None:
        return None
    clock = RunClock(time.time() if started is None else started, seconds, folds, lanes)
    clock.write(run_dir)
    return clock
