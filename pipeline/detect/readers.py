"""One entry point for every label format: ``competition.format`` picks the reader (banana, COCO, YOLO,
Pascal VOC); each checks the whole split up front and lists every problem in one error."""
from __future__ import annotations

from pathlib import Path

from pipeline.detect.layout import class_file, find, tried
from pipeline.errors import PipelineError


def labels_location(cfg, split: str) -> Path | None:
    """The split's label file (banana, coco) or folder (yolo, voc), if it exists."""
    want_dir = cfg.competition.format in ("yolo", "voc")
    return find(cfg, split, "labels", want_dir=want_dir)


def image_folder(cfg, split: str) -> Path:
    folder = find(cfg, split, "images", want_dir=True)
    if folder is None:
        raise PipelineError(f"split {split!r}: no image folder; looked in {tried(cfg, split, 'images')}; "
                            f"check competition.root={cfg.competition.root!r}, competition.format={cfg.competition.format!r} and the split names")
    return folder


def _image_folders(cfg, split: str) -> list[Path]:
    from pipeline.detect.layout import candidates

    found = [p for p in candidates(cfg, split, "images") if p.is_dir()]
    if not found:
        image_folder(cfg, split)  # raises with the places it tried
    return found


def read_classes(cfg) -> list[str]:
    """``data.classes`` if given, else what the format's files say (see each reader's docstring)."""
    if cfg.data.classes:
        return list(cfg.data.classes)
    fmt = cfg.competition.format
    labels = labels_location(cfg, cfg.data.train)
    if fmt == "yolo":
        f = class_file(cfg)
        if f is not None:
            from pipeline.detect.yolo import names_from_file

            return names_from_file(f)
    if labels is None:
        raise PipelineError(f"no labels for the train split {cfg.data.train!r}; looked in "
                            f"{tried(cfg, cfg.data.train, 'labels')}")
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

    names = voc_names(xml_files(labels, Path(cfg.competition.root), cfg.data.train))
    if not names:
        raise PipelineError(f"no <object><name> in the XML files of {labels}; list the classes in data.classes")
    return names


def read_split(cfg, split: str, classes: list[str], labels: Path | None = None):
    """The split's images and boxes (a :class:`pipeline.detect.data.Split`), checked.

    Args:
        labels: labels kept elsewhere (``data.test_labels``); default: the format's place for them.
            A split without labels is read as its images alone (a test split).
    """
    from pipeline.detect.data import unlabelled_split

    labels = labels or labels_location(cfg, split)
    fmt = cfg.competition.format
    if fmt == "coco":
        from pipeline.detect.coco import read_coco

        if labels is None:
            return unlabelled_split(image_folder(cfg, split), split)
        return read_coco(labels, _image_folders(cfg, split), classes, split)
    if fmt == "yolo":
        from pipeline.detect.yolo import read_yolo

        return read_yolo(image_folder(cfg, split), labels, classes, split)
    if fmt == "voc":
        from pipeline.detect.voc import read_voc, xml_files

        if labels is None:
            return unlabelled_split(image_folder(cfg, split), split)
        files = xml_files(labels, Path(cfg.competition.root), split)
        return read_voc(files, _voc_image_folder(cfg, split, files), classes, split)
    raise PipelineError(f"competition.format={fmt!r} has no reader here; use banana, coco, yolo or voc")


def _voc_image_folder(cfg, split: str, files: list[Path]) -> Path:
    """The first image folder holding the first XML's image (VOC names files relative to it)."""
    from pipeline.detect.voc import _parse

    folders = _image_folders(cfg, split)
    if files:
        root, _ = _parse(files[0])
        name = (root.findtext("filename") or "").strip() if root is not None else ""
        for d in folders:
            if name and (d / name).is_file():
                return d
    return folders[0]
