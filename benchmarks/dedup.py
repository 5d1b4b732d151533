"""Benchmark of the dedup stage against imagededup's PHash, on a set with planted duplicates.

Builds its own image set from real images shipped with the dependencies (tiles of the photographs
in scikit-learn and matplotlib, and scikit-learn's handwritten digits as look-alikes: many
different images of one class), plants copies of some of them (exact re-saves, JPEG, resizing,
brightness, contrast, gamma, grayscale, noise, blur, small crops and rotations, and pairs of
these), then prints pairwise precision, recall and seconds of:

- our dedup (``pipeline.dedup.find_duplicates`` with the default config),
- imagededup ``PHash`` at max distance 0, 4 and 10 (``pip install imagededup`` for this only),

and the time of our candidate search over 100,000 random 64-bit hashes.

    python benchmarks/dedup.py [--out /tmp/dedup_bench] [--copies 200] [--seed 0] [--hashes 100000]
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DedupConfig  # noqa: E402
from pipeline.data.digits import _render  # noqa: E402
from pipeline.data.images import read_image  # noqa: E402
from pipeline.dedup import find_duplicates  # noqa: E402
from pipeline.dedup_hash import gray, hamming_pairs  # noqa: E402


def photo_paths() -> list[Path]:
    import matplotlib
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    return [sk / "china.jpg", sk / "flower.jpg",
            Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"]


def originals(rng: np.random.Generator, n_digits: int) -> list[np.ndarray]:
    """Distinct real images: textured photo tiles (no two overlap at one scale) and digits."""
    from sklearn.datasets import load_digits

    images = []
    for photo in map(read_image, photo_paths()):
        h, w = photo.shape[:2]
        for size in (72, 104, 136):
            for y in range(0, h - size + 1, size):
                for x in range(0, w - size + 1, size):
                    tile = photo[y:y + size, x:x + size]
                    if gray(tile).std() > 12:  # skip near-flat sky: no image set is made of those
                        images.append(tile.copy())
    pixels = load_digits().images
    _, first = np.unique(pixels.reshape(len(pixels), -1), axis=0, return_index=True)
    pick = rng.choice(np.sort(first), size=min(n_digits, len(first)), replace=False)
    images += [_render(p) for p in pixels[pick]]
    return images


def _jpeg(im: np.ndarray, q: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _crop(im: np.ndarray, f: float, rng: np.random.Generator) -> np.ndarray:
    """Cut up to ``2 f`` of each side, each side on its own (at least one pixel overall)."""
    h, w = im.shape[:2]
    top, bottom = (round(h * f * rng.uniform(0, 2)) for _ in range(2))
    left, right = (round(w * f * rng.uniform(0, 2)) for _ in range(2))
    if top + bottom + left + right == 0:
        top = 1
    return im[top:h - bottom, left:w - right]


def _rotate(im: np.ndarray, deg: float) -> np.ndarray:
    h, w = im.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
    return cv2.warpAffine(im, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def transforms(rng: np.random.Generator) -> dict:
    u = rng.uniform
    return {
        "jpeg": lambda im: _jpeg(im, int(rng.integers(40, 91))),
        "resize": lambda im: cv2.resize(im, None, fx=(f := u(0.6, 1.5)), fy=f,
                                        interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC),
        "brightness": lambda im: np.clip(im.astype(np.int16) + int(rng.choice([-1, 1]) * rng.integers(8, 31)),
                                         0, 255).astype(np.uint8),
        "contrast": lambda im: np.clip((im.astype(np.float32) - 128) * u(0.8, 1.25) + 128, 0, 255).astype(np.uint8),
        "gamma": lambda im: np.clip(255 * (im / 255.0) ** u(0.8, 1.25), 0, 255).astype(np.uint8),
        "grayscale": lambda im: cv2.cvtColor(gray(im), cv2.COLOR_GRAY2RGB),
        "noise": lambda im: np.clip(im + rng.normal(0, u(3, 7), im.shape), 0, 255).astype(np.uint8),
        "blur": lambda im: cv2.GaussianBlur(im, (0, 0), u(0.5, 0.9)),
        "crop": lambda im: _crop(im, u(0.01, 0.025), rng),
        "rotate": lambda im: _rotate(im, u(-2, 2)),
        "hflip": lambda im: im[:, ::-1].copy(),
    }


def build_set(out: Path, n_copies: int, seed: int, n_digits: int = 700) -> tuple[list[str], dict[str, int], dict]:
    """Write the benchmark images to ``out``; returns their names, the true group and how each copy was made."""
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base = originals(rng, n_digits)
    tf = transforms(rng)
    names, group, made = [], {}, {}

    def save(im: np.ndarray, g: int, ext: str, how: str = "original") -> None:
        name = f"{len(names):05d}{ext}"
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else []
        cv2.imwrite(str(out / name), cv2.cvtColor(im, cv2.COLOR_RGB2BGR), params)
        names.append(name)
        group[name] = g
        made[name] = how

    for g, im in enumerate(base):
        save(im, g, ".png")
    kinds = list(tf) + ["exact"]
    for g in rng.choice(len(base), size=n_copies, replace=False):
        for _ in range(int(rng.choice([1, 2, 4], p=[0.8, 0.15, 0.05]))):  # groups of 2, 3 and 5
            k = str(rng.choice(kinds + ["combo"] * 3))
            if k == "exact":
                save(base[g], int(g), ".bmp", "exact")
                continue
            steps = rng.choice(list(tf), size=2, replace=False) if k == "combo" else [k]
            im = base[g]
            for step in steps:
                im = tf[step](im)
            kind = ("digit " if base[g].shape[0] == 32 else "photo ") + "+".join(steps)
            save(im, int(g), str(rng.choice([".png", ".jpg", ".webp"])), kind)
    return names, group, made


def true_pairs(group: dict[str, int]) -> set[frozenset]:
    by = pd.Series(group).groupby(pd.Series(group).values).groups
    return {frozenset(p) for members in by.values() for p in itertools.combinations(members, 2)}


def score(pred: set[frozenset], truth: set[frozenset]) -> tuple[float, float]:
    tp = len(pred & truth)
    return tp / max(1, len(pred)), tp / max(1, len(truth))


def ours(folder: Path, names: list[str], cfg: DedupConfig) -> set[frozenset]:
    table = pd.DataFrame({"image": names, "path": [str(folder / n) for n in names], "split": "train", "label": "x"})
    out, _ = find_duplicates(table, cfg, progress=False)
    return {frozenset(p) for _, g in out.groupby("group")["image"] for p in itertools.combinations(g, 2)}


def imagededup_phash(folder: Path, distance: int, encodings: dict | None = None) -> tuple[set[frozenset], dict]:
    from imagededup.methods import PHash

    hasher = PHash(verbose=False)
    if encodings is None:
        encodings = hasher.encode_images(image_dir=str(folder))
    dups = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=distance)
    return {frozenset((a, b)) for a, bs in dups.items() for b in bs}, encodings


def search_time(n: int, max_distance: int, workers: int) -> tuple[float, int]:
    h = np.random.default_rng(0).integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + \
        np.random.default_rng(1).integers(0, 2, size=n).astype(np.uint64)
    start = time.perf_counter()
    pairs, _ = hamming_pairs(h, max_distance, workers=workers)
    return time.perf_counter() - start, len(pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/dedup_bench", help="folder for the generated images (replaced)")
    parser.add_argument("--copies", type=int, default=200, help="originals that get planted copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hashes", type=int, default=100_000, help="random hashes for the search timing (0: skip)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dedup config key, e.g. --set min_correlation=0.95")
    args = parser.parse_args(argv)
    cfg = DedupConfig(**{k: float(v) if "." in v else int(v) for k, v in (o.split("=", 1) for o in args.overrides)})

    out = Path(args.out)
    names, group, made = build_set(out, args.copies, args.seed)
    truth = true_pairs(group)
    print(f"benchmark set: {len(names)} images ({len(set(group.values()))} distinct originals), "
          f"{len(truth)} true duplicate pairs, in {out}")
    rows = []
    start = time.perf_counter()
    pred = ours(out, names, cfg)
    rows.append((f"ours (pHash <= {cfg.phash_max_distance} + verify)", *score(pred, truth),
                 time.perf_counter() - start))
    missed = sorted(truth - pred, key=sorted)
    if missed:
        print(f"ours missed {len(missed)} pair(s): " + "; ".join(
            "+".join(made[n] for n in sorted(p) if made[n] != "original") or "copy-copy" for p in missed[:20]))
    wrong = pred - truth
    if wrong:
        print(f"ours merged {len(wrong)} distinct pair(s): " + "; ".join(" / ".join(sorted(p)) for p in list(wrong)[:10]))
    try:
        encodings = None
        for d in (0, 4, 10):
            start = time.perf_counter()
            pred_i, encodings = imagededup_phash(out, d, encodings)
            took = time.perf_counter() - start
            rows.append((f"imagededup PHash distance {d}", *score(pred_i, truth), took))
    except ImportError:
        print("imagededup is not installed: `pip install imagededup` to compare (benchmark only)")
    print(f"\n{'method':36s} {'precision':>9s} {'recall':>7s} {'seconds':>8s}")
    for name, p, r, s in rows:
        print(f"{name:36s} {p:9.3f} {r:7.3f} {s:8.2f}")
    print("(imagededup's first row includes encoding all images; the others reuse the encodings)")
    if args.hashes:
        took, found = search_time(args.hashes, cfg.phash_max_distance, workers=1)
        print(f"\ncandidate search, {args.hashes:,} random 64-bit hashes, distance <= {cfg.phash_max_distance}: "
              f"{took:.1f}s ({found} pairs)")


if __name__ == "__main__":
    main()
