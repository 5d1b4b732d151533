"""Images/s of the training DataLoader alone (no model) at 224 px, raw and through the image cache.

    python benchmarks/loader_throughput.py                       # 224- and 1024-px originals, 0/1/2 workers
    python benchmarks/loader_throughput.py --n 512 --workers 0 1 2 4 --rounds 5 --data data/bench

For originals of 224 px and of 1024 px (made by ``benchmarks/make_large_comp.py`` in ``--data``),
each path (``raw``: the original JPEGs; ``jpeg``/``memmap``: ``cache.size=auto``, 258 px) and each
number of DataLoader workers: the images/s of iterating ``pipeline.train.build_loaders``' training
loader (decode, albumentations of the Leaves recipe or ``--augment light``, collate) for one epoch,
after a warm-up epoch, median and spread of ``--rounds``. Beside it, in the same run, the bare limit
per core: ``cv2.imdecode`` + resize to 224 px of the same files in a plain loop. Printed: images/s,
per core, the ratio to the bare limit per core, what each added worker adds, the cache's speed-up
over raw, and the RAM ``train.cache_images`` takes per 10k images (with a ``memmap`` cache it takes
none: the page cache holds the array, shared by every worker). OpenCV runs one thread per
process here (``cv2.setNumThreads(1)``) so that "per core" means one core.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.make_large_comp import build  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import load_competition  # noqa: E402
from pipeline.data.cache import image_reader  # noqa: E402
from pipeline.engine.distributed import DistInfo  # noqa: E402
from pipeline.train import build_loaders, seed_epoch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIGHT = ["train.augment.rotate=0", "train.augment.color_jitter=0", "train.augment.vflip=0"]


def config(root: Path, work: Path, path: str, workers: int, augment: str, batch: int):
    over = [f"competition.root={root}", f"competition.name={root.name}", "competition.build=null",
            "competition.solution=null", f"paths.work={work}", "wandb.mode=disabled", "device=cpu",
            f"train.num_workers={workers}", "train.cache_images=false", "train.img_size=224",
            f"train.batch_size={batch}"]
    if path != "raw":
        over += ["cache.size=auto", f"cache.format={path}"]
    return load_config(REPO / "configs" / "leaves_resnet50d.yaml", over + (LIGHT if augment == "light" else []))


def loader_for(cfg, comp):
    folds = pd.DataFrame({"image": comp.train["image"], "label": comp.train["label"], "group": 0, "fold": 0})
    folds.loc[folds.index[:4], "fold"] = 1  # a token validation fold; every other image trains
    reader = image_reader(cfg, comp.root)
    loader, *_ = build_loaders(cfg, folds, 1, comp.root, comp.classes, DistInfo(device=torch.device("cpu")),
                               reader=reader)
    return loader, reader


def epoch_rate(loader, epoch: int) -> float:
    seed_epoch(loader, epoch)
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - start)


def bare_rate(files: list[str]) -> float:
    """cv2.imdecode + resize of the short side to 224 px, one core: the limit a loader core can reach."""
    start = time.perf_counter()
    for f in files:
        img = cv2.imdecode(np.fromfile(f, np.uint8), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        s = 224 / min(h, w)
        cv2.resize(img, (max(224, round(w * s)), max(224, round(h * s))), interpolation=cv2.INTER_AREA)
    return len(files) / (time.perf_counter() - start)


def ram_per_10k(cfg, comp) -> float:
    """MiB that ``train.cache_images`` holds per 10k training images (the decoded arrays)."""
    loader, _ = loader_for(cfg, comp)
    ds = loader.dataset.dataset
    ds.preload()
    return sum(a.nbytes for a in ds._images.values()) / len(ds) * 1e4 / 2**20


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.0f} ({min(xs):.0f}-{max(xs):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=320, help="images per competition (80%% train)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 1024])
    parser.add_argument("--paths", nargs="+", default=["raw", "jpeg", "memmap"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--augment", choices=["leaves", "light"], default="leaves",
                        help="the Leaves recipe (crop, flips, rotate 30, colour jitter) or crop+flip only")
    parser.add_argument("--data", default="data/bench", help="where the generated competitions are kept")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} on {os.cpu_count()} cores; "
          f"{args.n} images per set, batch {args.batch_size}, augment {args.augment}, {args.rounds} rounds "
          "(median (min-max))")
    rows, bare = [], {}
    for size in args.sizes:
        root = build(Path(args.data) / f"loader_{args.n}_{size}", args.n, size, classes=10)
        work = Path(args.data) / "work"
        comp = load_competition(config(root, work, "raw", 0, args.augment, args.batch_size).competition)
        files = comp.train["path"].tolist()
        bare_rate(files[:32])
        bare[size] = [bare_rate(files) for _ in range(args.rounds)]
        print(f"{size}-px originals: bare cv2.imdecode + resize, one core: {med(bare[size])} img/s")
        for path in args.paths:
            for w in args.workers:
                cfg = config(root, work, path, w, args.augment, args.batch_size)
                loader, _ = loader_for(cfg, comp)
                epoch_rate(loader, 0)  # warm-up: worker start, page cache, cache build
                rates = [epoch_rate(loader, r + 1) for r in range(args.rounds)]
                per_core = [r / max(w, 1) for r in rates]
                rows.append({"originals": size, "path": path, "workers": w, "img_s": statistics.median(rates),
                             "spread": f"{min(rates):.0f}-{max(rates):.0f}",
                             "per_core": statistics.median(per_core),
                             "vs_bare_per_core": statistics.median(per_core) / statistics.median(bare[size])})
                print(f"  {path:6s} workers {w}: {med(rates)} img/s, per core {statistics.median(per_core):.0f}, "
                      f"{rows[-1]['vs_bare_per_core']:.2f} of the bare limit per core")
                del loader
    table = pd.DataFrame(rows)
    print("\nload average now", f"{os.getloadavg()[0]:.1f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}" if v < 10 else f"{v:.0f}"))
    for size in args.sizes:
        sub = table[table["originals"] == size].set_index(["path", "workers"])["img_s"]
        for path in args.paths:
            steps = [sub[(path, w)] for w in args.workers if (path, w) in sub]
            adds = ", ".join(f"+{b - a:.0f}" for a, b in zip(steps, steps[1:]))
            print(f"{size} px {path}: each added worker adds {adds} img/s")
            if path != "raw" and ("raw", args.workers[0]) in sub:
                ratio = [sub[(path, w)] / sub[("raw", w)] for w in args.workers]
                print(f"   {path} cache / raw: " + ", ".join(f"{r:.1f}x ({w} workers)" for r, w in
                                                            zip(ratio, args.workers)))
    for size in args.sizes:
        root = Path(args.data) / f"loader_{args.n}_{size}"
        path = "raw" if size <= 258 else "jpeg"  # what training at 224 px holds: originals, or the 258-px cache
        cfg = config(root, Path(args.data) / "work", path, 0, args.augment, args.batch_size)
        held = ram_per_10k(cfg, load_competition(cfg.competition))
        print(f"train.cache_images RAM per 10k images, {size}-px originals via {path}: {held:.0f} MiB")


if __name__ == "__main__":
    main()
