"""A higher-resolution stage, and the config a fold really trains with.

``finetune: {from: <experiment>, img_size, epochs, lr}``: each fold k starts from fold k's best
weights of ``from`` (its EMA or SWA weights where that experiment used them; head included) and
trains at ``img_size`` for ``epochs`` at ``lr`` (224 -> 384 is the usual step on real data). Those
three replace ``train.img_size``, ``train.epochs`` and ``train.lr``: :func:`resolve_training_config`
writes them into the config (and resolves ``train.img_size: auto``), so the saved config, the
up-to-date check and the predict stage all see the size the weights were trained at. It is
idempotent, and every entry point (``pipeline.train``, ``pipeline.run``) calls it first.
"""
from __future__ import annotations

import torch

from pipeline import paths
from pipeline.config import Config
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.io import read_json


def resolve_training_config(cfg: Config, quiet: bool = False) -> Config:
    """``cfg`` with ``finetune`` values and ``train.img_size: auto`` written into ``train``."""
    from pipeline.image_size import resolve_img_size

    f = cfg.finetune
    if f.enabled:
        updates = {k: v for k, v in (("img_size", f.img_size), ("epochs", f.epochs), ("lr", f.lr)) if v is not None}
        if any(getattr(cfg.train, k) != v for k, v in updates.items()):
            cfg = cfg.model_copy(deep=True)
            for k, v in updates.items():
                setattr(cfg.train, k, v)
    return resolve_img_size(cfg, quiet=quiet)


def load_start_weights(cfg: Config, fold: int, model: torch.nn.Module, classes: list[str]) -> str:
    """Load fold ``fold``'s best weights of ``finetune.from`` into ``model``; returns what was loaded."""
    source = cfg.finetune.source
    if source == cfg.experiment:
        raise PipelineError(f"finetune.from = {source!r} is this experiment; name the experiment to continue from")
    d = paths.fold_dir(cfg, fold, source)
    best = d / paths.BEST
    if not best.is_file():
        raise PipelineError(f"finetune.from = {source!r}: {best} does not exist; train that experiment first "
                            f"(python -m pipeline.run --set experiment={source} ...)")
    ckpt = load_checkpoint(best)
    if list(ckpt.get("classes", [])) != list(classes):
        raise PipelineError(f"finetune.from = {source!r} has other classes than this competition")
    metrics = read_json(d / paths.METRICS) if (d / paths.METRICS).is_file() else {}
    use_ema = ckpt.get("ema") is not None and bool(metrics.get("used_ema", True))
    state = ckpt["ema"] if use_ema else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PipelineError(f"finetune.from = {source!r}: its weights do not fit model.backbone "
                            f"{cfg.model.backbone!r} ({str(exc).splitlines()[0]}); use the same backbone") from None
    return f"{best} ({'EMA' if use_ema else 'SWA' if ckpt.get('used_swa') else 'model'} weights)"
