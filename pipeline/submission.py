"""Submission files: exactly the form of ``sample_submission.csv``, checked before writing.

Two forms (``competition.submission_form``):
- ``label``: the id column and one label column, a class name per row (Classify Leaves, CIFAR-10);
- ``probabilities``: the id column and one probability column per class (Dog breed).

Files go to ``submissions/<name>_<timestamp>.csv`` with a same-stem ``.json`` recording what made
them; an existing file is never overwritten.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import CompetitionConfig
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_csv, atomic_write_json

MAX_LISTED = 5
SUM_TOLERANCE = 1e-3


class SubmissionError(PipelineError):
    """The submission does not match the sample submission; the message says where."""


def _listed(items: Sequence[Any]) -> str:
    items = list(items)
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(repr(i) for i in items[:MAX_LISTED]) + more


def build_submission(sample: pd.DataFrame, comp_cfg: CompetitionConfig, test_ids: Sequence[str],
                     probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Fill the sample submission's form with predictions.

    Args:
        sample: the competition's sample submission (as read, all strings).
        comp_cfg: the ``competition`` config section (id column, submission form).
        test_ids: the id of each row of ``probs``.
        probs: ``(N, C)`` probabilities, columns in the order of ``classes``.
        classes: the sorted class list of the run.
    """
    idc = comp_cfg.id_column
    if idc not in sample.columns:
        raise SubmissionError(f"sample submission has no id column {idc!r} (columns {list(sample.columns)}); "
                              "set competition.id_column")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(test_ids), len(classes)):
        raise SubmissionError(f"predictions have shape {probs.shape}, expected ({len(test_ids)}, {len(classes)})")
    ids = pd.Series(list(test_ids), dtype=str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise SubmissionError(f"test ids {_listed(dup)} are predicted more than once")
    index = pd.Index(ids)
    wanted = sample[idc].astype(str).str.strip()
    missing = wanted[~wanted.isin(index)]
    if len(missing):
        raise SubmissionError(f"no prediction for {len(missing)} id(s) of the sample submission: {_listed(missing)}; "
                              "predict every test image (python -m pipeline.predict --all-folds)")
    rows = index.get_indexer(wanted)
    ordered = probs[rows]

    others = [c for c in sample.columns if c != idc]
    if comp_cfg.submission_form == "label":
        if len(others) != 1:
            raise SubmissionError(
                f"the sample submission has {len(others)} columns besides {idc!r} ({_listed(others)}); "
                "a label submission has exactly one. For one probability column per class set "
                "competition.submission_form=probabilities")
        labels = np.asarray(classes, dtype=object)[ordered.argmax(1)]
        return pd.DataFrame({idc: sample[idc].to_numpy(), others[0]: labels})[list(sample.columns)]

    col = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in others if c not in col]
    if unknown:
        raise SubmissionError(f"sample submission columns {_listed(unknown)} are not classes of the run "
                              f"(classes: {_listed(classes)})")
    out = pd.DataFrame(ordered[:, [col[c] for c in others]], columns=others)
    # The sample may list the classes in another order; the columns follow it exactly.
    out.insert(0, idc, sample[idc].to_numpy())
    return out[list(sample.columns)]


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame, comp_cfg: CompetitionConfig,
                        classes: Sequence[str], source: str = "sample_submission.csv") -> None:
    """Raise :class:`SubmissionError` unless ``sub`` has exactly the form of ``sample``.

    Checks the columns, the row count, every id and its order, the labels (known classes) or the
    probabilities (finite, in [0, 1], each row summing to 1).
    """
    idc = comp_cfg.id_column
    if list(sub.columns) != list(sample.columns):
        raise SubmissionError(f"submission columns {list(sub.columns)} differ from {source}'s {list(sample.columns)}")
    if len(sub) != len(sample):
        raise SubmissionError(f"submission has {len(sub)} rows but {source} has {len(sample)}; "
                              "one row per test id is needed")
    got = sub[idc].astype(str).str.strip().to_numpy()
    want = sample[idc].astype(str).str.strip().to_numpy()
    if (got != want).any():
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing or extra:
            parts = [f"missing id(s) {_listed(missing)}" if missing else "",
                     f"unknown id(s) {_listed(extra)}" if extra else ""]
            raise SubmissionError(f"submission ids differ from {source}: " + "; ".join(p for p in parts if p))
        row = int(np.flatnonzero(got != want)[0])
        raise SubmissionError(f"submission row {row + 2} has id {got[row]!r} where {source} has {want[row]!r}; "
                              "rows must follow the sample's order")
    others = [c for c in sample.columns if c != idc]
    if comp_cfg.submission_form == "label":
        known = set(classes)
        values = sub[others[0]].astype(str)
        bad = values[~values.isin(known)]
        if len(bad):
            r = bad.index[0]
            raise SubmissionError(f"submission row {r + 2} (id {sub.at[r, idc]!r}) has label {bad.iloc[0]!r}, "
                                  f"which is not a class of the training data; {len(bad)} such row(s)")
        return
    unknown = [c for c in others if c not in set(classes)]
    if unknown:
        raise SubmissionError(f"probability columns {_listed(unknown)} are not known classes")
    p = sub[others].to_numpy(dtype=np.float64)
    bad_rows = np.flatnonzero(~np.isfinite(p).all(1) | (p < 0).any(1) | (p > 1).any(1))
    if len(bad_rows):
        r = int(bad_rows[0])
        raise SubmissionError(f"submission row {r + 2} (id {sub.iloc[r][idc]!r}) has a probability outside [0, 1] "
                              f"or not a number; {len(bad_rows)} such row(s)")
    sums = p.sum(1)
    off = np.flatnonzero(np.abs(sums - 1) > SUM_TOLERANCE)
    if len(off):
        r = int(off[0])
        raise SubmissionError(f"submission row {r + 2} (id {sub.iloc[r][idc]!r}) has probabilities summing to "
                              f"{sums[r]:.4f}, not 1; {len(off)} such row(s)")


