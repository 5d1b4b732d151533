"""The resized-image cache (``pipeline.prepare``) and the stages that read it."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from digits_helpers import cut_digits, tiny_run_config
from PIL import Image

from pipeline import paths
from pipeline.config import load_config
from pipeline.data.cache import image_reader, preprocess, read_preprocessed, resize_short_side
from pipeline.data.images import read_image
from pipeline.errors import PipelineError
from pipeline.prepare import build_cache, cache_is_current, ensure_cache, main

REPO = Path(__file__).resolve().parents[1]
# (height, width) of the originals; the last one is stored landscape with EXIF "rotate 90" (orientation 6).
SHAPES = [(60, 40), (40, 90), (33, 33), (20, 30), (45, 70)]


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def odd_comp(tmp_path) -> Path:
    """A tiny competition of photos of differing aspect ratios, one JPEG carrying an EXIF rotation."""
    root = tmp_path / "odd"
    (root / "images").mkdir(parents=True)
    names = []
    for k, (h, w) in enumerate(SHAPES):
        name = f"images/{k}.png" if k < len(SHAPES) - 1 else f"images/{k}.jpg"
        img = Image.fromarray(_photo(h, w, k))
        if name.endswith(".jpg"):
            exif = Image.Exif()
            exif[0x0112] = 6  # stored sideways: viewers turn it 90 degrees clockwise
            img.save(root / name, quality=95, exif=exif)
        else:
            img.save(root / name)
        names.append(name)
    pd.DataFrame({"image": names[:3], "label": ["a", "b", "a"]}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"image": names[3:]}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"image": names[3:], "label": "a"}).to_csv(root / "sample_submission.csv", index=False)
    return root


def _cfg(tmp_path, root, *overrides):
    return load_config(REPO / "configs" / "default.yaml", [
        f"paths.work={tmp_path / 'work'}", f"paths.runs={tmp_path / 'runs'}",
        f"paths.submissions={tmp_path / 'submissions'}", f"competition.root={root}", "competition.name=odd",
        "competition.build=null", "competition.solution=null", "wandb.mode=disabled", "cache.workers=2",
        *overrides])


def test_resize_keeps_aspect_and_never_enlarges():
    img = np.zeros((300, 500, 3), np.uint8)
    assert resize_short_side(img, 100).shape == (100, 167, 3)
    assert resize_short_side(img.transpose(1, 0, 2), 100).shape == (167, 100, 3)
    assert resize_short_side(img, 300) is img and resize_short_side(img, 400) is img


@pytest.mark.parametrize("fmt", ["jpeg", "png", "memmap"])
def test_cache_holds_every_image_resized_as_preprocess_says(tmp_path, odd_comp, fmt):
    cfg = _cfg(tmp_path, odd_comp, "cache.size=30", f"cache.format={fmt}")
    info = build_cache(cfg, progress=False)
    assert info.folder == paths.work_dir(cfg) / "cache_30" and len(info.index) == len(SHAPES)
    reader = image_reader(cfg, odd_comp)
    for k, (h, w) in enumerate(SHAPES):
        orig = odd_comp / f"images/{k}.{'jpg' if k == len(SHAPES) - 1 else 'png'}"
        got = reader(orig)
        original = read_image(orig)  # EXIF applied: the last one comes out portrait
        if k == len(SHAPES) - 1:
            assert original.shape[:2] == (w, h)
        oh, ow = original.shape[:2]
        short = min(oh, ow)
        expect = (oh, ow) if short <= 30 else (round(oh * 30 / short), round(ow * 30 / short))
        assert got.shape == (*expect, 3), (k, got.shape, expect)
        # Bit-identical to the function an inference notebook applies to the original file.
        np.testing.assert_array_equal(got, read_preprocessed(orig, cfg.cache, cfg.train))
        if fmt != "jpeg":
            np.testing.assert_array_equal(got, resize_short_side(original, 30))
        else:
            assert np.abs(got.astype(int) - resize_short_side(original, 30)).mean() < 8  # q95 on noisy pixels
    # relative paths (as train builds them) find the same entries
    np.testing.assert_array_equal(image_reader(cfg, Path(os.path.relpath(odd_comp)))(
        Path(os.path.relpath(odd_comp)) / "images/0.png"), reader(odd_comp / "images/0.png"))


def test_cache_is_remade_only_when_sources_or_settings_change(tmp_path, odd_comp, capsys):
    cfg = _cfg(tmp_path, odd_comp, "cache.size=30", "cache.format=png")
    ensure_cache(cfg, quiet=True)
    meta = paths.cache_dir(cfg, 30) / "cache.json"
    stamp = meta.stat().st_mtime_ns
    assert cache_is_current(cfg)
    ensure_cache(cfg, quiet=True)
    main(["--set", f"paths.work={tmp_path / 'work'}", "--set", f"competition.root={odd_comp}", "--set",
          "competition.name=odd", "--set", "competition.build=null", "--set", "cache.size=30", "--set",
          "cache.format=png"])
    assert meta.stat().st_mtime_ns == stamp and "up to date" in capsys.readouterr().out
    # cache.workers does not change the pixels
    assert cache_is_current(_cfg(tmp_path, odd_comp, "cache.size=30", "cache.format=png", "cache.workers=1"))
    # another format, another quality, or a changed image: made again
    assert not cache_is_current(_cfg(tmp_path, odd_comp, "cache.size=30", "cache.format=jpeg"))
    new = _photo(50, 50, 99)
    cv2.imwrite(str(odd_comp / "images/0.png"), new)
    assert not cache_is_current(cfg)
    ensure_cache(cfg, quiet=True)
    assert "made from other images or settings" in capsys.readouterr().out
    np.testing.assert_array_equal(image_reader(cfg, odd_comp)(odd_comp / "images/0.png"),
                                  resize_short_side(new[:, :, ::-1], 30))
    assert not (paths.cache_dir(cfg, 30).parent / "cache_30.partial").exists()


def test_builders_at_once_make_the_cache_once(tmp_path, odd_comp, monkeypatch):
    """Two fold jobs that need the same missing cache at once (two terminals, a Slurm array): one
    builds it while the other waits on the lock, then finds it current and uses it. Without the lock
    both would build into the same side folder and one would delete the other's files."""
    import threading

    import pipeline.prepare as prep

    cfg = _cfg(tmp_path, odd_comp, "cache.size=30", "cache.format=png")
    builds, inside = [], threading.Event()
    real = prep.build_cache

    def slow_build(*args, **kwargs):
        builds.append(threading.get_ident())
        inside.set()
        threading.Event().wait(0.3)  # long enough for the second job to arrive and wait
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "build_cache", slow_build)
    got, errors = [], []

    def job():
        try:
            got.append(prep.ensure_cache(cfg, quiet=True).folder)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    first = threading.Thread(target=job)
    first.start()
    inside.wait(5)
    second = threading.Thread(target=job)
    second.start()
    first.join(30)
    second.join(30)
    assert errors == [] and len(builds) == 1
    assert got == [paths.cache_dir(cfg, 30)] * 2 and cache_is_current(cfg)


