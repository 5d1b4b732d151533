"""Issue 17, points 1 and 6: on a folder of one's own, an experiment trained on an older folds.csv
is skipped by the blend with one line, and the submission comes from the current experiments."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from pipeline.io import read_json

CLASSES = ["ant", "bee", "cat"]


def _picture(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A 16 px picture no dedup would call a copy of another: a random 4x4 pattern, upscaled, tinted."""
    pattern = cv2.resize(rng.integers(0, 255, (4, 4), dtype=np.uint8), (16, 16), interpolation=cv2.INTER_CUBIC)
    img = np.stack([pattern] * 3, -1).astype(np.int16)
    img[..., cls] += 60
    return np.clip(img, 0, 255).astype(np.uint8)


def build_folder(root: Path, n_per_class: int = 6, n_test: int = 4) -> Path:
    """A tiny competition of one's own in the Classify Leaves layout."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(n_per_class):
            cv2.imwrite(str(root / "images" / f"{name}{i}.png"), _picture(rng, c))
            rows.append(f"images/{name}{i}.png,{name}")
    tests = [f"images/t{i}.png" for i in range(n_test)]
    for i, t in enumerate(tests):
        cv2.imwrite(str(root / t), _picture(rng, i % 3))
    (root / "train.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    (root / "test.csv").write_text("image\n" + "\n".join(tests) + "\n")
    (root / "sample_submission.csv").write_text("image,label\n" + "".join(f"{t},ant\n" for t in tests))
    return root


TINY = ("folds.k=2", "train.epochs=1", "train.img_size=16", "train.batch_size=8", "model.backbone=resnet10t",
        "tta=[identity]", "competition.name=mine", "competition.build=null", "train.cache_images=false")


def test_stale_experiments_and_missing_members_are_skipped_with_one_line_each(make_cfg, tmp_path, capsys):
    from pipeline.run import run_all

    root = build_folder(tmp_path / "mine")
    # Point 6: a listed member that does not exist is named before training, and the current
    # experiment is blended anyway (ensemble.experiments = the current one plus those listed).
    first = run_all(make_cfg("experiment=exp_a", "ensemble.experiments=[teacher]", *TINY, root=root))
    out = capsys.readouterr().out.splitlines()
    announce = next(i for i, line in enumerate(out) if "teacher (in ensemble.experiments) will be left out" in line)
    assert announce < next(i for i, line in enumerate(out) if "train fold 0" in line)
    assert first.submission is not None and first.submission.is_file()
    first_meta = read_json(first.submission.with_suffix(".json"))
    assert first_meta["experiments"] == ["exp_a"] and "not trained yet" in first_meta["skipped"]["teacher"]
    # A label fix: folds.csv is made again, and exp_a's OOF rows no longer match it.
    table = (root / "train.csv").read_text().replace("images/ant0.png,ant", "images/ant0.png,bee")
    (root / "train.csv").write_text(table)

    second = run_all(make_cfg("experiment=exp_b", *TINY, root=root))
    out = capsys.readouterr().out
    skip_lines = [line for line in out.splitlines() if "skipping exp_a" in line]
    assert len(skip_lines) == 1, out
    assert "trained on another folds.csv" in skip_lines[0] and "label(s) changed" in skip_lines[0]
    assert "runs/exp_a/config.yaml" in skip_lines[0]  # the way out: retrain it on the current data
    assert second.submission is not None and second.submission != first.submission
    meta = read_json(second.submission.with_suffix(".json"))
    assert meta["experiments"] == ["exp_b"]
    assert "exp_a" in meta["skipped"] and "folds.csv" in meta["skipped"]["exp_a"]
    assert json.dumps(meta)  # the record stays plain JSON
