"""Data order and augmentation that depend on (seed, epoch, rank, image) alone.

Both tracks train through these, which is what makes ``--resume`` equal an uninterrupted run and
results independent of ``num_workers``: shuffling comes from a ``DistributedSampler`` seeded by
(seed, epoch) and split by rank, and each image's augmentation from generators seeded by
(seed, epoch, index), not from state carried between epochs or DataLoader workers.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` from a ``DistributedSampler`` so that the dataset can seed each
    image's augmentation by (seed, epoch, index)."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((index, self.epoch) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededAugment(Dataset):
    """A dataset with an albumentations ``transform`` whose item ``(index, epoch)`` is augmented
    with generators seeded by (seed, epoch, index).

    albumentations 2 keeps its own random generators, which the global seeds do not reach and which
    every DataLoader worker would otherwise copy. Seeding per image makes an epoch's augmentation
    the same whatever the number of workers, with persistent workers, and after ``--resume``.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        rng = np.random.default_rng([self.seed, epoch, index])
        self.dataset.transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        return self.dataset[index]


def epoch_sampler(dataset: Dataset, seed: int, rank: int, world_size: int) -> EpochSampler:
    """Shuffled, split by rank; the order depends on (seed, epoch) only."""
    return EpochSampler(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed))


def seed_epoch(loader: DataLoader, epoch: int) -> None:
    """Start epoch ``epoch``: its shuffling and augmentation depend on (seed, epoch, rank) alone,
    which is what lets ``--resume`` reproduce the uninterrupted run exactly."""
    loader.sampler.set_epoch(epoch)


MAX_WORKERS = 8


def loader_workers(setting: int | str, device: torch.device) -> int:
    """``train.num_workers``: a number, or ``auto``.

    auto on CUDA: min(cores - 1, 8) for each GPU process on the machine (``LOCAL_WORLD_SIZE`` under
    torchrun), so decoding and augmentation overlap the GPU's work and one core is left to the
    process feeding it. On the CPU: 0, the batch is made in the training process; the model's
    own threads already use every core, and one worker competing with them ran the 2-core
    benchmark slower (benchmarks/train_throughput.py --num-workers 1).
    """
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(per_process - 1, MAX_WORKERS))
