"""Where a result came from: code version, library versions, data and device.

Every run's ``metrics.json`` and every submission's ``.json`` carry :func:`provenance`, so a score
can be traced to the commit (and whether the tree had uncommitted changes), the versions of
torch, timm and the other libraries that shape results, the exact data (a fingerprint) and the
hardware it was made on.
"""
from __future__ import annotations

import hashlib
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

# Distributions whose version can change a result (numerics, augmentation, decoding, metrics).
PACKAGES = ("torch", "torchvision", "timm", "albumentations", "opencv-python-headless", "opencv-python",
            "numpy", "pandas", "scikit-learn", "scipy", "pillow", "pydantic", "wandb", "pycocotools")
REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The project's git commit and whether the working tree differed from it (None outside git)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` (those not installed are left out) and Python's."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def device_info(device: Any = None) -> dict[str, Any]:
    """The accelerator a run used: GPU model, compute capability, count, CUDA/cuDNN; or the CPU."""
    import torch

    kind = getattr(device, "type", str(device) if device is not None else "cpu")
    if kind == "cuda" and torch.cuda.is_available():
        index = getattr(device, "index", None) or 0
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}",
                "count": torch.cuda.device_count(), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def file_fingerprint(*files: str | Path) -> str | None:
    """sha256 (16 hex digits) of the files' bytes in order; None when one is missing."""
    h = hashlib.sha256()
    for f in files:
        p = Path(f)
        if not p.is_file():
            return None
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def data_fingerprint(cfg: Any) -> str | None:
    """The classification data: folds.csv (images, labels, groups, folds) and dedup's fingerprint of
    every train and test image file (name, size, modification time); None before folds exist."""
    from pipeline import paths
    from pipeline.io import read_json

    folds = file_fingerprint(paths.folds_csv(cfg))
    try:
        images = read_json(paths.dedup_report(cfg)).get("input_fingerprint")
    except (OSError, ValueError):
        images = None
    return f"{folds}-{images}" if folds else None


def split_fingerprint(*splits: Any) -> str:
    """Detection splits: image names, original sizes, boxes and labels."""
    h = hashlib.sha256()
    for s in splits:
        for name, size, boxes, labels in zip(s.images, s.sizes, s.boxes, s.labels):
            h.update(f"{s.name}/{name}:{size}".encode())
            h.update(boxes.tobytes())
            h.update(labels.tobytes())
    return h.hexdigest()[:16]


def provenance(*, device: Any = None, data: str | None = None, world_size: int = 1) -> dict[str, Any]:
    """The block saved as ``provenance`` in run and submission JSON files.

    Args:
        device: the torch device the work ran on.
        data: a fingerprint of the data the result was made from.
        world_size: processes that trained together (DDP).
    """
    return {"code": code_version(), "versions": versions(), "data_fingerprint": data,
            "device": {**device_info(device), "world_size": world_size}}
