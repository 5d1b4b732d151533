"""Score a trained detector: ``python -m pipeline.detect.evaluate [--split test|val] [--predictions CSV]``.

Reports mAP@0.5, mAP@0.5:0.95 (COCO definition), per-class AP and precision/recall at
``post.score_threshold``; writes ``runs/<experiment>/eval_<split>.json`` and a picture of
predictions against ground truth, ``eval_<split>.png``. The default split is the held-out test
split when its labels are available (``data.test_labels``), else the validation split.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import paths
from pipeline.config import add_config_args, config_from_args
from pipeline.data.images import read_image
from pipeline.detect.config import DEFAULT_DETECT_CONFIG, DetectConfig
from pipeline.detect.data import Split, ensure_dataset, load_split
from pipeline.detect.draw import draw_detections, grid
from pipeline.detect.inference import ground_truth, load_members, predict_split, run_dir
from pipeline.detect.layout import tried
from pipeline.detect.metrics import ImageBoxes, evaluate_detections
from pipeline.detect.readers import labels_location
from pipeline.detect.tta import View, detect_views
from pipeline.engine.distributed import resolve_device
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_image, atomic_write_json, read_json

PRED_COLUMNS = ["image", "label", "score", "xmin", "ymin", "xmax", "ymax"]


def labelled_split(cfg: DetectConfig, split: str | None, classes: list[str]) -> Split:
    """The split to score: ``split`` by name, or test (when its labels exist), else val."""
    test_labels = Path(cfg.data.test_labels) if cfg.data.test_labels else None
    if split is None:
        has_test = cfg.data.test and ((test_labels and test_labels.exists())
                                      or labels_location(cfg, cfg.data.test) is not None)
        split = cfg.data.test if has_test else cfg.data.val
    labels = test_labels if split == cfg.data.test and test_labels and test_labels.exists() else None
    s = load_split(cfg, split, classes, labels)
    if not s.labelled:
        raise PipelineError(f"split {split!r} has no labels (looked in {tried(cfg, split, 'labels')}, "
                            "and data.test_labels does not point to them); evaluate val instead")
    return s


def read_predictions(path: Path, split: Split, classes: list[str]) -> list[ImageBoxes]:
    """Detections from a predictions/submission CSV, in the split's image order."""
    if not path.is_file():
        raise PipelineError(f"predictions file {path} does not exist; run python -m pipeline.detect.predict")
    table = pd.read_csv(path, dtype={"image": str, "label": str})
    missing = [c for c in PRED_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(PRED_COLUMNS)}")
    unknown = sorted(set(table["label"]) - set(classes))
    if unknown:
        raise PipelineError(f"{path}: unknown label(s) {unknown[:10]}; classes are {classes}")
    stray = sorted(set(table["image"]) - set(split.images))
    if stray:
        raise PipelineError(f"{path}: {len(stray)} image(s) not in split {split.name!r}, e.g. {stray[:5]}")
    groups = dict(tuple(table.groupby("image")))
    out = []
    for name in split.images:
        g = groups.get(name)
        if g is None:
            out.append(ImageBoxes(np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0)))
            continue
        out.append(ImageBoxes(g[["xmin", "ymin", "xmax", "ymax"]].to_numpy(float),
                              g["label"].map(classes.index).to_numpy(np.int64), g["score"].to_numpy(float)))
    return out


def evaluate(cfg: DetectConfig, split: str | None = None, predictions: str | Path | None = None,
             which: str = "best", picture: int = 8, tta: bool = True) -> dict:
    """Score the run's ``which`` checkpoint (or a predictions CSV) on a labelled split; with ``tta``
    the views of ``cfg.tta`` (and the models of ``ensemble.experiments``) are fused first."""
    ensure_dataset(cfg)
    out_dir = run_dir(cfg)
    device = resolve_device(cfg.device)
    if predictions is not None:
        classes = read_json(out_dir / paths.CLASSES)["classes"] if (out_dir / paths.CLASSES).is_file() \
            else None
        if classes is None:
            from pipeline.detect.data import class_names

            classes = class_names(cfg)
        data = labelled_split(cfg, split, classes)
        dets = read_predictions(Path(predictions), data, classes)
    else:
        members, classes = load_members(cfg, which, device)
        cfg = members[0][1]
        data = labelled_split(cfg, split, classes)
        by_index = predict_split(members[0][0], data, cfg, device, cfg.post.eval_score_threshold, tta=tta,
                                 members=members)
        dets = [by_index[i] for i in range(len(data.paths))]
    gts = ground_truth(data)
    m = evaluate_detections(gts, dets, len(classes), score_threshold=cfg.post.score_threshold,
                            max_dets=cfg.post.max_detections)
    result = {
        "experiment": cfg.experiment, "split": data.name, "checkpoint": None if predictions else f"{which}.pt",
        "predictions": str(predictions) if predictions else None,
        "map_50": m["map_50"], "map_50_95": m["map_50_95"],
        "ap_50": dict(zip(classes, m["ap_50"])), "ap_50_95": dict(zip(classes, m["ap_50_95"])),
        "precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
        "score_threshold": cfg.post.score_threshold, "n_images": m["n_images"], "n_gt": m["n_gt"],
        "tta": None if predictions else [v.name for v in (detect_views(cfg) if tta else [View()])],
        "ensemble": None if predictions else [cfg.experiment] + list(cfg.ensemble.experiments),
    }
    atomic_write_json(out_dir / f"eval_{data.name}.json", result)
    if picture:
        tiles = [draw_detections(read_image(data.paths[i]), dets[i], classes, gts[i], cfg.post.score_threshold)
                 for i in range(min(picture, len(data.paths)))]
        atomic_write_image(out_dir / f"eval_{data.name}.png", grid(tiles))
    print(f"{cfg.experiment} on {data.name} ({m['n_images']} images, {m['n_gt']} boxes): "
          f"mAP@0.5 {m['map_50']:.4f}  mAP@0.5:0.95 {m['map_50_95']:.4f}")
    for c, a50, a in zip(classes, m["ap_50"], m["ap_50_95"]):
        print(f"  {c:>12s}  AP@0.5 {a50 if a50 is not None else float('nan'):.4f}  "
              f"AP@0.5:0.95 {a if a is not None else float('nan'):.4f}")
    print(f"  at score >= {cfg.post.score_threshold}: precision {m['precision']:.4f}  recall {m['recall']:.4f}")
    print(f"-> {out_dir / f'eval_{data.name}.json'}" + (f", {out_dir / f'eval_{data.name}.png'}" if picture else ""))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.detect.evaluate", description=__doc__.split("\n\n")[0])
    add_config_args(parser, DEFAULT_DETECT_CONFIG)
    parser.add_argument("--split", default=None, help="split folder to score (default: test if labelled, else val)")
    parser.add_argument("--predictions", default=None, metavar="CSV",
                        help="score this predictions CSV instead of running the model")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument("--picture", type=int, default=8, help="images in eval_<split>.png (0: none)")
    parser.add_argument("--no-tta", dest="tta", action="store_false",
                        help="the plain view of this experiment's model only (no tta views, no ensemble)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, DetectConfig)
    if not args.tta:
        cfg = cfg.model_copy(update={"ensemble": cfg.ensemble.model_copy(update={"experiments": [], "weights": None})})
    with torch.no_grad():  # a context, not a global switch: callers may train afterwards
        return evaluate(cfg, args.split, args.predictions, args.checkpoint, args.picture, args.tta)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
