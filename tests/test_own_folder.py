"""Issue 17, points 4, 5 and 8 on a tiny folder of one's own: a changed model keeps the old
experiment, --folds/--partial, weights-only best.pt, train.keep_last and --extend."""
from __future__ import annotations

import pytest
import torch
from test_stale_blend import TINY, build_folder

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.io import read_json


def test_folds_partial_and_a_changed_model_under_the_same_name(make_cfg, tmp_path, capsys):
    from pipeline.run import run_all

    root = build_folder(tmp_path / "mine")
    cfg = make_cfg("experiment=mine_a", *TINY, root=root)
    quick = run_all(cfg, only_folds=[0])
    out = capsys.readouterr().out
    assert quick.submission is None and "no submission until every fold" in out
    assert quick.trained == [0] and not (paths.fold_dir(cfg, 1) / paths.METRICS).exists()

    part = run_all(cfg, only_folds=[0], partial=True)
    assert part.trained == [] and part.submission.name.startswith("mine_a_partial")
    assert read_json(part.submission.with_suffix(".json"))["partial_folds"] == {"mine_a": [0]}

    # Another model under the same name: the trained experiment is kept aside, not deleted.
    changed = make_cfg("experiment=mine_a", *TINY, "model.drop_rate=0.1", root=root)
    run_all(changed, only_folds=[0])
    out = capsys.readouterr().out
    kept = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("mine_a@")]
    assert len(kept) == 1 and (kept[0] / "fold0" / paths.METRICS).is_file()
    assert f"kept the earlier mine_a in {kept[0]}/" in out and "model.drop_rate" in out
    assert read_json(paths.fold_dir(changed, 0) / paths.METRICS)["config"]["model"]["drop_rate"] == 0.1
    # --force replaces instead.
    run_all(make_cfg("experiment=mine_a", *TINY, "model.drop_rate=0.2", root=root), only_folds=[0], force=True)
    assert len([p for p in (tmp_path / "runs").iterdir() if p.name.startswith("mine_a@")]) == 1


def test_weights_only_best_keep_last_and_extend(make_cfg, tmp_path, capsys):
    from pipeline.train import train_fold

    root = build_folder(tmp_path / "mine")
    cfg = make_cfg("experiment=disk", *TINY, "train.ema=true", root=root)
    train_fold(cfg, 0)
    d = paths.fold_dir(cfg, 0)
    best = torch.load(d / paths.BEST, weights_only=True)
    last = torch.load(d / paths.LAST, weights_only=True)
    assert best["ema"] is None and best["weights"] == "ema" and "optimizer" not in best
    assert all(torch.equal(best["model"][k], last["ema"][k]) for k in best["model"])
    assert (d / paths.BEST).stat().st_size < (d / paths.LAST).stat().st_size / 2

    capsys.readouterr()
    metrics = train_fold(cfg, 0, extend=1)
    out = capsys.readouterr().out
    assert "continues from epoch 1 to 2" in out and "stretched" in out and "train.epochs: 2" in out
    assert metrics["epochs_run"] == 2 and cfg.train.epochs == 2
    history = read_json(d / paths.METRICS)
    assert history["config"]["train"]["epochs"] == 2
    import pandas as pd

    assert pd.read_csv(d / paths.HISTORY)["epoch"].tolist() == [1, 2]

    lean = make_cfg("experiment=disk", *TINY, "train.ema=true", "train.keep_last=false", root=root)
    train_fold(lean, 1)
    assert (paths.fold_dir(lean, 1) / paths.BEST).is_file() and not (paths.fold_dir(lean, 1) / paths.LAST).exists()
    with pytest.raises(PipelineError, match="train.keep_last: false"):
        train_fold(lean, 1, extend=2)
