"""Images/s of our train loop vs a bare timm loop on pre-made tensors (same model, batch, image size).

Ours is the real path of ``python -m pipeline.train``: the digits competition's images from the
RAM cache, the albumentations train pipeline, a DataLoader of uint8 batches, normalisation on the
device, timm Mixup/CutMix and ``train_one_epoch`` (AMP context, accumulation bookkeeping, NaN
check, schedule, progress bar) with the pipeline's optimizer (fused AdamW). The bare loop is
forward, loss, backward and an optimizer step on one tensor batch made once, with
``torch.optim.AdamW``'s defaults as one would write it; "bare fused" is the same loop with
``fused=True``, the like-for-like step, so its ratio is the cost of our data path and bookkeeping
alone. Rounds alternate between the loops so that load from other processes hits them alike;
the median of each is reported with their ratios. Beside wall-clock rates it reports rates in
this process's CPU time, which other processes' load disturbs far less (with --num-workers 0
every cost of our loop is in this process; with workers their CPU is not counted).

    python benchmarks/train_throughput.py                    # resnet10t, batch 32, 32 px (configs/default.yaml)
    python benchmarks/train_throughput.py --breakdown        # ms per batch of each part of our step
    python benchmarks/train_throughput.py --threads 1 --rounds 5 --backbone resnet18
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import pandas as pd
import timm
import torch

from pipeline.config import load_config
from pipeline.data import load_competition
from pipeline.data.device_input import DeviceInput
from pipeline.engine.amp import resolve_amp
from pipeline.engine.distributed import DistInfo
from pipeline.engine.loop import classification_loss, create_mixup, create_train_loss, train_one_epoch
from pipeline.engine.optim import create_optimizer
from pipeline.engine.sampling import loader_workers
from pipeline.train import build_loaders, build_model, seed_epoch


def _rates(start: tuple[float, float], images: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) since ``start``."""
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    return images / max(wall, 1e-9), images / max(cpu, 1e-9)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def ours(cfg, loader, info: DistInfo, num_classes: int, epoch: int) -> tuple[float, float]:
    _, model, _, _ = build_model(cfg, num_classes, info)
    optimizer = create_optimizer(model, cfg.train)
    amp = resolve_amp(cfg.train.amp, info.device)
    mixup = create_mixup(cfg.train, num_classes)
    seed_epoch(loader, epoch)
    aug = cfg.train.augment
    loss_fn = classification_loss(create_train_loss(cfg.train, mixup), amp=amp, device=info.device, mixup=mixup,
                                  channels_last=cfg.train.channels_last, mean=aug.mean, std=aug.std)
    start = _now()
    stats = train_one_epoch(model, loader, optimizer, loss_fn, epoch=epoch, info=info, scaler=amp.grad_scaler(),
                            desc="ours")
    return _rates(start, stats.images)


def data_only(cfg, loader, num_classes: int, epoch: int, device: torch.device) -> tuple[float, float]:
    """Images/s of loading, augmentation, normalisation and Mixup alone: the overhead our loop adds."""
    mixup = create_mixup(cfg.train, num_classes)
    to_input = DeviceInput.for_training(cfg.train, device)
    seed_epoch(loader, epoch)
    start, seen = _now(), 0
    for x, y in loader:
        x, y = to_input(x), y.to(device)
        if mixup is not None:
            x, y = mixup(x, y)
        seen += len(x)
    return _rates(start, seen)


