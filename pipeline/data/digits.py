"""The embedded default competition, built from scikit-learn's bundled handwritten digits.

Written in the Classify Leaves layout::

    data/digits/                   train.csv (image,label), test.csv (image),
                                   sample_submission.csv (image,label), images/*.png|jpg|bmp
    data/digits_private/           solution.csv (image,label) and planted.json, kept outside the
                                   competition folder so the demo can score its own submission

Planted on purpose, and recorded in ``planted.json``, so the dedup stage has something real to
find: exact duplicates (one saved as BMP: same pixels, other bytes), near duplicates (re-encoded
JPEG, brightness shifted), one duplicate with a conflicting label, and test images also in train.

``--label-noise FRACTION`` (default 0) also flips the labels of that fraction of the train images
(``planted.json: label_noise.flips``), half of them between the two most-confused classes, where a
label audit finds them hardest, so ``pipeline.analyze`` has real label errors to find. At most a third
of those two classes' images are flipped (the rest of the flips go elsewhere), so each keeps its true
label as the majority: past half, the two classes would simply be swapped.

Run ``python -m pipeline.data.digits [--root data/digits] [--force] [--label-noise 0.03]`` to build
it by hand.
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
from pipeline.io import atomic_write_csv, atomic_write_json, read_json

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 32
TEST_FRACTION = 0.2
N_EXACT = 4
N_NEAR = 4
N_OVERLAP = 3
MAX_LABEL_NOISE = 0.5


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


def default_root() -> Path:
    """Where the default config puts the demo: ``data/digits`` of this checkout. Only there does
    reading the competition build it on first use; elsewhere ``python -m pipeline.data.digits
    --root PATH`` builds it, so a mistyped ``competition.root`` is an error, not a new demo."""
    return Path(__file__).resolve().parents[2] / "data" / "digits"


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


def built_label_noise(root: str | Path) -> float:
    """The ``--label-noise`` fraction a complete build at ``root`` was made with (0 for older builds)."""
    return float(read_json(private_dir(root) / "planted.json").get("label_noise", {}).get("fraction", 0.0))


def built_train_fraction(root: str | Path) -> float:
    """The ``--train-fraction`` a complete build at ``root`` was made with (1 for older builds)."""
    return float(read_json(private_dir(root) / "planted.json").get("train_fraction", {}).get("fraction", 1.0))


def build_digits(root: str | Path = "data/digits", seed: int = 0, force: bool = False,
                 label_noise: float = 0.0, train_fraction: float = 1.0) -> Path:
    """Build the competition folder at ``root`` (deterministic for a given ``seed``).

    An existing complete build is kept unless ``force``. The files are written to a temporary
    folder and moved into place at the end, so a killed build leaves nothing half-written and
    two processes building at once (e.g. DDP ranks) both end with the same complete folder.

    Args:
        label_noise: fraction of the train images whose label is flipped (recorded in planted.json).
        train_fraction: keep this stratified fraction of the train rows (a harder competition for
            second-round levers; the planted images are always kept; test and solution unchanged).

    Raises:
        PipelineError: ``root`` (or its private folder) exists and was not made by this module, or
            it holds a build with another ``label_noise`` (and not ``force``).
    """
    root = Path(root)
    private = private_dir(root)
    if not 0.0 <= label_noise <= MAX_LABEL_NOISE:
        raise PipelineError(f"--label-noise {label_noise}: must be a fraction between 0 and {MAX_LABEL_NOISE}, "
                            "e.g. 0.03 for 3% of the train labels")
    if not 0.0 < train_fraction <= 1.0:
        raise PipelineError(f"--train-fraction {train_fraction}: must be a fraction in (0, 1], e.g. 0.33")
    if is_built(root) and not force:
        if built_train_fraction(root) != train_fraction:
            raise PipelineError(f"{root} was built with train fraction {built_train_fraction(root)}, not "
                                f"{train_fraction}; add --force to rebuild it, or build into another folder with --root")
        if built_label_noise(root) != label_noise:
            raise PipelineError(f"{root} was built with label noise {built_label_noise(root)}, not {label_noise}; "
                                "add --force to rebuild it, or build into another folder with --root")
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
        _write_competition(tmp / "competition", tmp / "private", seed, label_noise)
        if train_fraction < 1.0:
            _subsample_train(tmp / "competition", tmp / "private", train_fraction, seed)
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


def _subsample_train(out: Path, private: Path, fraction: float, seed: int) -> None:
    """Keep a stratified ``fraction`` of train.csv (every planted image stays), recorded in planted.json."""
    train = pd.read_csv(out / "train.csv", dtype=str, keep_default_na=False)
    planted = read_json(private / "planted.json")
    # The planted duplicates, conflicts and overlaps stay (dedup has them to find); flipped labels are
    # subsampled like every other row, so the noise fraction stays what --label-noise asked for.
    planted_groups = {k: v for k, v in planted.items() if k != "label_noise"}
    keep_always = {v for v in _strings(planted_groups) if v in set(train["image"])}
    rng = np.random.default_rng([seed, 2])
    keep = set(keep_always)
    for _, group in train[~train["image"].isin(keep_always)].groupby("label"):
        n = max(2, int(round(fraction * len(group))))
        keep |= set(group["image"].to_numpy()[rng.permutation(len(group))[:n]])
    kept = train[train["image"].isin(keep)]
    atomic_write_csv(out / "train.csv", kept)
    planted["train_fraction"] = {"fraction": fraction, "kept": len(kept), "of": len(train)}
    planted.setdefault("counts", {})["train"] = len(kept)
    atomic_write_json(private / "planted.json", planted)


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _write_competition(out: Path, private: Path, seed: int, label_noise: float = 0.0) -> None:
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
    in_planted = {img for pair in planted["exact"] + planted["near"] for img in pair}
    in_planted |= {img for c in planted["conflict"] for img in c["images"]}
    # Only images outside the planted groups are flipped: a flipped copy would be a dedup conflict
    # instead, which the folds stage drops before any model sees it.
    candidates = [name_of[int(i)] for i in train_idx if name_of[int(i)] not in in_planted]
    pixels_of = {name_of[int(i)]: pixels[i].reshape(-1) for i in train_idx}
    planted["label_noise"] = _flip_labels(train, candidates, pixels_of, label_noise, seed)
    test = pd.DataFrame({"image": rows_test})
    atomic_write_csv(out / "train.csv", train)
    atomic_write_csv(out / "test.csv", test)
    atomic_write_csv(out / "sample_submission.csv", test.assign(label=CLASS_NAMES[0]))
    atomic_write_csv(private / "solution.csv", pd.DataFrame(solution, columns=["image", "label"]))
    planted["seed"] = seed
    planted["counts"] = {"train": len(train), "test": len(test)}
    atomic_write_json(private / "planted.json", planted)


PAIR_CAP = 1 / 3  # of the confused pair's images flipped at most: each class keeps its true label as the majority


def most_confused_pair(x: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """The two classes a quick classifier confuses most (either way), from 5-fold CV predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import cross_val_predict

    pred = cross_val_predict(LogisticRegression(max_iter=2000), x / 16.0, y, cv=5)
    cm = confusion_matrix(y, pred, labels=range(len(CLASS_NAMES)))
    both = cm + cm.T
    np.fill_diagonal(both, 0)
    a, b = np.unravel_index(np.argmax(both), both.shape)
    return int(min(a, b)), int(max(a, b))


