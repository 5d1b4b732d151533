"""The predict stage on a fold written in the train stage's contract form (no training needed)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import paths
from pipeline.config import save_config
from pipeline.data import load_competition
from pipeline.data.competition import save_classes
from pipeline.data.transforms import eval_transform
from pipeline.engine.checkpoint import save_checkpoint
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_csv, atomic_write_json
from pipeline.models import create_classifier
from pipeline.predict import main, predict_fold, prediction_is_current

N_VAL = 24


def fake_fold(cfg, fold: int = 0, seed: int = 0) -> pd.DataFrame:
    """Write config.yaml, classes.json and fold<K>/{best.pt, metrics.json, oof.csv} as train does,
    with an untrained tiny model whose OOF rows come from a plain forward pass."""
    comp = load_competition(cfg.competition)
    classes = comp.classes
    torch.manual_seed(seed)
    model = create_classifier(cfg.model, len(classes)).eval()
    d = paths.fold_dir(cfg, fold)
    save_config(cfg, paths.run_dir(cfg) / "config.yaml")
    save_classes(classes, paths.run_dir(cfg) / "classes.json")
    val = comp.train.iloc[fold * N_VAL:(fold + 1) * N_VAL]
    tf = eval_transform(cfg.train.img_size, cfg.train.augment, normalize=True)  # the CPU-normalised reference
    from pipeline.data import read_image

    x = torch.stack([tf(image=read_image(p))["image"] for p in val["path"]])
    with torch.inference_mode():
        probs = torch.softmax(model(x), 1).numpy()
    oof = pd.DataFrame(probs, columns=classes)
    oof.insert(0, "label", val["label"].to_numpy())
    oof.insert(0, "image", val["image"].to_numpy())
    atomic_write_csv(d / "oof.csv", oof)
    save_checkpoint(d / "best.pt", {"model": model.state_dict(), "ema": None, "config": cfg.to_dict(),
                                    "classes": classes, "epoch": 0, "best_metric": 0.0})
    atomic_write_json(d / "metrics.json", {"experiment": cfg.experiment, "fold": fold, "used_ema": False,
                                           "complete": True})
    return oof


@pytest.fixture
def tiny_cfg(make_cfg):
    def _make(*overrides):
        return make_cfg("model.backbone=test_resnet", "predict.batch_size=128", "train.img_size=16", *overrides)
    return _make


def test_identity_tta_reproduces_the_training_oof(tiny_cfg):
    cfg = tiny_cfg("tta=[identity]")
    oof = fake_fold(cfg)
    info = predict_fold(cfg, 0, quiet=True)
    d = paths.fold_dir(cfg, 0)
    tta = pd.read_csv(d / "oof_tta.csv", dtype={"image": str, "label": str})
    assert list(tta.columns) == list(oof.columns)
    assert tta["image"].tolist() == oof["image"].tolist()
    np.testing.assert_allclose(tta.iloc[:, 2:].to_numpy(), oof.iloc[:, 2:].to_numpy(), atol=1e-5)
    assert info["oof_acc"] == pytest.approx(info["oof_acc_tta"])
    assert info["oof_logloss"] == pytest.approx(info["oof_logloss_tta"], abs=1e-5)


def test_predict_writes_contract_files_and_skips_when_current(tiny_cfg, capsys):
    cfg = tiny_cfg("tta=[identity,hflip,five_crop,scale_1.125]", "predict.tta_merge=geometric")
    fake_fold(cfg)
    comp = load_competition(cfg.competition)
    main(["--fold", "0", "--config", "configs/default.yaml",
          *sum((["--set", f"{k}={v}"] for k, v in _overrides(cfg).items()), [])])
    out = capsys.readouterr().out
    assert "dropped hflip" in out and "OOF acc" in out
    d = paths.fold_dir(cfg, 0)
    test = pd.read_csv(d / "test.csv", dtype={"image": str})
    assert list(test.columns) == ["image"] + comp.classes
    assert test["image"].tolist() == comp.test["image"].tolist()
    np.testing.assert_allclose(test[comp.classes].sum(axis=1), 1.0, atol=1e-6)
    info = json.loads((d / "predict.json").read_text())
    for key in ("tta", "merge", "oof_acc", "oof_logloss", "oof_acc_tta", "oof_logloss_tta", "n_test"):
        assert key in info
    # digits: training used no flips, so the mirrored view is dropped and five crops + scale remain
    assert info["tta"] == ["identity", "crop_tl", "crop_tr", "crop_bl", "crop_br", "crop_cc", "scale_1.125"]
    assert info["merge"] == "geometric" and info["n_test"] == len(comp.test)
    assert prediction_is_current(cfg, 0)
    before = (d / "test.csv").stat().st_mtime_ns
    predict_fold(cfg, 0)
    assert "up to date" in capsys.readouterr().out
    assert (d / "test.csv").stat().st_mtime_ns == before
    # another TTA list makes the outputs stale
    cfg.tta = ["identity"]
    assert not prediction_is_current(cfg, 0)


def _overrides(cfg) -> dict[str, str]:
    return {
        "paths.work": cfg.paths.work, "paths.runs": cfg.paths.runs, "paths.submissions": cfg.paths.submissions,
        "competition.root": cfg.competition.root, "wandb.mode": "disabled", "model.backbone": "test_resnet",
        "tta": "[" + ",".join(cfg.tta) + "]", "predict.tta_merge": cfg.predict.tta_merge,
    }


def test_missing_checkpoint_is_one_clear_error(tiny_cfg):
    cfg = tiny_cfg()
    with pytest.raises(PipelineError, match=r"oof.csv does not exist.*pipeline.train --fold 3"):
        predict_fold(cfg, 3)
    fake_fold(cfg)
    (paths.fold_dir(cfg, 0) / "best.pt").unlink()
    with pytest.raises(PipelineError, match=r"best.pt does not exist; train the fold first"):
        predict_fold(cfg, 0)
