"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

A killed process therefore never leaves a half-written checkpoint, prediction or submission.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; outputs get the usual rw-r--r-- (per umask).
_FILE_MODE = 0o666 & ~_umask()


def _atomic(path: str | Path, write: Callable[[str], None], overwrite: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise _exists(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _exists(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} already exists and is never overwritten; choose another name")


def _publish_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist, even with concurrent writers."""
    try:
        # os.link fails if the target exists, so a concurrent writer can never be clobbered.
        os.link(tmp, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError:
        # No hard links here (FAT, some network shares): reserve the name with O_EXCL, then replace.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise _exists(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write UTF-8 text (whatever the platform's default encoding)."""
    return _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite)


def atomic_write_json(path: str | Path, obj: Any, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n", overwrite)


def atomic_write_csv(path: str | Path, df, overwrite: bool = True, **kwargs) -> Path:
    """Write a pandas DataFrame as CSV (no index unless asked)."""
    kwargs.setdefault("index", False)
    return _atomic(path, lambda tmp: df.to_csv(tmp, **kwargs), overwrite)


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_figure(path: str | Path, fig, **kwargs) -> Path:
    kwargs.setdefault("dpi", 120)
    kwargs.setdefault("bbox_inches", "tight")
    suffix = Path(path).suffix.lstrip(".") or "png"
    return _atomic(path, lambda tmp: fig.savefig(tmp, format=suffix, **kwargs))


def atomic_write_image(path: str | Path, rgb) -> Path:
    """Write an RGB (H, W, 3) or grayscale (H, W) uint8 array with OpenCV, format from the suffix."""
    import cv2

    path = Path(path)
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(path.suffix or ".png", img)
    if not ok:
        raise OSError(f"could not encode image for {path}")
    return _atomic(path, lambda tmp: Path(tmp).write_bytes(buf.tobytes()))


def stat_stamp(path: str | Path) -> str:
    """``size:mtime_ns`` of a file, or ``missing``: what input fingerprints record per file (a stat,
    no reading), so that a changed or replaced image makes the outputs made from it stale."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")
