"""The detection stages end to end on a tiny shapes set: train, resume, evaluate, predict, errors."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from pipeline.config import load_config
from pipeline.detect.config import DetectConfig

REPO_CONFIG = "configs/banana_ssd.yaml"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from pipeline.detect.shapes import build_shapes

    return build_shapes(tmp_path_factory.mktemp("det") / "shapes", splits={"train": 16, "val": 6, "test": 6})


@pytest.fixture
def det_cfg(shapes_root, tmp_path):
    def _make(*overrides: str) -> DetectConfig:
        from pathlib import Path

        repo = Path(__file__).resolve().parents[1]
        base = [f"competition.root={shapes_root}", f"data.test_labels={shapes_root.parent / 'shapes_private/test/label.csv'}",
                f"paths.runs={tmp_path / 'runs'}", f"paths.submissions={tmp_path / 'subs'}", "wandb.mode=disabled",
                "model.img_size=64", "train.batch_size=8", "train.epochs=1", "predict.batch_size=8",
                "post.score_threshold=0.05"]
        return load_config(repo / REPO_CONFIG, base + list(overrides), schema=DetectConfig)

    return _make


def test_train_resume_evaluate_predict(det_cfg, tmp_path):
    from pipeline.detect.evaluate import evaluate
    from pipeline.detect.predict import predict
    from pipeline.detect.train import train

    cfg = det_cfg()
    metrics = train(cfg)
    run = tmp_path / "runs" / cfg.experiment
    for name in ("config.yaml", "classes.json", "best.pt", "last.pt", "history.csv", "metrics.json"):
        assert (run / name).is_file(), name
    assert metrics["complete"] and metrics["epochs_run"] == 1 and 0.0 <= metrics["map_50_95"] <= metrics["map_50"]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert {"model", "ema", "config", "classes", "epoch", "best_metric", "optimizer", "scheduler", "rng"} <= set(ckpt)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])

    # one more epoch resumes from last.pt instead of starting over
    more = train(det_cfg("train.epochs=2"))
    assert more["epochs_run"] == 2
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1, 2]  # counted from 1, as in classification

    result = evaluate(cfg)
    assert result["split"] == "test" and result["n_images"] == 6
    assert json.loads((run / "eval_test.json").read_text())["map_50"] == result["map_50"]
    assert (run / "eval_test.png").is_file()

    sub = predict(cfg, draw=True)
    table = pd.read_csv(run / "predictions.csv")
    assert list(table.columns) == ["image", "label", "score", "xmin", "ymin", "xmax", "ymax"]
    assert sub.is_file() and sub.with_suffix(".json").is_file()
    assert (table["score"] >= 0.05).all() and set(table["label"]) <= {"cross", "ring", "star"}
    assert (table["xmax"] > table["xmin"]).all()
    # the submission scores the same as evaluating the model at the same threshold
    scored = evaluate(cfg, predictions=run / "predictions.csv", picture=0)
    assert scored["n_gt"] == result["n_gt"]


def test_cli_errors_are_one_line(det_cfg, capsys, tmp_path):
    from pipeline.detect import evaluate, train
    from pipeline.errors import cli_entry

    assert cli_entry(train.main, ["--config", REPO_CONFIG, "--set", "model.archh=x"]) == 2
    assert "unknown key 'model.archh'. Did you mean model.arch" in capsys.readouterr().err
    assert cli_entry(train.main, ["--config", REPO_CONFIG, "--set", "train.loss=l2"]) == 2
    assert "hard_negative" in capsys.readouterr().err
    assert cli_entry(evaluate.main, ["--config", REPO_CONFIG, "--set", f"paths.runs={tmp_path / 'none'}",
                                     "--set", "data.build=null", "--set", f"competition.root={tmp_path}"]) == 2
    assert "does not exist; train" in capsys.readouterr().err
