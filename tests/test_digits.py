"""The embedded default competition: deterministic, readable, and with its planted duplicates."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.data import load_competition, read_image
from pipeline.data.digits import CLASS_NAMES, IMAGE_SIZE, build_digits, ensure_digits, is_built, private_dir
from pipeline.errors import PipelineError
from pipeline.io import read_json

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def planted(digits_root) -> dict:
    return read_json(private_dir(digits_root) / "planted.json")


def test_a_mistyped_root_is_an_error_not_a_new_demo(tmp_path):
    root = tmp_path / "data" / "digitz"
    cfg = load_config(REPO / "configs" / "default.yaml", [f"competition.root={root}"])
    with pytest.raises(PipelineError, match=f"competition.root {root} is not a folder.*built on first use only in"):
        load_competition(cfg.competition)
    assert not root.exists() and not root.parent.exists()


def test_first_use_builds_the_same_bytes(digits_root, tmp_path, capsys, monkeypatch):
    """A second build (here on first use through the reader, where the default config puts the
    demo) is byte-for-byte the first."""
    import pipeline.data.digits as digits

    root = tmp_path / "data" / "digits"
    monkeypatch.setattr(digits, "default_root", lambda: root)
    cfg = load_config(REPO / "configs" / "default.yaml", [f"competition.root={root}"])
    assert cfg.competition.build == "digits" and not root.exists()
    comp = load_competition(cfg.competition)
    assert "building the embedded default competition" in capsys.readouterr().out
    assert _files(root) == _files(digits_root)
    assert _files(private_dir(root)) == _files(private_dir(digits_root))
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    load_competition(cfg.competition)  # built: not rebuilt
    assert capsys.readouterr().out == ""
    assert comp.classes == sorted(CLASS_NAMES)


def test_tables_and_images(digits_root, planted):
    train = pd.read_csv(digits_root / "train.csv", dtype=str)
    test = pd.read_csv(digits_root / "test.csv", dtype=str)
    sample = pd.read_csv(digits_root / "sample_submission.csv", dtype=str)
    solution = pd.read_csv(private_dir(digits_root) / "solution.csv", dtype=str)
    n_copies = sum(len(planted[k]) for k in ("exact", "near", "conflict", "overlap"))
    assert len(train) + len(test) == 1797 + n_copies  # every bundled digit, plus the planted copies
    assert planted["counts"] == {"train": len(train), "test": len(test)}
    assert list(train.columns) == ["image", "label"] and set(train["label"]) == set(CLASS_NAMES)
    assert sample["image"].tolist() == test["image"].tolist() == solution["image"].tolist()
    assert set(solution["label"]) <= set(CLASS_NAMES)
    assert not set(train["image"]) & set(test["image"])
    img = read_image(digits_root / train["image"].iat[0])
    assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img.dtype == np.uint8
    comp = load_competition(load_config(REPO / "configs" / "default.yaml",
                                        [f"competition.root={digits_root}"]).competition, check_images=True)
    assert len(comp.train) == len(train) and len(comp.test) == len(test)


def test_planted_duplicates(digits_root, planted):
    train = pd.read_csv(digits_root / "train.csv", dtype=str).set_index("image")["label"]
    test = set(pd.read_csv(digits_root / "test.csv", dtype=str)["image"])
    pixels = {name: read_image(digits_root / name).astype(int) for name in list(train.index) + sorted(test)}
    assert len(planted["exact"]) >= 3 and len(planted["near"]) >= 3 and len(planted["overlap"]) >= 2

    for src, copy in planted["exact"]:
        assert src in train.index and copy in train.index and train[src] == train[copy]
        assert np.array_equal(pixels[src], pixels[copy])
    bmp = [copy for _, copy in planted["exact"] if copy.endswith(".bmp")]
    assert bmp and (digits_root / bmp[0]).read_bytes() != (digits_root / planted["exact"][0][0]).read_bytes()

    for src, copy in planted["near"]:
        assert copy.endswith(".jpg") and train[src] == train[copy]
        diff = np.abs(pixels[src] - pixels[copy])
        assert diff.max() > 0  # not an exact copy ...
        assert 2 < diff.mean() < 20  # ... but a small brightness change and JPEG noise
        assert np.corrcoef(pixels[src].ravel(), pixels[copy].ravel())[0, 1] > 0.97

    (conflict,) = planted["conflict"]
    a, b = conflict["images"]
    assert np.array_equal(pixels[a], pixels[b])
    assert [train[a], train[b]] == conflict["labels"] and train[a] != train[b]

    for pair in planted["overlap"]:
        assert pair["test"] in test and pair["train"] in train.index
        assert np.array_equal(pixels[pair["test"]], pixels[pair["train"]])

    # Nothing else is a duplicate: every group of identical pixels is a planted one.
    groups: dict[str, list[str]] = {}
    for name, px in pixels.items():
        groups.setdefault(hashlib.sha1(px.astype(np.uint8).tobytes()).hexdigest(), []).append(name)
    found = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    expected = sorted(sorted(p) for p in planted["exact"] + [conflict["images"]]
                      + [[o["test"], o["train"]] for o in planted["overlap"]])
    assert found == expected


def test_incomplete_build_is_detected_and_foreign_folders_are_kept(digits_copy, tmp_path):
    assert is_built(digits_copy)
    (private_dir(digits_copy) / "solution.csv").unlink()
    assert not is_built(digits_copy)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "labels.csv").write_text("id,breed\n")
    with pytest.raises(PipelineError, match="refusing to replace it"):
        build_digits(user, force=True)
    assert (user / "labels.csv").read_text() == "id,breed\n"
    # A folder with a train.csv of its own is read as it is, never built over.
    (user / "train.csv").write_text("image,label\n")
    assert ensure_digits(user) == user and sorted(p.name for p in user.iterdir()) == ["labels.csv", "train.csv"]


def test_label_noise_flips_are_recorded_and_half_in_the_confused_pair(digits_root, tmp_path):
    root = build_digits(tmp_path / "noisy" / "digits", label_noise=0.03)
    noise = read_json(private_dir(root) / "planted.json")["label_noise"]
    clean = pd.read_csv(digits_root / "train.csv", dtype=str).set_index("image")["label"]
    noisy = pd.read_csv(root / "train.csv", dtype=str).set_index("image")["label"]
    flips = pd.DataFrame(noise["flips"]).set_index("image")
    assert len(flips) == round(0.03 * len(clean))
    changed = noisy[noisy != clean]
    assert set(changed.index) == set(flips.index)  # every flip recorded, nothing else changed
    assert (flips["true"] == clean[flips.index]).all() and (flips["given"] == noisy[flips.index]).all()
    pair = flips[flips["kind"] == "pair"]
    assert len(pair) == len(flips) // 2 and set(pair["true"]) | set(pair["given"]) == set(noise["confused_pair"])
    assert (flips["true"] != flips["given"]).all()
    # The images, test set and solution are those of the clean build.
    for name in ("test.csv", "sample_submission.csv"):
        assert (root / name).read_bytes() == (digits_root / name).read_bytes()
    assert (private_dir(root) / "solution.csv").read_bytes() == (private_dir(digits_root) / "solution.csv").read_bytes()
    # Heavy noise: the pair gets at most a third of its images flipped, the rest of the flips go elsewhere.
    heavy = build_digits(tmp_path / "heavy" / "digits", label_noise=0.3)
    flips = pd.DataFrame(read_json(private_dir(heavy) / "planted.json")["label_noise"]["flips"])
    in_pair = clean.isin(noise["confused_pair"])
    assert len(flips) == round(0.3 * len(clean))
    n_pair = (flips["kind"] == "pair").sum()  # the cap counts the pair's images that may be flipped (no planted copies)
    assert 0.3 * in_pair.sum() < n_pair <= in_pair.sum() / 3 < len(flips) // 2
    given = pd.read_csv(heavy / "train.csv", dtype=str).set_index("image")["label"]
    for name in noise["confused_pair"]:  # the true label is still the majority of each pair class
        assert (given[clean == name] == name).mean() > 0.6
    with pytest.raises(PipelineError, match="label noise 0.03, not 0.0.*--force"):
        build_digits(root)
    with pytest.raises(PipelineError, match="between 0 and"):
        build_digits(tmp_path / "other", label_noise=1.5)


@pytest.mark.slow
def test_train_fraction_keeps_a_stratified_share_and_every_planted_image(tmp_path):
    import json

    import pandas as pd

    from pipeline.data.digits import build_digits, private_dir
    from pipeline.errors import PipelineError

    root = build_digits(tmp_path / "digits_third", train_fraction=0.3)
    train = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    planted = json.loads((private_dir(root) / "planted.json").read_text())
    assert planted["train_fraction"]["kept"] == len(train) < 0.35 * planted["train_fraction"]["of"]
    assert set(train["label"]) == set(pd.read_csv(private_dir(root) / "solution.csv", dtype=str)["label"])
    for pair in planted["exact"] + planted["near"]:
        assert set(pair) <= set(train["image"])
    solution = pd.read_csv(private_dir(root) / "solution.csv")
    assert len(solution) == len(pd.read_csv(root / "test.csv"))  # test and solution unchanged
    with pytest.raises(PipelineError, match="train fraction 0.3"):
        build_digits(root)
