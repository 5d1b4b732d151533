"""One lock per unit of work, (experiment, seed, fold): two processes never train or predict one fold at once.

Whoever starts them (two terminals, two launchers, a Slurm job requeued while a later ``pipeline.run``
is working), the second process waits for the fold, or moves on to another, and says which.

The lock is an operating-system file lock (the ``filelock`` package: ``flock`` on Unix), so the kernel
drops it the moment its process dies, even by ``kill -9`` or a lost node (NFS and Lustre mounted with
``flock`` keep such locks across machines; where a file system has no ``flock``, filelock falls back to
a plain lock file). Beside it, ``<lock>.holder.json`` says who holds it (host, pid, Slurm job, since
when) for the messages of the processes that wait; a holder file left by a process that died tells the
next one that it takes over a stale lock.

Files: ``runs/<experiment>/locks/seed<S>-fold<K>.lock`` and ``.holder.json`` (removed on release).
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import filelock

from pipeline import paths
from pipeline.io import atomic_write_json, read_json

# How often a waiting process reports that it still waits (seconds).
REPORT_EVERY_S = 600.0


def _slurm_job() -> str:
    job = os.environ.get("SLURM_JOB_ID", "")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if job and task is not None:
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{task}"
    return job


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock."""

    host: str
    pid: int
    since: str
    job: str = ""

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), datetime.now().isoformat(timespec="seconds"), _slurm_job())

    def alive(self) -> bool | None:
        """Whether the holder's process still runs (None: on another host, cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process, alive
            return True
        return True

    def __str__(self) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        return f"{self.host}:{self.pid}{job}, since {self.since}"


class FoldLock:
    """The lock of fold ``fold`` of ``cfg.experiment`` (seed ``cfg.seed`` unless given).

    Use ``try_acquire()`` to move on when the fold is busy, ``acquire()`` to wait for it, or ``with``.
    """

    def __init__(self, cfg, fold: int, seed: int | None = None, say: Callable[[str], Any] = print):
        self.experiment, self.fold = cfg.experiment, fold
        self.seed = cfg.seed if seed is None else seed
        self.path = paths.fold_lock(cfg, fold, self.seed)
        self.holder_path = self.path.with_name(self.path.name + ".holder.json")
        self.say = say
        self._lock: filelock.BaseFileLock | None = None

    @property
    def name(self) -> str:
        return f"fold {self.fold} of {self.experiment} (seed {self.seed})"

    def _file_lock(self) -> filelock.BaseFileLock:
        if self._lock is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = filelock.FileLock(self.path, thread_local=False)
        return self._lock

    def holder(self) -> Holder | None:
        """The recorded holder (None when nobody has written one)."""
        try:
            data = read_json(self.holder_path)
            return Holder(str(data["host"]), int(data["pid"]), str(data["since"]), str(data.get("job", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock is not None and self._lock.is_locked

    def _try_lock(self, timeout: float) -> bool:
        try:
            self._file_lock().acquire(timeout=timeout)
        except filelock.Timeout:
            return False
        return True

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False (at once) when another process holds it."""
        if self.held:
            return True
        if not self._try_lock(0):
            return False
        self._took_over()
        return True

    def acquire(self, report_every_s: float = REPORT_EVERY_S, poll_s: float = 1.0) -> None:
        """Take the lock, waiting for its holder as long as it takes (saying so now and then)."""
        if self.try_acquire():
            return
        started, reported = time.monotonic(), -1.0
        while True:
            waited = time.monotonic() - started
            if reported < 0 or waited - reported >= report_every_s:
                who = self.holder()
                self.say(f"lock: {self.name} is held by {who or 'another process'}; "
                         f"waiting for it{f' ({waited / 60:.0f} min so far)' if reported >= 0 else ''}")
                reported = waited
            if self._try_lock(poll_s):
                self._took_over()
                return

    def _took_over(self) -> None:
        """Record this process as the holder, saying so when an earlier holder died with the lock."""
        old = self.holder()
        if old is not None and (old.host, old.pid) != (socket.gethostname(), os.getpid()):
            why = "whose process is gone" if old.alive() is False else "which ended without letting go"
            self.say(f"lock: taking over the stale lock of {self.name} left by {old}, {why}")
        me = Holder.me()
        atomic_write_json(self.holder_path, {"host": me.host, "pid": me.pid, "since": me.since, "job": me.job})

    def release(self) -> None:
        if not self.held:
            return
        # The holder file goes first: one left behind means its process died holding the lock.
        try:
            self.holder_path.unlink()
        except FileNotFoundError:
            pass
        self._file_lock().release()

    def __enter__(self) -> FoldLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(cfg, fold: int, seed: int | None = None) -> Holder | None:
    """Who holds the lock of ``fold`` now, or None when it is free (probes without waiting)."""
    lock = FoldLock(cfg, fold, seed, say=lambda *_: None)
    if lock._try_lock(0):
        # Probing leaves the holder file alone: one left by a dead process is the next holder's news.
        lock._file_lock().release()
        return None
    return lock.holder() or Holder("?", 0, "?")
