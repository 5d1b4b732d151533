"""Weights & Biases, offline by default; ``disabled`` works even with wandb not installed.

Only the main rank calls :func:`start_run`; other ranks get a no-op run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class NullRun:
    """Stands in for a W&B run when logging is disabled or on non-main ranks."""

    dir = None
    id = None

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self, *args, **kwargs) -> None:
        pass

    @property
    def summary(self) -> dict:
        return {}


def start_run(wandb_cfg, run_root: str | Path, *, name: str, group: str, job_type: str,
              config: dict[str, Any], enabled: bool = True, run_id: str | None = None):
    """Start a W&B run whose files land under ``run_root/wandb/``.

    Args:
        wandb_cfg: the ``wandb`` config section (mode, project, entity, tags).
        run_root: ``runs/<experiment>``.
        enabled: False on non-main ranks.
        run_id: the id of a run to continue (a resumed fold logs to the run it started, not a new one).
    """
    if not enabled or wandb_cfg.mode == "disabled":
        return NullRun()
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    if wandb_cfg.mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
    try:
        import wandb
    except ImportError:
        from pipeline.errors import PipelineError

        raise PipelineError("wandb.mode is offline/online but the wandb package is not installed; "
                            "pip install wandb or use --set wandb.mode=disabled") from None
    run_root = Path(run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=wandb_cfg.project, entity=wandb_cfg.entity, group=group, job_type=job_type, name=name,
        config=config, dir=str(run_root), mode=wandb_cfg.mode, tags=list(wandb_cfg.tags), reinit="finish_previous",
        id=run_id, resume="allow" if run_id else None,
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
