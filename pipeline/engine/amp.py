"""Mixed precision: which dtype ``train.amp`` means on this device, the autocast context, the scaler."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Amp:
    """Resolved AMP setting: ``dtype`` None means full float32."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        """The autocast context for forward passes (a no-op when off)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        """Loss scaling is needed for fp16 only; bf16 has float32's range."""
        return self.dtype is torch.float16

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


BF16_CAPABILITY = (8, 0)  # Ampere and newer compute in bf16 at full speed; older GPUs emulate it slowly


def resolve_amp(mode: str, device: torch.device) -> Amp:
    """``auto``: bf16 on GPUs of compute capability 8.0 or more, fp16 with a GradScaler on older
    ones (Kaggle's T4 and P100), off on the CPU. The same rule for both tracks.

    Args:
        mode: ``train.amp`` (auto, bf16, fp16, off).
        device: the training device.
    """
    kind = device.type
    if mode == "off":
        return Amp(kind, None)
    if kind != "cuda":
        if mode == "fp16":
            raise PipelineError("train.amp = fp16 needs a CUDA GPU; on the CPU use --set train.amp=off "
                                "(or bf16, which the CPU autocast supports)")
        # auto stays off on the CPU: CPU autocast is rarely faster for convolutions and changes results.
        return Amp(kind, torch.bfloat16 if mode == "bf16" else None)
    # is_bf16_supported() says yes on a T4 too (emulated, several times slower): ask the hardware.
    fast_bf16 = tuple(torch.cuda.get_device_capability(device)) >= BF16_CAPABILITY
    if mode == "bf16" and not fast_bf16:
        raise PipelineError("train.amp = bf16 but this GPU (compute capability below 8.0) has no fast bfloat16; "
                            "use --set train.amp=fp16 or auto")
    if mode == "auto":
        return Amp(kind, torch.bfloat16 if fast_bf16 else torch.float16)
    return Amp(kind, torch.bfloat16 if mode == "bf16" else torch.float16)


def set_tf32(device: torch.device, enabled: bool = True) -> None:
    """TensorFloat-32 for float32 matmuls and cuDNN convolutions on CUDA (``train.tf32``); once per
    process, at startup. Ampere and newer GPUs run float32 work on tensor cores with it; older
    ones ignore it. Nothing changes on the CPU."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
