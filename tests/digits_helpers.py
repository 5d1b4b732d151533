"""Helpers shared by the tests that run whole stages on a cut-down copy of the embedded digits."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def cut_digits(source: Path, dest: Path, n_train: int, n_test: int) -> Path:
    """A copy of the digits competition at ``source`` in ``dest`` (its private folder beside it), cut
    to the first ``n_train`` training and ``n_test`` test images, sample submission and hidden
    solution cut to match."""
    shutil.copytree(source, dest)
    private = dest.parent / "digits_private"
    shutil.copytree(source.parent / "digits_private", private)
    pd.read_csv(dest / "train.csv", dtype=str).iloc[:n_train].to_csv(dest / "train.csv", index=False)
    test = pd.read_csv(dest / "test.csv", dtype=str).iloc[:n_test]
    test.to_csv(dest / "test.csv", index=False)
    for path in (dest / "sample_submission.csv", private / "solution.csv"):
        table = pd.read_csv(path, dtype=str)
        table[table["image"].isin(test["image"])].to_csv(path, index=False)
    return dest


def tiny_run_config(root: Path, out: Path, *extra: str):
    """The default config on ``root`` with every output under ``out`` and the cheapest training
    (untrained-size test_resnet at 16 px, 1 epoch, 2 folds); ``extra`` overrides come last and win."""
    from pipeline.config import load_config

    return load_config(REPO / "configs" / "default.yaml", [
        f"paths.work={out / 'work'}", f"paths.runs={out / 'runs'}", f"paths.submissions={out / 'submissions'}",
        f"competition.root={root}", f"competition.solution={root.parent / 'digits_private' / 'solution.csv'}",
        "wandb.mode=disabled", "train.num_workers=0", "model.backbone=test_resnet", "train.img_size=16",
        "train.epochs=1", "train.batch_size=32", "train.warmup_epochs=0", "folds.k=2", "dedup.workers=0",
        "predict.batch_size=512", *extra])