def write_submission(sub: pd.DataFrame, directory: str | Path, name: str, meta: dict[str, Any],
                     timestamp: str | None = None) -> Path:
    """Write ``<directory>/<name>_<timestamp>.csv`` and the same-stem ``.json``; never overwrite.

    With an explicit ``timestamp`` an existing file raises :class:`FileExistsError`; with the
    automatic one (UTC, to the second) a suffix ``-2``, ``-3`` ... keeps two runs in one second apart.
    """
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise SubmissionError(f"submission name {name!r} must be a plain file name (no '/', not starting with '.')")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    auto = timestamp is None
    stamp = timestamp or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for attempt in range(1, 100):
        stem = f"{name}_{stamp}" + (f"-{attempt}" if attempt > 1 else "")
        csv, js = directory / f"{stem}.csv", directory / f"{stem}.json"
        if auto and (csv.exists() or js.exists()):
            continue
        try:
            atomic_write_csv(csv, sub, overwrite=False)
        except FileExistsError:
            if auto:
                continue
            raise
        atomic_write_json(js, {**meta, "submission": str(csv)}, overwrite=False)
        return csv
    raise FileExistsError(f"{directory}/{name}_{stamp}*.csv: too many submissions in one second")


def read_submission_meta(csv_path: str | Path) -> dict[str, Any] | None:
    """The ``.json`` written beside a submission, or None if it is missing or unreadable."""
    from pipeline.io import read_json

    try:
        return read_json(Path(csv_path).with_suffix(".json"))
    except (OSError, ValueError):
        return None


def score_submission(sub: pd.DataFrame, solution_path: str | Path, comp_cfg: CompetitionConfig) -> float:
    """Score against a hidden solution (id + label): accuracy, or log loss for probability submissions."""
    path = Path(solution_path)
    if not path.is_file():
        raise PipelineError(f"solution file {path} does not exist; set competition.solution or leave it empty")
    sol = pd.read_csv(path, dtype=str, keep_default_na=False)
    idc = comp_cfg.id_column
    label_col = next((c for c in sol.columns if c != idc), None)
    if idc not in sol.columns or label_col is None:
        raise PipelineError(f"solution file {path} needs columns {idc!r} and a label column; has {list(sol.columns)}")
    merged = sol.merge(sub, on=idc, how="left", suffixes=("_true", ""))
    if comp_cfg.submission_form == "label":
        pred_col = [c for c in sub.columns if c != idc][0]
        true = merged[f"{label_col}_true"] if f"{label_col}_true" in merged else merged[label_col]
        return float((merged[pred_col].astype(str) == true.astype(str)).mean())
    classes = [c for c in sub.columns if c != idc]
    col = {c: i for i, c in enumerate(classes)}
    p = merged[classes].to_numpy(dtype=np.float64)
    y = np.array([col.get(v, -1) for v in merged[label_col]])
    if (y < 0).any() or np.isnan(p).any():
        raise PipelineError(f"solution file {path} has ids or labels the submission does not cover")
    p = p / p.sum(1, keepdims=True)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1)).mean())
