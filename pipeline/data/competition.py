"""The competition reader: one table of train images and one of test images, by config alone.

Layouts (design.md):
- Classify Leaves: ``train.csv`` (image,label) with paths, ``test.csv`` (image);
- CIFAR-10: ``trainLabels.csv`` (id,label), ``train_image: train/{id}.png``, test ids from ``test_dir``;
- Dog breed: ``labels.csv`` (id,breed), test ids from ``sample_submission.csv``, one probability
  column per class in the submission.

Every table gets the columns ``id`` (what the submission uses), ``image`` (path relative to the
competition root, the key in every file between stages) and ``path`` (absolute); train also
``label``.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
from tqdm.auto import tqdm

from pipeline.config import CompetitionConfig
from pipeline.data.images import ImageReadError, read_image
from pipeline.errors import PipelineError

MAX_LISTED = 10


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


def _read_csv(path: Path, what: str, required: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; set competition.* in the config to the right file name")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many kinds; the user needs the file name
        raise DataError(f"{what} {path} could not be read as CSV: {exc}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{what} {path} has no column {', '.join(repr(m) for m in missing)}; its columns are "
            f"{list(df.columns)}. Set competition.id_column / competition.label_column to match."
        )
    return df


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _image_path(template: str, id_: str) -> str:
    return template.format(id=id_)


def _check_paths(df: pd.DataFrame, root: Path, source: str) -> list[str]:
    problems = []
    root_resolved = root.resolve()
    for row, rel in zip(df.index, df["image"]):
        p = PurePosixPath(rel.replace("\\", "/"))
        line = row + 2  # header is line 1
        if rel.strip() == "":
            problems.append(f"{source} line {line}: empty image path")
        elif p.is_absolute() or re.match(r"^[A-Za-z]:", rel):
            problems.append(f"{source} line {line}: {rel!r} is an absolute path; paths must be inside {root}")
        elif ".." in p.parts or not (root / p).resolve().is_relative_to(root_resolved):
            problems.append(f"{source} line {line}: {rel!r} leaves the competition folder {root}")
        elif not (root / p).is_file():
            problems.append(f"{source} line {line}: {rel!r} not found under {root}")
    return problems


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} problem(s) in {what}:\n  {shown}{more}\nFix or remove these rows and run again.")


def load_competition(cfg: CompetitionConfig, check_images: bool = False, build: bool = True) -> Competition:
    """Read and check the competition folder described by ``cfg``.

    Args:
        cfg: the ``competition`` section of the config.
        check_images: also decode every image (parallel, progress bar) and report unreadable ones.
        build: build the embedded default competition first if ``cfg.build`` names one and the
            folder does not exist yet.
    """
    root = Path(cfg.root)
    if build and cfg.build == "digits" and not (root / cfg.train_csv).is_file():
        from pipeline.data.digits import build_digits

        print(f"building the embedded default competition in {root} (first use)")
        build_digits(root)
    if not root.is_dir():
        raise DataError(f"competition.root {root} is not a folder; point competition.root at the competition data")

    train_src = root / cfg.train_csv
    raw = _read_csv(train_src, "train table", [cfg.id_column, cfg.label_column])
    train = pd.DataFrame({"id": raw[cfg.id_column].str.strip(), "label": raw[cfg.label_column].str.strip()})
    train["image"] = [_image_path(cfg.train_image, i) for i in train["id"]]

    problems = [f"{train_src.name} line {r + 2}: empty label" for r in train.index[train["label"] == ""]]
    problems += [f"{train_src.name} line {r + 2}: empty id" for r in train.index[train["id"] == ""]]
    dup = train["image"].duplicated(keep="first")
    problems += [f"{train_src.name} line {r + 2}: {train.at[r, 'image']!r} listed twice" for r in train.index[dup]]
    problems += _check_paths(train, root, train_src.name)

    sub_path = root / cfg.sample_submission
    sample = _read_csv(sub_path, "sample submission", [cfg.id_column])

    if cfg.test_csv:
        test_src = root / cfg.test_csv
        ids = _read_csv(test_src, "test table", [cfg.id_column])[cfg.id_column].str.strip().tolist()
        test_name = test_src.name
    elif cfg.test_dir:
        folder = root / cfg.test_dir
        if not folder.is_dir():
            raise DataError(f"competition.test_dir {folder} is not a folder")
        exts = {e.lower() for e in cfg.test_extensions}
        files = sorted((f for f in folder.iterdir() if f.suffix.lower() in exts), key=lambda f: _natural_key(f.name))
        ids = [f.stem for f in files]
        test_name = f"{cfg.test_dir}/"
    else:
        ids = sample[cfg.id_column].str.strip().tolist()
        test_name = sub_path.name
    test = pd.DataFrame({"id": ids})
    test["image"] = [_image_path(cfg.test_image, i) for i in test["id"]]
    problems += _check_paths(test, root, test_name)
    _raise_if(problems, f"competition {root}")

    for df in (train, test):
        df["path"] = [str((root / p).resolve()) for p in df["image"]]

    classes = sorted(train["label"].unique().tolist())
    if cfg.submission_form == "probabilities":
        sub_classes = [c for c in sample.columns if c != cfg.id_column]
        unknown = sorted(set(classes) - set(sub_classes))
        if unknown:
            raise DataError(
                f"{sub_path}: labels {unknown[:MAX_LISTED]} of {train_src.name} have no probability column; "
                "the sample submission must list every class"
            )
    comp = Competition(cfg, root, train, test, classes, sample)
    if check_images:
        check_image_files(comp.all_images(), what=f"competition {root}")
    return comp


def check_image_files(table: pd.DataFrame, what: str = "images", workers: int = 4) -> None:
    """Decode every image in ``table['path']``; raise one :class:`DataError` naming all bad ones."""

    def probe(path: str) -> str | None:
        try:
            read_image(path)
        except ImageReadError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(probe, table["path"]), total=len(table), desc="checking images",
                            leave=False, disable=len(table) < 2000))
    problems = [f"{img}: {msg.split(': ', 1)[-1]}" for img, msg in zip(table["image"], results) if msg]
    _raise_if(problems, what)


def save_classes(classes: list[str], path: str | Path) -> Path:
    from pipeline.io import atomic_write_json

    return atomic_write_json(path, {"classes": list(classes)})


def load_classes(path: str | Path) -> list[str]:
    from pipeline.io import read_json

    return list(read_json(path)["classes"])
