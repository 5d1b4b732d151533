"""The model's input made on the device: loaders send uint8 pixels, normalisation happens there.

The classification loaders end in ``ToTensorV2`` without ``Normalize``, so a batch crosses to the
device as uint8 (a quarter of float32's bytes, pinned on CUDA) and one batched multiply-add on the
device turns it into the normalised float32 the model takes. The per-image ``A.Normalize`` it
replaces cost more on the CPU than the crop (about 0.1 ms per 32-px image, measured) and was done
in the loader workers that a GPU waits on.

A float batch is taken as already normalised and passes through (tests, benchmarks and callers
that make their own tensors), so the dtype says what a batch is: uint8 is raw 0-255 pixels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.config import TrainConfig


class DeviceInput:
    """``batch -> model input`` on ``device``: moved (non-blocking), made channels_last if asked
    (before Mixup, on the uint8 batch, where the copy is cheapest), and uint8 pixels normalised
    by ``mean``/``std`` (per channel, for pixels scaled to 0-1, as ``A.Normalize`` takes them).

    Args:
        device: where the model runs.
        mean, std: the normalisation of ``train.augment``; needed only for uint8 batches.
        channels_last: return NHWC-strided batches (``train.channels_last``).
    """

    def __init__(self, device: torch.device, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 channels_last: bool = False):
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.scale = self.shift = None
        if mean is not None and std is not None:
            # (x / 255 - mean) / std == x * scale + shift, one fused multiply-add per pixel.
            std_t = torch.tensor(std, dtype=torch.float64)
            scale = 1.0 / (255.0 * std_t)
            shift = -torch.tensor(mean, dtype=torch.float64) / std_t
            self.scale = scale.float().view(1, -1, 1, 1).to(self.device)
            self.shift = shift.float().view(1, -1, 1, 1).to(self.device)

    @classmethod
    def for_training(cls, train_cfg: TrainConfig, device: torch.device) -> DeviceInput:
        """The input of a model trained with ``train_cfg`` (its normalisation and memory format)."""
        aug = train_cfg.augment
        return cls(device, aug.mean, aug.std, channels_last=train_cfg.channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if x.dtype == torch.uint8:
            if self.scale is None:
                raise ValueError("a uint8 image batch needs the mean and std to normalise it; pass them to DeviceInput")
            # float() keeps the memory format and the in-place ops keep it too: channels_last stays.
            x = x.float().mul_(self.scale).add_(self.shift)
        return x
