"""Images/s of our train loop vs a bare timm loop on pre-made tensors (same model, batch, image size).

Ours is the real path of ``python -m pipeline.train``: the digits competition's images from the
RAM cache, the albumentations train pipeline, a DataLoader, timm Mixup/CutMix and
``train_one_epoch`` (AMP context, accumulation bookkeeping, NaN check, schedule, progress bar).
The bare loop is forward, loss, backward and an optimizer step on one tensor batch made once.
Rounds alternate between the two so that load from other processes hits both alike; the
median of each is reported with their ratio.

    python benchmarks/train_throughput.py                    # resnet18, batch 64, 32 px
    python benchmarks/train_throughput.py --threads 1 --rounds 5 --backbone resnet10t
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
from pipeline.engine.amp import resolve_amp
from pipeline.engine.distributed import DistInfo
from pipeline.engine.loop import classification_loss, create_mixup, create_train_loss, train_one_epoch
from pipeline.engine.optim import create_optimizer
from pipeline.train import build_loaders, build_model, seed_epoch


def ours(cfg, loader, info: DistInfo, num_classes: int, epoch: int) -> float:
    _, model, _, _ = build_model(cfg, num_classes, info)
    optimizer = create_optimizer(model, cfg.train)
    amp = resolve_amp(cfg.train.amp, info.device)
    mixup = create_mixup(cfg.train, num_classes)
    seed_epoch(loader, epoch)
    loss_fn = classification_loss(create_train_loss(cfg.train, mixup), amp=amp, device=info.device, mixup=mixup)
    stats = train_one_epoch(model, loader, optimizer, loss_fn, epoch=epoch, info=info, scaler=amp.grad_scaler(),
                            desc="ours")
    return stats.images_per_s


def data_only(cfg, loader, num_classes: int, epoch: int, device: torch.device) -> float:
    """Images/s of loading, augmentation and Mixup alone: the overhead our loop adds."""
    mixup = create_mixup(cfg.train, num_classes)
    seed_epoch(loader, epoch)
    start, seen = time.perf_counter(), 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if mixup is not None:
            x, y = mixup(x, y)
        seen += len(x)
    return seen / (time.perf_counter() - start)


def bare(cfg, num_classes: int, n_batches: int, device: torch.device) -> float:
    model = timm.create_model(cfg.model.backbone, num_classes=num_classes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    x = torch.randn(cfg.train.batch_size, 3, cfg.train.img_size, cfg.train.img_size, device=device)
    y = torch.randint(0, num_classes, (cfg.train.batch_size,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(n_batches):
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n_batches * cfg.train.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--backbone", default=None, help="timm name (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--mixup", type=float, default=0.4, help="mixup and cutmix alpha in our loop (0: off)")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds of each loop")
    parser.add_argument("--batches", type=int, default=10,
                        help="batches per round (short rounds keep the two loops close in time on a busy CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
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

    print(f"{cfg.model.backbone}, batch {cfg.train.batch_size}, {cfg.train.img_size} px, {n_batches} batches per "
          f"round, {info.device}, {torch.get_num_threads()} threads, num_workers {args.num_workers}, "
          f"mixup/cutmix alpha {args.mixup}, load average {os.getloadavg()[0]:.1f}")
    ours(cfg, loader, info, len(comp.classes), epoch=0)  # warm up both (allocator, oneDNN kernels)
    bare(cfg, len(comp.classes), 3, info.device)
    a, b, d = [], [], []
    for r in range(args.rounds):
        a.append(ours(cfg, loader, info, len(comp.classes), epoch=r + 1))
        b.append(bare(cfg, len(comp.classes), n_batches, info.device))
        d.append(data_only(cfg, loader, len(comp.classes), r + 1, info.device))
        print(f"round {r + 1}: ours {a[-1]:.1f} img/s, bare timm {b[-1]:.1f} img/s, ratio {a[-1] / b[-1]:.3f} "
              f"(data+mixup alone {d[-1]:.0f} img/s)")
    ratio = statistics.median(np.array(a) / np.array(b))
    # If data work and the model step simply add up, ours would run at 1 / (1/bare + 1/data).
    expected = statistics.median([1 / (1 + bb / dd) for bb, dd in zip(b, d)])
    print(f"median: ours {statistics.median(a):.1f} img/s, bare timm {statistics.median(b):.1f} img/s, "
          f"ratio {ratio:.3f} (aim >= 0.9); data+mixup alone {statistics.median(d):.0f} img/s, "
          f"which bounds the ratio at {expected:.3f} when nothing overlaps")


if __name__ == "__main__":
    main()
