"""The competition reader: one table of train images and one of test images, by config alone.

Layouts (README, "Your own competition"):
- Classify Leaves: ``train.csv`` (image,label) with paths, ``test.csv`` (image);
- CIFAR-10: ``trainLabels.csv`` (id,label), ``train_image: train/{id}.png``, test ids from the
  files in ``test_dir`` (ids are the file names without extension);
- Dog breed: ``labels.csv`` (id,breed), ``test_csv: null`` so the test ids come from
  ``sample_submission.csv``, one probability column per class in the submission.

Every table gets the columns ``id`` (as written in the CSV; what the submission uses), ``image``
(path relative to the competition root with ``/`` separators, the key in every file between
stages) and ``path`` (absolute); train also ``label``. Ids and labels are always strings
(``"007"`` stays ``"007"``), and classes sort as strings.

Every problem of the tables (missing columns aside, which stop the reading) is collected and
raised as one :class:`DataError` listing every offending row, before any training starts.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from pipeline.config import CompetitionConfig
from pipeline.data.images import ImageReadError, read_image
from pipeline.errors import PipelineError
from pipeline.progress import bar

MAX_LISTED = 10
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class DataError(PipelineError):
    """The competition files have problems; the message lists every offending row."""


@dataclass
class Competition:
    cfg: CompetitionConfig
    root: Path
    train: pd.DataFrame
    test: pd.DataFrame
    classes: list[str]
    sample_submission: pd.DataFrame

    @property
    def slug(self) -> str:
        return self.cfg.slug

    @property
    def class_to_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def all_images(self) -> pd.DataFrame:
        """Train and test together with a ``split`` column (train rows first)."""
        train = self.train.assign(split="train")
        test = self.test.assign(split="test", label=pd.NA)
        return pd.concat([train, test], ignore_index=True)[["id", "image", "path", "label", "split"]]


def _read_csv(path: Path, what: str, required: list[str], key: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; set {key} in the config to the right file name")
    try:
        # dtype=str and no NA parsing: ids like "007" and labels like "NA" or "1" stay as written.
        # utf-8-sig drops the byte-order mark Excel puts before the first header.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save it as UTF-8 CSV") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{what} {path} is empty; it needs a header line and one line per image") from None
    except Exception as exc:  # pandas raises many kinds (ParserError, ...); the user needs the file name
        raise DataError(f"{what} {path} could not be read as CSV: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{what} {path} has no column {', '.join(repr(m) for m in missing)}; its columns are "
            f"{list(df.columns)}. Set competition.id_column / competition.label_column to match."
        )
    return df


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _image_path(template: str, id_: str) -> str:
    """Template applied to the id, normalised to a relative POSIX path (Windows ``\\`` accepted)."""
    raw = template.format(id=id_).strip()
    if raw == "":
        return ""
    return str(PurePosixPath(raw.replace("\\", "/")))


def _check_paths(df: pd.DataFrame, root: Path, source: str, first_line: int = 2) -> tuple[list[str], list[bool]]:
    """Problems of ``df['image']`` (row numbers as lines of ``source``) and which rows are usable."""
    problems, ok = [], []
    for row, (id_, rel) in enumerate(zip(df["id"], df["image"])):
        line = row + first_line
        p = PurePosixPath(rel)
        if id_ == "":
            problems.append(f"{source} line {line}: empty id")
        elif p.is_absolute() or _WINDOWS_DRIVE.match(rel):
            problems.append(f"{source} line {line}: {rel!r} is an absolute path; paths must be relative "
                            f"to the competition folder {root}")
        elif ".." in p.parts:
            # A textual check on purpose: a symlinked images/ folder (data on another disk) is fine.
            problems.append(f"{source} line {line}: {rel!r} leaves the competition folder {root}")
        elif not (root / p).is_file():
            problems.append(f"{source} line {line}: {rel!r} not found under {root}")
        else:
            ok.append(True)
            continue
        ok.append(False)
    return problems, ok


def _duplicates(df: pd.DataFrame, column: str, source: str, first_line: int = 2) -> list[str]:
    dup = df[column].duplicated(keep="first") & (df[column] != "")
    return [f"{source} line {r + first_line}: {df[column].iat[r]!r} listed twice"
            for r in range(len(df)) if dup.iat[r]]


def _id_mismatch(test_ids: list[str], sample_ids: list[str], test_name: str, sample_name: str) -> list[str]:
    test_set, sample_set = set(test_ids), set(sample_ids)
    problems = []
    for missing, here, there in ((sorted(test_set - sample_set, key=_natural_key), test_name, sample_name),
                                 (sorted(sample_set - test_set, key=_natural_key), sample_name, test_name)):
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
            problems.append(f"{len(missing)} id(s) of {here} are not in {there} ({shown}); a submission must "
                            "list exactly the test ids")
    return problems


# The closing advice of an error, by the kind of problem: a train row can be fixed or removed, but
# the submission needs every test id, so a test problem is fixed at the files, never by removing it.
ADVICE = {
    "train": "Fix or remove these rows of the train table and run again.",
    "test": "The submission must list every test id, so test rows cannot be removed: put the missing or "
            "broken test images in place (check competition.root and competition.test_image) and run again.",
    "ids": "Use the test table and sample submission of the same download (or set competition.test_csv: null "
           "to take the test ids from the sample submission).",
    "classes": "Spell the labels of the train table as the sample submission's columns (they are compared "
               "exactly, case included) and run again.",
}
_said: set[str] = set()


def _note_once(message: str) -> None:
    """A note about the data, printed once per process however many stages read the competition."""
    if message not in _said:
        _said.add(message)
        print(f"note: {message}", file=sys.stderr)


def _raise_if(problems: list[str], what: str, kinds: set[str] | None = None) -> None:
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        advice = "\n".join(ADVICE[k] for k in ADVICE if k in (kinds or {"train"}))
        raise DataError(f"{len(problems)} problem(s) in {what}:\n  {shown}{more}\n{advice}")


def _stripped(values: pd.Series, what: str, source: str) -> list[str]:
    """``values`` without surrounding spaces; says once how many had them (a silent change surprises)."""
    raw = values.astype(str)
    clean = raw.str.strip()
    changed = (raw != clean).to_numpy().nonzero()[0]
    if len(changed):
        r = int(changed[0])
        _note_once(f"{source}: removed spaces around {len(changed)} {what}(s) (e.g. line {r + 2}: {raw.iat[r]!r} "
                   f"-> {clean.iat[r]!r}); they are read without them")
    return clean.tolist()


def _class_column_problems(train: pd.DataFrame, sample_columns: set[str], tname: str, sub_name: str
                           ) -> list[str]:
    """One problem per class of the train table without a probability column, with its rows and the
    nearest column name (``Grace_Hopper`` vs ``grace_hopper``)."""
    problems = []
    lower = {c.lower(): c for c in sample_columns}
    for cls in sorted(set(train["label"]) - sample_columns - {""}):
        lines = [r + 2 for r in (train["label"] == cls).to_numpy().nonzero()[0]]
        near = lower.get(cls.lower()) or next(iter(difflib.get_close_matches(cls, sorted(sample_columns), n=1)), None)
        hint = f"; did you mean {near!r}?" if near else ""
        shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
        problems.append(f"{tname} line(s) {shown} ({len(lines)} row(s)): class {cls!r} has no probability column "
                        f"in {sub_name}{hint}")
    return problems


def _test_table(cfg: CompetitionConfig, root: Path, sample: pd.DataFrame, sample_name: str
                ) -> tuple[pd.DataFrame, str, int]:
    """Test ids and images from test_dir, test_csv or the sample submission (in that order)."""
    if cfg.test_dir:
        folder = root / cfg.test_dir
        if not folder.is_dir():
            raise DataError(f"competition.test_dir {folder} is not a folder; set it to the folder of test "
                            "images, or to null to read test ids from competition.test_csv")
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in cfg.test_extensions}
        # Hidden files (".DS_Store", macOS "._x.png" resource forks) are never images.
        files = sorted((f for f in folder.iterdir()
                        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in exts),
                       key=lambda f: _natural_key(f.name))
        if not files:
            raise DataError(f"competition.test_dir {folder} holds no files ending in {sorted(exts)}; "
                            "set competition.test_extensions")
        # The id is the file name without extension; the image is the file itself.
        test = pd.DataFrame({"id": [f.stem for f in files],
                             "image": [str(PurePosixPath(*f.relative_to(root).parts)) for f in files]})
        return test, f"{cfg.test_dir}/", 1
    if cfg.test_csv:
        src = root / cfg.test_csv
        if not src.is_file():
            raise DataError(f"test table {src} does not exist; set competition.test_csv to the right file "
                            "name, or to null to take the test ids from competition.test_dir or the "
                            "sample submission")
        ids = _read_csv(src, "test table", [cfg.id_column], "competition.test_csv")[cfg.id_column]
        name = src.name
    else:
        ids, name = sample[cfg.id_column], sample_name
    ids = [str(i).strip() for i in ids]
    test = pd.DataFrame({"id": ids, "image": [_image_path(cfg.test_image, i) if i else "" for i in ids]})
    return test, name, 2


def read_test_table(cfg: CompetitionConfig, root: Path, sample: pd.DataFrame | None = None) -> pd.DataFrame:
    """The test table alone (id, image, path) from ``test_dir`` or ``test_csv`` under ``root``: no train.csv.

    For ``pipeline.infer`` on a hidden test set. Raises one :class:`DataError` listing every missing image.
    """
    if sample is None and not (cfg.test_dir or cfg.test_csv):
        raise DataError("the test ids come from the sample submission (competition.test_csv and test_dir are "
                        "null); give the sample submission")
    sample = sample if sample is not None else pd.DataFrame({cfg.id_column: []})
    test, name, first_line = _test_table(cfg, root, sample, cfg.sample_submission)
    problems = _duplicates(test, "id", name, first_line) + _check_paths(test, root, name, first_line)[0]
    _raise_if(problems, f"test images under {root}")
    test["path"] = [str(root.resolve() / p) for p in test["image"]]
    return test


def load_competition(cfg: CompetitionConfig, check_images: bool = False, build: bool = True) -> Competition:
    """Read and check the competition folder described by ``cfg``.

    Args:
        cfg: the ``competition`` section of the config.
        check_images: also decode every image (threads, progress bar) and report unreadable ones
            in the same error as the other problems.
        build: build the embedded default competition first if ``cfg.build`` names one and the
            folder has not been built yet.

    Raises:
        DataError: one message listing every problem found (first ``MAX_LISTED`` rows by name).
    """
    root = Path(cfg.root)
    hint = ""
    if build and cfg.build == "digits":
        from pipeline.data.digits import default_root, ensure_digits

        if root.exists() or root.resolve() == default_root():
            ensure_digits(root)
        else:
            hint = (f"; the embedded demo is built on first use only in {default_root()} (build it elsewhere "
                    f"with python -m pipeline.data.digits --root {cfg.root})")
    if not root.is_dir():
        raise DataError(f"competition.root {cfg.root} is not a folder (resolved: {os.path.abspath(root)}); point "
                        "competition.root at the competition data (a relative path in a config file is read from "
                        f"that file's folder, one given with --set from the working folder){hint}")
    root_abs = root.resolve()

    train_src = root / cfg.train_csv
    raw = _read_csv(train_src, "train table", [cfg.id_column, cfg.label_column], "competition.train_csv")
    tname = train_src.name
    ids = _stripped(raw[cfg.id_column], "id", tname)
    train = pd.DataFrame({
        "id": ids,
        "label": _stripped(raw[cfg.label_column], "label", tname),
        "image": [_image_path(cfg.train_image, i) if i else "" for i in ids],
    })
    problems = [f"{tname} line {r + 2}: empty label" for r in range(len(train)) if train["label"].iat[r] == ""]
    problems += _duplicates(train, "image", tname)
    path_problems, train_ok = _check_paths(train, root, tname)
    problems += path_problems
    if len(train) == 0:
        problems.append(f"{tname}: no rows; it needs one line per training image")

    sub_path = root / cfg.sample_submission
    sample = _read_csv(sub_path, "sample submission", [cfg.id_column], "competition.sample_submission")
    kinds = {"train"} if problems else set()
    test, test_name, first_line = _test_table(cfg, root, sample, sub_path.name)
    test_problems = _duplicates(test, "id", test_name, first_line)
    path_problems, test_ok = _check_paths(test, root, test_name, first_line)
    test_problems += path_problems
    kinds |= {"test"} if test_problems else set()
    problems += test_problems
    id_problems = _id_mismatch(test["id"].tolist(), sample[cfg.id_column].astype(str).str.strip().tolist(),
                               test_name, sub_path.name)
    kinds |= {"ids"} if id_problems else set()
    problems += id_problems

    for df in (train, test):
        df["path"] = [str(root_abs / p) if p else "" for p in df["image"]]

    labels = train.loc[train["label"] != "", "label"]
    classes = sorted(labels.unique().tolist())
    if len(train) and len(classes) < 2:
        problems.append(f"{tname}: column {cfg.label_column!r} holds {len(classes)} class(es) {classes}; "
                        "a classifier needs at least two")
        kinds.add("train")
    if cfg.submission_form == "probabilities":
        # With submission_form: probabilities the sample submission has one column per class.
        class_problems = _class_column_problems(train, {c for c in sample.columns if c != cfg.id_column},
                                                tname, sub_path.name)
        kinds |= {"classes"} if class_problems else set()
        problems += class_problems

    if check_images:
        for df, ok, source, first, kind in ((train, train_ok, tname, 2, "train"),
                                            (test, test_ok, test_name, first_line, "test")):
            decode = _decode_problems(df, ok, source, first)
            kinds |= {kind} if decode else set()
            problems += decode
    _raise_if(problems, f"competition {root}", kinds)
    return Competition(cfg, root, train, test, classes, sample)


def read_train_column(comp: Competition, column: str, key: str) -> pd.Series:
    """Another column of the train table (e.g. a patient id) as text, in the row order of ``comp.train``."""
    src = comp.root / comp.cfg.train_csv
    raw = _read_csv(src, "train table", [], key)
    if column not in raw.columns:
        raise DataError(f"{key} = {column!r}: {src} has no such column; its columns are {list(raw.columns)}")
    return raw[column].astype(str).str.strip().reset_index(drop=True)


def _probe(path: str) -> str | None:
    try:
        read_image(path)
    except ImageReadError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def _decode_all(paths: list[str], workers: int) -> list[str | None]:
    # cv2 releases the GIL while decoding, so threads overlap the work without pickling images.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(bar(pool.map(_probe, paths), total=len(paths), desc="checking images",
                        leave=False, enabled=len(paths) >= 2000))


def _decode_problems(df: pd.DataFrame, ok: list[bool], source: str, first_line: int, workers: int = 4) -> list[str]:
    rows = [r for r in range(len(df)) if ok[r]]
    results = _decode_all([df["path"].iat[r] for r in rows], workers)
    return [f"{source} line {r + first_line}: {df['image'].iat[r]!r} {msg}"
            for r, msg in zip(rows, results) if msg]


def check_image_files(table: pd.DataFrame, what: str = "images", workers: int = 4) -> None:
    """Decode every image in ``table['path']``; raise one :class:`DataError` naming all bad ones."""
    results = _decode_all(table["path"].tolist(), workers)
    _raise_if([f"{img}: {msg}" for img, msg in zip(table["image"], results) if msg], what)


def save_classes(classes: list[str], path: str | Path) -> Path:
    """Write ``{"classes": [...]}`` (the run's class order; probability columns follow it)."""
    from pipeline.io import atomic_write_json

    return atomic_write_json(path, {"classes": list(classes)})


def load_classes(path: str | Path) -> list[str]:
    from pipeline.io import read_json

    return list(read_json(path)["classes"])
