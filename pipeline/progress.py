"""Progress bars only where a person watches them.

A tqdm bar redraws itself with carriage returns; written to a log file (``> train.log``, a Slurm
job, ``nohup``) every redraw becomes text, thousands of lines of it. So bars appear only when
stderr is a terminal and ``--quiet`` was not given; otherwise long work reports one summary line
per step (train prints one line per epoch) and nothing in between.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no bars and no per-epoch lines for the rest of the process."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def bars_enabled() -> bool:
    """Whether a progress bar would reach a person: stderr is a terminal and not ``--quiet``."""
    isatty = getattr(sys.stderr, "isatty", None)
    return not _quiet and bool(isatty and isatty())


def bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, switched off unless :func:`bars_enabled` (and ``enabled``)."""
    return tqdm(iterable, disable=not (enabled and bars_enabled()), **kwargs)


def line(text: str) -> None:
    """A per-step summary line (an epoch), printed beside any open bar; nothing under ``--quiet``."""
    if not _quiet:
        tqdm.write(text, file=sys.stdout)
