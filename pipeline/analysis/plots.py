"""Pictures of an analysis: the ordered confusion matrix and the reliability diagram."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import atomic_save_figure

LABEL_ALL_UP_TO = 30      # classes: above this, tick labels would overlap; the top pairs are marked instead
NUMBERS_UP_TO = 15        # classes: write each cell's share in it
MARKED_PAIRS = 15


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, order: np.ndarray, classes: list[str], pairs: pd.DataFrame, out: Path,
                   title: str) -> Path:
    """Row-normalised confusion matrix in ``order``; readable from 2 to hundreds of classes.

    Up to LABEL_ALL_UP_TO classes every row and column is named. Above, names would overlap, so
    the MARKED_PAIRS most confused pairs are circled, numbered and listed beside the matrix. A
    square-root colour scale keeps a few errors visible next to the full diagonal, and the
    colour map is white at zero, so hundreds of classes never print as a dark block.
    """
    from matplotlib.colors import PowerNorm

    plt = _plt()
    n = len(classes)
    norm_cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    shown = norm_cm[np.ix_(order, order)]
    names = [classes[i] for i in order]
    many = n > LABEL_ALL_UP_TO
    side = min(14.0, max(5.0, 0.32 * n)) if not many else 11.0
    fig_w = side + (4.5 if many else 1.5)
    fig = plt.figure(figsize=(fig_w, side))
    ax = fig.add_axes([0.08 if many else 0.16, 0.08, side / fig_w * 0.82, 0.84])
    im = ax.imshow(shown, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("given label")
    if not many:
        size = 8 if n <= 15 else 6
        ax.set_xticks(range(n), names, rotation=90, fontsize=size)
        ax.set_yticks(range(n), names, fontsize=size)
        if n <= NUMBERS_UP_TO:
            for i in range(n):
                for j in range(n):
                    if cm[order[i], order[j]]:
                        v = shown[i, j]
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if v > 0.5 else "black")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        pos = {c: i for i, c in enumerate(names)}
        lines = []
        for k, r in enumerate(pairs.head(MARKED_PAIRS).itertuples(index=False), start=1):
            i, j = pos[r.given], pos[r.predicted]
            ax.scatter([j], [i], s=90, facecolors="none", edgecolors="red", linewidths=1.2)
            ax.annotate(str(k), (j, i), xytext=(4, 4), textcoords="offset points", color="red", fontsize=8,
                        fontweight="bold")
            lines.append(f"{k:>2}. {r.given} -> {r.predicted}: {r.count} ({r.share:.0%})")
        text = "most confused (given -> predicted)\n\n" + "\n".join(lines) if lines else "no errors"
        fig.text(side / fig_w * 0.82 + 0.1, 0.9, text, va="top", ha="left", fontsize=8, family="monospace")
        ax.set_xlabel(f"predicted ({n} classes, ordered so confused classes sit together)")
    cbar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.01)
    cbar.set_label("share of the given class (square-root scale)", fontsize=8)
    atomic_save_figure(out, fig)
    plt.close(fig)
    return out


def plot_calibration(bins: pd.DataFrame, ece: float, out: Path, title: str) -> Path:
    """Reliability diagram (accuracy against confidence per bin) over a histogram of confidences."""
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    width = float(bins["high"].iloc[0] - bins["low"].iloc[0])
    centers = (bins["low"] + bins["high"]) / 2
    used = bins["count"] > 0
    top.bar(centers[used], bins.loc[used, "accuracy"], width=width * 0.95, color="#4c72b0", label="accuracy")
    gap = bins.loc[used, "confidence"] - bins.loc[used, "accuracy"]
    top.bar(centers[used], gap, bottom=bins.loc[used, "accuracy"], width=width * 0.95, color="none",
            edgecolor="#c44e52", hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title}\nexpected calibration error {ece:.4f}", fontsize=10)
    bottom.bar(centers, bins["count"], width=width * 0.95, color="#888888")
    bottom.set_yscale("log" if bins["count"].max() > 50 * max(bins["count"][used].min(), 1) else "linear")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    atomic_save_figure(out, fig)
    plt.close(fig)
    return out
