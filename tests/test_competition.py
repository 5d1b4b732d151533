"""The competition reader: the three layouts of design.md by config alone, and the bad-input report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import CompetitionConfig, load_config
from pipeline.data import DataError, load_competition
from pipeline.data.competition import check_image_files, load_classes, save_classes
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]


def _img(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _csv(path: Path, text: str, bom: bool = False) -> None:
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


def _competition(config: str, root: Path, *overrides: str) -> CompetitionConfig:
    return load_config(REPO / "configs" / config, [f"competition.root={root}", *overrides]).competition


@pytest.fixture
def leaves(tmp_path) -> Path:
    root = tmp_path / "classify-leaves"
    for i in range(6):
        _img(root / "images" / f"{i}.jpg", 40 * i)
    _csv(root / "train.csv", "image,label\nimages/0.jpg,acer_rubrum\nimages/1.jpg,quercus_alba\n"
         "images/2.jpg,acer_rubrum\nimages\\3.jpg,quercus_alba\n", bom=True)  # Excel BOM, Windows path
    _csv(root / "test.csv", "image\nimages/4.jpg\nimages/5.jpg\n")
    _csv(root / "sample_submission.csv", "image,label\nimages/4.jpg,acer_rubrum\nimages/5.jpg,acer_rubrum\n")
    return root


def test_classify_leaves_layout(leaves):
    comp = load_competition(_competition("leaves_resnet50d.yaml", leaves), check_images=True)
    assert comp.classes == ["acer_rubrum", "quercus_alba"]
    assert comp.train["image"].tolist() == ["images/0.jpg", "images/1.jpg", "images/2.jpg", "images/3.jpg"]
    assert comp.train["id"].iat[3] == "images\\3.jpg"  # the id stays as written: the submission uses it
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in comp.train["path"])
    assert comp.test["id"].tolist() == ["images/4.jpg", "images/5.jpg"]
    both = comp.all_images()
    assert both["split"].tolist() == ["train"] * 4 + ["test"] * 2
    assert both["label"].isna().sum() == 2
    assert list(comp.sample_submission.columns) == ["image", "label"]


def test_cifar10_layout_test_ids_from_folder(tmp_path):
    root = tmp_path / "cifar-10"
    rows = [("1", "cat"), ("2", "dog"), ("007", "cat"), ("10", "dog")]
    for id_, _ in rows:
        _img(root / "train" / f"{id_}.png")
    _csv(root / "trainLabels.csv", "id,label\n" + "".join(f"{i},{lab}\n" for i, lab in rows))
    for id_ in ["10", "2", "1"]:
        _img(root / "test" / f"{id_}.png")
    (root / "test" / ".DS_Store").write_bytes(b"\0")
    (root / "test" / "._1.png").write_bytes(b"\0\5\26\7")  # macOS resource fork: not an image
    (root / "test" / "notes.txt").write_text("x")
    (root / "test" / "sub").mkdir()
    _csv(root / "sampleSubmission.csv", "id,label\n1,cat\n2,cat\n10,cat\n")

    comp = load_competition(_competition("cifar10.yaml", root), check_images=True)
    assert comp.train["id"].tolist() == ["1", "2", "007", "10"]  # ids stay strings: "007" is not 7
    assert comp.train["image"].iat[2] == "train/007.png"
    assert comp.test["id"].tolist() == ["1", "2", "10"]  # natural order, hidden files skipped
    assert comp.test["image"].tolist() == ["test/1.png", "test/2.png", "test/10.png"]
    assert comp.classes == ["cat", "dog"]


def test_numeric_labels_stay_strings(tmp_path):
    root = tmp_path / "nums"
    for i in range(3):
        _img(root / "img" / f"{i}.png")
    _csv(root / "train.csv", "image,label\n0,01\n1,2\n2,NA\n")
    _csv(root / "sample_submission.csv", "image,label\n")
    cfg = CompetitionConfig(root=str(root), test_csv=None, train_image="img/{id}.png", test_image="img/{id}.png")
    comp = load_competition(cfg)
    assert comp.classes == ["01", "2", "NA"]  # "NA" is a class name, not a missing value
    assert len(comp.test) == 0


def test_dog_breed_layout_probability_submission(tmp_path):
    root = tmp_path / "dog-breed"
    rows = [("a1", "beagle"), ("b2", "pug"), ("c3", "beagle")]
    for id_, _ in rows:
        _img(root / "train" / f"{id_}.jpg")
    _img(root / "test" / "t1.jpg")
    _img(root / "test" / "t2.jpg")
    _csv(root / "labels.csv", "id,breed\n" + "".join(f"{i},{b}\n" for i, b in rows))
    _csv(root / "sample_submission.csv", "id,beagle,pug\nt1,0.5,0.5\nt2,0.5,0.5\n")
    cfg = _competition("dog_breed.yaml", root)
    assert cfg.submission_form == "probabilities"
    comp = load_competition(cfg, check_images=True)
    assert comp.classes == ["beagle", "pug"]
    assert comp.test["id"].tolist() == ["t1", "t2"]
    assert comp.test["image"].tolist() == ["test/t1.jpg", "test/t2.jpg"]

    _csv(root / "sample_submission.csv", "id,beagle\nt1,1\nt2,1\n")
    with pytest.raises(DataError, match=r"class 'pug' has no probability column"):
        load_competition(cfg)


def test_bad_input_is_one_report_listing_every_row(leaves, tmp_path):
    (leaves / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    outside = tmp_path / "outside.jpg"
    _img(outside)
    _csv(leaves / "train.csv", "image,label\n"
         "images/0.jpg,acer_rubrum\n"        # line 2: fine
         "images/missing.jpg,acer_rubrum\n"  # line 3: missing file
         "images/corrupt.jpg,quercus_alba\n"  # line 4: unreadable image
         f"../{outside.name},acer_rubrum\n"   # line 5: leaves the folder
         f"{outside},quercus_alba\n"          # line 6: absolute path
         "images/1.jpg,\n"                    # line 7: empty label
         "C:\\data\\x.jpg,acer_rubrum\n"     # line 8: Windows absolute path
         "images/0.jpg,quercus_alba\n")       # line 9: listed twice
    with pytest.raises(DataError) as info:
        load_competition(_competition("leaves_resnet50d.yaml", leaves), check_images=True)
    msg = str(info.value)
    assert msg.startswith("7 problem(s) in competition")
    for expected in ["train.csv line 3: 'images/missing.jpg' not found",
                     "train.csv line 4: 'images/corrupt.jpg' not a readable image",
                     "train.csv line 5: '../outside.jpg' leaves the competition folder",
                     f"train.csv line 6: '{outside}' is an absolute path",
                     "train.csv line 7: empty label",
                     "train.csv line 8: 'C:/data/x.jpg' is an absolute path",
                     "train.csv line 9: 'images/0.jpg' listed twice"]:
        assert expected in msg, expected
    assert "line 2:" not in msg


def test_long_report_is_shortened(leaves):
    _csv(leaves / "train.csv", "image,label\n" + "".join(f"images/x{i}.jpg,a\n" for i in range(25))
         + "images/0.jpg,b\n")
    with pytest.raises(DataError, match=r"25 problem\(s\)[\s\S]*x9\.jpg[\s\S]*\.\.\. and 15 more") as info:
        load_competition(_competition("leaves_resnet50d.yaml", leaves))
    assert "x10.jpg" not in str(info.value)


@pytest.mark.parametrize("config, overrides, message", [
    ("leaves_resnet50d.yaml", ["competition.label_column=species"],
     r"train table .*train.csv has no column 'species'; its columns are \['image', 'label'\]"),
    ("leaves_resnet50d.yaml", ["competition.train_csv=labels.csv"],
     r"labels.csv does not exist; set competition.train_csv"),
    ("leaves_resnet50d.yaml", ["competition.test_csv=tests.csv"],
     r"tests.csv does not exist; set competition.test_csv .* or to null"),
    ("leaves_resnet50d.yaml", ["competition.test_dir=test"], r"test_dir .*test is not a folder"),
    ("leaves_resnet50d.yaml", ["competition.sample_submission=sub.csv"], r"sub.csv does not exist"),
])
def test_missing_files_and_columns(leaves, config, overrides, message):
    with pytest.raises(DataError, match=message):
        load_competition(_competition(config, leaves, *overrides))


def test_unreadable_tables(leaves):
    cfg = _competition("leaves_resnet50d.yaml", leaves)
    (leaves / "train.csv").write_bytes("image,label\nimages/0.jpg,\xe9rable\n".encode("latin-1"))
    with pytest.raises(DataError, match="train.csv is not UTF-8 text"):
        load_competition(cfg)
    (leaves / "train.csv").write_text("")
    with pytest.raises(DataError, match="train.csv is empty"):
        load_competition(cfg)
    _csv(leaves / "train.csv", "image,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_competition(cfg)
    _csv(leaves / "train.csv", "image,label\nimages/0.jpg,a\nimages/1.jpg,a\n")
    with pytest.raises(DataError, match=r"1 class\(es\) \['a'\]; a classifier needs at least two"):
        load_competition(cfg)


def test_test_ids_must_match_sample_submission(leaves):
    _csv(leaves / "sample_submission.csv", "image,label\nimages/4.jpg,a\nimages/9.jpg,a\n")
    with pytest.raises(DataError) as info:
        load_competition(_competition("leaves_resnet50d.yaml", leaves))
    msg = str(info.value)
    assert "1 id(s) of test.csv are not in sample_submission.csv ('images/5.jpg')" in msg
    assert "1 id(s) of sample_submission.csv are not in test.csv ('images/9.jpg')" in msg


def test_check_image_files_names_every_bad_image(tmp_path):
    _img(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    table = pd.DataFrame({"image": ["ok.png", "bad.png", "gone.png"],
                          "path": [str(tmp_path / n) for n in ("ok.png", "bad.png", "gone.png")]})
    with pytest.raises(DataError, match=r"2 problem\(s\) in images:\n  bad.png: not a readable image.*\n"
                                        r"  gone.png: file not found"):
        check_image_files(table)


def test_build_never_replaces_a_users_folder(leaves):
    """A config copied from default.yaml that kept `build: digits` must not delete real data."""
    (leaves / "train.csv").rename(leaves / "labels.csv")
    cfg = _competition("leaves_resnet50d.yaml", leaves, "competition.build=digits")
    with pytest.raises(PipelineError, match="not built by pipeline.data.digits; refusing to replace it"):
        load_competition(cfg)
    assert (leaves / "labels.csv").is_file() and (leaves / "images" / "0.jpg").is_file()


def test_classes_round_trip(tmp_path):
    path = save_classes(["b", "a", "ç"], tmp_path / "run" / "classes.json")
    assert load_classes(path) == ["b", "a", "ç"]
