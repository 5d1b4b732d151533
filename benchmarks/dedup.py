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

At scale (``benchmarks/make_large_comp.py`` sets with 1% planted near duplicates: resized,
cropped by up to 5% a side, re-encoded at quality 70-95), each in a child process so that its
peak RAM is its own: the whole stage's time per step, peak RAM and how many planted pairs it
grouped; and the candidate search alone, FAISS's binary index against our numpy search:

    python benchmarks/dedup.py --scale 20000 100000 [--px 224] [--workers 2]
    python benchmarks/dedup.py --scale 20000 --replicate 5   # 100k: 20k decoded, the later steps on 5x
    python benchmarks/dedup.py --search 100000 1000000
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


def random_hashes(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + \
        np.random.default_rng(1).integers(0, 2, size=n).astype(np.uint64)


def search_time(n: int, max_distance: int, workers: int) -> tuple[float, int]:
    h = random_hashes(n)
    start = time.perf_counter()
    pairs, _ = hamming_pairs(h, max_distance, workers=workers)
    return time.perf_counter() - start, len(pairs)


# ------------------------------------------------------------------------------------ at scale
def replicate(fp, table: pd.DataFrame, k: int):
    """``k`` times the images, as fingerprints: copy c turns every thumbnail by a quarter turn (and
    from the fifth copy on shifts it by half its side) and XORs every
    pHash with one random mask (distances within a copy kept, across copies random). Planted
    duplicates stay duplicates inside each copy. For timing the steps after decoding at sizes that
    cannot be generated in time; decoding scales linearly."""
    from pipeline.dedup_hash import Fingerprints

    n, v, d = fp.thumb.shape
    side = int(round(d ** 0.5))
    grid = fp.thumb.reshape(n, v, side, side)
    def op(g: np.ndarray, c: int) -> np.ndarray:
        # quarter turns (no two related by the horizontal flip the stage already matches), then
        # half-side cyclic shifts for more copies
        g = np.rot90(g, c % 4, (2, 3))
        return np.roll(g, (side // 2, side // 2), (2, 3)) if (c // 4) % 2 else g

    masks = np.random.default_rng(7).integers(0, 2**63, k, dtype=np.int64).astype(np.uint64)
    masks[0] = 0
    out = Fingerprints(
        pixel_hash=[f"{h}#{c}" for c in range(k) for h in fp.pixel_hash],
        phash=np.concatenate([fp.phash ^ masks[c] for c in range(k)]),
        thumb=np.ascontiguousarray(np.concatenate([op(grid, c).reshape(n, v, d) for c in range(k)])),
        level=np.tile(fp.level, (k, 1)), shape=np.tile(fp.shape, (k, 1)), errors=list(fp.errors) * k)
    tables = [table.assign(image=[f"{i}#{c}" if c else i for i in table["image"]]) for c in range(k)]
    return out, pd.concat(tables, ignore_index=True)


def stage_at_scale(root: Path, workers: int, copies: int = 1) -> dict:
    """The whole dedup stage (decode, hash, search, verify, groups) on a generated competition, with
    the recall of its planted near duplicates. Run in a child process so its peak RAM is its own.
    With ``copies`` > 1, the steps after decoding run on that many times the images (:func:`replicate`)."""
    import json
    import resource

    from pipeline.config import CompetitionConfig
    from pipeline.data.competition import load_competition
    from pipeline.dedup_hash import alignment_crops, fingerprint_images

    comp = load_competition(CompetitionConfig(root=str(root), name=root.name, build=None, solution=None))
    table = comp.all_images()
    cfg = DedupConfig(workers=workers)
    planted = json.loads((root.parent / f"{root.name}_private" / "planted.json").read_text())["near_duplicates"]
    pairs = [p["images"] for p in planted]
    start = time.perf_counter()
    fp = fingerprint_images(table["path"].tolist(), cfg.thumb_size, workers=workers, progress=False,
                            crops=alignment_crops(cfg.align_crops, cfg.align_side), mirror=cfg.mirror)
    decode = time.perf_counter() - start
    if copies > 1:
        fp, table = replicate(fp, table, copies)
        pairs = [[f"{a}#{c}" if c else a, f"{b}#{c}" if c else b] for c in range(copies) for a, b in pairs]
    start = time.perf_counter()
    out, report = find_duplicates(table, cfg, progress=False, fingerprints=fp)
    took = time.perf_counter() - start
    group = dict(zip(out["image"], out["group"]))
    found = sum(group[a] == group[b] for a, b in pairs)
    timing = {**report["timing_s"], "hash": round(decode, 1)}
    return {"images": len(table), "seconds": round(decode + took, 1), "timing_s": timing, "copies": copies,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "planted_pairs": len(pairs), "planted_found": found,
            "groups": report["counts"]["groups"], "images_in_groups": report["counts"]["images_in_groups"],
            "candidate_pairs": report["counts"]["candidate_pairs"]}


def at_scale(sizes: list[int], data: Path, px: int, workers: int, copies: int = 1) -> None:
    import json
    import os
    import subprocess

    from benchmarks.make_large_comp import build

    for n in sizes:
        start = time.perf_counter()
        root = build(data / f"dedup_{n}_{px}", n, px, classes=50, duplicates=0.01, aspect="mixed")
        made = time.perf_counter() - start
        load = os.getloadavg()
        res = subprocess.run([sys.executable, __file__, "--stage", str(root), "--workers", str(workers),
                              "--replicate", str(copies)], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        t = r["timing_s"]
        how = f" ({n:,} decoded, then {copies} turned copies of their fingerprints)" if copies > 1 else ""
        print(f"{r['images']:,} images of {px} px{how} ({made:.0f}s to generate): whole stage {r['seconds']:.0f}s "
              f"(decode+hash {t['hash']:.0f}s, search {t['search']:.0f}s, verify {t['verify']:.0f}s), "
              f"peak RAM {r['peak_rss_mb']:,} MB; planted near duplicates found {r['planted_found']}/"
              f"{r['planted_pairs']}; {r['groups']} groups, {r['candidate_pairs']:,} candidate pairs; "
              f"load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after")


def search_compare(sizes: list[int], max_distance: int, workers: int) -> None:
    """The candidate search at each size: FAISS's binary index against our numpy search."""
    import os

    from pipeline.dedup_hash import faiss_available

    for n in sizes:
        h = random_hashes(n)
        row = []
        for backend in ("faiss", "numpy"):
            if backend == "faiss" and not faiss_available():
                continue
            if backend == "numpy" and n > 200_000:
                row.append("numpy: skipped (quadratic: about (n / 100k)^2 x its 100k time)")
                continue
            start = time.perf_counter()
            pairs, _ = hamming_pairs(h, max_distance, workers=workers, backend=backend)
            row.append(f"{backend} {time.perf_counter() - start:.1f}s ({len(pairs)} pairs)")
        print(f"candidate search, {n:,} random hashes, distance <= {max_distance}, {workers} thread(s): "
              f"{'; '.join(row)}; load average {os.getloadavg()[0]:.1f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/dedup_bench", help="folder for the generated images (replaced)")
    parser.add_argument("--copies", type=int, default=200, help="originals that get planted copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hashes", type=int, default=100_000, help="random hashes for the search timing (0: skip)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dedup config key, e.g. --set min_correlation=0.95")
    parser.add_argument("--scale", type=int, nargs="+", default=None, metavar="N",
                        help="instead: the whole stage on N generated photos each (e.g. 20000 100000)")
    parser.add_argument("--search", type=int, nargs="+", default=None, metavar="N",
                        help="instead: the candidate search over N random hashes, FAISS vs numpy (e.g. 100000 1000000)")
    parser.add_argument("--px", type=int, default=224, help="--scale: long side of the generated photos")
    parser.add_argument("--data", default="data/bench", help="--scale: where the generated sets are kept")
    parser.add_argument("--workers", type=int, default=2, help="--scale/--search: threads")
    parser.add_argument("--replicate", dest="replicas", type=int, default=1,
                        help="--scale: run the steps after decoding on this many turned copies of the fingerprints")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # the child process of --scale
    args = parser.parse_args(argv)
    if args.stage:
        import json

        print(json.dumps(stage_at_scale(Path(args.stage), args.workers, args.replicas)))
        return
    if args.search:
        search_compare(args.search, DedupConfig().phash_max_distance, args.workers)
        return
    if args.scale:
        at_scale(args.scale, Path(args.data), args.px, args.workers, args.replicas)
        return
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
