"""Default (d2l) against fitted (``model.anchors: auto``) anchors on a generated set whose objects
are half the size of the embedded shapes set's: best-possible recall of each, and validation mAP
after the same training time.

    python benchmarks/detect_anchors.py [--budget 4m] [--threads 2] [--img-size 128] [--train 300] [--val 100]

Builds ``<work>/shapes_half`` (the shapes generator with ``object_scale=0.5``) on first use and
trains TinySSD once per anchor style under the same ``train.time_budget``, one run after the
other, each with the same torch thread count (``--threads``); prints one table. On an idle
machine the whole takes about twice the budget plus a minute. ``--parallel`` runs both at once
(one thread each) instead, so that both see the same load on a busy machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    from pipeline.config import load_config
    from pipeline.detect.anchor_fit import best_possible_recall, feature_shapes, fit_anchors, normalised_boxes
    from pipeline.detect.anchors import anchors_per_location, explicit_anchors, level_shapes_d2l
    from pipeline.detect.config import DetectConfig
    from pipeline.detect.data import class_names, load_split
    from pipeline.detect.shapes import build_shapes
    from pipeline.io import read_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="4m", help="train.time_budget of each run")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2),
                        help="torch threads of each training run (the same for both)")
    parser.add_argument("--parallel", action="store_true", help="train both at once, one thread each")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--work", default=None, help="folder for the set and runs (default: a temp folder)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="detect_anchors_"))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), f"| torch {torch.__version__}")
    root = build_shapes(work / "shapes_half", seed=1, splits={"train": args.train, "val": args.val},
                        object_scale=0.5)
    sets = [f"competition.root={root}", "data.build=null", "data.test=null", "data.test_labels=null",
            f"paths.runs={work / 'runs'}", "wandb.mode=disabled", f"model.img_size={args.img_size}",
            f"train.time_budget={args.budget}"]
    base = load_config(REPO / "configs/banana_ssd.yaml", sets, schema=DetectConfig)
    classes = class_names(base)
    boxes = normalised_boxes(load_split(base, base.data.train, classes))
    val_boxes = normalised_boxes(load_split(base, base.data.val, classes))
    shapes = feature_shapes(base.model, len(classes))
    m = base.model
    default = level_shapes_d2l(len(shapes), m.min_size, m.max_size, m.ratios)
    fit = fit_anchors(boxes, shapes, anchors_per_location("d2l", 2, m.ratios), default, m.img_size,
                      base.train.iou_threshold)
    side = torch.tensor((boxes[:, 2:] - boxes[:, :2]).prod(1) ** 0.5 * args.img_size)
    print(f"{len(boxes)} training boxes; object side at {args.img_size}px: median {float(side.median()):.1f} px "
          f"(10%-90%: {float(side.quantile(0.1)):.1f}-{float(side.quantile(0.9)):.1f})")

    threads = 1 if args.parallel else args.threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    procs, wall = {}, {}
    for style in ("d2l", "auto"):
        cmd = [sys.executable, "-m", "pipeline.detect.train", "--fresh", "--config", str(REPO / "configs/banana_ssd.yaml")]
        for s in [*sets, f"experiment=half_{style}", f"model.anchors={style}"]:
            cmd += ["--set", s]
        log = open(work / f"train_{style}.log", "w")
        wall[style] = time.perf_counter()
        procs[style] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        if not args.parallel:
            procs[style][0].wait()
            wall[style] = time.perf_counter() - wall[style]
            print(f"{style}: trained in {wall[style]:.0f} s ({subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()})")
    for style, (p, log) in procs.items():
        p.wait()
        log.close()
        if args.parallel:
            wall[style] = time.perf_counter() - wall[style]
    print(f"\n{'anchors':8s} {'BPR train':>9s} {'BPR val':>8s} {'mean IoU':>8s} {'epochs':>6s} {'train s':>8s} "
          f"{'wall s':>7s} {'mAP@.5':>7s} {'mAP@.5:.95':>10s}")
    for style, level_wh in (("d2l", default), ("auto", fit.shapes)):
        anchors = explicit_anchors(shapes, level_wh)
        bpr_t, iou_t = best_possible_recall(torch.as_tensor(boxes), anchors, base.train.iou_threshold)
        bpr_v, _ = best_possible_recall(torch.as_tensor(val_boxes), anchors, base.train.iou_threshold)
        metrics = work / "runs" / f"half_{style}" / "metrics.json"
        if not metrics.is_file():
            print(f"{style:8s} training failed: see {work / f'train_{style}.log'}")
            continue
        r = read_json(metrics)
        print(f"{style:8s} {bpr_t:9.1%} {bpr_v:8.1%} {iou_t:8.2f} {r['epochs_run']:6d} {r['train_time_s']:8.0f} "
              f"{wall[style]:7.0f} {r['map_50']:7.3f} {r['map_50_95']:10.3f}")
    how = "both at once, one thread each" if args.parallel else f"one after the other, {threads} thread(s) each"
    print(f"(BPR: share of boxes with an anchor at IoU >= {base.train.iou_threshold:g}; auto used the "
          f"{fit.source} shapes; trained {how} under train.time_budget={args.budget}; "
          f"logs and runs in {work})")


if __name__ == "__main__":
    main()
