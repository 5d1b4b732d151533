"""Stochastic weight averaging of a fold's epochs with ``torch.optim.swa_utils``.

From ``train.swa.start_epoch`` on (or over the last ``train.swa.last_n`` epochs), the weights at the
end of each epoch are added to an :class:`~torch.optim.swa_utils.AveragedModel` (an equal-weight
running mean). At the end, BatchNorm statistics are recomputed for the averaged weights with
``update_bn`` over the training data: the running means and variances of the epochs do not belong
to the average. Optionally ``train.swa.lr`` switches the schedule to ``SWALR`` (annealed to a
constant learning rate) for the averaged epochs.

The running average is kept in the fold's own ``swa.pt`` (weights, count, the epochs averaged), not
in ``last.pt``, so dropping ``last.pt`` (``train.keep_last``) never loses it and ``--resume``
continues it exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from pipeline.data.device_input import DeviceInput
from pipeline.engine.checkpoint import load_checkpoint, save_checkpoint


def swa_start_epoch(swa_cfg, epochs: int) -> int | None:
    """0-based first averaged epoch, or None when SWA is off."""
    if swa_cfg is None:
        return None
    if swa_cfg.last_n is not None:
        return max(0, epochs - swa_cfg.last_n)
    if swa_cfg.start_epoch is not None:
        return min(max(0, swa_cfg.start_epoch - 1), epochs - 1)  # the key counts epochs from 1, as printed
    return None


class Swa:
    """An equal-weight running average of a model's per-epoch weights.

    Args:
        model: the bare (unwrapped) model being trained.
        start_epoch: 0-based first epoch whose end weights are averaged.
        optimizer: when ``lr`` is given, ``SWALR`` takes over its learning rate from ``start_epoch``.
        lr: the constant SWA learning rate (None: keep the run's own schedule).
        anneal_epochs: epochs of cosine annealing from the current learning rate to ``lr``.
    """

    def __init__(self, model: torch.nn.Module, start_epoch: int, optimizer: torch.optim.Optimizer | None = None,
                 lr: float | None = None, anneal_epochs: int = 1):
        self.start_epoch = start_epoch
        # use_buffers=False: BatchNorm buffers are recomputed at the end (update_bn), not averaged.
        self.averaged = AveragedModel(model, use_buffers=False)
        self.epochs: list[int] = []
        self.scheduler = (SWALR(optimizer, swa_lr=lr, anneal_epochs=anneal_epochs, anneal_strategy="cos")
                          if lr is not None and optimizer is not None else None)

    def owns_schedule(self, epoch: int) -> bool:
        """Whether SWALR, not the run's scheduler, sets the learning rate during ``epoch``."""
        return self.scheduler is not None and epoch >= self.start_epoch

    def end_epoch(self, model: torch.nn.Module, epoch: int) -> bool:
        """Add the weights at the end of ``epoch`` (if averaged); returns whether they were added."""
        if epoch < self.start_epoch or epoch in self.epochs:
            return False
        self.averaged.update_parameters(model)
        self.epochs.append(epoch)
        if self.owns_schedule(epoch):
            self.scheduler.step()
        return True

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged.item())

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    def update_bn(self, loader, device: torch.device, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, channels_last: bool = False) -> None:
        """Recompute BatchNorm statistics of the averaged weights over ``loader`` (the training data);
        uint8 batches are normalised on the device by ``mean``/``std`` as in training."""
        to_input = DeviceInput(device, mean, std, channels_last=channels_last)
        # update_bn resets the statistics first, then runs every batch it is given.
        update_bn((to_input(images) for images, *_ in loader), self.averaged)

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.averaged.module.state_dict().items()},
                "n_averaged": self.n_averaged, "epochs": list(self.epochs), "start_epoch": self.start_epoch,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.module.load_state_dict(state["model"])
        self.averaged.n_averaged.fill_(int(state["n_averaged"]))
        self.epochs = [int(e) for e in state["epochs"]]
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def save(self, path: str | Path, **extra: Any) -> Path:
        return save_checkpoint(path, {**self.state_dict(), **extra})

    def load(self, path: str | Path) -> None:
        self.load_state_dict(load_checkpoint(path))

