"""Where a detection split's images and labels are, for each ``competition.format``, and the problem list
every reader fills before it raises one error.

Path values (``data.images``, ``data.labels``, ``data.classes_file``) holding ``{split}`` are
relative to ``competition.root``; other relative values to ``<root>/<split>/``; absolute ones are taken
as they are. Left null, the format's usual places are tried in this order:

    banana  images: <split>/images                 labels: <split>/label.csv
    coco    images: <split>/images, <split>,       labels: annotations/instances_<split>.json,
                    images/<split>, images                 <split>/_annotations.coco.json (Roboflow)
    yolo    images: <split>/images, images/<split> labels: <split>/labels, labels/<split>
    voc     images: <split>/JPEGImages,            labels: <split>/Annotations, <split>,
                    <split>/images, <split>,               Annotations (+ ImageSets/Main/<split>.txt)
                    JPEGImages
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError

FORMATS = ("banana", "coco", "yolo", "voc")
DEFAULTS: dict[str, dict[str, list[str]]] = {
    "banana": {"images": ["images"], "labels": ["label.csv"]},
    "coco": {"images": ["{split}/images", "{split}", "images/{split}", "images"],
             "labels": ["annotations/instances_{split}.json", "{split}/_annotations.coco.json"]},
    "yolo": {"images": ["{split}/images", "images/{split}"], "labels": ["{split}/labels", "labels/{split}"]},
    "voc": {"images": ["{split}/JPEGImages", "{split}/images", "{split}", "JPEGImages"],
            "labels": ["{split}/Annotations", "{split}", "Annotations"]},
}
CLASS_FILES = ["data.yaml", "dataset.yaml", "classes.txt", "obj.names"]
MAX_LISTED = 20


def resolve(root: str | Path, split: str, template: str) -> Path:
    """The path ``template`` names for ``split`` (see the module docstring for the rule)."""
    value = template.replace("{split}", split)
    path = Path(value)
    if path.is_absolute():
        return path
    return Path(root) / value if "{split}" in template else Path(root) / split / value


def candidates(cfg, split: str, kind: str) -> list[Path]:
    """``data.<kind>`` when set, else the format's usual places for ``kind`` (images or labels),
    under ``competition.root`` (``cfg`` is a :class:`pipeline.detect.config.DetectConfig`)."""
    given = getattr(cfg.data, kind)
    templates = [given] if given else DEFAULTS[cfg.competition.format][kind]
    out: list[Path] = []
    for t in templates:
        p = resolve(cfg.competition.root, split, t)
        if p not in out:
            out.append(p)
    return out


def find(cfg, split: str, kind: str, want_dir: bool | None = None) -> Path | None:
    """The first of :func:`candidates` that exists (a folder or a file as ``want_dir`` says)."""
    for p in candidates(cfg, split, kind):
        ok = p.is_dir() if want_dir else p.is_file() if want_dir is False else p.exists()
        if ok:
            return p
    return None


def tried(cfg, split: str, kind: str) -> str:
    key = f"data.{kind}"
    where = ", ".join(str(p) for p in candidates(cfg, split, kind))
    hint = "" if getattr(cfg.data, kind) else f" (set {key} to where they are)"
    return f"{where}{hint}"


def class_file(cfg) -> Path | None:
    """``data.classes_file``, else the first of data.yaml, dataset.yaml, classes.txt, obj.names in root."""
    root = Path(cfg.competition.root)
    if cfg.data.classes_file:
        p = Path(cfg.data.classes_file)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise PipelineError(f"data.classes_file={cfg.data.classes_file!r}: {p} does not exist")
        return p
    for name in CLASS_FILES:
        if (root / name).is_file():
            return root / name
    return None


class Problems:
    """Every problem found in a split's labels, raised together as one error."""

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        listed = "\n  ".join(self.items[:MAX_LISTED])
        more = f"\n  ... and {len(self.items) - MAX_LISTED} more" if len(self.items) > MAX_LISTED else ""
        raise PipelineError(f"{self.source}: {len(self.items)} problem(s); fix or remove them:\n  {listed}{more}")


def check_box(x0: float, y0: float, x1: float, y1: float, size: tuple[int, int], tol: float = 0.5) -> str | None:
    """Why a pixel box is unusable in an image of ``size`` (width, height), or None."""
    import math

    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return "empty or non-finite coordinate"
    if x1 <= x0 or y1 <= y0:
        return f"empty box (xmax <= xmin or ymax <= ymin: {x0:g},{y0:g},{x1:g},{y1:g})"
    w, h = size
    if x0 < -tol or y0 < -tol or x1 > w + tol or y1 > h + tol:
        return f"box ({x0:g},{y0:g},{x1:g},{y1:g}) outside the {w}x{h} image"
    return None


def clip_box(x0: float, y0: float, x1: float, y1: float, size: tuple[int, int]) -> tuple[float, ...]:
    w, h = size
    return min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)
