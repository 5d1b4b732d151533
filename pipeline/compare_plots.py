"""Plots for :mod:`pipeline.compare`: learning curves per fold and experiment, CV scores with spread.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so the command works on a
headless machine and the notebook shows the same figure inline.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from pipeline.compare_records import RunRecord, summarize
from pipeline.io import atomic_save_figure

MAX_EXPERIMENTS = 12  # beyond this the per-experiment rows stop being readable; pick with names/--where


def _curve(ax, hist: pd.DataFrame, col: str, color, style: str, label: str | None = None) -> bool:
    if col not in hist.columns or hist[col].isna().all():
        return False
    ax.plot(hist["epoch"], hist[col], style, color=color, lw=1.4, marker="o", ms=2.5, label=label)
    return True


def plot_learning_curves(ax_loss, ax_acc, run: RunRecord, acc_limits: tuple[float, float] | None = None) -> None:
    """Train/val loss and val accuracy of every fold of ``run`` on two axes (one colour per fold)."""
    colors = _fold_colors(len(run.folds))
    has_ema = False
    for f in run.folds:
        if f.history is None or f.history.empty:
            continue
        c = colors[f.fold]
        _curve(ax_loss, f.history, "train_loss", c, "-")
        _curve(ax_loss, f.history, "val_loss", c, "--")
        _curve(ax_acc, f.history, "val_acc", c, "-")
        has_ema |= _curve(ax_acc, f.history, "ema_val_acc", c, ":")
    done = f"{len(run.complete_folds)}/{len(run.folds)} folds"
    cv = [f.score for f in run.complete_folds]
    score = f"CV {np.mean(cv):.4f}" if cv else "no complete fold"
    title = f"{run.experiment} ({run.get('model.backbone', '?')}, {run.get('train.img_size', '?')}px)"
    ax_loss.set_title(f"{title}: loss", fontsize=10)
    ax_acc.set_title(f"{title}: val accuracy, {score}, {done}", fontsize=10)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.set_ylabel("val accuracy")
    if acc_limits:
        ax_acc.set_ylim(*acc_limits)
    fold_handles = [Line2D([], [], color=colors[f.fold], lw=2,
                           label=f"fold {f.fold}" + ("" if f.complete else " (incomplete)"))
                    for f in run.folds if f.history is not None and not f.history.empty]
    ax_loss.legend(handles=fold_handles + [Line2D([], [], color="gray", ls="-", label="train"),
                                           Line2D([], [], color="gray", ls="--", label="val")],
                   fontsize=7, loc="upper right")
    if has_ema:
        ax_acc.legend(handles=[Line2D([], [], color="gray", ls="-", label="model"),
                               Line2D([], [], color="gray", ls=":", label="EMA")], fontsize=7, loc="lower right")


def _fold_scores(run: RunRecord, metric: str) -> list[float]:
    if metric == "log_loss":
        return [v for v in (_num(f.metrics.get("val_loss")) for f in run.complete_folds) if not math.isnan(v)]
    return [f.score for f in run.complete_folds]


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def plot_cv_bars(ax, runs: list[RunRecord], table: pd.DataFrame) -> None:
    """CV score per experiment by the competition's metric (accuracy, or log loss where the runs are
    scored by it) with ±std error bars and every fold's score as a dot."""
    metric = "log_loss" if "metric" in table and (table["metric"] == "log_loss").all() else "accuracy"
    name = "log loss" if metric == "log_loss" else "accuracy"
    by_name = {r.experiment: r for r in runs}
    per_run = [_fold_scores(by_name[n], metric) for n in table["experiment"]]
    x = np.arange(len(table))
    means = np.array([np.mean(v) if v else np.nan for v in per_run], dtype=float)
    stds = np.array([np.std(v, ddof=1) if len(v) > 1 else np.nan for v in per_run], dtype=float)
    complete = (table["status"] == "complete").to_numpy()
    bars = ax.bar(x, np.nan_to_num(means), yerr=np.nan_to_num(stds), capsize=5,
                  color=["C0" if c else "lightsteelblue" for c in complete],
                  edgecolor="black", lw=0.6, label="mean ± std over folds")
    for bar, c in zip(bars, complete):
        if not c:
            bar.set_hatch("//")
    scores_all = []
    for i, scores in enumerate(per_run):
        scores_all += scores
        jitter = np.linspace(-0.15, 0.15, len(scores)) if len(scores) > 1 else np.zeros(len(scores))
        ax.scatter(i + jitter, scores, color="black", s=14, zorder=3, label="fold score" if i == 0 else None)
    labels = []
    for (_, row), m, sd in zip(table.iterrows(), means, stds):
        # one short item per line so that a dozen experiments still fit side by side
        cv = "no fold done" if math.isnan(m) else f"{m:.4f}"
        std = "" if math.isnan(sd) else f"\n±{sd:.4f}"
        labels.append(f"{row['experiment']}\n{cv}{std}\n{row['folds_complete']}/{row['folds_total']} folds")
    ax.set_xticks(x, labels, fontsize=8 if len(labels) <= 6 else 7)
    ok = ~np.isnan(means)
    sd0 = np.nan_to_num(stds)
    if scores_all:
        # zoom on the scores (bars then start below the lowest fold) so fold differences stay visible
        lo = min(scores_all + list(means[ok] - sd0[ok]))
        hi = max(scores_all + list(means[ok] + sd0[ok]))
        span = hi - lo
        bottom = max(0.0, lo - max(0.02, 0.6 * span))  # the lowest bar keeps a visible height
        top = hi + max(0.01, 0.3 * span)
        ax.set_ylim(bottom, (min(1.0, top) if metric == "accuracy" else top) + 0.005)
    zoomed = ax.get_ylim()[0] > 0
    better = "lower is better" if metric == "log_loss" else "higher is better"
    ax.set_ylabel(f"validation {name}" + (" (axis zoomed, not from 0)" if zoomed else ""))
    ax.set_title(f"CV {name} per experiment ({better}; bars: mean ± std over complete folds; dots: folds; "
                 "hatched: incomplete)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="upper right", ncol=2)


def plot_runs(runs: list[RunRecord], table: pd.DataFrame | None = None, path: str | Path | None = None) -> Figure:
    """Learning curves (one row per experiment) above a CV bar chart; saved atomically when ``path`` is given.

    Args:
        runs: from :func:`pipeline.compare_records.load_runs`, in the order to show.
        table: the matching :func:`pipeline.compare_records.summarize` table (computed when omitted).
        path: image file to write (format from the suffix).
    """
    if len(runs) > MAX_EXPERIMENTS:
        print(f"plotting the first {MAX_EXPERIMENTS} of {len(runs)} experiments; choose others by name or --where",
              file=sys.stderr)
        runs = runs[:MAX_EXPERIMENTS]
    table = summarize(runs) if table is None else table[table["experiment"].isin([r.experiment for r in runs])]
    table = table.reset_index(drop=True)
    with_curves = [r for r in runs if any(f.history is not None and not f.history.empty for f in r.folds)]
    n = len(with_curves)
    fig = Figure(figsize=(13, 3.2 * n + 4), layout="constrained")
    grid = fig.add_gridspec(n + 1, 2, height_ratios=[1] * n + [1.2])
    accs = [v for r in with_curves for f in r.folds if f.history is not None
            for col in ("val_acc", "ema_val_acc") if col in f.history for v in f.history[col].dropna()]
    limits = (max(0.0, min(accs) - 0.02), min(1.0, max(accs)) + 0.02) if accs else None
    first_loss = first_acc = None
    for i, run in enumerate(with_curves):
        ax_loss = fig.add_subplot(grid[i, 0], sharex=first_loss, sharey=first_loss)
        ax_acc = fig.add_subplot(grid[i, 1], sharex=first_loss, sharey=first_acc)
        first_loss, first_acc = first_loss or ax_loss, first_acc or ax_acc
        plot_learning_curves(ax_loss, ax_acc, run, limits)
    plot_cv_bars(fig.add_subplot(grid[n, :]), runs, table)
    fig.suptitle(f"Run comparison: {len(runs)} experiment(s)", fontsize=12)
    if path is not None:
        atomic_save_figure(path, fig)
    return fig


def _fold_colors(k: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(k, 1))]
