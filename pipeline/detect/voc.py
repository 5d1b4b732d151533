"""Pascal VOC XML labels: one ``<name>.xml`` per image with ``<filename>``, ``<size>`` and an
``<object>`` per box (``<name>``, ``<bndbox>`` xmin ymin xmax ymax in pixels). The devkit layout
(``Annotations/`` + ``JPEGImages/`` + ``ImageSets/Main/<split>.txt``) and a folder per split
(XML beside the images, Roboflow's export) both work. Classes: ``data.classes``, else the sorted
object names of the train split.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pipeline.data.images import image_size
from pipeline.detect.data import Split
from pipeline.detect.layout import Problems, check_box, clip_box
from pipeline.errors import PipelineError


def xml_files(label_dir: Path, root: Path, split: str) -> list[Path]:
    """The split's XML files; in the devkit layout only the ids of ``ImageSets/Main/<split>.txt``."""
    ids = root / "ImageSets" / "Main" / f"{split}.txt"
    if ids.is_file() and label_dir.resolve() == (root / "Annotations").resolve():
        names = [ln.split()[0] for ln in ids.read_text().splitlines() if ln.strip()]
        return [label_dir / f"{n}.xml" for n in names]
    return sorted(label_dir.glob("*.xml"))


def _parse(path: Path) -> tuple[ET.Element | None, str | None]:
    try:
        return ET.parse(path).getroot(), None
    except (OSError, ET.ParseError) as exc:
        return None, f"not a readable XML file ({exc})"


def voc_names(files: list[Path]) -> list[str]:
    """Sorted object names over ``files`` (the class list when ``data.classes`` is not set)."""
    names: set[str] = set()
    for f in files:
        root, _ = _parse(f)
        if root is not None:
            names |= {(o.findtext("name") or "").strip() for o in root.iter("object")} - {""}
    return sorted(names)


def read_voc(files: list[Path], image_dir: Path, classes: list[str], split: str) -> Split:
    """Read and check the split's XML files; every bad file, object and missing image in one error."""
    problems = Problems(files[0].parent if files else image_dir)
    records: list[tuple[str, tuple[int, int], list[tuple]]] = []
    for f in files:
        root, why = _parse(f)
        if root is None:
            problems.add(f.name, why or "unreadable")
            continue
        name = (root.findtext("filename") or "").strip() or f.stem + ".jpg"
        size = image_size(image_dir / name)
        if size is None:
            problems.add(f.name, f"image {name!r} not found or unreadable in {image_dir}")
            continue
        boxes = []
        for k, obj in enumerate(root.iter("object")):
            where = f"{f.name} object {k + 1}"
            label = (obj.findtext("name") or "").strip()
            if label not in classes:
                problems.add(where, f"unknown class {label!r}; classes are {classes}")
                continue
            bb = obj.find("bndbox")
            try:
                x0, y0, x1, y1 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                problems.add(where, "bndbox needs numeric xmin, ymin, xmax, ymax")
                continue
            why = check_box(x0, y0, x1, y1, size)
            if why:
                problems.add(where, why)
                continue
            boxes.append((classes.index(label), *clip_box(x0, y0, x1, y1, size)))
        records.append((name, size, boxes))
    problems.raise_if_any()
    if not records:
        raise PipelineError(f"no XML label files for split {split!r} in {problems.source}")
    records.sort(key=lambda r: r[0])
    return Split(
        split, [r[0] for r in records], [image_dir / r[0] for r in records],
        [np.array([b[1:] for b in r[2]], np.float32).reshape(-1, 4) for r in records],
        [np.array([b[0] for b in r[2]], np.int64) for r in records],
        [r[1] for r in records], labelled=True,
    )


def write_voc(split: Split, classes: list[str], label_dir: Path) -> None:
    """``split`` as VOC XML files (one per image, ``<filename>`` naming the image)."""
    label_dir.mkdir(parents=True, exist_ok=True)
    for name, boxes, labels, (w, h) in zip(split.images, split.boxes, split.labels, split.sizes):
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = name
        size = ET.SubElement(ann, "size")
        for tag, v in (("width", w), ("height", h), ("depth", 3)):
            ET.SubElement(size, tag).text = str(v)
        for (x0, y0, x1, y1), lab in zip(boxes.astype(np.float64), labels):
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = classes[int(lab)]
            bb = ET.SubElement(obj, "bndbox")
            for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (x0, y0, x1, y1)):
                ET.SubElement(bb, tag).text = repr(float(v))
        ET.ElementTree(ann).write(label_dir / (Path(name).stem + ".xml"))
