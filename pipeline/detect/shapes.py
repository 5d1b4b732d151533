"""The embedded default detection set: coloured shapes pasted on real photographs.

Backgrounds are the photographs that ship with installed packages (scikit-learn's
``china.jpg`` and ``flower.jpg``, matplotlib's ``grace_hopper.jpg``): random crops, flips and
brightness changes, resized to varied image sizes. One to four objects of three classes
(``cross``, ``ring``, ``star``) are pasted at random positions, scales, aspect ratios and
rotations. Written in the banana layout::

    data/shapes/{train,val}/images/*.jpg + label.csv   (img_name,label,xmin,ymin,xmax,ymax)
    data/shapes/test/images/*.jpg
    data/shapes_private/test/label.csv                 (kept apart to score the test split)

Run ``python -m pipeline.detect.shapes [--root data/shapes] [--force]`` to build it by hand.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.io import atomic_write_csv

CLASSES = ["cross", "ring", "star"]
SPLITS = {"train": 1200, "val": 200, "test": 200}
_SS = 4  # supersampling factor for anti-aliased sprite edges


def private_dir(root: str | Path) -> Path:
    root = Path(root)
    return root.parent / f"{root.name}_private"


def sample_photos() -> list[np.ndarray]:
    """The photographs scikit-learn and matplotlib ship, as RGB arrays (no download)."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(im) for im in load_sample_images().images]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        buf = np.frombuffer(f.read(), np.uint8)
    photos.append(cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    return photos


def _background(rng: np.random.Generator, photos: list[np.ndarray], out_wh: tuple[int, int]) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    ch = int(rng.uniform(0.35, 0.9) * h)
    cw = int(min(w, ch * out_wh[0] / out_wh[1] * rng.uniform(0.9, 1.1)))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = cv2.resize(np.ascontiguousarray(crop), out_wh, interpolation=cv2.INTER_AREA).astype(np.float32)
    return np.clip(img * rng.uniform(0.7, 1.2), 0, 255)


def _shape_mask(cls: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased alpha mask (float 0..1) of one shape, rotated and stretched at random."""
    s = size * _SS
    canvas = np.zeros((2 * s, 2 * s), np.uint8)
    c = s  # centre
    r = s * 0.5
    if cls == "ring":
        cv2.circle(canvas, (c, c), int(r), 255, -1, cv2.LINE_AA)
        cv2.circle(canvas, (c, c), int(r * rng.uniform(0.45, 0.65)), 0, -1, cv2.LINE_AA)
    elif cls == "star":
        ang = np.arange(10) * math.pi / 5 - math.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        pts = np.stack([c + rad * np.cos(ang), c + rad * np.sin(ang)], 1).round().astype(np.int32)
        cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA)
    else:  # cross
        t = int(r * rng.uniform(0.28, 0.4))
        cv2.rectangle(canvas, (int(c - r), c - t), (int(c + r), c + t), 255, -1)
        cv2.rectangle(canvas, (c - t, int(c - r)), (c + t, int(c + r)), 255, -1)
    stretch = np.diag([rng.uniform(0.75, 1.3), rng.uniform(0.75, 1.3)])
    rot = cv2.getRotationMatrix2D((0, 0), float(rng.uniform(0, 360)), 1.0)[:, :2]
    m = rot @ stretch
    affine = np.hstack([m, (np.array([c, c]) - m @ np.array([c, c]))[:, None]])
    canvas = cv2.warpAffine(canvas, affine, canvas.shape[::-1], flags=cv2.INTER_LINEAR)
    small = cv2.resize(canvas, (2 * size, 2 * size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    ys, xs = np.nonzero(small > 0.02)
    return small[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _paste(img: np.ndarray, alpha: np.ndarray, x: int, y: int, rng: np.random.Generator) -> None:
    h, w = alpha.shape
    hue = rng.uniform(0, 180)
    hsv = np.uint8([[[hue, rng.uniform(150, 255), rng.uniform(130, 255)]]])
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    # Shading across the sprite and a darker rim make it look less like a flat stencil.
    grad = np.linspace(rng.uniform(0.75, 1.0), rng.uniform(1.0, 1.2), w)[None, :, None]
    edge = cv2.erode((alpha > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8))[..., None].astype(np.float32)
    sprite = colour * grad * (0.55 + 0.45 * edge)
    a = alpha[..., None]
    region = img[y:y + h, x:x + w]
    img[y:y + h, x:x + w] = region * (1 - a) + np.clip(sprite, 0, 255) * a


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_image(rng: np.random.Generator, photos: list[np.ndarray],
               object_scale: float = 1.0) -> tuple[np.ndarray, list[tuple]]:
    """One picture and its boxes ``(label, xmin, ymin, xmax, ymax)`` in pixels; ``object_scale``
    multiplies the objects' sizes (0.5: half the default set's)."""
    wh = (int(rng.integers(200, 341)), int(rng.integers(180, 301)))
    img = _background(rng, photos, wh)
    boxes: list[tuple] = []
    for _ in range(int(rng.integers(1, 5))):
        cls = CLASSES[rng.integers(len(CLASSES))]
        size = max(4, int(rng.uniform(0.14, 0.45) * object_scale * min(wh)))
        alpha = _shape_mask(cls, size, rng)
        h, w = alpha.shape
        if h >= wh[1] or w >= wh[0]:
            continue
        for _try in range(20):
            x, y = int(rng.integers(0, wh[0] - w)), int(rng.integers(0, wh[1] - h))
            box = [x, y, x + w, y + h]
            if all(_iou(box, list(b[1:])) < 0.15 for b in boxes):
                _paste(img, alpha, x, y, rng)
                boxes.append((cls, *box))
                break
    return np.round(img).astype(np.uint8), boxes


def build_shapes(root: str | Path = "data/shapes", seed: int = 0, force: bool = False,
                 splits: dict[str, int] | None = None, object_scale: float = 1.0) -> Path:
    """Build the set at ``root`` (deterministic for a given ``seed`` and ``object_scale``); a no-op
    if already built."""
    root = Path(root)
    private = private_dir(root)
    if (root / "train" / "label.csv").is_file() and not force:
        return root
    for d in (root, private):
        if d.exists():
            shutil.rmtree(d)
    tmp = root.parent / f".{root.name}.building"
    if tmp.exists():
        shutil.rmtree(tmp)
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    test_rows = []
    for split, n in (splits or SPLITS).items():
        (tmp / split / "images").mkdir(parents=True)
        rows = []
        for i in range(n):
            img, boxes = make_image(rng, photos, object_scale)
            name = f"{split}_{i:04d}.jpg"
            cv2.imwrite(str(tmp / split / "images" / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 92])
            rows += [(name, *b) for b in boxes]
        table = pd.DataFrame(rows, columns=["img_name", "label", "xmin", "ymin", "xmax", "ymax"])
        if split == "test":
            test_rows = table
        else:
            atomic_write_csv(tmp / split / "label.csv", table)
    if len(test_rows):
        atomic_write_csv(tmp.parent / f".{private.name}.building" / "test" / "label.csv", test_rows)
        (tmp.parent / f".{private.name}.building").rename(private)
    tmp.rename(root)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded shapes-on-photographs detection set.")
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = parser.parse_args(argv)
    root = build_shapes(args.root, args.seed, args.force)
    print(f"detection set ready at {root} (labels of the test split in {private_dir(root)})")


if __name__ == "__main__":
    from pipeline.errors import cli_entry

    raise SystemExit(cli_entry(main))
