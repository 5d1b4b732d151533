"""One entry point for every label format: ``data.format`` picks the reader (banana, COCO, YOLO,
Pascal VOC); each checks the whole split up front and lists every problem in one error."""
from __future__ import annotations

from pathlib import Path

from pipeline.detect.layout import class_file, find, tried
from pipeline.errors import PipelineError


def labels_location(section, split: str) -> Path | None:
    """The split's label file (banana, coco) or folder (yolo, voc), if it exists."""
    want_dir = section.format in ("yolo", "voc")
    return find(section, split, "labels", want_dir=want_dir)


def image_folder(section, split: str) -> Path:
    folder = find(section, split, "images", want_dir=True)
    if folder is None:
        raise PipelineError(f"split {split!r}: no image folder; looked in {tried(section, split, 'images')}; "
                            f"check competition.root={section.root!r}, data.format={section.format!r} and the split names")
    return folder


def _image_folders(section, split: str) -> list[Path]:
    from pipeline.detect.layout import candidates

    found = [p for p in candidates(section, split, "images") if p.is_dir()]
    if not found:
        image_folder(section, split)  # raises with the places it tried
    return found


def read_classes(section) -> list[str]:
    """``data.classes`` if given, else what the format's files say (see each reader's docstring)."""
    if section.classes:
        return list(section.classes)
    fmt = section.format
    labels = labels_location(section, section.train)
    if fmt == "yolo":
        f = class_file(section)
        if f is not None:
            from pipeline.detect.yolo import names_from_file

            return names_from_file(f)
    if labels is None:
        raise PipelineError(f"no labels for the train split {section.train!r}; looked in "
                            f"{tried(section, section.train, 'labels')}")
    if fmt == "coco":
        from pipeline.detect.coco import coco_classes

        return coco_classes(labels)
    if fmt == "yolo":
        from pipeline.detect.yolo import max_class_id

        top = max_class_id(labels)
        if top < 0:
            raise PipelineError(f"{labels} holds no labelled object; list the classes in data.classes")
        print(f"no class names found (data.yaml, classes.txt or data.classes): classes are the ids 0..{top}")
        return [str(i) for i in range(top + 1)]
    from pipeline.detect.voc import voc_names, xml_files

    names = voc_names(xml_files(labels, Path(section.root), section.train))
    if not names:
        raise PipelineError(f"no <object><name> in the XML files of {labels}; list the classes in data.classes")
    return names


def read_split(section, split: str, classes: list[str], labels: Path | None = None):
    """The split's images and boxes (a :class:`pipeline.detect.data.Split`), checked.

    Args:
        labels: labels kept elsewhere (``data.test_labels``); default: the format's place for them.
            A split without labels is read as its images alone (a test split).
    """
    from pipeline.detect.data import unlabelled_split

    labels = labels or labels_location(section, split)
    fmt = section.format
    if fmt == "coco":
        from pipeline.detect.coco import read_coco

        if labels is None:
            return unlabelled_split(image_folder(section, split), split)
        return read_coco(labels, _image_folders(section, split), classes, split)
    if fmt == "yolo":
        from pipeline.detect.yolo import read_yolo

        return read_yolo(image_folder(section, split), labels, classes, split)
    if fmt == "voc":
        from pipeline.detect.voc import read_voc, xml_files

        if labels is None:
            return unlabelled_split(image_folder(section, split), split)
        files = xml_files(labels, Path(section.root), split)
        return read_voc(files, _voc_image_folder(section, split, files), classes, split)
    raise PipelineError(f"data.format={fmt!r} has no reader here; use banana, coco, yolo or voc")


def _voc_image_folder(section, split: str, files: list[Path]) -> Path:
    """The first image folder holding the first XML's image (VOC names files relative to it)."""
    from pipeline.detect.voc import _parse

    folders = _image_folders(section, split)
    if files:
        root, _ = _parse(files[0])
        name = (root.findtext("filename") or "").strip() if root is not None else ""
        for d in folders:
            if name and (d / name).is_file():
                return d
    return folders[0]
