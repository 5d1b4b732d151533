"""competition.relabel / competition.exclude and folds.group_column: what folds.csv says after them."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline import paths
from pipeline.data import DataError, load_competition
from pipeline.folds import folds_are_current, make_folds, read_folds, training_rows, validation_rows
from pipeline.io import read_json


def _write_dedup(cfg, images: list[str], group: list[str]) -> None:
    out = paths.dedup_csv(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image": images, "split": "train", "group": group, "exact_group": group, "near_group": group,
                  "conflict": False}).to_csv(out, index=False)


@pytest.fixture
def train(make_cfg) -> pd.DataFrame:
    return load_competition(make_cfg().competition).train.reset_index(drop=True)


def test_relabel_and_exclude_change_folds_csv_as_stated(make_cfg, train, tmp_path, capsys):
    base_cfg = make_cfg("folds.k=4")
    _write_dedup(base_cfg, train["image"].tolist(), [f"g{i}" for i in range(len(train))])
    before = make_folds(base_cfg, quiet=True).set_index("image")
    fixed_imgs = train["image"].iloc[[3, 50, 700]].tolist()
    new_labels = [next(c for c in ("zero", "one") if c != train["label"].iloc[i]) for i in (3, 50, 700)]
    (tmp_path / "relabel.csv").write_text("image,label\n" + "".join(f"{i},{c}\n" for i, c in zip(fixed_imgs, new_labels)))
    dropped = train["image"].iloc[[10, 11, 12, 900]].tolist()
    # analyze --write-fixes' draft form: extra columns are ignored
    pd.DataFrame({"image": dropped, "given": "x", "suggested": "y", "suggested_prob": 0.99}).to_csv(
        tmp_path / "exclude.csv", index=False)
    cfg = make_cfg("folds.k=4", f"competition.relabel={tmp_path / 'relabel.csv'}",
                   f"competition.exclude={tmp_path / 'exclude.csv'}")
    assert not folds_are_current(cfg)  # the fixes make folds.csv stale...
    make_folds(cfg)
    out = capsys.readouterr().out
    assert "3 image(s) relabelled, 4 excluded from training" in out
    after = pd.read_csv(paths.folds_csv(cfg), dtype={"image": str, "label": str, "group": str}).set_index("image")
    assert list(after.columns) == ["label", "group", "fold", "excluded"]
    assert after["fold"].equals(before["fold"])  # ...but fold ids never move
    changed = after.index[after["label"] != before["label"]]
    assert sorted(changed) == sorted(fixed_imgs) and after.loc[fixed_imgs, "label"].tolist() == new_labels
    assert sorted(after.index[after["excluded"]]) == sorted(dropped)
    record = read_json(paths.folds_json(cfg))["label_fixes"]
    assert [r["image"] for r in record["relabelled"]] == fixed_imgs and record["excluded"] == dropped
    assert record["relabelled"][0]["given"] == train["label"].iloc[3] and record["relabel"]["sha256"]
    assert folds_are_current(cfg)
    # Training skips the excluded images; validation keeps every image, with its corrected label.
    folds = read_folds(paths.folds_csv(cfg))
    k = int(after.loc[dropped[0], "fold"])
    assert not set(dropped) & set(training_rows(folds, (k + 1) % 4)["image"])
    val = validation_rows(folds, k).set_index("image")
    assert dropped[0] in val.index and len(val) == (before["fold"] == k).sum()
    k2 = int(after.loc[fixed_imgs[0], "fold"])
    assert validation_rows(folds, k2).set_index("image").loc[fixed_imgs[0], "label"] == new_labels[0]
    # Editing a fix list makes folds.csv stale again.
    (tmp_path / "exclude.csv").write_text("image\n" + dropped[0] + "\n")
    assert not folds_are_current(cfg)
    # So does dropping the fixes: the next folds.csv has the labels as given and excludes nothing.
    assert not folds_are_current(base_cfg)
    make_folds(base_cfg, quiet=True)
    plain = read_folds(paths.folds_csv(base_cfg)).set_index("image")
    assert not plain["excluded"].any() and folds_are_current(base_cfg)
    assert plain.loc[before.index, "label"].tolist() == before["label"].tolist()


def test_a_fix_naming_an_unknown_image_or_class_is_one_clear_error(make_cfg, train, tmp_path):
    cfg0 = make_cfg("folds.k=4")
    _write_dedup(cfg0, train["image"].tolist(), [f"g{i}" for i in range(len(train))])
    img = train["image"].iloc[0]
    (tmp_path / "relabel.csv").write_text(f"image,label\nimages/nope.png,one\n{img},eleven\n{img},two\n")
    cfg = make_cfg("folds.k=4", f"competition.relabel={tmp_path / 'relabel.csv'}")
    with pytest.raises(DataError) as err:
        make_folds(cfg, quiet=True)
    msg = str(err.value)
    assert "competition.relabel" in msg and "2 problem(s)" in msg
    assert "line 2: image 'images/nope.png' is not a train image" in msg
    assert "line 3:" in msg and "'eleven' is not a class" in msg
    assert not paths.folds_csv(cfg).exists()  # nothing written
    (tmp_path / "bad.csv").write_text("file,label\na,b\n")
    with pytest.raises(DataError, match="no column 'image'.*columns are \\['file', 'label'\\]"):
        make_folds(make_cfg(f"competition.relabel={tmp_path / 'bad.csv'}"), quiet=True)
    with pytest.raises(DataError, match="competition.exclude = .*missing.csv: no such file"):
        make_folds(make_cfg(f"competition.exclude={tmp_path / 'missing.csv'}"), quiet=True)


def test_group_column_is_joined_with_duplicate_groups(make_cfg, digits_copy):
    train = pd.read_csv(digits_copy / "train.csv", dtype=str)
    # Patients: 40 images each, except that image 0 belongs to patient "p_link" with image 500,
    # and image 500 is a duplicate of image `dup` (dedup group): 0, 500 and dup must share a fold.
    dup = int(train.index[(train["label"] == train["label"].iloc[500]) & (train.index > 800)][0])
    patient = [f"p{i // 40}" for i in range(len(train))]
    patient[0] = patient[500] = "p_link"
    patient[7] = ""  # unknown: the image is its own group
    train["patient"] = patient
    train.to_csv(digits_copy / "train.csv", index=False)
    cfg = make_cfg("folds.k=4", "folds.group_column=patient", root=digits_copy)
    group = [f"g{i}" for i in range(len(train))]
    group[dup] = group[500]
    _write_dedup(cfg, train["image"].tolist(), group)
    folds = make_folds(cfg, quiet=True).set_index("image")
    img = train["image"]
    assert folds.loc[img[0], "fold"] == folds.loc[img[500], "fold"] == folds.loc[img[dup], "fold"]
    by_patient = folds.join(train.set_index("image")["patient"])
    assert (by_patient[by_patient["patient"] != ""].groupby("patient")["fold"].nunique() == 1).all()
    assert read_json(paths.folds_json(cfg))["group_column"] == "patient"
    assert folds_are_current(cfg)
    with pytest.raises(DataError, match="folds.group_column = 'site'.*no such column.*'patient'"):
        make_folds(make_cfg("folds.group_column=site", root=digits_copy), quiet=True)


def _fake_trained_folds(cfg, folds: pd.DataFrame) -> None:
    """Outputs of a finished training of every fold, as train writes them (probabilities made up)."""
    import numpy as np
    import torch

    from pipeline.config import save_config
    from pipeline.folds import training_fingerprint
    from pipeline.io import atomic_write_csv, atomic_write_json

    classes = sorted(folds["label"].unique())
    save_config(cfg, paths.run_dir(cfg) / paths.CONFIG)
    for k in sorted(int(f) for f in folds["fold"].unique() if f >= 0):
        d = paths.fold_dir(cfg, k)
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"model": {}}, d / paths.BEST)
        val = validation_rows(folds, k)
        probs = np.full((len(val), len(classes)), 0.01)
        probs[np.arange(len(val)), val["label"].map(classes.index)] = 1 - 0.01 * (len(classes) - 1)
        atomic_write_csv(d / paths.OOF, pd.concat([val[["image", "label"]], pd.DataFrame(probs, columns=classes)],
                                                 axis=1))
        atomic_write_json(d / paths.PREDICT, {"tta": ["identity"]})
        atomic_write_json(d / paths.METRICS, {"complete": True, "config": cfg.to_dict(), "val_acc": 1.0,
                                             "train_rows_sha256": training_fingerprint(folds, k)})


def test_fixes_force_exactly_the_retraining_they_should(make_cfg, train, tmp_path):
    """Excluding an image of fold j retrains every fold but j; relabelling one also only corrects
    fold j's oof.csv labels; a fix of nothing in the folds retrains nothing."""
    from pipeline.train import fold_is_current, sync_validation_labels

    cfg = make_cfg("folds.k=3")
    _write_dedup(cfg, train["image"].tolist(), [f"g{i}" for i in range(len(train))])
    folds = make_folds(cfg, quiet=True)
    _fake_trained_folds(cfg, folds)
    assert all(fold_is_current(cfg, k, folds)[0] for k in range(3))

    in_fold1 = folds.loc[folds["fold"] == 1, "image"].iloc[0]
    (tmp_path / "exclude.csv").write_text(f"image\n{in_fold1}\n")
    cfg_x = make_cfg("folds.k=3", f"competition.exclude={tmp_path / 'exclude.csv'}")
    folds_x = make_folds(cfg_x, quiet=True)
    state = {k: fold_is_current(cfg_x, k, folds_x) for k in range(3)}
    assert [k for k, (cur, _) in state.items() if not cur] == [0, 2]
    assert "training images or labels changed" in state[0][1]
    assert not sync_validation_labels(cfg_x, 1, folds_x)  # fold 1 still validates the image, label as given

    old = folds.set_index("image").loc[in_fold1, "label"]
    new = next(c for c in sorted(folds["label"].unique()) if c != old)
    (tmp_path / "relabel.csv").write_text(f"image,label\n{in_fold1},{new}\n")
    cfg_r = make_cfg("folds.k=3", f"competition.relabel={tmp_path / 'relabel.csv'}")
    folds_r = make_folds(cfg_r, quiet=True)
    assert [k for k in range(3) if not fold_is_current(cfg_r, k, folds_r)[0]] == [0, 2]
    d1 = paths.fold_dir(cfg_r, 1)
    assert sync_validation_labels(cfg_r, 1, folds_r)
    oof = pd.read_csv(d1 / paths.OOF, dtype={"image": str, "label": str}).set_index("image")
    assert oof.loc[in_fold1, "label"] == new
    assert (oof["label"] != folds.set_index("image")["label"].reindex(oof.index)).sum() == 1
    assert read_json(d1 / paths.METRICS)["val_acc"] == pytest.approx(1 - 1 / len(oof))
    assert not (d1 / paths.PREDICT).exists()  # predict makes oof_tta.csv again, with the new label
    assert not sync_validation_labels(cfg_r, 1, folds_r)  # once

    # A fix naming an image the dedup policy dropped changes no fold.
    (tmp_path / "none.csv").write_text("image\n")
    cfg_n = make_cfg("folds.k=3", f"competition.exclude={tmp_path / 'none.csv'}")
    folds_n = make_folds(cfg_n, quiet=True)
    assert all(fold_is_current(cfg_n, k, folds_n)[0] for k in range(3))
