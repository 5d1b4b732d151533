"""The classification loop in the shape of timm's train.py: ``train_one_epoch()`` and ``validate()``.

Mixup/CutMix, losses and EMA come from timm; this module only wires them into one pass over a
DataLoader with AMP, gradient accumulation, clipping, a per-update schedule and DDP.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import dispatch_clip_grad, unwrap_model

from pipeline.config import TrainConfig
from pipeline.data.device_input import DeviceInput
from pipeline.engine.amp import Amp
from pipeline.engine.distributed import DistInfo, all_gather_object, reduce_mean
from pipeline.engine.optim import current_lr
from pipeline.errors import PipelineError
from pipeline.progress import bar

CHECK_EVERY = 10  # steps between reading the loss back to the host


class NonFiniteLossError(PipelineError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, lr: float, value: float):
        self.epoch, self.step, self.lr, self.value = epoch, step, lr, value
        super().__init__(
            f"the training loss became {value} at epoch {epoch + 1}, step {step + 1} (learning rate "
            f"{lr:.3g}); training stopped on every rank and last.pt keeps the last good epoch. Lower "
            "train.lr, set train.clip_grad (e.g. 1.0) or train.amp=off, then train again"
        )


@dataclass
class TrainStats:
    losses: dict[str, float]   # mean per image over every rank, by name ("loss" is the minimised one)
    lr: float
    images: int
    time_s: float
    num_updates: int

    @property
    def loss(self) -> float:
        return self.losses["loss"]

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.time_s, 1e-9)


@dataclass
class EvalResult:
    """Per-image outputs of a validation pass in dataset order, and their summary."""

    probs: np.ndarray
    losses: np.ndarray
    targets: np.ndarray

    @property
    def loss(self) -> float:
        return float(self.losses.mean()) if len(self.losses) else float("nan")

    @property
    def accuracy(self) -> float:
        return float((self.probs.argmax(1) == self.targets).mean()) if len(self.targets) else float("nan")


LossFn = Callable[[torch.nn.Module, Any], tuple[dict[str, torch.Tensor], int]]
"""``loss_fn(model, batch) -> (losses, n_images)``: moves the batch to the device, runs the forward
pass (under the track's autocast) and returns named losses; ``losses["loss"]`` is the one that
is minimised, the others (e.g. ``cls_loss``, ``box_loss``) are averaged and reported beside it."""


def create_mixup(train_cfg: TrainConfig, num_classes: int) -> Mixup | None:
    """timm's batch Mixup/CutMix (it also applies label smoothing to the soft targets), or None."""
    if train_cfg.mixup_alpha <= 0 and train_cfg.cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=train_cfg.mixup_alpha, cutmix_alpha=train_cfg.cutmix_alpha,
                 prob=train_cfg.mixup_prob, switch_prob=train_cfg.mixup_switch_prob, mode="batch",
                 label_smoothing=train_cfg.label_smoothing, num_classes=num_classes)


