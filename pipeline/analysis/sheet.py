"""Contact sheets: a grid of images, each with a caption of a few lines (fastai's plot_top_losses idea)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.images import ImageReadError, read_image
from pipeline.io import atomic_save_figure

CELL = 128


@dataclass
class Tile:
    path: Path
    caption: str
    frame: str | None = None   # a colour name draws a frame (e.g. "red" for a conflicting group)


def _thumbnail(path: Path) -> np.ndarray:
    try:
        img = read_image(path)
    except ImageReadError:
        return np.full((CELL, CELL, 3), 255, np.uint8)  # the caption still names the file
    h, w = img.shape[:2]
    scale = CELL / max(h, w)
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                     interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    canvas = np.full((CELL, CELL, 3), 255, np.uint8)
    y, x = (CELL - img.shape[0]) // 2, (CELL - img.shape[1]) // 2
    canvas[y:y + img.shape[0], x:x + img.shape[1]] = img
    return canvas


def contact_sheet(tiles: list[Tile], out: Path, title: str, columns: int = 6) -> Path | None:
    """Draw ``tiles`` into ``out``; returns None (and writes nothing) when there are none."""
    if not tiles:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    lines = max(t.caption.count("\n") + 1 for t in tiles)
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, (2.0 + 0.17 * lines) * rows + 0.4),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile in zip(axes.ravel(), tiles):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(_thumbnail(tile.path))
        ax.set_xlabel(tile.caption, fontsize=7)
        if tile.frame:
            for spine in ax.spines.values():
                spine.set_color(tile.frame)
                spine.set_linewidth(2.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_save_figure(out, fig)
    plt.close(fig)
    return out
