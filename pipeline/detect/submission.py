"""Detection submissions in the forms Kaggle scores.

* ``boxes``: a row per box, ``image,label,score,xmin,ymin,xmax,ymax`` in pixels (predictions.csv).
* ``prediction_string``: a row per image, ``<id_column>,<prediction_column>``, the image's boxes
  written one after another by ``submission.prediction_string`` (Global Wheat:
  ``"{score} {xmin} {ymin} {width} {height}"``), in pixels or normalised to the image, an empty
  string for an image with no box; ids and their order taken from the sample submission when
  there is one, which it must match.

Template fields: ``score``, ``label`` (class name), ``class_id`` (0-based), ``xmin``, ``ymin``,
``xmax``, ``ymax``, ``width``, ``height``, ``cx``, ``cy``; format specs work (``{score:.3f}``).
"""
from __future__ import annotations

import string
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

FIELDS = ("score", "label", "class_id", "xmin", "ymin", "xmax", "ymax", "width", "height", "cx", "cy")
_EXAMPLE = {"score": 0.5, "label": "a", "class_id": 0, "xmin": 1.0, "ymin": 2.0, "xmax": 3.0, "ymax": 4.0,
            "width": 2.0, "height": 2.0, "cx": 2.0, "cy": 3.0}


def check_template(template: str) -> str:
    """The template if it names only known fields and formats an example box; else ValueError."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"is not a valid template ({exc}); e.g. '{{score}} {{xmin}} {{ymin}} {{width}} {{height}}'") from None
    unknown = sorted(n.split(".")[0].split("[")[0] for n in names if n.split(".")[0].split("[")[0] not in FIELDS)
    if unknown or not names:
        raise ValueError(f"unknown field(s) {unknown or '(none given)'}; use {', '.join(FIELDS)}")
    try:
        template.format(**_EXAMPLE)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"cannot format a box ({exc}); check the format specs, e.g. {{score:.3f}}") from None
    return template


def box_fields(box: np.ndarray, score: float, class_id: int, classes: list[str], size: tuple[int, int],
               normalised: bool) -> dict:
    """The template's values for one pixel box; rounded so that a plain ``{xmin}`` prints short."""
    x0, y0, x1, y1 = (float(v) for v in box)
    digits = 1
    if normalised:
        w, h = size
        x0, x1, y0, y1 = x0 / w, x1 / w, y0 / h, y1 / h
        digits = 5
    r = lambda v: round(v, digits)  # noqa: E731
    return {"score": round(float(score), 4), "label": classes[int(class_id)], "class_id": int(class_id),
            "xmin": r(x0), "ymin": r(y0), "xmax": r(x1), "ymax": r(y1), "width": r(x1 - x0),
            "height": r(y1 - y0), "cx": r((x0 + x1) / 2), "cy": r((y0 + y1) / 2)}


def image_id(name: str, form: str) -> str:
    """The id a competition knows an image by: its file name without extension (``stem``) or with."""
    return Path(name).with_suffix("").as_posix() if form == "stem" else name


def prediction_string_table(split, dets: dict, classes: list[str], sub, root: str | Path) -> pd.DataFrame:
    """A row per image of ``split`` with its boxes as one string, in the sample submission's order.

    Args:
        dets: image index -> ``ImageBoxes`` in pixels, best first.
        sub: the ``submission`` config section.
        root: the competition folder (a relative ``submission.sample_submission`` is read from it).
    """
    normalised = sub.coordinates == "normalized"
    rows = {}
    for i, name in enumerate(split.images):
        d = dets[i]
        parts = [sub.prediction_string.format(**box_fields(b, s, lab, classes, split.sizes[i], normalised))
                 for b, lab, s in zip(d.boxes, d.labels, d.scores)]
        key = image_id(name, sub.image_id)
        if key in rows:
            raise PipelineError(f"two images have the id {key!r}; set submission.image_id=name")
        rows[key] = " ".join(parts)
    ids = list(rows)
    sample = sample_path(sub, root)
    if sample is not None:
        ids = check_against_sample(sample, sub, set(rows))
    return pd.DataFrame({sub.id_column: ids, sub.prediction_column: [rows[i] for i in ids]})


def sample_path(sub, root: str | Path) -> Path | None:
    if not sub.sample_submission:
        return None
    p = Path(sub.sample_submission)
    p = p if p.is_absolute() else Path(root) / p
    if not p.is_file():
        raise PipelineError(f"submission.sample_submission: {p} does not exist; give its path (relative to "
                            "competition.root) or null to write without one")
    return p


def check_against_sample(path: Path, sub, ours: set[str]) -> list[str]:
    """The sample submission's ids in its order, after checking its columns and that it lists
    exactly the images predicted."""
    try:
        sample = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise PipelineError(f"{path} is not a readable CSV file ({exc})") from None
    cols = [sub.id_column, sub.prediction_column]
    if list(sample.columns) != cols:
        raise PipelineError(f"{path}: columns {list(sample.columns)}, but submission.id_column and "
                            f"submission.prediction_column make {cols}; set them to the sample's")
    ids = sample[sub.id_column].tolist()
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    missing = [i for i in ids if i not in ours]
    extra = sorted(ours - set(ids))
    if dup or missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} id(s) of the sample have no image in the split, e.g. {missing[:5]}")
        if extra:
            parts.append(f"{len(extra)} image(s) are not in the sample, e.g. {extra[:5]}")
        if dup:
            parts.append(f"the sample repeats id(s) {dup[:5]}")
        raise PipelineError(f"{path} does not match the predicted split: {'; '.join(parts)}. Check data.test, "
                            "submission.image_id (stem: file name without extension) and the sample file")
    return ids
