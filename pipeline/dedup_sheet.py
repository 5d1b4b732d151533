"""Contact sheet of duplicate groups: one row per group, conflicting and overlapping groups first."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.data.images import ImageReadError, read_image
from pipeline.io import atomic_save_figure

MAX_MEMBERS = 8
CELL = 96


def pick_groups(report: dict, max_groups: int) -> list[dict]:
    """Conflicting groups, then train/test overlaps, then the largest (report order), no repeats."""
    seen, picked = set(), []
    for g in report["conflicts"] + report["overlaps"] + report["groups"]:
        if g["group"] not in seen and len(picked) < max_groups:
            seen.add(g["group"])
            picked.append(g)
    return picked


def _cell(path: Path) -> np.ndarray:
    try:
        img = read_image(path)
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


def contact_sheet(report: dict, root: Path, out: Path, max_groups: int = 12) -> bool:
    """Draw the picked groups into ``out`` (PNG); returns False (and writes nothing) when there are none."""
    groups = pick_groups(report, max_groups)
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(MAX_MEMBERS, max(g["size"] for g in groups))
    fig, axes = plt.subplots(len(groups), cols, figsize=(1.6 * cols, 1.9 * len(groups)), squeeze=False)
    for row, g in enumerate(groups):
        tags = [t for t, on in (("CONFLICT", g["conflict"]), ("train/test", g["overlap"]),
                                ("chained", "chained" in g)) if on]
        title = f"group {g['group']}: {g['size']} images, {g['kind']}" + (f" [{', '.join(tags)}]" if tags else "")
        for col in range(cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= min(g["size"], MAX_MEMBERS):
                ax.axis("off")
                continue
            ax.imshow(_cell(root / g["images"][col]))
            label = g["labels"][col] if g["splits"][col] == "train" else "test"
            ax.set_xlabel(f"{Path(g['images'][col]).name}\n{label}", fontsize=7)
            if g["conflict"] and g["splits"][col] == "train":
                for spine in ax.spines.values():
                    spine.set_color("red")
                    spine.set_linewidth(2)
        axes[row, 0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    atomic_save_figure(out, fig)
    plt.close(fig)
    return True