def _flip_labels(train: pd.DataFrame, candidates: list[str], pixels_of: dict[str, np.ndarray],
                 fraction: float, seed: int) -> dict:
    """Flip ``fraction`` of the train labels in place; half between the most-confused pair, at most
    ``PAIR_CAP`` of that pair's images (the rest are random flips): past half, the flipped label would
    be the majority of its look-alikes, a swap of the two classes no audit or model could undo.

    A separate random stream, so the rest of the build is byte-for-byte the same with or without noise.
    """
    record: dict = {"fraction": fraction, "flips": []}
    n_flip = int(round(fraction * len(train)))
    if n_flip == 0:
        return record
    label_of = dict(zip(train["image"], train["label"]))
    index = {c: i for i, c in enumerate(CLASS_NAMES)}
    y = np.array([index[label_of[c]] for c in candidates])
    a, b = most_confused_pair(np.stack([pixels_of[c] for c in candidates]), y)
    rng = np.random.default_rng([seed, 1])
    pair_pool = [c for c, t in zip(candidates, y) if t in (a, b)]
    n_pair = min(n_flip // 2, int(PAIR_CAP * len(pair_pool)))
    other_pool = [c for c, t in zip(candidates, y) if t not in (a, b)]
    chosen_pair = rng.choice(pair_pool, size=n_pair, replace=False).tolist()
    chosen_other = rng.choice(other_pool, size=min(n_flip - len(chosen_pair), len(other_pool)), replace=False).tolist()
    new_label = {}
    for img in chosen_pair:
        t = index[label_of[img]]
        new_label[img] = ("pair", CLASS_NAMES[b if t == a else a])
    for img in chosen_other:
        t = index[label_of[img]]
        new_label[img] = ("random", CLASS_NAMES[(t + 1 + int(rng.integers(len(CLASS_NAMES) - 1))) % len(CLASS_NAMES)])
    for img, (kind, given) in sorted(new_label.items(), key=lambda kv: int(Path(kv[0]).stem)):
        record["flips"].append({"image": img, "true": label_of[img], "given": given, "kind": kind})
    train["label"] = [new_label[img][1] if img in new_label else lab for img, lab in zip(train["image"], train["label"])]
    record["confused_pair"] = [CLASS_NAMES[a], CLASS_NAMES[b]]
    record["confused_pair_from"] = "5-fold CV confusions of a logistic regression on the 8x8 train pixels"
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/digits", help="competition folder to write (default: data/digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the planted copies (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build is there")
    parser.add_argument("--label-noise", type=float, default=0.0, metavar="FRACTION",
                        help="flip the labels of this fraction of the train images, half of them between the "
                             "two most-confused classes (at most a third of their images; recorded in "
                             "planted.json; default 0)")
    parser.add_argument("--train-fraction", type=float, default=1.0, metavar="FRACTION",
                        help="keep this stratified fraction of the train images (a harder competition; "
                             "default 1)")
    args = parser.parse_args(argv)
    root = build_digits(args.root, seed=args.seed, force=args.force, label_noise=args.label_noise,
                        train_fraction=args.train_fraction)
    print(f"embedded default competition at {root}; hidden solution in {private_dir(root)}")
    flips = read_json(private_dir(root) / "planted.json").get("label_noise", {}).get("flips", [])
    if flips:
        # The flips were drawn over the full train set; count those the train fraction kept.
        train = set(pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)["image"])
        kept = sum(f["image"] in train for f in flips)
        print(f"label noise: {kept} of {len(train)} train labels flipped ({kept / len(train):.1%}; "
              f"listed in {private_dir(root) / 'planted.json'})")


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
