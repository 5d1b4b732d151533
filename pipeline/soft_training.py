"""The training rows of a fold as soft targets, when pseudo-labelling or distillation is on.

Joins the fold's own training rows (labels as smoothed one-hot rows; with ``distill``, the teacher
blend's OOF probabilities beside them) and the fold's pseudo-labelled test images (``pseudo``),
packed as :mod:`pipeline.engine.soft_targets` expects, into one dataset. The loss is then
:class:`~pipeline.engine.soft_targets.DistillationLoss` and Mixup is
:class:`~pipeline.engine.soft_targets.SoftTargetMixup`. What was used is recorded in the fold's
``second_round.json`` (teachers, the models each fold's pseudo-labels came from, counts, warnings).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.config import Config
from pipeline.data import ImageDataset
from pipeline.engine.soft_targets import DistillationLoss, SoftTargetMixup, one_hot, pack_targets
from pipeline.errors import PipelineError


def soft_targets_on(cfg: Config) -> bool:
    return cfg.pseudo.enabled or cfg.distill.enabled


@dataclass
class SoftRows:
    paths: list[str]
    packed: np.ndarray                 # (n, 2C + 1)
    n_train: int                       # the first n_train rows are the fold's own training images
    record: dict[str, Any] = field(default_factory=dict)


class PackedTargetDataset(ImageDataset):
    """An :class:`ImageDataset` whose target is a packed soft-target row instead of a class index."""

    def __init__(self, paths: list[str], packed: np.ndarray, transform=None, cache: bool = False):
        super().__init__(paths, None, transform, cache)
        self.packed = torch.from_numpy(np.ascontiguousarray(packed, np.float32))

    def __getitem__(self, index: int):
        x, _ = super().__getitem__(index)
        return x, self.packed[index]


def soft_rows(cfg: Config, fold: int, folds: pd.DataFrame, train_rows: pd.DataFrame, classes: list[str],
              root: Path) -> SoftRows:
    """The fold's training rows (+ pseudo-labelled test images) with packed soft targets."""
    from pipeline.data import load_competition
    from pipeline.distill import distill_targets
    from pipeline.pseudo import pseudo_labels

    index = {c: i for i, c in enumerate(classes)}
    labels = one_hot(train_rows["label"].map(index).to_numpy(), len(classes), cfg.train.label_smoothing)
    teacher = labels
    record: dict[str, Any] = {"fold": fold}
    if cfg.distill.enabled:
        probs, has, record["distill"] = distill_targets(cfg, fold, classes, folds, train_rows["image"].tolist())
        teacher = np.where(has[:, None], probs, labels)
    paths = [str(root / p) for p in train_rows["image"]]
    packed = [pack_targets(labels, teacher)]
    ps = pseudo_labels(cfg, fold, classes, folds) if cfg.pseudo.enabled else None
    if ps is not None:
        record["pseudo"] = ps.record
        if ps.images:
            test_path = dict(zip(*[load_competition(cfg.competition).test[c] for c in ("image", "path")]))
            unknown = [i for i in ps.images if i not in test_path]
            if unknown:
                raise PipelineError(f"pseudo-labels name test images the competition does not have (e.g. "
                                    f"{unknown[:3]}); predict the teachers again on the current competition")
            paths += [str(test_path[i]) for i in ps.images]
            packed.append(pack_targets(ps.targets, ps.targets, np.full(len(ps.images), ps.weight)))
    return SoftRows(paths, np.concatenate(packed), len(train_rows), record)


def soft_loss_and_mixup(cfg: Config, num_classes: int) -> tuple[torch.nn.Module, SoftTargetMixup | None]:
    """The distillation loss (``alpha`` 0 without a teacher) and Mixup for packed targets."""
    t = cfg.train
    alpha = cfg.distill.alpha if cfg.distill.enabled else 0.0
    loss = DistillationLoss(num_classes, alpha=alpha, temperature=cfg.distill.temperature)
    mixup = None
    if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
        mixup = SoftTargetMixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, prob=t.mixup_prob,
                                switch_prob=t.mixup_switch_prob, mode="batch", num_classes=num_classes)
    return loss, mixup
