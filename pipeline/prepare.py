"""Stage ``prepare``: the resized-image cache, every train and test image decoded once.

``python -m pipeline.prepare`` (also run by ``pipeline.run``, ``train``, ``predict`` and ``dedup``
when ``cache.size`` is set) reads every image of the competition's train and test tables, resizes
its short side to ``cache.size`` (aspect kept, never enlarged; ``auto``: 1.15 x ``train.img_size``)
and writes ``work/<competition>/cache_<size>/`` in ``cache.format`` (see :mod:`pipeline.data.cache`
for the files). Training then decodes a small file (or none, with ``memmap``) instead of the
original photo each epoch; prediction and dedup's thumbnails read it too.

The cache is made again only when its settings or the sources change (name, size, modification
time of every image: the fingerprint in ``cache.json``). It is built in a side folder and swapped in
whole, so a killed build leaves the old cache (or none), never half of one. Processes that need the
same cache at once (two ``pipeline.train --fold`` in two terminals, a Slurm array, DDP ranks) take a
file lock beside it: one builds, the others wait and then use it. Threads over all cores
(``cache.workers``) with a progress bar: OpenCV decodes, resizes and encodes without the GIL.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import filelock
import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import CacheConfig, Config, TrainConfig, add_config_args, config_from_args
from pipeline.data.cache import (
    ARRAY_FILE,
    FILES_DIR,
    INDEX_FILE,
    META_FILE,
    SUFFIX,
    CacheInfo,
    encode,
    open_cache,
    resize_short_side,
    resolve_size,
    settings,
)
from pipeline.data.competition import DataError, load_competition
from pipeline.data.images import ImageReadError, read_image
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json, read_json, stat_stamp
from pipeline.progress import bar as progress_bar

CHUNK = 256  # images in flight at once: bounds the RAM a build holds, whatever the competition's size
MAX_LISTED = 10


def source_table(cfg: Config) -> pd.DataFrame:
    """Every image the cache holds: train and test, each file once (``image``, ``path``)."""
    table = load_competition(cfg.competition).all_images()
    return table.drop_duplicates("image")[["image", "path"]].reset_index(drop=True)


def sources_fingerprint(table: pd.DataFrame) -> str:
    """Digest of every image's name, size and modification time (a stat per file, no reading)."""
    h = hashlib.sha256()
    for image, path in zip(table["image"], table["path"]):
        h.update(f"{image}\x1f{stat_stamp(path)}\x1e".encode())
    return h.hexdigest()[:16]


def _size(cfg: Config, cache: CacheConfig, train: TrainConfig) -> int:
    size = resolve_size(cache, train)
    if size is None:
        raise PipelineError("cache.size is not set; set it (e.g. --set cache.size=256 or cache.size=auto) "
                            "to make the resized-image cache")
    return size


def cache_is_current(cfg: Config, cache: CacheConfig | None = None, train: TrainConfig | None = None,
                     table: pd.DataFrame | None = None) -> bool:
    """Whether ``cache_<size>/`` is complete and made from the current images with these settings."""
    cache, train = cfg.cache if cache is None else cache, cfg.train if train is None else train
    size = _size(cfg, cache, train)
    meta_path = paths.cache_dir(cfg, size) / META_FILE
    if not meta_path.is_file():
        return False
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        return False
    if meta.get("settings") != settings(cache, size) or not meta.get("complete"):
        return False
    table = source_table(cfg) if table is None else table
    return meta.get("sources") == sources_fingerprint(table)


def _one(image: str, path: str, size: int, cache: CacheConfig, files: Path | None) -> tuple:
    """Decode, hash, resize and (file formats) write one image. Returns (row, pixels or None, error)."""
    try:
        rgb = read_image(path)
    except ImageReadError as exc:
        return None, None, f"{image}: {str(exc).split(': ', 1)[-1]}"
    digest = hashlib.sha1(np.ascontiguousarray(rgb).tobytes())  # as dedup's exact-duplicate hash
    digest.update(repr(rgb.shape).encode())
    small = np.ascontiguousarray(resize_short_side(rgb, size))
    row = {"image": image, "height": small.shape[0], "width": small.shape[1], "orig_height": rgb.shape[0],
           "orig_width": rgb.shape[1], "pixel_hash": digest.hexdigest()}
    if files is None:
        return row, small, None
    rel = image + SUFFIX[cache.format]
    out = files / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode(small, cache.format, cache.jpeg_quality))
    row["file"] = rel
    return row, None, None


