"""COCO JSON labels: ``images`` (id, file_name, width, height), ``annotations`` (image_id,
category_id, bbox ``[x, y, width, height]`` in pixels, iscrowd) and ``categories`` (id, name).

Classes are the category names in the order of their ids. ``iscrowd`` regions are left out of
training and scoring (COCO's own evaluation ignores them). Images with no annotation are kept as
pictures with no object in them. A JSON with ``images`` but no ``annotations`` (COCO's
``image_info_test``) is an unlabelled split.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.data.images import image_size
from pipeline.detect.data import Split
from pipeline.detect.layout import Problems, check_box, clip_box
from pipeline.errors import PipelineError


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PipelineError(f"{path}: not a COCO file (no 'images' list); expected keys images, annotations, "
                            "categories")
    return data


def coco_classes(path: Path) -> list[str]:
    """Category names of ``path`` ordered by category id."""
    cats = read_json(path).get("categories")
    if not cats:
        raise PipelineError(f"{path}: no 'categories' list; list the classes in data.classes")
    try:
        return [str(c["name"]) for c in sorted(cats, key=lambda c: int(c["id"]))]
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{path}: every category needs an integer 'id' and a 'name'") from None


def _image_dir(entries: list[dict], dirs: list[Path]) -> Path:
    """The candidate folder holding most of the first listed files (COCO names are relative to it)."""
    probe = [str(e.get("file_name", "")) for e in entries[:20]]
    best, hits = dirs[0], -1
    for d in dirs:
        n = sum((d / f).is_file() for f in probe if f)
        if n > hits:
            best, hits = d, n
    return best


def read_coco(path: Path, image_dirs: list[Path], classes: list[str], split: str) -> Split:
    """Read and check one COCO file; every bad image entry and annotation is listed in one error.

    Args:
        image_dirs: folders to look for the files in (the first that holds them is used).
        classes: the run's class names; each category's name must be one of them.
    """
    data = read_json(path)
    problems = Problems(path)
    img_dir = _image_dir(data["images"], image_dirs)
    cat_name = {}
    for c in data.get("categories") or []:
        if isinstance(c, dict) and "id" in c and "name" in c:
            cat_name[c["id"]] = str(c["name"])
    entries: dict = {}
    for k, e in enumerate(data["images"]):
        where = f"images[{k}]"
        if not isinstance(e, dict) or "id" not in e or not e.get("file_name"):
            problems.add(where, "needs an 'id' and a 'file_name'")
            continue
        where = f"image id {e['id']} ({e['file_name']})"
        if e["id"] in entries:
            problems.add(where, "duplicate image id")
            continue
        size = image_size(img_dir / str(e["file_name"]))
        if size is None:
            problems.add(where, f"image not found or unreadable in {img_dir}")
            continue
        listed = (e.get("width"), e.get("height"))
        if None not in listed and tuple(int(v) for v in listed) != tuple(size):
            # boxes are in the listed frame: a rotated or resized file would put them elsewhere
            problems.add(where, f"the JSON says {listed[0]}x{listed[1]} but the file is {size[0]}x{size[1]}")
            continue
        entries[e["id"]] = (str(e["file_name"]), size)

    labelled = "annotations" in data
    boxes: dict = {i: [] for i in entries}
    for k, a in enumerate(data.get("annotations") or []):
        aid = a.get("id", k) if isinstance(a, dict) else k
        where = f"annotation id {aid}"
        if not isinstance(a, dict):
            problems.add(where, "not an object")
            continue
        if a.get("iscrowd", 0):
            continue
        if a.get("image_id") not in entries:
            if not any(a.get("image_id") == e.get("id") for e in data["images"] if isinstance(e, dict)):
                problems.add(where, f"image_id {a.get('image_id')!r} is not in 'images'")
            continue  # its image is bad and already listed
        name, size = entries[a["image_id"]]
        where += f" ({name})"
        cat = a.get("category_id")
        if cat not in cat_name:
            problems.add(where, f"category_id {cat!r} is not in 'categories'")
            continue
        if cat_name[cat] not in classes:
            problems.add(where, f"unknown class {cat_name[cat]!r}; classes are {classes}")
            continue
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.add(where, f"bbox {a.get('bbox')!r} is not four numbers [x, y, width, height]")
            continue
        why = check_box(x, y, x + w, y + h, size)
        if why:
            problems.add(where, f"bbox [x, y, w, h] = [{x:g}, {y:g}, {w:g}, {h:g}]: {why}")
            continue
        boxes[a["image_id"]].append((classes.index(cat_name[cat]), *clip_box(x, y, x + w, y + h, size)))
    problems.raise_if_any()
    if not entries:
        raise PipelineError(f"{path} lists no images")
    ids = sorted(entries, key=lambda i: entries[i][0])
    names = [entries[i][0] for i in ids]
    return Split(
        split, names, [img_dir / n for n in names],
        [np.array([r[1:] for r in boxes[i]], np.float32).reshape(-1, 4) for i in ids],
        [np.array([r[0] for r in boxes[i]], np.int64) for i in ids],
        [entries[i][1] for i in ids], labelled=labelled,
    )


def write_coco(split: Split, classes: list[str], path: Path) -> Path:
    """``split`` as a COCO file (categories 1..C in ``classes`` order); used by tests and converters."""
    from pipeline.io import atomic_write_json

    images, anns = [], []
    for i, (name, size) in enumerate(zip(split.images, split.sizes)):
        images.append({"id": i + 1, "file_name": name, "width": int(size[0]), "height": int(size[1])})
        for b, lab in zip(split.boxes[i], split.labels[i]):
            x0, y0, x1, y1 = (float(v) for v in b)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(lab) + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(classes)]
    return atomic_write_json(path, {"images": images, "annotations": anns, "categories": cats})
