"""Label fixes a user acts on: ``competition.relabel`` (corrections) and ``competition.exclude`` (drops).

- ``competition.relabel: PATH``: a CSV of ``image,label`` (or the competition's id column instead of
  ``image``): each listed train image gets the new label, for training and for validation;
- ``competition.exclude: PATH``: a CSV with an ``image`` (or id) column: the listed train images
  are never trained on. Other columns are ignored, so ``pipeline.analyze --write-fixes``'s draft
  ``exclude.csv`` (image, given, suggested, ...) can be used as it is.

The folds stage applies them *after* assigning folds from the labels as given, so fold ids stay as
they were and earlier experiments stay blendable; every image stays in validation with its
corrected label, so CV before and after is measured on the same images and an exclusion cannot
raise CV by itself. ``folds.csv`` gets the corrected ``label`` and an ``excluded`` column;
``folds.json`` records both lists.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.data.competition import Competition, DataError

MAX_LISTED = 10


@dataclass
class LabelFixes:
    relabel: dict[str, str] = field(default_factory=dict)   # image -> corrected label
    exclude: list[str] = field(default_factory=list)        # images never trained on
    sources: dict[str, dict] = field(default_factory=dict)  # relabel/exclude -> path, sha256, rows

    def record(self, folds: pd.DataFrame, given: pd.Series) -> dict:
        """What folds.json records: the files and each change, with the label it replaced."""
        in_folds = set(folds["image"])
        changes = [{"image": img, "given": given.get(img), "label": lab} for img, lab in self.relabel.items()]
        return {
            **self.sources,
            "relabelled": [c for c in changes if c["image"] in in_folds],
            "excluded": [img for img in self.exclude if img in in_folds],
            # Images the dedup policy dropped are not in folds.csv: a fix cannot bring them back.
            "not_in_folds": sorted({*self.relabel, *self.exclude} - in_folds),
        }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _read(path: str, key: str, comp: Competition, need_label: bool) -> tuple[pd.DataFrame, Path]:
    """The CSV at ``path`` with an ``image`` column (mapped from the id column when that is what it has)."""
    src = Path(path)
    what = "corrections (image,label)" if need_label else "images to drop (an image column)"
    if not src.is_file():
        raise DataError(f"{key} = {path}: no such file; it must be a CSV of {what}")
    try:
        df = pd.read_csv(src, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError(f"{key} = {path}: the file is empty; it needs a header line and one line per image") from None
    except Exception as exc:  # pandas raises many kinds; the user needs the file name
        raise DataError(f"{key} = {path} could not be read as CSV: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    id_col = comp.cfg.id_column
    if "image" not in df.columns and id_col in df.columns:
        to_image = dict(zip(comp.train["id"], comp.train["image"]))
        df["image"] = [to_image.get(i.strip(), f"<unknown id {i.strip()!r}>") for i in df[id_col]]
    missing = [c for c in (["image", "label"] if need_label else ["image"]) if c not in df.columns]
    if missing:
        raise DataError(f"{key} = {path} has no column {', '.join(map(repr, missing))}; its columns are "
                        f"{list(df.columns)}. It must be a CSV of {what}; 'image' may be the "
                        f"competition's id column {id_col!r} instead")
    df["image"] = df["image"].str.strip().str.replace("\\", "/", regex=False)
    if need_label:
        df["label"] = df["label"].str.strip()
    return df, src


def _raise_if(problems: list[str], key: str, path: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} problem(s) in {key} = {path}:\n  {shown}{more}\nFix these rows and run again.")


def read_label_fixes(comp: Competition) -> LabelFixes:
    """Read and check ``competition.relabel`` and ``competition.exclude`` of ``comp.cfg``.

    Raises:
        DataError: one message listing every row naming an unknown image or class, or an image
            given two different labels.
    """
    fixes = LabelFixes()
    known = set(comp.train["image"])
    classes = set(comp.classes)
    if comp.cfg.relabel:
        df, src = _read(comp.cfg.relabel, "competition.relabel", comp, need_label=True)
        problems = []
        for line, (img, lab) in enumerate(zip(df["image"], df["label"]), start=2):
            if img not in known:
                problems.append(f"line {line}: image {img!r} is not a train image of the competition")
            elif lab not in classes:
                problems.append(f"line {line}: {img}: label {lab!r} is not a class of the competition "
                                f"(classes: {', '.join(sorted(classes)[:8])}{', ...' if len(classes) > 8 else ''})")
            elif fixes.relabel.get(img, lab) != lab:
                problems.append(f"line {line}: {img} listed again with another label ({fixes.relabel[img]!r}, {lab!r})")
            else:
                fixes.relabel[img] = lab
        _raise_if(problems, "competition.relabel", comp.cfg.relabel)
        fixes.sources["relabel"] = {"path": str(src), "sha256": _sha(src), "rows": len(df)}
    if comp.cfg.exclude:
        df, src = _read(comp.cfg.exclude, "competition.exclude", comp, need_label=False)
        problems = [f"line {line}: image {img!r} is not a train image of the competition"
                    for line, img in enumerate(df["image"], start=2) if img not in known]
        _raise_if(problems, "competition.exclude", comp.cfg.exclude)
        fixes.exclude = list(dict.fromkeys(df["image"]))
        fixes.sources["exclude"] = {"path": str(src), "sha256": _sha(src), "rows": len(df)}
    return fixes


def apply_label_fixes(folds: pd.DataFrame, fixes: LabelFixes) -> pd.DataFrame:
    """folds.csv rows with corrected labels and an ``excluded`` column; fold ids are not touched."""
    out = folds.copy()
    fixed = out["image"].map(fixes.relabel)
    out["label"] = fixed.where(fixed.notna(), out["label"])
    out["excluded"] = out["image"].isin(set(fixes.exclude))
    return out


def submission_record(cfg, experiments: list[str], config_of) -> dict:
    """What a submission's JSON records of the label fixes: each experiment's relabel/exclude files
    (from its saved config, ``config_of(name)``) and what the competition's current folds.csv holds
    (folds.json)."""
    from pipeline import paths
    from pipeline.io import read_json

    record: dict = {"experiments": {}}
    for name in experiments:
        comp = (config_of(name) or {}).get("competition") or {}
        record["experiments"][name] = {"relabel": comp.get("relabel"), "exclude": comp.get("exclude")}
    try:
        fixes = read_json(paths.folds_json(cfg)).get("label_fixes") or {}
    except (OSError, ValueError):
        fixes = {}
    record["folds"] = {**{k: fixes[k] for k in ("relabel", "exclude") if k in fixes},
                       "n_relabelled": len(fixes.get("relabelled", [])), "n_excluded": len(fixes.get("excluded", []))}
    return record
