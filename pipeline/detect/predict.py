"""Detect objects in a split: ``python -m pipeline.detect.predict [--split test] [--draw]``.

Writes ``runs/<experiment>/predictions.csv`` (``image,label,score,xmin,ymin,xmax,ymax`` in pixels
of the original images, detections scoring at least ``post.score_threshold``), a never-overwritten
submission ``submissions/<experiment>_<timestamp>.csv`` + ``.json`` (that table, or a row per
image with a ``PredictionString``: ``submission.*``, see ``submission.py``), and with ``--draw``
the images with their boxes in ``runs/<experiment>/predictions/``. The views of ``tta`` and the
models of ``ensemble.experiments`` are fused by weighted box fusion (``--no-tta``: neither).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from pipeline import paths
from pipeline.config import add_config_args, config_from_args
from pipeline.data.images import read_image
from pipeline.detect.config import DEFAULT_DETECT_CONFIG, DetectConfig
from pipeline.detect.data import ensure_dataset, load_split
from pipeline.detect.draw import draw_detections
from pipeline.detect.evaluate import PRED_COLUMNS
from pipeline.detect.inference import load_members, predict_split, run_dir
from pipeline.detect.submission import prediction_string_table
from pipeline.detect.tta import View, detect_views
from pipeline.engine.distributed import resolve_device
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_image
from pipeline.progress import bar
from pipeline.provenance import provenance, split_fingerprint
from pipeline.submission import write_submission


def predict(cfg: DetectConfig, split: str | None = None, draw: bool | None = None, which: str = "best",
            tta: bool = True) -> Path:
    """Run the trained detector on ``split`` (default ``predict.split``), with the views of ``cfg.tta``
    and the models of ``ensemble.experiments`` fused unless ``tta`` is False; returns the submission path."""
    ensure_dataset(cfg)
    split = split or cfg.predict.split or cfg.data.test
    if not split:
        raise PipelineError("no split to predict: data.test is null; pass --split NAME (e.g. --split val)")
    device = resolve_device(cfg.device)
    members, classes = load_members(cfg, which, device)
    cfg = members[0][1]
    data = load_split(cfg, split, classes)
    dets = predict_split(members[0][0], data, cfg, device, cfg.post.score_threshold, tta=tta, members=members)
    rows = []
    for i, name in enumerate(data.images):
        d = dets[i]
        for b, lab, s in zip(d.boxes, d.labels, d.scores):
            rows.append((name, classes[int(lab)], round(float(s), 5), *(round(float(v), 2) for v in b)))
    table = pd.DataFrame(rows, columns=PRED_COLUMNS)
    out_dir = run_dir(cfg)
    atomic_write_csv(out_dir / paths.DETECTIONS, table)
    form = cfg.submission
    submitted = table if form.form == "boxes" else prediction_string_table(data, dets, classes, form, cfg.competition.root)
    # never overwritten: two predictions in the same second get -2, -3 ... (as classification's)
    sub = write_submission(submitted, paths.submissions_dir(cfg), cfg.experiment, {
        "experiment": cfg.experiment, "checkpoint": str(out_dir / paths.checkpoint_name(which)), "split": split,
        "n_images": len(data.images), "n_detections": len(table), "classes": classes,
        "score_threshold": cfg.post.score_threshold, "nms_iou": cfg.post.nms_iou,
        "class_agnostic_nms": cfg.post.class_agnostic, "img_size": cfg.model.img_size,
        "tta": [v.name for v in (detect_views(cfg) if tta else [View()])], "tta_fusion": cfg.tta.fusion,
        "ensemble": [m[1].experiment for m in members] if len(members) > 1 else None,
        "ensemble_weights": [m[2] for m in members] if len(members) > 1 else None,
        "submission_form": form.model_dump(mode="json"),  # "submission" is the file's path
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": provenance(device=device, data=split_fingerprint(data)),
    })
    if cfg.predict.draw if draw is None else draw:
        for i in bar(range(min(cfg.predict.draw_max, len(data.images))), desc="draw", leave=False):
            pic = draw_detections(read_image(data.paths[i]), dets[i], classes)
            atomic_write_image(out_dir / "predictions" / (Path(data.images[i]).stem + ".jpg"), pic)
    print(f"{len(table)} detections on {len(data.images)} images of {split!r} -> {out_dir / 'predictions.csv'}, {sub}")
    return sub


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m pipeline.detect.predict", description=__doc__.split("\n\n")[0])
    add_config_args(parser, DEFAULT_DETECT_CONFIG)
    parser.add_argument("--split", default=None, help="split folder under competition.root (default: predict.split, else data.test)")
    parser.add_argument("--draw", action="store_true", default=None, help="also write images with boxes drawn")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument("--no-tta", dest="tta", action="store_false",
                        help="the plain view of this experiment's model only (no tta views, no ensemble)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, DetectConfig)
    if not args.tta:
        cfg = cfg.model_copy(update={"ensemble": cfg.ensemble.model_copy(update={"experiments": [], "weights": None})})
    with torch.no_grad():  # a context, not a global switch: callers may train afterwards
        return predict(cfg, args.split, args.draw, args.checkpoint, args.tta)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
