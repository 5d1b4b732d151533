"""Wall time of ``pipeline.run`` with 2 folds in parallel (1 thread each) against 2 folds one after
another (2 threads each), on the CPU cores of this machine, as a ratio.

Both are the real command (``python -m pipeline.run``, a fresh ``runs/`` each round, dedup and folds
made once beforehand), so the parallel side pays for starting its fold processes. Rounds alternate
between the two so that load from other processes hits both alike; the median and spread of each
are printed with their ratio (< 1: parallel folds are faster). Print ``uptime`` beside the figures:
on a shared machine they are only as good as the load allows.

    python benchmarks/parallel_folds.py                       # resnet10t, 32 px, 3 epochs, 400 images
    python benchmarks/parallel_folds.py --rounds 5 --epochs 5 --images 1160
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def make_competition(out: Path, images: int) -> Path:
    """The embedded digits competition cut to ``images`` training images."""
    from pipeline.data.digits import build_digits

    root = build_digits(out / "data" / "digits")
    train = pd.read_csv(root / "train.csv", dtype=str)
    train.iloc[:images].to_csv(root / "train.csv", index=False)
    return root


def run(args: argparse.Namespace, root: Path, out: Path, parallel: bool, tag: str) -> float:
    sets = [f"competition.root={root}", f"competition.solution={root.parent / 'digits_private' / 'solution.csv'}",
            f"paths.work={out / 'work'}", f"paths.runs={out / 'runs' / tag}", f"paths.submissions={out / 'subs' / tag}",
            "wandb.mode=disabled", f"train.epochs={args.epochs}", f"model.backbone={args.backbone}",
            f"train.img_size={args.img_size}", "folds.k=2", "dedup.workers=0"]
    if parallel:
        sets += ["launcher.parallel=2", "launcher.threads_per_fold=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1" if parallel else "2", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pipeline.run", "--config", str(REPO / "configs" / "default.yaml")]
    for s in sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{'parallel' if parallel else 'sequential'} run failed:\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=400, help="training images of the digits competition")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--img-size", type=int, default=32)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"{cores} cores; {args.backbone} {args.img_size} px, {args.epochs} epochs, {args.images} images, 2 folds")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        root = make_competition(out, args.images)
        run(args, root, out, parallel=False, tag="warmup")  # dedup + folds once; a warm file cache for both
        times: dict[str, list[float]] = {"sequential": [], "parallel": []}
        for r in range(args.rounds):
            order = ["sequential", "parallel"] if r % 2 == 0 else ["parallel", "sequential"]
            for name in order:
                tag = f"{name}{r}"
                times[name].append(run(args, root, out, parallel=name == "parallel", tag=tag))
                shutil.rmtree(out / "runs" / tag, ignore_errors=True)
                print(f"  round {r + 1} {name:10s} {times[name][-1]:6.1f} s", flush=True)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for name, ts in times.items():
        print(f"{name:10s} median {statistics.median(ts):6.1f} s  (min {min(ts):.1f}, max {max(ts):.1f}, "
              f"{len(ts)} rounds)")
    ratio = statistics.median(times["parallel"]) / statistics.median(times["sequential"])
    per_round = [p / s for p, s in zip(times["parallel"], times["sequential"])]
    print(f"parallel / sequential wall time: {ratio:.2f} (per round {min(per_round):.2f}-{max(per_round):.2f})")


if __name__ == "__main__":
    main()
