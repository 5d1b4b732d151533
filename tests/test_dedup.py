"""Dedup: planted duplicates of the default found and nothing else, near copies of real photos,
look-alikes kept apart, chaining, flat images, corrupt files, staleness, the Hamming search."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from digits_helpers import cut_digits

from pipeline import paths
from pipeline.config import DedupConfig
from pipeline.data.competition import DataError
from pipeline.dedup import dedup_is_current, ensure_dedup, find_duplicates, main, run_dedup
from pipeline.dedup_hash import hamming_pairs

REPO = Path(__file__).resolve().parents[1]


def _groups(out: pd.DataFrame) -> set[frozenset]:
    sizes = out.groupby("group")["image"].transform("size")
    return {frozenset(g) for _, g in out[sizes > 1].groupby("group")["image"]}


def test_default_finds_every_planted_duplicate_and_nothing_else(digits_dedup, digits_root):
    cfg, out, report = digits_dedup
    planted = json.loads((digits_root.parent / "digits_private" / "planted.json").read_text())
    expected = {frozenset(p) for p in planted["exact"] + planted["near"]}
    expected |= {frozenset(c["images"]) for c in planted["conflict"]}
    expected |= {frozenset((o["test"], o["train"])) for o in planted["overlap"]}
    assert _groups(out) == expected

    # The BMP copy has other bytes but the same pixels: an exact duplicate.
    bmp = next(p for p in planted["exact"] if p[1].endswith(".bmp"))
    rows = out.set_index("image").loc[bmp]
    assert rows["exact_group"].nunique() == 1
    near = planted["near"][0]
    rows = out.set_index("image").loc[near]
    assert rows["near_group"].nunique() == 1 and rows["exact_group"].nunique() == 2

    conflict = set(planted["conflict"][0]["images"])
    assert set(out.loc[out["conflict"], "image"]) == conflict
    assert [set(g["images"]) for g in report["conflicts"]] == [conflict]
    assert sorted(report["conflicts"][0]["train_labels"]) == sorted(planted["conflict"][0]["labels"])

    overlaps = {frozenset(g["images"]) for g in report["overlaps"]}
    assert overlaps == {frozenset((o["test"], o["train"])) for o in planted["overlap"]}
    c = report["counts"]
    assert (c["groups"], c["conflict_groups"], c["overlap_groups"], c["test_images_also_in_train"]) == (12, 1, 3, 3)
    assert c["images"] == len(out) and set(out["split"]) == {"train", "test"}


def test_outputs_follow_the_contract(digits_dedup):
    cfg, out, report = digits_dedup
    written = pd.read_csv(paths.dedup_csv(cfg))
    assert list(written.columns[:6]) == ["image", "split", "group", "exact_group", "near_group", "conflict"]
    assert written["conflict"].dtype == bool and len(written) == len(out)
    for key in ("counts", "groups", "conflicts", "overlaps", "chained", "settings", "timing_s", "input_fingerprint"):
        assert key in report
    assert report["settings"]["min_correlation"] == cfg.dedup.min_correlation
    sheet = paths.work_dir(cfg) / report["contact_sheet"]
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[0] > 200


def _tiles(n: int) -> list[np.ndarray]:
    import sklearn

    photo = cv2.cvtColor(cv2.imread(str(Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg")),
                         cv2.COLOR_BGR2RGB)
    tiles = []
    for y in range(0, photo.shape[0] - 96, 96):
        for x in range(0, photo.shape[1] - 96, 96):
            t = photo[y:y + 96, x:x + 96]
            if cv2.cvtColor(t, cv2.COLOR_RGB2GRAY).std() > 15:
                tiles.append(t.copy())
    return tiles[:n]


def _table(folder: Path, images: dict[str, np.ndarray], test: set[str] = frozenset()) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in images.items():
        params = [cv2.IMWRITE_JPEG_QUALITY, 60] if name.endswith(".jpg") else []
        assert cv2.imwrite(str(folder / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    names = list(images)
    return pd.DataFrame({"image": names, "path": [str(folder / n) for n in names],
                         "split": ["test" if n in test else "train" for n in names], "label": "a"})


def test_near_copies_of_photos_found_distinct_tiles_kept_apart(tmp_path):
    tiles = _tiles(12)
    images = {f"t{i}.png": t for i, t in enumerate(tiles)}
    a, b, c, d = tiles[:4]
    images["a_copy.bmp"] = a  # exact
    images["b_resized.jpg"] = cv2.resize(b, (70, 70), interpolation=cv2.INTER_AREA)  # resized + JPEG q60
    images["c_bright.png"] = np.clip(c.astype(int) + 25, 0, 255).astype(np.uint8)  # brighter
    images["d_crop.png"] = d[3:94, 2:95]  # a small crop
    images["e_mirror.png"] = tiles[4][:, ::-1]  # flipped left-right
    out, report = find_duplicates(_table(tmp_path, images), DedupConfig(workers=1), progress=False)
    assert _groups(out) == {frozenset(p) for p in [("t0.png", "a_copy.bmp"), ("t1.png", "b_resized.jpg"),
                                                   ("t2.png", "c_bright.png"), ("t3.png", "d_crop.png"),
                                                   ("t4.png", "e_mirror.png")]}
    assert report["counts"]["exact_pairs"] == 1


def test_chained_group_is_reported(tmp_path):
    a, b = _tiles(2)
    # A cross-fade from a to b: each step close to the next, the ends unrelated.
    steps = {f"s{i}.png": np.round((1 - w) * a + w * b).astype(np.uint8) for i, w in enumerate(np.linspace(0, 1, 9))}
    cfg = DedupConfig(phash_max_distance=64, sure_correlation=0.9, min_correlation=0.9, workers=1)
    out, report = find_duplicates(_table(tmp_path, steps), cfg, progress=False)
    assert report["chained"], "a chain a~b~c with a !~ c must be reported"
    group = next(g for g in report["groups"] if g["group"] in report["chained"])
    assert group["chained"]["min_correlation"] < 0.9 and len(group["chained"]["images"]) == 2


def test_flat_images(tmp_path):
    tiles = _tiles(3)
    images = {f"t{i}.png": t for i, t in enumerate(tiles)}
    images |= {"white.png": np.full((40, 40, 3), 250, np.uint8), "white2.jpg": np.full((50, 50, 3), 246, np.uint8),
               "black.png": np.full((40, 40, 3), 5, np.uint8)}
    out, _ = find_duplicates(_table(tmp_path, images), DedupConfig(workers=1), progress=False)
    assert _groups(out) == {frozenset(("white.png", "white2.jpg"))}


def test_corrupt_image_is_named(make_cfg, digits_copy):
    bad = digits_copy / "images" / "5.png"
    bad.write_bytes(b"this is not a png")
    cfg = make_cfg(root=digits_copy)
    with pytest.raises(DataError, match=r"images/5\.png"):
        run_dedup(cfg, quiet=True)


def test_cli_summary_and_staleness(digits_dedup, capsys, tmp_path):
    cfg, _, _ = digits_dedup
    assert dedup_is_current(cfg)
    ensure_dedup(cfg)
    assert "running dedup now" not in capsys.readouterr().out
    stricter = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"min_correlation": 0.96})})
    assert not dedup_is_current(stricter)
    small = cut_digits(Path(cfg.competition.root), tmp_path / "data" / "digits", 300, 100)  # the CLI's wiring only
    args = ["--set", f"paths.work={tmp_path}", "--set", f"competition.root={small}", "--set", "dedup.workers=1"]
    main(args)
    out = capsys.readouterr().out
    assert "duplicate groups" in out and "conflict" in out and "overlap" in out
    assert (tmp_path / cfg.competition.slug / "dedup.csv").is_file()


def test_hamming_search_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, size=(300, 3)).astype(np.uint64)
    near = base ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]  # within 3 bits of its base
    h = np.concatenate([base, near])
    pairs, dist = hamming_pairs(h, 6, rows=37, cols=64, workers=2)  # many small, odd blocks
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    i, j = np.nonzero(np.triu(d <= 6, 1))
    assert {tuple(p) for p in pairs.tolist()} == set(zip(i.tolist(), j.tolist()))
    assert (dist == d[pairs[:, 0], pairs[:, 1]]).all()
    assert {(k, k + 300) for k in range(300)} <= {tuple(p) for p in pairs.tolist()}


@pytest.mark.slow
def test_search_of_100k_hashes_is_fast():
    import time

    h = np.random.default_rng(0).integers(0, 2**63, size=100_000, dtype=np.int64).astype(np.uint64)
    start = time.perf_counter()
    hamming_pairs(h, 14, workers=os.cpu_count() or 1)
    assert time.perf_counter() - start < 60