def create_train_loss(train_cfg: TrainConfig, mixup: Mixup | None) -> torch.nn.Module:
    """Soft-target CE with Mixup, label-smoothing CE with smoothing alone, else plain CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if train_cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=train_cfg.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def classification_loss(criterion: torch.nn.Module, *, amp: Amp, device: torch.device, mixup: Mixup | None = None,
                        channels_last: bool = False, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> LossFn:
    """The classifier's :data:`LossFn`: (images, targets) batches, Mixup/CutMix, one named loss.

    uint8 batches are normalised on the device by ``mean``/``std`` (:class:`DeviceInput`), and made
    channels_last there before Mixup, so Mixup already writes the layout the model reads.
    """
    to_input = DeviceInput(device, mean, std, channels_last=channels_last)

    def loss_fn(model: torch.nn.Module, batch) -> tuple[dict[str, torch.Tensor], int]:
        images, targets = batch
        if mixup is not None and len(images) % 2:
            # timm's batch Mixup pairs each image with its mirror in the batch: it needs an even batch.
            images, targets = images[:-1], targets[:-1]
        images = to_input(images)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with amp.autocast():
            logits = model(images)
        return {"loss": criterion(logits.float(), targets)}, len(images)

    return loss_fn


def _first_bad_step(window: list[tuple[int, float, int, float]], info: DistInfo) -> tuple[int, float] | None:
    """(step, loss) of the first non-finite loss in ``window`` on any rank, or None.

    Every rank must stop together (a rank alone leaving would hang the others in their next
    all-reduce), so the earliest bad step is agreed by an all-reduce.
    """
    bad = [(step, value) for step, value, _, _ in window if not math.isfinite(value)]
    if not info.enabled:
        return bad[0] if bad else None
    never = torch.iinfo(torch.int64).max
    first = torch.tensor([bad[0][0] if bad else never], dtype=torch.int64, device=info.device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    step = int(first.item())
    if step == never:
        return None
    own = dict(bad)
    return step, own.get(step, float("nan"))


def train_one_epoch(
    model: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    epoch: int,
    info: DistInfo,
    scaler: torch.amp.GradScaler,
    scheduler=None,
    num_updates: int = 0,
    accum_steps: int = 1,
    clip_grad: float | None = None,
    ema=None,
    desc: str = "train",
) -> TrainStats:
    """One pass over ``loader``; the schedule is stepped after every optimizer update.

    Args:
        model: the model to train (possibly DDP-wrapped or compiled).
        loss_fn: see :data:`LossFn`; the same loop trains classifiers and detectors.
        epoch: 0-based epoch, for messages.
        num_updates: optimizer updates done before this epoch (the schedule's clock).
        ema: timm ``ModelEmaV3`` updated after every optimizer update, or None.

    Raises:
        NonFiniteLossError: the loss was NaN/inf on some rank (found up to ``CHECK_EVERY`` steps
            late; the weights are then spoilt, which is why only finished epochs are saved).
    """
    model.train()
    n_batches = len(loader)
    last_accum_start = n_batches - (n_batches % accum_steps or accum_steps)
    names: list[str] = []
    totals: torch.Tensor | None = None  # per named loss, summed over images, on the host
    seen = 0
    # Losses are read back to the host every CHECK_EVERY steps, not every step: reading a GPU value
    # waits for the GPU, and the host must keep queueing work ahead. A NaN is caught a few steps late,
    # which costs nothing because nothing of an unfinished epoch is saved.
    window: list[tuple[int, torch.Tensor, int, float]] = []  # (step, losses on device, images, lr)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    batches = bar(loader, total=n_batches, desc=desc, leave=False, enabled=info.is_main, dynamic_ncols=True)
    for step, batch in enumerate(batches):
        # Accumulation groups at the end of an epoch may be short; divide by their true length.
        group = accum_steps if step < last_accum_start else n_batches - last_accum_start
        is_update = (step + 1) % accum_steps == 0 or step + 1 == n_batches
        sync = contextlib.nullcontext() if is_update or not hasattr(model, "no_sync") else model.no_sync()
        lr = current_lr(optimizer)
        with sync:
            losses, n = loss_fn(model, batch)
            scaler.scale(losses["loss"] / group).backward()
        if not names:
            names = ["loss", *sorted(k for k in losses if k != "loss")]
        window.append((step, torch.stack([losses[k].detach().float() for k in names]), n, lr))
        if is_update:
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), value=clip_grad, mode="norm")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if ema is not None:
                ema.update(unwrap_model(model), step=num_updates)
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
        if len(window) >= CHECK_EVERY or step + 1 == n_batches:
            values = torch.stack([w[1] for w in window]).cpu()  # one host sync: (steps, named losses)
            checked = [(w[0], float(v[0]), w[2], w[3]) for w, v in zip(window, values)]
            counts = torch.tensor([w[2] for w in window], dtype=torch.float64)
            window.clear()
            bad = _first_bad_step(checked, info)
            if bad is not None:
                optimizer.zero_grad(set_to_none=True)
                lr = next(c[3] for c in checked if c[0] == bad[0])
                raise NonFiniteLossError(epoch, bad[0], lr, bad[1])
            part = (values.double() * counts[:, None]).sum(0)
            totals = part if totals is None else totals + part
            seen += int(counts.sum())
            batches.set_postfix(loss=f"{float(totals[0]) / max(seen, 1):.4f}", lr=f"{current_lr(optimizer):.2e}")
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    elapsed = time.perf_counter() - start
    images_total = int(round(reduce_mean(seen, info) * info.world_size))
    means = {k: reduce_mean(float(totals[i]) / max(seen, 1), info) if totals is not None else float("nan")
             for i, k in enumerate(names or ["loss"])}
    return TrainStats(losses=means, lr=current_lr(optimizer), images=images_total, time_s=elapsed,
                      num_updates=num_updates)


@torch.no_grad()
def validate(model: torch.nn.Module, loader, n_total: int, shard: np.ndarray, *, info: DistInfo, amp: Amp,
             channels_last: bool = False, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             desc: str = "valid") -> EvalResult:
    """Softmax probabilities and per-image losses of every validation image, on every rank.

    Each rank predicts its own shard (``shard`` = dataset indices of ``loader``, in order, with no
    padding) and the shards are gathered, so every image appears exactly once.

    Args:
        model: the bare (unwrapped) model or its EMA copy; DDP's forward would sync buffers.
        n_total: number of images in the whole validation set.
        shard: indices into the whole validation set that this rank's ``loader`` yields, in order.
        mean, std: normalisation of uint8 batches, on the device (:class:`DeviceInput`).
    """
    model.eval()
    to_input = DeviceInput(info.device, mean, std, channels_last=channels_last)
    # Outputs stay on the device until the end: one transfer, not a host sync per batch.
    probs, losses, targets = [], [], []
    for images, target in bar(loader, desc=desc, leave=False, enabled=info.is_main, dynamic_ncols=True):
        images = to_input(images)
        with amp.autocast():
            logits = model(images).float()
        probs.append(logits.softmax(1))
        losses.append(F.cross_entropy(logits, target.to(info.device, non_blocking=True), reduction="none"))
        targets.append(target.numpy())
    n_classes = probs[0].shape[1] if probs else 0
    mine = (
        shard,
        torch.cat(probs).cpu().numpy() if probs else np.zeros((0, n_classes), np.float32),
        torch.cat(losses).cpu().numpy() if losses else np.zeros(0, np.float32),
        np.concatenate(targets) if targets else np.zeros(0, np.int64),
    )
    parts = all_gather_object(mine, info)
    n_classes = max(p[1].shape[1] for p in parts)
    out_p = np.zeros((n_total, n_classes), np.float32)
    out_l = np.zeros(n_total, np.float32)
    out_t = np.full(n_total, -1, np.int64)
    covered = np.zeros(n_total, bool)
    for idx, p, lo, t in parts:
        out_p[idx], out_l[idx], out_t[idx] = p, lo, t
        covered[idx] = True
    if not covered.all():
        raise RuntimeError(f"validation shards missed {int((~covered).sum())} images")  # a bug, not user error
    return EvalResult(out_p, out_l, out_t)
