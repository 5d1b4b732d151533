"""DDP helpers: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on the CPU."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` takes the GPU of this process's local rank where CUDA exists, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from pipeline.errors import PipelineError

        raise PipelineError("device: cuda was asked for but no CUDA GPU is visible; use --set device=auto or cpu")
    return torch.device("cuda", local_rank)


def process_group_timeout() -> timedelta:
    """How long a rank waits in a collective: 3 hours, or ``PIPELINE_DIST_TIMEOUT_MIN`` minutes.

    Rank 0 alone runs dedup and folds before training, while the other ranks wait in a barrier;
    NCCL's default watchdog (10 minutes) would kill them on a large competition.
    """
    return timedelta(minutes=float(os.environ.get("PIPELINE_DIST_TIMEOUT_MIN", "180")))


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; a plain run is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=process_group_timeout())
    return DistInfo(rank, world, local, dev)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank: for decisions every rank must take together (stop or go on)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item() / info.world_size)
