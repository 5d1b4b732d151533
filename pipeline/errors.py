"""User-facing errors and the command-line wrapper that prints them without a traceback."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable


class PipelineError(RuntimeError):
    """A problem the user can fix (bad data, missing stage output); the message says how."""


def cli_entry(fn: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a stage's ``main`` and turn user errors into one clear message and exit code 2."""
    from pipeline.config import ConfigError

    try:
        fn(argv)
    except (ConfigError, PipelineError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed outputs are kept and the run can be resumed", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `python -m pipeline.compare | head`: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's last flush does not raise (and print a traceback) again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0