def bare(cfg, num_classes: int, n_batches: int, device: torch.device, fused: bool = False) -> tuple[float, float]:
    model = timm.create_model(cfg.model.backbone, num_classes=num_classes).to(device).train()
    kwargs = {"fused": True} if fused else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **kwargs)
    x = torch.randn(cfg.train.batch_size, 3, cfg.train.img_size, cfg.train.img_size, device=device)
    y = torch.randint(0, num_classes, (cfg.train.batch_size,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = _now()
    for _ in range(n_batches):
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _rates(start, n_batches * cfg.train.batch_size)


def breakdown(cfg, loader, info: DistInfo, num_classes: int, rounds: int) -> None:
    """Milliseconds per batch of each part of our training step, timed apart (synchronised on CUDA).

    The parts are those of ``classification_loss`` + ``train_one_epoch``, run one after another
    here so that each can be timed; "the rest" is what the real loop (ours) takes beyond their sum.
    """
    device = info.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    _, model, _, _ = build_model(cfg, num_classes, info)
    optimizer = create_optimizer(model, cfg.train)
    amp = resolve_amp(cfg.train.amp, device)
    mixup = create_mixup(cfg.train, num_classes)
    criterion = create_train_loss(cfg.train, mixup)
    to_input = DeviceInput.for_training(cfg.train, device)
    parts = ["load+augment+collate", "to device+normalise", "mixup", "forward+loss", "backward", "optimizer step"]
    times = {p: [] for p in parts}
    totals, n = [], 0
    for r in range(rounds + 1):  # round 0 warms up
        seed_epoch(loader, r)
        model.train()
        it = iter(loader)
        while True:
            t = [time.perf_counter()]
            try:
                x, y = next(it)
            except StopIteration:
                break
            t.append(time.perf_counter())
            x, y = to_input(x), y.to(device, non_blocking=True)
            sync()
            t.append(time.perf_counter())
            if mixup is not None:
                x, y = mixup(x, y)
            sync()
            t.append(time.perf_counter())
            with amp.autocast():
                loss = criterion(model(x).float(), y)
            sync()
            t.append(time.perf_counter())
            loss.backward()
            sync()
            t.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            t.append(time.perf_counter())
            if r:
                for p, a, b in zip(parts, t, t[1:]):
                    times[p].append((b - a) * 1000)
                n += 1
        if r:
            wall, _ = ours(cfg, loader, info, num_classes, epoch=r)
            totals.append(1000 * cfg.train.batch_size / wall)
    med = {p: statistics.median(v) for p, v in times.items()}
    whole = statistics.median(totals)
    print(f"ms per batch, median of {n} batches ({rounds} rounds), load average {os.getloadavg()[0]:.1f}:")
    for p in parts:
        print(f"  {p:22s} {med[p]:8.2f}  ({100 * med[p] / whole:4.1f}% of ours)")
    print(f"  {'the rest (bookkeeping)':22s} {whole - sum(med.values()):8.2f}")
    print(f"  {'ours, whole step':22s} {whole:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--backbone", default=None, help="timm name (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--num-workers", default="auto", help="train.num_workers (auto: the config's rule)")
    parser.add_argument("--mixup", type=float, default=0.4, help="mixup and cutmix alpha in our loop (0: off)")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds of each loop")
    parser.add_argument("--batches", type=int, default=10,
                        help="batches per round (short rounds keep the two loops close in time on a busy CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time each part of our step (ms per batch) instead of the comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["wandb.mode=disabled", f"train.num_workers={args.num_workers}",
                 f"train.mixup_alpha={args.mixup}", f"train.cutmix_alpha={args.mixup}"]
    for key, value in (("model.backbone", args.backbone), ("train.batch_size", args.batch_size),
                       ("train.img_size", args.img_size)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    info = DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    comp = load_competition(cfg.competition)
    # Every training image in one training split (fold 0); a few rows as a token validation fold.
    folds = pd.DataFrame({"image": comp.train["image"], "label": comp.train["label"], "group": 0, "fold": 0})
    folds = folds.head(8 + args.batches * cfg.train.batch_size)
    folds.loc[folds.index[:8], "fold"] = 1
    loader, *_ = build_loaders(cfg, folds, 1, comp.root, comp.classes, info)
    n_batches = len(loader)

    workers = loader_workers(cfg.train.num_workers, info.device)
    print(f"{cfg.model.backbone}, batch {cfg.train.batch_size}, {cfg.train.img_size} px, {n_batches} batches per "
          f"round, {info.device}, {torch.get_num_threads()} threads, num_workers {workers}, "
          f"mixup/cutmix alpha {args.mixup}, load average {os.getloadavg()[0]:.1f}")
    n_classes = len(comp.classes)
    if args.breakdown:
        breakdown(cfg, loader, info, n_classes, args.rounds)
        return
    ours(cfg, loader, info, n_classes, epoch=0)  # warm up each (allocator, oneDNN kernels)
    bare(cfg, n_classes, 3, info.device)
    bare(cfg, n_classes, 3, info.device, fused=True)
    a, b, f, d = [], [], [], []
    for r in range(args.rounds):
        a.append(ours(cfg, loader, info, n_classes, epoch=r + 1))
        b.append(bare(cfg, n_classes, n_batches, info.device))
        f.append(bare(cfg, n_classes, n_batches, info.device, fused=True))
        d.append(data_only(cfg, loader, n_classes, r + 1, info.device))
        print(f"round {r + 1}: ours {a[-1][0]:.1f} img/s, bare {b[-1][0]:.1f}, bare fused {f[-1][0]:.1f}; "
              f"ratio {a[-1][0] / b[-1][0]:.3f} / {a[-1][0] / f[-1][0]:.3f} (CPU time: {a[-1][1] / b[-1][1]:.3f} / "
              f"{a[-1][1] / f[-1][1]:.3f}); data+mixup alone {d[-1][0]:.0f} img/s, load {os.getloadavg()[0]:.1f}")

    def summary(k: int, what: str) -> None:
        ra = np.array([x[k] for x in a])
        for name, base in (("bare", b), ("bare fused", f)):
            ratios = ra / np.array([x[k] for x in base])
            print(f"  ours / {name:10s}: median {statistics.median(ratios):.3f}, spread {ratios.min():.3f}-"
                  f"{ratios.max():.3f} ({what})")

    print(f"median of {args.rounds} rounds: ours {statistics.median(x[0] for x in a):.1f} img/s, bare "
          f"{statistics.median(x[0] for x in b):.1f}, bare fused {statistics.median(x[0] for x in f):.1f}, "
          f"data+mixup alone {statistics.median(x[0] for x in d):.0f} img/s; load average {os.getloadavg()[0]:.1f}")
    summary(0, "wall clock")
    summary(1, "CPU time of this process")
    # If data work and the model step simply add up, ours would run at 1 / (1/bare + 1/data).
    expected = statistics.median([1 / (1 + bb[0] / dd[0]) for bb, dd in zip(f, d)])
    print(f"  serial bound (bare fused + data+mixup alone, nothing overlapping): {expected:.3f}; aim >= 0.95")


if __name__ == "__main__":
    main()
