"""Default (d2l) against fitted (``model.anchors: auto``) anchors on a generated set whose objects
are half the size of the embedded shapes set's: best-possible recall of each, and validation mAP
after the same training time.

    python benchmarks/detect_anchors.py [--minutes 4] [--img-size 128] [--train 400] [--val 100]

Builds ``<work>/shapes_half`` (the shapes generator with ``object_scale=0.5``) on first use and
trains TinySSD once per anchor style under ``train.max_minutes``; prints one table.
"""
from __future__ import annotations

import argparse
import os
import subprocess
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
    from pipeline.detect.train import train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training time per anchor style")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--work", default=None, help="folder for the set and runs (default: a temp folder)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="detect_anchors_"))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
          f"| torch {torch.__version__}, {torch.get_num_threads()} threads")
    root = build_shapes(work / "shapes_half", seed=1, splits={"train": args.train, "val": args.val},
                        object_scale=0.5)

    def cfg_for(anchors: str) -> DetectConfig:
        return load_config(REPO / "configs/banana_ssd.yaml", [
            f"data.root={root}", "data.build=null", "data.test=null", "data.test_labels=null",
            f"paths.runs={work / 'runs'}", "wandb.mode=disabled", f"experiment=half_{anchors}",
            f"model.img_size={args.img_size}", f"model.anchors={anchors}", "train.epochs=200",
            f"train.max_minutes={args.minutes}"], schema=DetectConfig)

    base = cfg_for("d2l")
    classes = class_names(base)
    boxes = normalised_boxes(load_split(base, base.data.train, classes))
    val_boxes = normalised_boxes(load_split(base, base.data.val, classes))
    shapes = feature_shapes(base.model, len(classes))
    m = base.model
    default = level_shapes_d2l(len(shapes), m.min_size, m.max_size, m.ratios)
    fit = fit_anchors(boxes, shapes, anchors_per_location("d2l", 2, m.ratios), default, m.img_size,
                      base.train.iou_threshold)
    side = (boxes[:, 2:] - boxes[:, :2]).prod(1) ** 0.5 * args.img_size
    print(f"{len(boxes)} training boxes, object side at {args.img_size}px: median {float(torch.tensor(side).median()):.1f}"
          f" px (10%-90%: {float(torch.tensor(side).quantile(0.1)):.1f}-{float(torch.tensor(side).quantile(0.9)):.1f})")
    rows = []
    for style, level_wh in (("d2l", default), ("auto", fit.shapes)):
        anchors = explicit_anchors(shapes, level_wh)
        bpr_t, iou_t = best_possible_recall(torch.as_tensor(boxes), anchors, base.train.iou_threshold)
        bpr_v, _ = best_possible_recall(torch.as_tensor(val_boxes), anchors, base.train.iou_threshold)
        t0 = time.perf_counter()
        result = train(cfg_for(style), fresh=True)
        rows.append((style, bpr_t, bpr_v, iou_t, result["epochs_run"], result["train_time_s"],
                     time.perf_counter() - t0, result["map_50"], result["map_50_95"]))
    print(f"\n{'anchors':8s} {'BPR train':>9s} {'BPR val':>8s} {'mean IoU':>8s} {'epochs':>6s} {'train s':>8s} "
          f"{'mAP@.5':>7s} {'mAP@.5:.95':>10s}")
    for style, bpr_t, bpr_v, iou_t, ep, tt, _, m50, m5095 in rows:
        print(f"{style:8s} {bpr_t:9.1%} {bpr_v:8.1%} {iou_t:8.2f} {ep:6d} {tt:8.0f} {m50:7.3f} {m5095:10.3f}")
    print(f"(BPR: share of boxes with an anchor at IoU >= {base.train.iou_threshold:g}; auto used the "
          f"{fit.source} shapes; {os.cpu_count()} CPUs; set and runs in {work})")


if __name__ == "__main__":
    main()
