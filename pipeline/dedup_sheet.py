"""Contact sheet of duplicate groups: one row per group, conflicting and overlapping groups first."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.data.images import ImageReadError, read_image
from pipeline.io import atomic_save_figure

MAX_MEMBERS = 8
CELL = 96
CAPTION_CHARS = 14  # what fits under a 1.5-inch cell at 7 pt; longer names are cut in the middle


def pick_groups(report: dict, max_groups: int) -> list[dict]:
    """Conflicting groups, then train/test overlaps, then the largest (report order), no repeats."""
    seen, picked = set(), []
    for g in report["conflicts"] + report["overlaps"] + report["groups"]:
        if g["group"] not in seen and len(picked) < max_groups:
            seen.add(g["group"])
            picked.append(g)
    return picked


def _cell(path: Path, reader=read_image) -> np.ndarray:
    try:
        img = reader(path)
    except ImageReadError:
        return np.full((CELL, CELL, 3), 255, np.uint8)
    h, w = img.shape[:2]
    scale = CELL / max(h, w)
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                     interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    canvas = np.full((CELL, CELL, 3), 255, np.uint8)
    y, x = (CELL - img.shape[0]) // 2, (CELL - img.shape[1]) // 2
    canvas[y:y + img.shape[0], x:x + img.shape[1]] = img
    return canvas


def shorten(text: str, width: int = CAPTION_CHARS) -> str:
    """``text`` cut to ``width`` characters in the middle (an extension kept whole), so a 32-character
    Kaggle id fits under its cell without running into the next caption."""
    if len(text) <= width:
        return text
    stem, ext = (text.rsplit(".", 1)[0], "." + text.rsplit(".", 1)[1]) if "." in text[-6:] else (text, "")
    keep = max(2, width - len(ext) - 1)
    head = (keep + 1) // 2
    return f"{stem[:head]}\u2026{stem[len(stem) - (keep - head):]}{ext}"


def _pack(groups: list[dict], width: int) -> list[list[tuple[dict, int]]]:
    """Rows of (group, first column): groups side by side while they fit in ``width`` cells."""
    rows: list[list[tuple[dict, int]]] = [[]]
    used = 0
    for g in groups:
        cells = min(g["size"], MAX_MEMBERS)
        if rows[-1] and used + 1 + cells > width:
            rows.append([])
            used = 0
        start = used + (1 if rows[-1] else 0)  # one empty cell between groups
        rows[-1].append((g, start))
        used = start + cells
    return rows


def contact_sheet(report: dict, root: Path, out: Path, max_groups: int = 12, reader=read_image) -> bool:
    """Draw the picked groups into ``out`` (PNG); returns False (and writes nothing) when there are none.

    ``reader`` reads an image by path (the resized-image cache's reader, or the original files).
    """
    groups = pick_groups(report, max_groups)
    if not groups:
        return False
    import matplotlib.pyplot as plt

    fig = draw_sheet(groups, root, reader)
    atomic_save_figure(out, fig)
    plt.close(fig)
    return True


def draw_sheet(groups: list[dict], root: Path, reader=read_image):
    """The contact sheet of ``groups`` as a matplotlib figure (one row per group or groups side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(MAX_MEMBERS, max(min(g["size"], MAX_MEMBERS) for g in groups))
    rows = _pack(groups, width)
    fig, axes = plt.subplots(len(rows), width, figsize=(1.5 * width, 2.0 * len(rows)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, row in enumerate(rows):
        for g, start in row:
            tags = [t for t, on in (("CONFLICT", g["conflict"]), ("train/test", g["overlap"]),
                                    ("chained", "chained" in g)) if on]
            title = f"group {g['group']}: {g['size']}, {g['kind']}" + (f" [{', '.join(tags)}]" if tags else "")
            for k in range(min(g["size"], MAX_MEMBERS)):
                ax = axes[r, start + k]
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.imshow(_cell(root / g["images"][k], reader))
                label = g["labels"][k] if g["splits"][k] == "train" else "test"
                ax.set_xlabel(f"{shorten(Path(g['images'][k]).name)}\n{shorten(str(label))}", fontsize=7)
                if g["conflict"] and g["splits"][k] == "train":
                    for spine in ax.spines.values():
                        spine.set_color("red")
                        spine.set_linewidth(2)
            axes[r, start].set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    return fig
