"""How ``pipeline.run`` trains the folds that are not current: the ``launcher`` config section.

- ``launcher.kind: local`` with ``parallel: 1`` (the default): one fold after another in the
  ``pipeline.run`` process itself (under torchrun: each fold over every rank, as before).
- ``launcher.kind: local`` with ``parallel: N``: up to N folds at once, each a separate process
  (``python -m pipeline.fold_job``) pinned to its own GPU(s) through ``CUDA_VISIBLE_DEVICES``, or on
  the CPU to its share of the cores (``launcher.threads_per_fold``, default cores / N);
  ``launcher.gpus_per_fold`` > 1 starts each fold under torchrun (DDP over those GPUs). One progress
  line per fold; a failed fold is reported with the last lines of its log and the others finish.
- ``launcher.kind: submitit``: one Slurm job array over the folds (:mod:`pipeline.launch_submitit`).

Every fold runs while holding its lock (:mod:`pipeline.locks`): a fold that another process holds
is left for later (this process moves on to another fold, saying so) or waited for, and a fold that
became current meanwhile is not trained again. Each fold job also writes the fold's TTA predictions.

Writes ``runs/<experiment>/launch/``: ``config-<hash>.json`` (the resolved config the fold jobs read)
and ``fold<K>.log`` (each fold process's output).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_text

Say = Callable[[str], Any]
LOG_TAIL_LINES = 15
POLL_S = 0.5


@dataclass
class LaunchResult:
    """What became of the folds handed to a launcher."""

    trained: list[int] = field(default_factory=list)  # trained here (or by this launch's jobs)
    current: list[int] = field(default_factory=list)  # found current once their lock was ours
    failed: dict[int, str] = field(default_factory=dict)  # fold -> what went wrong (log tail)
    pending: list[int] = field(default_factory=list)  # submitted, not waited for (--no-wait)

    def raise_if_failed(self, cfg: Config) -> None:
        if self.failed:
            ks = ", ".join(str(k) for k in sorted(self.failed))
            raise PipelineError(f"{len(self.failed)} fold(s) of {cfg.experiment} failed: {ks} (reported above; logs in "
                                f"{paths.launch_dir(cfg)}); fix the cause and run again: finished folds are kept")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    # Progress bars redraw with carriage returns; only the lines a person would have seen last are kept.
    shown = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(shown[-lines:])


def write_job_config(cfg: Config) -> Path:
    """The resolved config the fold jobs read, named by its content (concurrent runs never clash)."""
    text = json.dumps(cfg.to_dict(), indent=1, sort_keys=True)
    path = paths.launch_dir(cfg) / f"config-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    if not path.is_file():
        atomic_write_text(path, text)
    return path.resolve()


# --------------------------------------------------------------------------- progress
class FoldBoard:
    """One line per fold (state, epoch, accuracy, time): redrawn in place on a terminal, printed when
    it changes otherwise, so a log file gets no carriage-return bars."""

    def __init__(self, cfg: Config, folds: list[int], stream=None):
        self.cfg, self.folds = cfg, list(folds)
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.state = {k: "queued" for k in folds}
        self.started: dict[int, float] = {}
        self.lines: dict[int, str] = {}
        self.drawn = 0

    def set(self, fold: int, state: str) -> None:
        if state.startswith("running") and fold not in self.started:
            self.started[fold] = time.monotonic()
        self.state[fold] = state

    def _epochs(self, fold: int) -> str:
        hist = paths.fold_dir(self.cfg, fold) / paths.HISTORY
        try:
            h = pd.read_csv(hist)
        except (OSError, ValueError):
            return ""
        if fold in self.started and hist.stat().st_mtime < time.time() - (time.monotonic() - self.started[fold]):
            return ""  # an earlier run's history, not yet replaced
        if h.empty:
            return ""
        return f" epoch {len(h)}/{self.cfg.train.epochs} val_acc {h['val_acc'].iloc[-1]:.4f}"

    def line(self, fold: int) -> str:
        state = self.state[fold]
        detail = self._epochs(fold) if state.startswith("running") else ""
        took = ""
        if fold in self.started:
            took = f" ({int(time.monotonic() - self.started[fold])}s)" if state.startswith("running") else ""
        return f"  fold {fold}: {state}{detail}{took}"

    def refresh(self) -> None:
        new = {k: self.line(k) for k in self.folds}
        if self.tty:
            if self.drawn:
                self.stream.write(f"\x1b[{self.drawn}F")
            for k in self.folds:
                self.stream.write("\x1b[2K" + new[k] + "\n")
            self.drawn = len(self.folds)
        else:
            for k in self.folds:
                # The seconds counter alone is no news worth a line in a log file.
                if new[k].rsplit(" (", 1)[0] != self.lines.get(k, "").rsplit(" (", 1)[0]:
                    self.stream.write(new[k] + "\n")
        self.lines = new
        self.stream.flush()

    def say(self, text: str) -> None:
        """A message above the board (the board is drawn again below it)."""
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0
        self.stream.write(text + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------- in this process
def run_in_process(cfg: Config, folds: list[int], say: Say = print, force: bool = False) -> LaunchResult:
    """One fold after another here; a fold another process holds is left for after the free ones."""
    from pipeline.fold_job import run_fold
    from pipeline.locks import lock_holder

    result = LaunchResult()
    pending = list(folds)
    while pending:
        for k in pending:
            outcome = run_fold(cfg, k, predict=False, wait=False, force=force, say=say)
            if outcome != "busy":
                break
            others = [j for j in pending if j != k]
            if others and int(os.environ.get("RANK", "0")) == 0:  # only rank 0 probes locks
                say(f"        fold {k} is being worked on by {lock_holder(cfg, k) or 'another process'}; "
                    f"moving on to fold {others[0]}")
        else:
            k = pending[0]  # every fold left is held elsewhere: wait for the first
            outcome = run_fold(cfg, k, predict=False, wait=True, force=force, say=say)
        pending.remove(k)
        (result.trained if outcome == "trained" else result.current).append(k)
    return result


# --------------------------------------------------------------------------- local processes
@dataclass
class Slot:
    """What one fold process may use."""

    cpus: list[int]
    gpus: list[str]

    def env(self, threads: int) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PIPELINE_CPUS": ",".join(map(str, self.cpus))}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env

    def __str__(self) -> str:
        return f"GPU {','.join(self.gpus)}" if self.gpus else f"CPU {','.join(map(str, self.cpus))}"


def _visible_gpus(cfg: Config) -> list[str]:
    if cfg.device == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in env.split(",") if g.strip()] if env else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def plan_slots(cfg: Config, n_folds: int, say: Say = print) -> tuple[list[Slot], int]:
    """(slots, threads per process): ``launcher.parallel`` slots at most, each its own GPU(s) or cores."""
    lc = cfg.launcher
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    gpus = _visible_gpus(cfg)
    n = min(lc.parallel, n_folds)
    if gpus:
        fit = len(gpus) // lc.gpus_per_fold
        if fit == 0:
            raise PipelineError(f"launcher.gpus_per_fold={lc.gpus_per_fold} but only {len(gpus)} GPU(s) are visible "
                                f"({', '.join(gpus)}); lower launcher.gpus_per_fold")
        if fit < n:
            say(f"        launcher: {len(gpus)} GPU(s) hold {fit} fold(s) of {lc.gpus_per_fold} GPU(s) at once, "
                f"not launcher.parallel={lc.parallel}")
            n = fit
    per = lc.threads_per_fold or max(1, len(cpus) // n)
    procs = lc.gpus_per_fold if (gpus or lc.gpus_per_fold > 1) else 1
    if per * n > len(cpus) and not gpus:
        say(f"        launcher: {n} folds x {per} threads on {len(cpus)} cores: the folds will compete for cores")
    slots = []
    for i in range(n):
        mine = [cpus[(i * per + j) % len(cpus)] for j in range(per)]
        slots.append(Slot(sorted(set(mine)), gpus[i * lc.gpus_per_fold:(i + 1) * lc.gpus_per_fold] if gpus else []))
    # torchrun's ranks of one fold split the fold's threads.
    return slots, max(1, per // procs)


def fold_command(cfg: Config, fold: int, config_json: Path) -> list[str]:
    # --force: train_folds has already set aside a stale experiment, once, before any fold started.
    job = ["-m", "pipeline.fold_job", "--fold", str(fold), "--config-json", str(config_json), "--force"]
    if cfg.launcher.gpus_per_fold > 1:
        # --standalone: a private rendezvous on a free port, so several folds' torchruns share a host.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={cfg.launcher.gpus_per_fold}", *job]
    return [sys.executable, *job]


@dataclass
class _Running:
    proc: subprocess.Popen
    slot: Slot
    log: Path


def run_processes(cfg: Config, folds: list[int], say: Say = print, stream=None) -> LaunchResult:
    """Up to ``launcher.parallel`` fold processes at once; returns when every fold has ended."""
    from pipeline.locks import lock_holder

    slots, threads = plan_slots(cfg, len(folds), say)
    config_json = write_job_config(cfg)
    board = FoldBoard(cfg, folds, stream)
    say(f"        launcher: {len(folds)} fold(s), {len(slots)} at once ({', '.join(map(str, slots))}; "
        f"{threads} thread(s) each); logs in {paths.launch_dir(cfg)}")
    env_base = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
                    PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                             os.environ.get("PYTHONPATH")])))
    queue, free = list(folds), list(slots)
    running: dict[int, _Running] = {}
    result, told_busy = LaunchResult(), set()
    try:
        while queue or running:
            for k, job in list(running.items()):
                rc = job.proc.poll()
                if rc is None:
                    continue
                free.append(job.slot)
                del running[k]
                if rc == 0:
                    text = job.log.read_text(encoding="utf-8", errors="replace") if job.log.is_file() else ""
                    (result.current if f"fold_job: fold {k} current" in text else result.trained).append(k)
                    board.set(k, "done")
                else:
                    result.failed[k] = log_tail(job.log)
                    board.set(k, f"FAILED (exit code {rc})")
                    board.say(f"        fold {k} failed (exit code {rc}); the last lines of {job.log}:\n"
                              + "\n".join("          | " + line for line in result.failed[k].splitlines()))
            while free and queue:
                k = next((j for j in queue if lock_holder(cfg, j) is None), None)
                if k is None:
                    break
                queue.remove(k)
                slot = free.pop(0)
                log = paths.fold_log(cfg, k)
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w", encoding="utf-8") as fh:
                    proc = subprocess.Popen(fold_command(cfg, k, config_json), stdout=fh, stderr=subprocess.STDOUT,
                                            env={**env_base, **slot.env(threads)}, cwd=os.getcwd())
                running[k] = _Running(proc, slot, log)
                board.set(k, f"running on {slot}")
            for k in queue:
                holder = lock_holder(cfg, k)
                if holder is not None:
                    board.set(k, f"waiting: held by {holder}")
                    if k not in told_busy and (running or len(queue) > 1):
                        told_busy.add(k)
                        board.say(f"        fold {k} is being worked on by {holder}; starting the other folds first")
            board.refresh()
            if queue or running:
                time.sleep(POLL_S)
    finally:
        for job in running.values():  # interrupted: the fold processes must not outlive the launcher
            job.proc.terminate()
        for job in running.values():
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
    return result


# --------------------------------------------------------------------------- dispatch
def in_process(cfg: Config) -> bool:
    """Whether the folds run one after another in this process (launcher defaults, or under torchrun)."""
    lc = cfg.launcher
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return lc.kind == "local" and (distributed or (lc.parallel == 1 and lc.gpus_per_fold == 1))


def train_folds(cfg: Config, folds: list[int], wait: bool = True, say: Say = print, force: bool = False) -> LaunchResult:
    """Train (and, in fold jobs, predict) ``folds`` as ``cfg.launcher`` says; see the module docstring.

    ``force``: as ``pipeline.train --force``. Fold jobs of other processes never move the experiment
    aside themselves (two at once would race): that is done here, once, before they start.
    """
    lc = cfg.launcher
    if not folds:
        return LaunchResult()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if in_process(cfg):
        if lc.parallel > 1 and distributed:
            say("        launcher: under torchrun every fold uses all ranks; launcher.parallel is ignored")
        return run_in_process(cfg, folds, say, force=force)
    if distributed:
        raise PipelineError(f"launcher.kind={lc.kind} with launcher.parallel={lc.parallel} starts its own processes; "
                            "run pipeline.run without torchrun")
    if not force:
        from pipeline.train import set_aside_changed_experiment

        set_aside_changed_experiment(cfg)
    if lc.kind == "submitit":
        from pipeline.launch_submitit import run_submitit

        return run_submitit(cfg, folds, wait=wait, say=say)
    return run_processes(cfg, folds, say)
