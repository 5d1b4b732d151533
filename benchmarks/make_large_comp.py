"""A Leaves-shaped competition of N photo-like JPEGs of SIZE px, for measuring at real scale.

    python benchmarks/make_large_comp.py 20000 224                 # -> data/large_20000_224/
    python benchmarks/make_large_comp.py 2000 1024 --root /tmp/big --classes 50 --aspect mixed
    python benchmarks/make_large_comp.py 100000 224 --duplicates 0.01   # plant near duplicates

Each image blends two random crops (scale, position, flips, quarter turns) of the photographs that
installed packages ship (scikit-learn's ``china.jpg`` and ``flower.jpg``, matplotlib's
``grace_hopper.jpg``; scikit-image is not a dependency), tints it with its class's colour plus
random brightness and contrast, adds sensor-like grain and saves it as a quality-90 JPEG: photo
textures that cost what photos cost to decode, all different from each other. Classes differ by
tint and by which photo dominates (learnable, not trivial). Layout of Classify Leaves:
``train.csv`` (image,label), ``test.csv`` (image), ``sample_submission.csv`` and ``images/<i>.jpg``
(80% train, 20% test). ``--duplicates F`` adds F x N near duplicates of random images (resized,
cropped by a few percent, re-encoded at another quality) and lists them in
``<root>_private/planted.json``; ``--aspect mixed`` makes the long side SIZE and the short side
SIZE / (1 to 1.5), in either orientation. Threads over all cores; deterministic for a seed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.detect.shapes import sample_photos  # noqa: E402


def _crop(rng: np.random.Generator, photo: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    h, w = photo.shape[:2]
    aspect = out_hw[1] / out_hw[0]
    ch = int(rng.uniform(0.2, 0.95) * h)
    cw = min(w, max(8, int(ch * aspect)))
    ch = min(h, max(8, int(cw / aspect)))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.ascontiguousarray(crop)
    return cv2.resize(crop, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_CUBIC if ch < out_hw[0] else cv2.INTER_AREA)


def class_tints(classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 7]).uniform(0.6, 1.3, (classes, 3)).astype(np.float32)


def make_image(rng: np.random.Generator, photos: list[np.ndarray], label: int, tint: np.ndarray,
               out_hw: tuple[int, int]) -> np.ndarray:
    main = photos[label % len(photos)]
    other = photos[int(rng.integers(len(photos)))]
    a = _crop(rng, main, out_hw).astype(np.float32)
    b = _crop(rng, other, out_hw).astype(np.float32)
    mix = rng.uniform(0.15, 0.45)
    img = (1 - mix) * a + mix * b
    img = img * tint * rng.uniform(0.75, 1.2) + rng.uniform(-20, 20)
    grain = np.empty(img.shape, np.float32)
    cv2.randn(grain, 0, float(rng.uniform(3, 9)))
    img = np.clip(img + grain, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.rot90(img, int(rng.integers(4)))) if out_hw[0] == out_hw[1] else img


def near_copy(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, dict]:
    """A resized, slightly cropped copy (re-encoded by the caller at another quality)."""
    h, w = img.shape[:2]
    cut = rng.uniform(0.0, 0.05, 4)
    y0, y1 = int(h * cut[0]), h - int(h * cut[1])
    x0, x1 = int(w * cut[2]), w - int(w * cut[3])
    scale = rng.uniform(0.6, 1.0)
    out = cv2.resize(img[y0:y1, x0:x1], (max(16, int((x1 - x0) * scale)), max(16, int((y1 - y0) * scale))),
                     interpolation=cv2.INTER_AREA)
    return out, {"crop": [round(float(c), 3) for c in cut], "scale": round(float(scale), 3)}


def shape_for(rng: np.random.Generator, size: int, aspect: str) -> tuple[int, int]:
    if aspect == "square":
        return size, size
    short = int(round(size / rng.uniform(1.0, 1.5)))
    return (size, short) if rng.random() < 0.5 else (short, size)


def build(root: Path, n: int, size: int, classes: int = 20, seed: int = 0, aspect: str = "square",
          duplicates: float = 0.0, quality: int = 90, workers: int | None = None, force: bool = False) -> Path:
    root = Path(root)
    if root.exists():
        if not force:
            print(f"{root} exists; --force to make it again")
            return root
        shutil.rmtree(root)
        shutil.rmtree(root.parent / f"{root.name}_private", ignore_errors=True)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    photos = sample_photos()
    tints = class_tints(classes, seed)
    labels = np.random.default_rng([seed, 1]).integers(0, classes, n)
    n_dup = int(round(duplicates * n))
    dup_of = np.random.default_rng([seed, 2]).choice(n, size=n_dup, replace=False) if n_dup else np.zeros(0, int)

    def one(i: int) -> dict | None:
        rng = np.random.default_rng([seed, 3, i])
        img = make_image(rng, photos, int(labels[i]), tints[labels[i]], shape_for(rng, size, aspect))
        cv2.imwrite(str(tmp / "images" / f"{i}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, quality])
        return None

    def dup(k: int) -> dict:
        src = int(dup_of[k])
        rng = np.random.default_rng([seed, 4, k])
        img = cv2.imread(str(tmp / "images" / f"{src}.jpg"), cv2.IMREAD_COLOR)
        copy, how = near_copy(rng, img)
        q = int(rng.integers(70, 96))
        cv2.imwrite(str(tmp / "images" / f"{n + k}.jpg"), copy, [cv2.IMWRITE_JPEG_QUALITY, q])
        return {"images": [f"images/{src}.jpg", f"images/{n + k}.jpg"], **how, "quality": q}

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(tqdm(pool.map(one, range(n)), total=n, desc=f"{n} images of {size} px", mininterval=1.0))
        planted = list(tqdm(pool.map(dup, range(n_dup)), total=n_dup, desc="near duplicates", disable=not n_dup))
    names = np.array([f"images/{i}.jpg" for i in range(n + n_dup)])
    all_labels = np.concatenate([labels, labels[dup_of]]).astype(int)
    is_test = np.random.default_rng([seed, 5]).random(n + n_dup) < 0.2
    label_names = np.array([f"class_{c:03d}" for c in range(classes)])
    pd.DataFrame({"image": names[~is_test], "label": label_names[all_labels[~is_test]]}).to_csv(
        tmp / "train.csv", index=False)
    pd.DataFrame({"image": names[is_test]}).to_csv(tmp / "test.csv", index=False)
    pd.DataFrame({"image": names[is_test], "label": label_names[0]}).to_csv(tmp / "sample_submission.csv",
                                                                            index=False)
    private = root.parent / f"{root.name}_private"
    private.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image": names[is_test], "label": label_names[all_labels[is_test]]}).to_csv(
        private / "solution.csv", index=False)
    (private / "planted.json").write_text(json.dumps({"n": n, "size": size, "seed": seed, "classes": classes,
                                                      "near_duplicates": planted}, indent=1))
    tmp.rename(root)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, help="number of images")
    parser.add_argument("size", type=int, help="image side in pixels (the long side with --aspect mixed)")
    parser.add_argument("--root", default=None, help="output folder (default data/large_<N>_<SIZE>)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aspect", choices=["square", "mixed"], default="square")
    parser.add_argument("--duplicates", type=float, default=0.0, help="fraction of N added as near duplicates")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the originals")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: one per core)")
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    root = Path(args.root or f"data/large_{args.n}_{args.size}")
    out = build(root, args.n, args.size, args.classes, args.seed, args.aspect, args.duplicates, args.quality,
                args.workers, args.force)
    print(f"{out}: {args.n} images of {args.size} px in {args.classes} classes"
          f"{f' + {int(round(args.duplicates * args.n))} near duplicates' if args.duplicates else ''}; "
          f"config: --set competition.root={out} --set competition.name={out.name} --set competition.build=null "
          "--set competition.solution=null")


if __name__ == "__main__":
    main()
