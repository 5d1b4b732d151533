"""Folds: grouped, stratified, rare classes kept in training, dedup policy, staleness."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import paths
from pipeline.folds import NEVER_VALIDATED, apply_policy, assign_folds, ensure_folds, folds_are_current, main


def _write_dedup(cfg, train: pd.DataFrame, group: list[str], conflict: list[bool] | None = None) -> None:
    out = paths.dedup_csv(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "image": train["image"], "split": "train", "group": group,
        "exact_group": group, "near_group": group,
        "conflict": conflict if conflict is not None else [False] * len(train),
    }).to_csv(out, index=False)


def test_assign_folds_never_splits_a_group_and_stratifies():
    rng = np.random.default_rng(0)
    n = 400
    group = rng.integers(0, 120, n).astype(str)
    label = np.array([f"c{int(g) % 4}" for g in group])  # label follows group, as duplicates do
    table = pd.DataFrame({"image": [f"{i}.png" for i in range(n)], "label": label, "group": group})
    fold, notes = assign_folds(table, k=5, seed=1)
    assert notes == []
    assert (table.assign(fold=fold).groupby("group")["fold"].nunique() == 1).all()
    counts = pd.crosstab(table["label"], fold)
    assert counts.shape == (4, 5)
    share = counts.div(counts.sum(axis=1), axis=0)
    assert (share.max(axis=1) - share.min(axis=1)).max() < 0.15  # every class in every fold, near 20% each
    # Same seed, same folds; another seed, other folds.
    assert (assign_folds(table, 5, 1)[0] == fold).all()
    assert (assign_folds(table, 5, 2)[0] != fold).any()


def test_rare_classes_are_warned_and_kept_in_training():
    table = pd.DataFrame({
        "image": [f"{i}.png" for i in range(44)],
        "label": ["a"] * 20 + ["b"] * 20 + ["solo"] * 2 + ["pair"] * 2,
        "group": [str(i) for i in range(40)] + ["s", "s", "p1", "p2"],
    })
    fold, notes = assign_folds(table, k=5, seed=0)
    solo = table["label"] == "solo"
    assert (fold[solo] == NEVER_VALIDATED).all()
    pair_folds = fold[table["label"] == "pair"]
    assert len(set(pair_folds)) == 2 and NEVER_VALIDATED not in pair_folds  # each fold trains on the other one
    assert any("solo" in n for n in notes) and any("pair" in n for n in notes)


def test_a_group_with_a_never_validated_member_stays_together():
    # A kept conflict: image "x" (class a) and its copy "y" labelled with a class seen nowhere else.
    table = pd.DataFrame({
        "image": [f"{i}.png" for i in range(30)] + ["x", "y"],
        "label": ["a"] * 15 + ["b"] * 15 + ["a", "lonely"],
        "group": [str(i) for i in range(30)] + ["g", "g"],
    })
    fold, _ = assign_folds(table, k=3, seed=0)
    assert fold[-1] == NEVER_VALIDATED and fold[-2] == NEVER_VALIDATED


def test_policy_drop_majority_keep_one():
    table = pd.DataFrame({
        "image": ["a", "b", "c", "d", "e", "f", "g"],
        "label": ["x", "x", "y", "x", "y", "z", "z"],
        "group": ["g1", "g1", "g1", "g2", "g2", "g3", "g4"],
    })
    dropped, s = apply_policy(table, "keep_all", "drop")
    assert dropped["image"].tolist() == ["f", "g"] and s["conflict_groups"] == 2
    maj, s = apply_policy(table, "keep_all", "majority")
    # g1 is 2:1 for x (c relabelled), g2 is a 1:1 tie and is dropped.
    assert maj.set_index("image")["label"].to_dict() == {"a": "x", "b": "x", "c": "x", "f": "z", "g": "z"}
    assert s["relabelled"] == 1 and s["dropped_tie"] == 2
    one, s = apply_policy(table, "keep_one", "keep")
    assert one["image"].tolist() == ["a", "d", "f", "g"] and s["dropped_keep_one"] == 3


def test_folds_cli_uses_dedup_groups_and_policy(make_cfg, capsys):
    cfg = make_cfg()
    from pipeline.data import load_competition

    train = load_competition(cfg.competition).train.reset_index(drop=True)
    group = [f"g{i}" for i in range(len(train))]
    same = train.index[train["label"] == train.loc[0, "label"]][1]
    other = train.index[train["label"] != train.loc[0, "label"]][0]
    group[same] = group[0]  # a duplicate pair with one label: kept, in one fold
    partner = train.index[(train["label"] != train.loc[other, "label"]) & ~train.index.isin([0, same])][0]
    group[partner] = group[other]  # a pair whose labels disagree: dropped by dedup.conflicts=drop
    _write_dedup(cfg, train, group)
    args = sum([["--set", o] for o in (
        f"paths.work={cfg.paths.work}", f"competition.root={cfg.competition.root}", "folds.k=4",
        "dedup.conflicts=drop")], [])
    folds = main(args)
    out = capsys.readouterr().out
    assert "images" in out and "groups" in out and "dropped 2" in out
    by_image = folds.set_index("image")
    assert by_image.loc[train.loc[0, "image"], "fold"] == by_image.loc[train.loc[same, "image"], "fold"]
    assert train.loc[other, "image"] not in by_image.index and train.loc[partner, "image"] not in by_image.index
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3]
    written = pd.read_csv(paths.folds_csv(cfg))
    assert list(written.columns) == ["image", "label", "group", "fold", "excluded"] and len(written) == len(train) - 2


def test_ensure_folds_uses_current_dedup_and_remakes_when_settings_change(make_cfg, seed_dedup, capsys):
    cfg = seed_dedup(make_cfg("folds.k=3"))  # dedup of these very images: current, not run again
    folds = ensure_folds(cfg)
    out = capsys.readouterr().out
    assert "running dedup now" not in out and "making it now" in out
    assert paths.dedup_csv(cfg).is_file()
    # The planted duplicates of the default share a group, so they share a fold.
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert folds["group"].nunique() < len(folds)
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    assert folds_are_current(cfg)
    ensure_folds(cfg)
    assert "making it now" not in capsys.readouterr().out
    cfg4 = make_cfg("folds.k=4")
    assert not folds_are_current(cfg4)
    assert sorted(ensure_folds(cfg4)["fold"].unique()) == [0, 1, 2, 3]


def test_too_few_groups_is_a_clear_error():
    from pipeline.errors import PipelineError

    table = pd.DataFrame({"image": list("abcd"), "label": list("xxyy"), "group": ["1", "1", "2", "3"]})
    with pytest.raises(PipelineError, match="folds.k"):
        assign_folds(table, k=5, seed=0)
