"""competition.relabel / competition.exclude and folds.group_column: what folds.csv says after them."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline import paths
from pipeline.data import DataError, load_competition
from pipeline.folds import _read_folds, folds_are_current, make_folds, training_rows, validation_rows
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
    folds = _read_folds(paths.folds_csv(cfg))
    k = int(after.loc[dropped[0], "fold"])
    assert not set(dropped) & set(training_rows(folds, (k + 1) % 4)["image"])
    val = validation_rows(folds, k).set_index("image")
    assert dropped[0] in val.index and len(val) == (before["fold"] == k).sum()
    k2 = int(after.loc[fixed_imgs[0], "fold"])
    assert validation_rows(folds, k2).set_index("image").loc[fixed_imgs[0], "label"] == new_labels[0]
    # Editing a fix list makes folds.csv stale again.
    (tmp_path / "exclude.csv").write_text("image\n" + dropped[0] + "\n")
    assert not folds_are_current(cfg)


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
