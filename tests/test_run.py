"""``python -m pipeline.run`` end to end on a trimmed copy of the embedded default, with tiny models."""
from __future__ import annotations

import pandas as pd
import pytest
from digits_helpers import cut_digits, tiny_run_config

from pipeline.data import load_competition
from pipeline.run import main, run_all
from pipeline.submission import validate_submission
from pipeline.train import fold_is_current

N_TRAIN, N_TEST = 200, 60


@pytest.fixture(scope="module")
def small_root(digits_root, tmp_path_factory):
    """A copy of the digits competition cut to N_TRAIN training and N_TEST test images (every class
    kept), with its sample submission and hidden solution cut to match."""
    return cut_digits(digits_root, tmp_path_factory.mktemp("run") / "digits", N_TRAIN, N_TEST)


def _tiny(root, *extra):
    return tiny_run_config(root, root.parent / "out", *extra)


@pytest.fixture(scope="module")
def first_run(small_root):
    """One run of every stage, shared by the tests of this module (it is the expensive part)."""
    import contextlib
    import io

    cfg = _tiny(small_root)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = run_all(cfg)
    return cfg, summary, buf.getvalue()


def test_run_does_every_stage_then_only_reports(first_run, capsys):
    cfg, first, out = first_run
    assert first.trained == [0, 1] and first.skipped == []
    for stage in ("[1/4] data+folds", "[2/4] train", "[3/4] predict", "[4/4] ensemble", "summary"):
        assert stage in out
    assert "score against the hidden solution" in out and 0 <= first.solution_score <= 1
    comp = load_competition(cfg.competition)
    sub = pd.read_csv(first.submission, dtype=str, keep_default_na=False)
    validate_submission(sub, comp.sample_submission, cfg.competition, comp.classes)

    # the second run does nothing but report
    subs_before = sorted(first.submission.parent.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in first.submission.parents[1].rglob("fold*/*")}
    second = run_all(cfg)
    out = capsys.readouterr().out
    assert second.trained == [] and second.skipped == [0, 1]
    assert second.submission == first.submission and second.solution_score == first.solution_score
    assert "up to date" in out and "train fold" not in out
    assert sorted(first.submission.parent.iterdir()) == subs_before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_only_training_settings_make_a_fold_stale(first_run):
    from pipeline.folds import ensure_folds

    cfg = first_run[0].model_copy(deep=True)
    folds = ensure_folds(cfg)
    assert fold_is_current(cfg, 0, folds) == (True, "complete")
    lr = cfg.train.lr
    cfg.train.lr = lr * 10
    current, reason = fold_is_current(cfg, 0, folds)
    assert not current and reason.startswith("config changed (train.lr: ")
    cfg.train.lr = lr
    cfg.tta, cfg.ensemble.method, cfg.wandb.mode = ["identity"], "caruana", "offline"
    assert fold_is_current(cfg, 0, folds)[0]  # TTA, ensemble and W&B settings retrain nothing
    other = folds.copy()
    other.loc[other.index[:3], "fold"] = 1 - other.loc[other.index[:3], "fold"]
    assert fold_is_current(cfg, 0, other) == (False, "folds.csv changed")


@pytest.mark.slow
def test_second_experiment_is_blended(first_run, small_root):
    cfg, first, _ = first_run
    other = _tiny(small_root, "experiment=tiny_resnet10t", "model.backbone=resnet10t")
    third = run_all(other)
    assert set(third.weights) == {cfg.experiment, "tiny_resnet10t"}
    assert sum(third.weights.values()) == pytest.approx(1.0)
    ll = {k: v["logloss_tta"] for k, v in third.cv.items()}
    # 1e-6: the blend renormalises rows that the CSV's rounded probabilities left a hair off 1
    assert ll["blend"] <= min(ll[cfg.experiment], ll["tiny_resnet10t"]) + 1e-6
    assert third.submission != first.submission


def test_cli_reports_a_bad_config_value_in_one_line(capsys):
    from pipeline.errors import cli_entry

    assert cli_entry(main, ["--set", "ensemble.method=best"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ensemble.method" in err and "optimize" in err


def test_label_fixes_retrain_only_the_folds_they_change(first_run, small_root, tmp_path, capsys):
    """Excluding an image of fold 0 retrains fold 1 alone; relabelling one of fold 1 then retrains
    fold 0 alone and corrects fold 1's OOF label; the submission records the fixes."""
    import json

    from pipeline import paths

    cfg, _, _ = first_run
    folds = pd.read_csv(paths.folds_csv(cfg), dtype=str, keep_default_na=False)
    in0 = folds.loc[folds["fold"] == "0", "image"].iloc[0]
    (tmp_path / "exclude.csv").write_text(f"image\n{in0}\n")
    exclude = f"competition.exclude={tmp_path / 'exclude.csv'}"
    s = run_all(_tiny(small_root, exclude))
    assert s.trained == [1] and s.skipped == [0]
    meta = json.loads(s.submission.with_suffix(".json").read_text())["label_fixes"]
    assert meta["experiments"][cfg.experiment]["exclude"] == str(tmp_path / "exclude.csv")
    assert meta["folds"]["n_excluded"] == 1 and meta["folds"]["exclude"]["sha256"]

    in1 = folds.loc[folds["fold"] == "1"].iloc[0]
    new = next(c for c in sorted(folds["label"].unique()) if c != in1["label"])
    (tmp_path / "relabel.csv").write_text(f"image,label\n{in1['image']},{new}\n")
    capsys.readouterr()
    s = run_all(_tiny(small_root, exclude, f"competition.relabel={tmp_path / 'relabel.csv'}"))
    assert s.trained == [0] and s.skipped == [1]
    assert "fold 1: validation labels corrected" in capsys.readouterr().out
    for name in (paths.OOF, paths.OOF_TTA):  # predict made oof_tta.csv again, with the new label
        oof = pd.read_csv(paths.fold_dir(cfg, 1) / name, dtype=str).set_index("image")
        assert oof.loc[in1["image"], "label"] == new
