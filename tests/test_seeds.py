"""seeds: members of one experiment, averaged before blending (no training: member files written by hand)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import paths
from pipeline.config import save_config
from pipeline.io import atomic_write_csv, atomic_write_json
from pipeline.seeds import average_members, is_member, mark_member, member_configs

CLASSES = ["a", "b", "c"]


def _member_files(cfg, rng):
    save_config(cfg, paths.run_dir(cfg) / paths.CONFIG)
    atomic_write_json(paths.run_dir(cfg) / paths.CLASSES, {"classes": CLASSES})
    for k in range(2):
        d = paths.fold_dir(cfg, k)
        images = [f"img{k}_{i}.png" for i in range(6)]
        for name, with_label in ((paths.OOF, True), (paths.OOF_TTA, True), (paths.TEST, False)):
            df = pd.DataFrame(rng.dirichlet(np.ones(3), size=6), columns=CLASSES)
            if with_label:
                df.insert(0, "label", ["a", "b", "c", "a", "b", "c"])
            df.insert(0, "image", images if with_label else [f"t{i}.png" for i in range(6)])
            atomic_write_csv(d / name, df)
        atomic_write_json(d / paths.PREDICT, {"tta": ["identity"], "oof_acc_tta": 0.5})


def test_members_are_averaged_row_for_row_and_hidden_from_discovery(make_cfg):
    from pipeline.ensemble import discover_experiments

    cfg = make_cfg("experiment=seeded", "seeds=[3, 4]", "folds.k=2")
    members = member_configs(cfg)
    assert [m.experiment for m in members] == ["seeded-seed3", "seeded-seed4"]
    assert [m.seed for m in members] == [3, 4] and all(m.seeds == [] for m in members)
    rng = np.random.default_rng(0)
    for m in members:
        _member_files(m, rng)
        mark_member(cfg, m)
    summary = average_members(cfg, members, [0, 1])
    for k in range(2):
        for name in (paths.OOF, paths.OOF_TTA, paths.TEST):
            got = pd.read_csv(paths.fold_dir(cfg, k) / name)[CLASSES].to_numpy()
            want = sum(pd.read_csv(paths.fold_dir(m, k) / name)[CLASSES].to_numpy() for m in members) / 2
            assert np.allclose(got, want)
    assert summary["seeds"] == [3, 4] and summary["folds"][0]["member_oof_acc_tta"] == [0.5, 0.5]
    assert is_member(cfg, "seeded-seed3") and not is_member(cfg, "seeded")
    assert discover_experiments(cfg, verbose=False) == ["seeded"]


def test_a_seed_listed_twice_is_an_error(make_cfg):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="twice"):
        member_configs(make_cfg("seeds=[1, 1]"))
