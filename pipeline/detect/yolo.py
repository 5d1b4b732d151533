"""YOLO txt labels: one ``labels/<name>.txt`` per ``images/<name>.<ext>``, a line per object
``class cx cy w h`` normalised to the image (0..1); a line ``class x1 y1 x2 y2 ...`` (a polygon,
YOLO's segment form) is read as the box around its points. An image without a label file, or
with an empty one, holds no object. Class names come from ``data.yaml`` / ``dataset.yaml``
(``names``, a list or an id->name mapping), ``classes.txt`` / ``obj.names`` (a name per line), or
``data.classes``; without any, the ids themselves ("0", "1", ...).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from pipeline.data.images import image_size
from pipeline.detect.data import IMAGE_EXTENSIONS, Split
from pipeline.detect.layout import Problems, check_box, clip_box
from pipeline.errors import PipelineError

_TOL = 1e-3  # normalised coordinates written with few digits land a hair outside 0..1


def names_from_file(path: Path) -> list[str]:
    """Class names from a YOLO ``data.yaml`` (``names``) or a text file with a name per line."""
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise PipelineError(f"{path} is not a readable YAML file ({exc})") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            try:
                ids = sorted(int(k) for k in names)
            except ValueError:
                raise PipelineError(f"{path}: 'names' keys must be class ids 0, 1, ...") from None
            if ids != list(range(len(ids))):
                raise PipelineError(f"{path}: 'names' ids must run 0..{len(ids) - 1} without gaps; found {ids}")
            return [str(names[k] if k in names else names[str(k)]) for k in ids]
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        raise PipelineError(f"{path}: no 'names' list of class names; add one or set data.classes")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    names = [ln for ln in lines if ln]
    if not names:
        raise PipelineError(f"{path} lists no class names")
    return names


def label_files(label_dir: Path) -> list[Path]:
    return sorted(p for p in label_dir.rglob("*.txt") if p.name not in ("classes.txt", "obj.names"))


def max_class_id(label_dir: Path) -> int:
    """The largest class id in a labels folder (-1 if none): the class list when no names are given."""
    top = -1
    for f in label_files(label_dir):
        for line in f.read_text().splitlines():
            head = line.split()[:1]
            if head and head[0].isdigit():
                top = max(top, int(head[0]))
    return top


def _images(image_dir: Path) -> dict[str, str]:
    """Image path relative to ``image_dir`` without extension -> relative path with it."""
    out: dict[str, str] = {}
    for p in sorted(image_dir.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            rel = p.relative_to(image_dir)
            out.setdefault(rel.with_suffix("").as_posix(), rel.as_posix())
    return out


def _parse_line(line: str) -> tuple[int, float, float, float, float] | str:
    """``(class, x0, y0, x1, y1)`` normalised, or why the line is bad."""
    parts = line.split()
    if len(parts) < 5 or (len(parts) > 5 and len(parts) % 2 == 0):
        return f"expected 'class cx cy w h' (or 'class x1 y1 x2 y2 ...'), got {len(parts)} field(s)"
    try:
        cls = int(parts[0])
        vals = [float(v) for v in parts[1:]]
    except ValueError:
        return "class id or coordinates are not numbers"
    if not np.isfinite(vals).all():
        return "non-finite coordinate"
    if min(vals) < -_TOL or max(vals) > 1 + _TOL:
        return "coordinates must be normalised to 0..1 (divide pixels by the image width and height)"
    if len(vals) == 4:
        cx, cy, w, h = vals
        return cls, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    xs, ys = vals[0::2], vals[1::2]
    return cls, min(xs), min(ys), max(xs), max(ys)


def read_yolo(image_dir: Path, label_dir: Path | None, classes: list[str], split: str) -> Split:
    """Read and check one split; every bad line and every label file without an image in one error."""
    found = _images(image_dir)
    if not found:
        raise PipelineError(f"{image_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    names = sorted(found.values())
    sizes = {n: image_size(image_dir / n) for n in names}
    bad = [n for n, s in sizes.items() if s is None]
    if bad:
        raise PipelineError(f"{len(bad)} unreadable image(s) in {image_dir}: {', '.join(bad[:20])}")
    labelled = label_dir is not None and label_dir.is_dir()
    per_image: dict[str, list[tuple]] = {n: [] for n in names}
    problems = Problems(label_dir or image_dir)
    for f in label_files(label_dir) if labelled else []:
        key = f.relative_to(label_dir).with_suffix("").as_posix()
        if key not in found:
            problems.add(f.name, f"no image {key}.* in {image_dir}")
            continue
        name = found[key]
        w, h = sizes[name]
        for ln, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{f.relative_to(label_dir)}:{ln}"
            parsed = _parse_line(line)
            if isinstance(parsed, str):
                problems.add(where, parsed)
                continue
            cls, x0, y0, x1, y1 = parsed
            if not 0 <= cls < len(classes):
                problems.add(where, f"unknown class id {cls}; classes are 0..{len(classes) - 1} {classes}")
                continue
            box = (x0 * w, y0 * h, x1 * w, y1 * h)
            why = check_box(*box, (w, h), tol=_TOL * max(w, h) + 0.5)
            if why:
                problems.add(where, why)
                continue
            per_image[name].append((cls, *clip_box(*box, (w, h))))
    problems.raise_if_any()
    return Split(
        split, names, [image_dir / n for n in names],
        [np.array([r[1:] for r in per_image[n]], np.float32).reshape(-1, 4) for n in names],
        [np.array([r[0] for r in per_image[n]], np.int64) for n in names],
        [sizes[n] for n in names], labelled=labelled,
    )


def write_yolo(split: Split, classes: list[str], image_dir: Path, label_dir: Path) -> None:
    """``split`` as YOLO files (images linked or copied, one txt per image, classes.txt beside)."""
    import shutil

    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for name, path, boxes, labels, (w, h) in zip(split.images, split.paths, split.boxes, split.labels, split.sizes):
        shutil.copyfile(path, image_dir / name)
        lines = []
        for (x0, y0, x1, y1), lab in zip(boxes.astype(np.float64), labels):
            lines.append(f"{int(lab)} {(x0 + x1) / 2 / w:.10f} {(y0 + y1) / 2 / h:.10f} "
                         f"{(x1 - x0) / w:.10f} {(y1 - y0) / h:.10f}")
        (label_dir / Path(name).with_suffix(".txt")).write_text("\n".join(lines) + ("\n" if lines else ""))
