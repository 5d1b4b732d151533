"""The distillation loss on known logits, and soft targets through Mixup."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.engine.soft_targets import DistillationLoss, SoftTargetMixup, one_hot, pack_targets


def test_distillation_loss_on_a_known_pair_of_logits():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = np.array([[0.7, 0.2, 0.1]])
    label = one_hot(np.array([0]), 3)
    alpha, t = 0.25, 2.0
    loss = DistillationLoss(3, alpha=alpha, temperature=t)(student, torch.from_numpy(pack_targets(label, teacher)))

    # by hand: CE on the label, KL between softmaxes at temperature t (teacher from its probabilities)
    s = [2.0, 0.0, -1.0]
    ce = -(s[0] - math.log(sum(math.exp(v) for v in s)))
    tt = [p ** (1 / t) for p in teacher[0]]
    tt = [v / sum(tt) for v in tt]
    st = [math.exp(v / t) for v in s]
    st = [v / sum(st) for v in st]
    kl = sum(a * math.log(a / b) for a, b in zip(tt, st))
    assert loss.item() == pytest.approx((1 - alpha) * ce + alpha * t * t * kl, rel=1e-5)

    # alpha 0 is plain cross-entropy; a student equal to the teacher at T=1 has zero KL
    assert DistillationLoss(3)(student, torch.from_numpy(pack_targets(label, teacher))).item() == pytest.approx(ce, rel=1e-6)
    same = torch.log(torch.tensor(teacher, dtype=torch.float32))
    kl_only = DistillationLoss(3, alpha=1.0)(same, torch.from_numpy(pack_targets(label, teacher)))
    assert kl_only.item() == pytest.approx(0.0, abs=1e-6)


def test_row_weights_scale_each_rows_loss():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = one_hot(np.array([0, 0]), 2)
    full = DistillationLoss(2)(logits, torch.from_numpy(pack_targets(labels)))
    half = DistillationLoss(2)(logits, torch.from_numpy(pack_targets(labels, weights=np.array([1.0, 0.0]))))
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0]), reduction="none")
    assert full.item() == pytest.approx(ce.mean().item())
    assert half.item() == pytest.approx(ce[0].item() / 2)


def test_soft_target_mixup_mixes_targets_with_the_images_lambda():
    torch.manual_seed(0)
    np.random.seed(0)
    mix = SoftTargetMixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, num_classes=3)
    x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    target = torch.from_numpy(pack_targets(one_hot(np.array([0, 2]), 3)))
    mixed_x, mixed_t = mix(x.clone(), target)
    lam = 1.0 - mixed_x[0].mean().item()  # image 0 became lam * 0 + (1 - lam) * 1
    assert mixed_t[0, :3].tolist() == pytest.approx([lam, 0.0, 1 - lam], abs=1e-6)
    assert mixed_t[:, -1].tolist() == pytest.approx([1.0, 1.0])
