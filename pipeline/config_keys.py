"""Which config keys change a trained model: one table for ``pipeline.run`` and ``--resume``.

A trained fold (or detection run) is only as current as the settings it was trained with. Each
dotted config key is either ``RETRAIN`` (changing it can change the weights, so ``pipeline.run``
trains the fold again and ``--resume`` refuses to continue) or ``NO_RETRAIN`` (it changes how
fast, where, or what happens after training: nothing is retrained and ``--resume`` accepts the
change). The most specific entry wins: ``train`` is RETRAIN, ``train.num_workers`` is NO_RETRAIN.

A new feature adds its keys with one line each, e.g.::

    "train.swa": RETRAIN,              # a new training technique
    "cache": NO_RETRAIN,               # a new section that only makes data loading faster

Every key of both tracks' configs must fall under an entry (``tests/test_config_keys.py`` checks
that), so a new section cannot silently be ignored by the up-to-date check. A key missing from an
older saved config compares as ``None`` and so counts as changed when the new default is not None.
"""
from __future__ import annotations

from typing import Any

RETRAIN = "retrain"
NO_RETRAIN = "no retrain"

KEYS: dict[str, str] = {
    # --- both tracks
    "experiment": NO_RETRAIN,           # the run folder's own name
    "seed": RETRAIN,
    "device": NO_RETRAIN,               # where it runs; precision is train.amp
    "paths": NO_RETRAIN,
    "wandb": NO_RETRAIN,
    "predict": NO_RETRAIN,              # what happens after training
    "launcher": NO_RETRAIN,             # how and where the folds run (pipeline/launch.py)
    "competition": RETRAIN,             # the data itself
    "competition.solution": NO_RETRAIN,  # only scores submissions
    "competition.build": NO_RETRAIN,    # whether to build the demo data, not what it holds
    # Label fixes change the training rows of some folds only: train.fold_is_current compares each
    # fold's own training rows (metrics.json: train_rows_sha256) instead of the file names.
    "competition.relabel": NO_RETRAIN,
    "competition.exclude": NO_RETRAIN,
    "model": RETRAIN,
    "train": RETRAIN,
    "train.num_workers": NO_RETRAIN,    # results do not depend on it (augmentation seeded per image)
    "train.cache_images": NO_RETRAIN,   # the same pixels, decoded once
    "train.compile": NO_RETRAIN,        # the same graph, compiled
    "train.tf32": NO_RETRAIN,           # float32 rounding on CUDA, like cuDNN autotuning
    "train.keep_last": NO_RETRAIN,      # whether last.pt is kept after the fold is complete
    "train.time_budget": RETRAIN,       # it picks the epochs
    # --- classification
    "dedup": RETRAIN,                   # which images are grouped, hence the folds
    "dedup.workers": NO_RETRAIN,
    "dedup.sheet_groups": NO_RETRAIN,
    "folds": RETRAIN,
    "folds.group_column": RETRAIN,      # regroups the images, hence the folds
    "tta": NO_RETRAIN,
    "cache": RETRAIN,                   # the resized pixels training sees (size, format, jpeg_quality)
    "cache.workers": NO_RETRAIN,        # threads that build it: the same files
    "ensemble": NO_RETRAIN,
    "package": NO_RETRAIN,              # an inference package is made from trained folds
    "pseudo": RETRAIN,                  # second round: what each fold learns from (teachers, threshold ...)
    "distill": RETRAIN,
    "finetune": RETRAIN,                # the start weights; its img_size/epochs/lr are written into train.*
    "seeds": RETRAIN,                   # which seed members make the experiment's average
    # --- detection
    "data": RETRAIN,
    "data.cache_images": NO_RETRAIN,
    "data.test": NO_RETRAIN,            # training never reads the test split
    "data.test_labels": NO_RETRAIN,
    "train.max_minutes": NO_RETRAIN,    # a limit on wall time: a run it stopped may resume under a new one
    "post": RETRAIN,                    # NMS settings decide the validation mAP, hence best.pt
    "post.score_threshold": NO_RETRAIN,
    "submission": NO_RETRAIN,           # detection: the submission's form, written after training  # only precision/recall at the reporting threshold
}


def classify(key: str) -> str | None:
    """RETRAIN or NO_RETRAIN for a dotted key (most specific entry), None if no entry covers it."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        hit = KEYS.get(".".join(parts[:n]))
        if hit is not None:
            return hit
    return None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists and empty dicts stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def retrain_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every RETRAIN key that differs, sorted by key.

    A key no entry covers counts as RETRAIN: an unknown setting might change the result.
    """
    from pipeline.config import absolute_path_values

    a, b = absolute_path_values(flatten(saved)), absolute_path_values(flatten(current))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if classify(k) != NO_RETRAIN and a.get(k) != b.get(k)]


def describe(changes: list[tuple[str, Any, Any]], limit: int = 5) -> str:
    """``train.lr: 0.001 -> 0.002, ...`` for messages."""
    shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:limit])
    return shown + (f" (+{len(changes) - limit} more)" if len(changes) > limit else "")
