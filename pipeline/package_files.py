"""What an inference package holds and how its integrity is checked (shared by package and infer).

A package (``packages/<name>/``, uploaded as a Kaggle dataset) is a folder::

    manifest.json                     every other file with its size and sha256
    ensemble.json                     members, weights, TTA, merge, preprocessing, submission form
    classes.json                      the class order of every probability column
    experiments/<member>/config.yaml  the resolved training config of each member
    weights/<member>/fold<k>.pt       inference weights only (a plain state dict, float32 or float16)
    wheels/                           the project as a wheel (+ dependency wheels with --with-deps)
    inference.ipynb, README.md

``pipeline.infer`` refuses a package whose files are missing or altered before any work, naming
the file: a half-uploaded dataset or a weight file from another version must not score quietly.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENSEMBLE = "ensemble.json"
CLASSES = "classes.json"
NOTEBOOK = "inference.ipynb"
README = "README.md"
WHEELS = "wheels"
PROJECT_DIST = "pipeline"  # the distribution name in pyproject.toml


def experiment_config(member: str) -> str:
    return f"experiments/{member}/config.yaml"


def weights_file(member: str, fold: int) -> str:
    return f"weights/{member}/fold{fold}.pt"


class PackageError(PipelineError):
    """The package is incomplete, altered or not a package; the message names the file."""


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(root: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record every file under ``root`` (but the manifest) with its size and sha256."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST:
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    manifest = {"format": FORMAT_VERSION, **(extra or {}), "files": files}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def verify_package(root: Path, hashes: bool = True) -> dict[str, Any]:
    """Check that every file of the manifest is present with its size and sha256.

    Returns:
        The manifest.

    Raises:
        PackageError: listing every missing or altered file.
    """
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise PackageError(f"{root} is not an inference package: no {MANIFEST}; build one with "
                           "python -m pipeline.package, and point --package at the folder that holds it")
    try:
        manifest = read_json(root / MANIFEST)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackageError(f"{root / MANIFEST} is unreadable ({exc}); rebuild the package") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise PackageError(f"{root / MANIFEST} has format {manifest.get('format')!r}; this pipeline reads "
                           f"format {FORMAT_VERSION}: rebuild the package with this version")
    problems = []
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != info["bytes"]:
            problems.append(f"{rel}: {p.stat().st_size} bytes, the manifest says {info['bytes']}")
        elif hashes and sha256(p) != info["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (altered or corrupt)")
    if problems:
        raise PackageError(f"package {root} is refused, {len(problems)} file(s) do not match {MANIFEST}:\n  "
                           + "\n  ".join(problems) + "\nUpload the package again (or rebuild it).")
    return manifest
