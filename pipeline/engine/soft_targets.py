"""Training on soft targets: pseudo-labels, a teacher's probabilities (distillation), per-row weights.

A row's target is packed into one float vector so it travels through the DataLoader, ``.to(device)``
and Mixup like a class index does: ``[label distribution (C) | teacher probabilities (C) | weight]``.

- the label distribution is the one-hot label (label smoothing folded in), or a pseudo-label's
  soft probabilities;
- the teacher probabilities are the teacher blend's out-of-fold probabilities for a training image
  (for rows without one, the label distribution again);
- the weight scales the row's loss (``pseudo.weight`` for pseudo-labelled test images, 1 otherwise).

The loss is Hinton et al.'s distillation loss, ``(1 - alpha) * CE(student, label) + alpha * T^2 *
KL(teacher_T || student_T)`` where ``_T`` is a softmax at temperature ``T`` (the ``T^2`` keeps the
gradient scale of the soft term independent of ``T``); with ``alpha = 0`` it is a soft-target
cross-entropy. timm's ``SoftTargetCrossEntropy`` has neither the teacher term nor row weights.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup


def pack_targets(labels: np.ndarray, teacher: np.ndarray | None = None, weights: np.ndarray | None = None) -> np.ndarray:
    """``(N, 2C + 1)`` float32 rows from label distributions ``(N, C)``, teacher probabilities, weights."""
    labels = np.asarray(labels, np.float32)
    teacher = labels if teacher is None else np.asarray(teacher, np.float32)
    weights = np.ones(len(labels), np.float32) if weights is None else np.asarray(weights, np.float32)
    return np.concatenate([labels, teacher, weights[:, None]], axis=1).astype(np.float32)


def one_hot(index: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """Smoothed one-hot rows, as timm's Mixup makes them (``smoothing / C`` off, the rest on)."""
    out = np.full((len(index), num_classes), smoothing / num_classes, np.float32)
    out[np.arange(len(index)), index] += 1.0 - smoothing
    return out


class DistillationLoss(torch.nn.Module):
    """Weighted ``(1 - alpha) CE(label) + alpha T^2 KL(teacher_T || student_T)`` on packed targets."""

    def __init__(self, num_classes: int, alpha: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.num_classes, self.alpha, self.temperature = num_classes, alpha, temperature

    def forward(self, logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        c = self.num_classes
        label, teacher, weight = packed[:, :c], packed[:, c:2 * c], packed[:, 2 * c]
        logits = logits.float()  # log-softmax in fp32 under autocast
        per_row = -(label * F.log_softmax(logits, dim=1)).sum(1)
        if self.alpha > 0:
            t = self.temperature
            teacher_t = F.log_softmax(torch.log(teacher.clamp_min(1e-8)) / t, dim=1)
            student_t = F.log_softmax(logits / t, dim=1)
            kl = (teacher_t.exp() * (teacher_t - student_t)).sum(1) * t * t
            per_row = (1.0 - self.alpha) * per_row + self.alpha * kl
        return (weight * per_row).mean()


class SoftTargetMixup(Mixup):
    """timm's batch Mixup/CutMix for packed soft targets: the images are mixed by timm, the target
    rows (label, teacher and weight alike) by the same ``lam`` (timm's own target mixing one-hot
    encodes class indices, which packed rows are not)."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        assert len(x) % 2 == 0, "batch Mixup needs an even batch"
        lam = self._mix_batch(x)
        return x, target * lam + target.flip(0) * (1.0 - lam)
