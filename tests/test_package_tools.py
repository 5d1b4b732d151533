"""Code-competition tools that need no package: CV against the leaderboard, the target factor."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import PipelineError

DATA = Path(__file__).parent / "data"


def test_scores_match_leaderboard_rows_to_our_submissions_and_flag_divergence(make_cfg, tmp_path, capsys):
    from pipeline.scores import cv_vs_public

    cfg = make_cfg()
    subs = Path(cfg.paths.submissions)
    subs.mkdir(parents=True)
    cvs = {"blend_20261130-090100": 0.9920, "digits_resnet18_20261130-085900": 0.9900,
           "digits_resnet10t_20261130-085500": 0.9890, "digits_resnet10t_20261130-091500": 0.9895}
    for stem, acc in cvs.items():
        (subs / f"{stem}.json").write_text(json.dumps({"competition": "digits", "experiments": ["x"],
                                                       "cv": {"blend": {"acc": acc - 0.001, "acc_tta": acc}}}))
    (subs / "other_competition.json").write_text(json.dumps({"competition": "leaves", "cv": {}}))
    table = cv_vs_public(cfg, csv=str(DATA / "kaggle_submissions.csv"))
    out = capsys.readouterr().out
    # The pending row has no score, the public notebook's file is not ours: three matched.
    assert sorted(table["fileName"]) == sorted(f"{s}.csv" for s in list(cvs)[:3])
    assert table.set_index("fileName").loc["digits_resnet10t_20261130-085500.csv", "divergent"]
    assert table["divergent"].sum() == 1 and "1 divergent" in out
    assert (subs / "cv_vs_public.png").is_file() and (subs / "cv_vs_public.csv").is_file()
    with pytest.raises(PipelineError, match="fileName and publicScore"):
        bad = tmp_path / "bad.csv"
        bad.write_text("a,b\n1,2\n")
        cv_vs_public(cfg, csv=str(bad))


def test_target_factor_is_recalibrated_from_a_kaggle_log(tmp_path):
    from pipeline.rehearse import target_factor

    assert target_factor("cpu")[0] == 1.0 and target_factor("2.5")[0] == 2.5
    log = tmp_path / "kaggle.log"
    log.write_text("pip ...\ninfer: 20000 images in 400.0s (50.0 images/s; 10 models, 20 forward passes per image)\n")
    factor, source = target_factor("cpu", local_ips=25.0, target_log=str(log))
    assert factor == pytest.approx(0.5) and "calibrated" in source
    with pytest.raises(PipelineError, match="t4x2"):
        target_factor("h100")
