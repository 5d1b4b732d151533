"""The embedded default competition, built from scikit-learn's bundled handwritten digits.

Written in the Classify Leaves layout::

    data/digits/                   train.csv (image,label), test.csv (image),
                                   sample_submission.csv (image,label), images/*.png|jpg|bmp
    data/digits_private/           solution.csv (image,label) and planted.json, kept outside the
                                   competition folder so the demo can score its own submission

Planted on purpose, and recorded in ``planted.json``, so the dedup stage has something real to
find: exact duplicates (one saved as BMP: same pixels, other bytes), near duplicates (re-encoded
JPEG, brightness shifted), one duplicate with a conflicting label, and test images also in train.

Run ``python -m pipeline.data.digits [--root data/digits] [--force]`` to build it by hand.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 32
TEST_FRACTION = 0.2
N_EXACT = 4
N_NEAR = 4
N_OVERLAP = 3


def private_dir(root: str | Path) -> Path:
    root = Path(root)
    return root.parent / f"{root.name}_private"


def _render(pixels8x8: np.ndarray) -> np.ndarray:
    """8x8 values 0..16 -> 32x32 RGB uint8 (dark ink on a light, slightly warm paper)."""
    ink = pixels8x8.astype(np.float32) / 16.0
    big = cv2.resize(ink, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    paper = np.array([250, 245, 235], np.float32)
    pen = np.array([20, 30, 90], np.float32)
    rgb = paper[None, None, :] * (1 - big[..., None]) + pen[None, None, :] * big[..., None]
    return np.round(rgb).astype(np.uint8)


def _write(path: Path, rgb: np.ndarray, **params) -> None:
    flags = []
    if path.suffix == ".jpg":
        flags = [cv2.IMWRITE_JPEG_QUALITY, params.get("quality", 92)]
    # imencode + write_bytes rather than imwrite: imwrite cannot write non-ASCII paths on Windows.
    ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), flags)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def is_built(root: str | Path) -> bool:
    """True when ``root`` holds a complete build (competition folder and private folder)."""
    root, private = Path(root), private_dir(root)
    return all(p.is_file() for p in (root / "train.csv", private / "solution.csv", private / "planted.json"))


def _is_ours(folder: Path, root: Path) -> bool:
    # Only a folder this module wrote (its private planted.json exists) or an empty one may be
    # replaced: a user's competition folder must never be deleted because a config kept build: digits.
    if not folder.exists():
        return True
    if folder.is_dir() and not any(folder.iterdir()):
        return True
    return (private_dir(root) / "planted.json").is_file()


def ensure_digits(root: str | Path = "data/digits", seed: int = 0) -> Path:
    """Build the competition at ``root`` unless a complete build is there (first use)."""
    root = Path(root)
    if is_built(root):
        return root
    if (root / "train.csv").is_file() and not (private_dir(root) / "planted.json").is_file():
        return root  # someone else's competition under a config that kept build: digits; read it as is
    print(f"building the embedded default competition in {root} (first use)")
    return build_digits(root, seed=seed)


def build_digits(root: str | Path = "data/digits", seed: int = 0, force: bool = False) -> Path:
    """Build the competition folder at ``root`` (deterministic for a given ``seed``).

    An existing complete build is kept unless ``force``. The files are written to a temporary
    folder and moved into place at the end, so a killed build leaves nothing half-written and
    two processes building at once (e.g. DDP ranks) both end with the same complete folder.

    Raises:
        PipelineError: ``root`` (or its private folder) exists and was not made by this module.
    """
    root = Path(root)
    private = private_dir(root)
    if is_built(root) and not force:
        return root
    for d in (root, private):
        if not _is_ours(d, root):
            raise PipelineError(
                f"{d} exists and was not built by pipeline.data.digits; refusing to replace it. If it is "
                "your competition, remove 'competition.build: digits' from your config; otherwise move it away."
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        _write_competition(tmp / "competition", tmp / "private", seed)
        if is_built(root) and not force:
            return root  # another process finished the same deterministic build meanwhile
        for d in (private, root):
            if d.exists():
                shutil.rmtree(d)
        # The private folder first: a complete competition folder means a complete build.
        for src, dst in ((tmp / "private", private), (tmp / "competition", root)):
            try:
                src.rename(dst)
            except OSError:
                if not dst.is_dir():
                    raise
                # Another process finished the same deterministic build first; keep its files.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_competition(out: Path, private: Path, seed: int) -> None:
    from sklearn.datasets import load_digits

    (out / "images").mkdir(parents=True)
    private.mkdir(parents=True)
    digits = load_digits()
    pixels, target = digits.images, digits.target
    # Guard against exact repeats in the raw set (none in current scikit-learn): every duplicate
    # the dedup stage finds must be a planted one.
    _, first = np.unique(pixels.reshape(len(pixels), -1), axis=0, return_index=True)
    keep = np.sort(first)
    pixels, target = pixels[keep], target[keep]

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pixels))
    n_test = int(round(len(order) * TEST_FRACTION))
    test_idx, train_idx = order[:n_test], order[n_test:]

    rows_train, rows_test, solution = [], [], []
    images: dict[str, np.ndarray] = {}
    name_of: dict[int, str] = {}
    for counter, i in enumerate(np.concatenate([train_idx, test_idx])):
        name = f"images/{counter}.png"
        name_of[int(i)] = name
        images[name] = _render(pixels[i])
        _write(out / name, images[name])
    for i in train_idx:
        rows_train.append((name_of[int(i)], CLASS_NAMES[target[i]]))
    for i in test_idx:
        rows_test.append(name_of[int(i)])
        solution.append((name_of[int(i)], CLASS_NAMES[target[i]]))

    next_id = len(images)
    planted = {"exact": [], "near": [], "conflict": [], "overlap": []}
    chosen = rng.choice(train_idx, size=N_EXACT + N_NEAR + 1, replace=False)

    def add_copy(rgb: np.ndarray, suffix: str, label: str, **params) -> str:
        nonlocal next_id
        name = f"images/{next_id}{suffix}"
        next_id += 1
        _write(out / name, rgb, **params)
        rows_train.append((name, label))
        return name

    for k, i in enumerate(chosen[:N_EXACT]):
        src = name_of[int(i)]
        # Same pixels; the first copy as BMP so only a hash of decoded pixels sees them as one.
        copy = add_copy(images[src], ".bmp" if k == 0 else ".png", CLASS_NAMES[target[i]])
        planted["exact"].append([src, copy])
    for i in chosen[N_EXACT:N_EXACT + N_NEAR]:
        src = name_of[int(i)]
        shift = int(rng.choice([-12, -8, 8, 12]))
        brighter = np.clip(images[src].astype(np.int16) + shift, 0, 255).astype(np.uint8)
        copy = add_copy(brighter, ".jpg", CLASS_NAMES[target[i]], quality=90)
        planted["near"].append([src, copy])
    i = chosen[-1]
    src = name_of[int(i)]
    wrong = CLASS_NAMES[(target[i] + 1 + rng.integers(9)) % 10]
    copy = add_copy(images[src], ".png", wrong)
    planted["conflict"].append({"images": [src, copy], "labels": [CLASS_NAMES[target[i]], wrong]})
    for i in rng.choice(test_idx, size=N_OVERLAP, replace=False):
        src = name_of[int(i)]
        copy = add_copy(images[src], ".png", CLASS_NAMES[target[i]])
        planted["overlap"].append({"test": src, "train": copy})

    train = pd.DataFrame(rows_train, columns=["image", "label"])
    test = pd.DataFrame({"image": rows_test})
    atomic_write_csv(out / "train.csv", train)
    atomic_write_csv(out / "test.csv", test)
    atomic_write_csv(out / "sample_submission.csv", test.assign(label=CLASS_NAMES[0]))
    atomic_write_csv(private / "solution.csv", pd.DataFrame(solution, columns=["image", "label"]))
    planted["seed"] = seed
    planted["counts"] = {"train": len(train), "test": len(test)}
    atomic_write_json(private / "planted.json", planted)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/digits", help="competition folder to write (default: data/digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the planted copies (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build is there")
    args = parser.parse_args(argv)
    root = build_digits(args.root, seed=args.seed, force=args.force)
    print(f"embedded default competition at {root}; hidden solution in {private_dir(root)}")


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
