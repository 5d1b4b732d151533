"""The one split of config keys into "retrain" and "no retrain", as run's up-to-date check and
``--resume`` both apply it; cheap: a fold's files are written by hand, nothing is trained."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline import paths
from pipeline.config import Config, save_config
from pipeline.config_keys import NO_RETRAIN, RETRAIN, classify, flatten, retrain_changes
from pipeline.detect.config import DetectConfig
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json
from pipeline.train import check_resume_config, fold_is_current

# one key per group, with a value different from the default
NO_RETRAIN_CHANGES = {
    "train.num_workers": 3, "train.cache_images": False, "train.compile": True, "device": "cpu",
    "wandb.mode": "disabled", "paths.submissions": "elsewhere", "predict.batch_size": 7, "tta": ["hflip"],
    "ensemble.method": "mean", "experiment": "renamed", "dedup.workers": 5, "competition.solution": "sol.csv",
}
RETRAIN_CHANGES = {
    "train.lr": 0.123, "train.epochs": 99, "train.augment.hflip": 0.0, "model.backbone": "resnet34",
    "seed": 7, "folds.k": 3, "dedup.policy": "keep_one", "competition.train_csv": "other.csv",
    "train.early_stopping_patience": 2,
}


def _set(cfg: Config, dotted: str, value) -> Config:
    data = cfg.to_dict()
    node = data
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return Config.model_validate(data)


@pytest.mark.parametrize("cls", [Config, DetectConfig])
def test_every_config_key_of_both_tracks_is_classified(cls):
    unclassified = [k for k in flatten(cls().to_dict()) if classify(k) is None]
    assert unclassified == [], f"add these keys to pipeline/config_keys.py KEYS: {unclassified}"


def test_most_specific_entry_wins():
    assert classify("train.lr") == RETRAIN
    assert classify("train.num_workers") == NO_RETRAIN
    assert classify("competition.root") == RETRAIN and classify("competition.solution") == NO_RETRAIN
    assert retrain_changes({"train": {"lr": 1, "num_workers": 0}}, {"train": {"lr": 1, "num_workers": 4}}) == []
    assert retrain_changes({"train": {"lr": 1}}, {"train": {"lr": 2}}) == [("train.lr", 1, 2)]
    assert retrain_changes({}, {"newsection": {"x": 1}}) == [("newsection.x", None, 1)]  # unknown: retrain


@pytest.fixture
def trained_fold(tmp_path):
    """A fold whose outputs say it finished with the default config (no training needed)."""
    cfg = Config.model_validate({**Config().to_dict(), "paths": {"work": str(tmp_path / "work"),
                                 "runs": str(tmp_path / "runs"), "submissions": str(tmp_path / "subs")}})
    d = paths.fold_dir(cfg, 0)
    d.mkdir(parents=True)
    save_config(cfg, paths.run_dir(cfg) / paths.CONFIG)
    (d / paths.BEST).write_bytes(b"weights")
    pd.DataFrame({"image": ["a.png", "b.png"], "label": ["x", "y"]}).to_csv(d / paths.OOF, index=False)
    atomic_write_json(d / paths.METRICS, {"complete": True, "config": cfg.to_dict()})
    folds = pd.DataFrame({"image": ["a.png", "b.png", "c.png"], "fold": [0, 0, 1]})
    return cfg, folds


@pytest.mark.parametrize("key", sorted(NO_RETRAIN_CHANGES))
def test_no_retrain_keys_keep_the_fold_and_allow_resume(trained_fold, key):
    cfg, folds = trained_fold
    changed = _set(cfg, key, NO_RETRAIN_CHANGES[key])
    # the fold is looked up where the original config put it
    changed = changed.model_copy(update={"paths": cfg.paths, "experiment": cfg.experiment})
    assert fold_is_current(changed, 0, folds) == (True, "complete")
    check_resume_config(cfg.to_dict(), _set(cfg, key, NO_RETRAIN_CHANGES[key]).to_dict(), paths.fold_dir(cfg, 0))


@pytest.mark.parametrize("key", sorted(RETRAIN_CHANGES))
def test_retrain_keys_retrain_the_fold_and_refuse_resume(trained_fold, key):
    cfg, folds = trained_fold
    changed = _set(cfg, key, RETRAIN_CHANGES[key])
    current, reason = fold_is_current(changed, 0, folds)
    assert not current and reason.startswith(f"config changed ({key}: ")
    with pytest.raises(PipelineError, match=f"--resume: .*{key}"):
        check_resume_config(cfg.to_dict(), changed.to_dict(), paths.fold_dir(cfg, 0))