def test_unreadable_images_are_named_and_no_cache_is_left(tmp_path, odd_comp):
    (odd_comp / "images/1.png").write_bytes(b"not an image")
    cfg = _cfg(tmp_path, odd_comp, "cache.size=30")
    with pytest.raises(PipelineError, match=r"images/1.png"):
        build_cache(cfg, progress=False)
    assert not paths.cache_dir(cfg, 30).exists()
    assert not (paths.work_dir(cfg) / "cache_30.partial").exists()


def test_auto_size_and_cache_off():
    cfg = load_config(REPO / "configs" / "default.yaml", ["cache.size=auto", "train.img_size=224"])
    from pipeline.data.cache import resolve_size

    assert resolve_size(cfg.cache, cfg.train) == 258
    off = load_config(REPO / "configs" / "default.yaml", [])
    assert resolve_size(off.cache, off.train) is None and image_reader(off, ".") is read_image
    img = np.zeros((40, 60, 3), np.uint8)
    assert preprocess(img, off.cache, off.train) is img


# ------------------------------------------------------------------ pipeline.run reads the cache
N_TRAIN, N_TEST = 120, 30


@pytest.fixture(scope="module")
def small_digits(digits_root, tmp_path_factory):
    return cut_digits(digits_root, tmp_path_factory.mktemp("cache_run") / "digits", N_TRAIN, N_TEST)


def _tiny(root, experiment, *extra):
    return tiny_run_config(root, root.parent / "out", f"experiment={experiment}", "cache.workers=1", *extra)


def _fold_outputs(cfg, name):
    return [pd.read_csv(paths.fold_dir(cfg, k) / name) for k in (0, 1)]


def test_run_trains_and_predicts_from_the_cache_alone(small_digits, capsys):
    from pipeline.run import run_all

    plain = _tiny(small_digits, "plain")
    run_all(plain)
    dedup_plain = pd.read_csv(paths.dedup_csv(plain))
    cached = _tiny(small_digits, "cached", "cache.size=32", "cache.format=png")
    ensure_cache(cached, quiet=True)
    # Spoil every original but keep its size and modification time (the cache's fingerprint): the
    # cached experiment must dedup, train and predict without decoding a single original.
    for path in (small_digits / "images").iterdir():
        st = path.stat()
        path.write_bytes(b"\0" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Exception):  # noqa: B017 - any decoding error proves the originals are spoilt
        read_image(next((small_digits / "images").iterdir()))
    summary = run_all(cached)
    out = capsys.readouterr().out
    assert summary.trained == [0, 1] and "cache_32 (png)" in out
    # dedup ran again (its source changed) from the cache: exact hashes of the originals, same groups
    pd.testing.assert_frame_equal(dedup_plain, pd.read_csv(paths.dedup_csv(cached)))
    # A lossless cache of images no larger than cache.size holds the original pixels: same OOF, same test
    for name in ("oof.csv", "test.csv"):
        for a, b in zip(_fold_outputs(plain, name), _fold_outputs(cached, name)):
            pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("fmt", ["jpeg", "memmap"])
def test_infer_sees_the_pixels_training_read_from_the_cache(tmp_path, odd_comp, fmt):
    # A package's inference reads raw hidden-test images: its transform must give the tensor the eval
    # transform gives on the cached image (for a jpeg cache that includes the re-encode, not only the resize).
    import pickle

    from pipeline.data.transforms import eval_transform
    from pipeline.infer import cache_size, member_transform

    cfg = _cfg(tmp_path, odd_comp, "cache.size=30", f"cache.format={fmt}", "train.img_size=24")
    build_cache(cfg, progress=False)
    reader = image_reader(cfg, odd_comp)
    assert cache_size(cfg) == 30
    tf = pickle.loads(pickle.dumps(member_transform(cfg)))  # DataLoader workers get a pickled copy
    plain = eval_transform(cfg.train.img_size, cfg.train.augment)
    for k in range(len(SHAPES)):
        orig = odd_comp / f"images/{k}.{'jpg' if k == len(SHAPES) - 1 else 'png'}"
        np.testing.assert_array_equal(tf(image=read_image(orig))["image"].numpy(),
                                      plain(image=reader(orig))["image"].numpy())