def build_cache(cfg: Config, cache: CacheConfig | None = None, train: TrainConfig | None = None,
                table: pd.DataFrame | None = None, progress: bool = True) -> CacheInfo:
    """Make ``cache_<size>/`` from scratch (see the module docstring) and return it opened.

    Raises:
        DataError: some images could not be read; the message names every one.
    """
    cache, train = cfg.cache if cache is None else cache, cfg.train if train is None else train
    size = _size(cfg, cache, train)
    table = source_table(cfg) if table is None else table
    final = paths.cache_dir(cfg, size)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files = None if cache.format == "memmap" else partial / FILES_DIR
    workers = cache.workers or os.cpu_count() or 1
    start = time.perf_counter()
    rows, errors, offset = [], [], 0
    array = open(partial / ARRAY_FILE, "wb") if files is None else None
    try:
        with ThreadPoolExecutor(workers) as pool, progress_bar(
                total=len(table), desc=f"cache_{size} ({cache.format})", unit="img", enabled=progress,
                mininterval=0.5) as bar:
            images, sources = table["image"].tolist(), table["path"].tolist()
            for a in range(0, len(images), CHUNK):
                done = pool.map(lambda ip: _one(ip[0], ip[1], size, cache, files), zip(images[a:a + CHUNK],
                                                                                       sources[a:a + CHUNK]))
                for row, pixels, error in done:
                    bar.update()
                    if error:
                        errors.append(error)
                        continue
                    if array is not None:
                        array.write(pixels.data)
                        row["offset"] = offset
                        offset += pixels.nbytes
                    rows.append(row)
    finally:
        if array is not None:
            array.close()
    if errors:
        shutil.rmtree(partial, ignore_errors=True)
        shown = "\n  ".join(errors[:MAX_LISTED]) + (f"\n  ... and {len(errors) - MAX_LISTED} more"
                                                      if len(errors) > MAX_LISTED else "")
        raise DataError(f"{len(errors)} image(s) could not be read:\n  {shown}\nReplace or remove them and run "
                        "again.")
    index = pd.DataFrame(rows)
    atomic_write_csv(partial / INDEX_FILE, index)
    seconds = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
    atomic_write_json(partial / META_FILE, {
        "settings": settings(cache, size), "sources": sources_fingerprint(table), "complete": True,
        "images": len(index), "bytes": disk, "seconds": round(seconds, 2),
        "images_per_s": round(len(index) / max(seconds, 1e-9), 1), "workers": workers,
    })
    # Swap in whole: readers see the old cache or the new one, never a mixture.
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return open_cache(final)


def locate_cache(cfg: Config, cache: CacheConfig | None = None, train: TrainConfig | None = None) -> CacheInfo:
    """The existing cache for these settings (for DDP ranks after rank 0 made it)."""
    cache, train = cfg.cache if cache is None else cache, cfg.train if train is None else train
    folder = paths.cache_dir(cfg, _size(cfg, cache, train))
    if not (folder / META_FILE).is_file():
        raise PipelineError(f"{folder} is not a complete image cache; run python -m pipeline.prepare")
    return open_cache(folder)


def ensure_cache(cfg: Config, cache: CacheConfig | None = None, train: TrainConfig | None = None,
                 quiet: bool = False) -> CacheInfo:
    """The cache for these settings, made first (one line says why) when missing or stale."""
    cache, train = cfg.cache if cache is None else cache, cfg.train if train is None else train
    table = source_table(cfg)
    if cache_is_current(cfg, cache, train, table):
        return locate_cache(cfg, cache, train)
    folder = paths.cache_dir(cfg, _size(cfg, cache, train))
    with build_lock(folder):
        if cache_is_current(cfg, cache, train, table):  # another process made it while this one waited
            return locate_cache(cfg, cache, train)
        reason = "missing" if not (folder / META_FILE).is_file() else "made from other images or settings"
        print(f"prepare: {folder} {reason}; making it now (python -m pipeline.prepare)")
        info = build_cache(cfg, cache, train, table, progress=not quiet)
    if not quiet:
        print(summary(info))
    return info


def build_lock(folder: Path) -> filelock.BaseFileLock:
    """The lock that one builder of ``folder`` holds (``cache_<size>.lock`` beside it)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(folder.with_name(folder.name + ".lock")))


def summary(info: CacheInfo) -> str:
    m, s = info.meta, info.meta["settings"]
    shrunk = int((info.index["orig_height"] != info.index["height"]).sum())
    return (f"prepare: {info.folder}: {m['images']} images, short side {s['size']} px ({shrunk} shrunk), {s['format']}"
            f", {m['bytes'] / 2**20:.1f} MiB, {m['seconds']:.1f}s ({m['images_per_s']:.0f} images/s on "
            f"{m['workers']} threads)")


def prepare(cfg: Config, force: bool = False) -> CacheInfo:
    """Make the cache of ``cfg`` (again with ``force``) and print what it holds."""
    from pipeline.finetune import resolve_training_config

    cfg = resolve_training_config(cfg, quiet=True)  # cache.size: auto follows train.img_size: auto
    if not force and cache_is_current(cfg):
        info = locate_cache(cfg)
        print(f"prepare: up to date ({info.folder}); --force to make it again")
    else:
        with build_lock(paths.cache_dir(cfg, _size(cfg, cfg.cache, cfg.train))):
            info = build_cache(cfg)
    print(summary(info))
    return info


def main(argv: list[str] | None = None) -> CacheInfo:
    parser = argparse.ArgumentParser(prog="python -m pipeline.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--force", action="store_true", help="make the cache again even if it is up to date")
    args = parser.parse_args(argv)
    return prepare(config_from_args(args), force=args.force)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
