"""Atomic writes: all or nothing, never overwriting when told not to, usual file permissions."""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data import read_image
from pipeline.io import (
    atomic_save_figure,
    atomic_torch_save,
    atomic_write_csv,
    atomic_write_image,
    atomic_write_json,
    atomic_write_text,
    read_json,
)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_text_json_csv_round_trip(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "b" / "note.txt", "érable ✓\n")
    assert p.read_text(encoding="utf-8") == "érable ✓\n"
    obj = {"acc": np.float32(0.5), "n": np.int64(3), "v": np.arange(3), "p": Path("runs/x")}
    assert read_json(atomic_write_json(tmp_path / "m.json", obj)) == {"acc": 0.5, "n": 3, "v": [0, 1, 2],
                                                                        "p": "runs/x"}
    df = pd.DataFrame({"image": ["images/0.png", "images/1.png"], "p": [0.25, 0.75]})
    out = pd.read_csv(atomic_write_csv(tmp_path / "t.csv", df))
    assert out.equals(df)
    with pytest.raises(TypeError, match="cannot write object to JSON"):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and not _leftovers(tmp_path)


def test_files_get_the_usual_permissions(tmp_path):
    p = atomic_write_text(tmp_path / "x.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # not mkstemp's owner-only 0600


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "sub.csv", "old\n")

    class Boom(Exception):
        pass

    def write(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise Boom

    from pipeline.io import _atomic

    with pytest.raises(Boom):
        _atomic(path, write)
    assert path.read_text() == "old\n" and not _leftovers(tmp_path)


def test_no_overwrite(tmp_path):
    path = atomic_write_text(tmp_path / "submission.csv", "first\n", overwrite=False)
    with pytest.raises(FileExistsError, match="already exists and is never overwritten"):
        atomic_write_text(path, "second\n", overwrite=False)
    assert path.read_text() == "first\n" and not _leftovers(tmp_path)
    atomic_write_text(path, "third\n")  # the default replaces
    assert path.read_text() == "third\n"


def test_no_overwrite_with_concurrent_writers(tmp_path):
    path = tmp_path / "race.txt"
    results: list[str] = []

    def writer(i: int) -> None:
        try:
            atomic_write_text(path, f"{i}\n", overwrite=False)
            results.append(f"won {i}")
        except FileExistsError:
            results.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1 and path.read_text() == winners[0].split()[1] + "\n"
    assert not _leftovers(tmp_path)


def test_no_overwrite_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    path = atomic_write_text(tmp_path / "s.csv", "a\n", overwrite=False)
    assert path.read_text() == "a\n"
    with pytest.raises(FileExistsError):
        atomic_write_text(path, "b\n", overwrite=False)
    assert path.read_text() == "a\n" and not _leftovers(tmp_path)


def test_torch_save_loads_weights_only(tmp_path):
    state = {"model": {"w": torch.ones(2)}, "epoch": 3, "classes": ["a", "b"], "best_metric": 0.5}
    p = atomic_torch_save(tmp_path / "fold0" / "best.pt", state)
    loaded = torch.load(p, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_image_and_figure(tmp_path):
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red: a BGR/RGB mix-up would show as blue
    assert np.array_equal(read_image(atomic_write_image(tmp_path / "r.png", rgb)), rgb)
    gray = np.full((4, 4), 77, np.uint8)
    assert (read_image(atomic_write_image(tmp_path / "g.png", gray)) == 77).all()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    p = atomic_save_figure(tmp_path / "plot.png", fig)
    plt.close(fig)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not _leftovers(tmp_path)
