"""One seed for Python, numpy, torch and DataLoader workers."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed every generator; returns a torch Generator for DataLoaders.

    It leaves cuDNN's settings alone: :func:`cudnn_autotune` decides those once per run.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy/random seeds from torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def cudnn_autotune(device: torch.device) -> None:
    """cuDNN benchmark mode (the fastest convolution kernels for fixed input sizes) on GPUs.

    Results on GPUs then match from run to run only closely; the exact-reproducibility promise
    (same OOF probabilities, resume equals uninterrupted) is for the CPU, where this does nothing.
    """
    torch.backends.cudnn.benchmark = device.type == "cuda"
