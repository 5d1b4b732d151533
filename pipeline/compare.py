"""Runs side by side: ``python -m pipeline.compare [EXPERIMENT ...]``.

Reads every ``runs/<experiment>/`` (config.yaml, and per fold history.csv, metrics.json,
predict.json; the W&B run folders under ``wandb/``) and prints one row per experiment: backbone,
image size, epochs, key augmentations, CV accuracy mean ± std over the complete folds, per-fold
scores, TTA gain, train time, images/s and how many folds are complete. A fold that is still
running, was killed, or left a half-written file is shown as incomplete, never as an error.

The records come from :mod:`pipeline.compare_records` (:func:`load_runs`, :func:`summarize`);
this module renders them. The same functions (with :func:`config_diff` and
:func:`pipeline.compare_plots.plot_runs`) drive ``notebooks/compare_runs.ipynb``.
"""
from __future__ import annotations

import argparse
import difflib
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.compare_records import FOLD_DIR, RunRecord, load_runs, summarize
from pipeline.compare_wandb import find_wandb_runs
from pipeline.config import (
    DEFAULT_CONFIG,
    Config,
    add_config_args,
    apply_overrides,
    build_config,
    config_from_args,
)
from pipeline.config_keys import flatten
from pipeline.errors import PipelineError, cli_entry

FORMATS = ("table", "csv", "markdown", "json")
_NUMBER = re.compile(r"^(….*|[+-]?\d[\d.,:/hms±e+-]*)$")


def _parse_where(item: str) -> tuple[str, bool, Any]:
    m = re.match(r"^\s*([^=!]+?)\s*(!=|=)(.*)$", item)
    if not m or not m.group(1):
        raise PipelineError(f"--where {item!r}: expected dotted.key=value (or key!=value), "
                            "e.g. --where model.backbone=resnet18")
    raw = m.group(3)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return m.group(1), m.group(2) == "=", value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b  # False == 0 in Python, but "ema off" is not "0 epochs of warmup"
    if a == b:
        return True
    if a is not None and b is not None:
        try:  # YAML reads "2e-3" as a string (it wants "2.0e-3"); users write it anyway
            return float(a) == float(b)
        except (TypeError, ValueError):
            pass
    return str(a) == str(b)


def filter_runs(runs: list[RunRecord], where: list[str]) -> list[RunRecord]:
    """Keep runs whose config matches every ``key=value`` / ``key!=value`` condition."""
    for item in where or []:
        key, equal, value = _parse_where(item)
        known = set().union(*(flatten(r.config) for r in runs)) if runs else set()
        if runs and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise PipelineError(f"--where {item!r}: no run has the config key {key!r}.{hint}")
        runs = [r for r in runs if _same(r.get(key, object()), value) == equal]
    return runs


def score_column(metric: str) -> str:
    """The summary column that holds a competition's metric (log loss: ``cv_loss``, else ``cv_mean``)."""
    return "cv_loss" if metric == "log_loss" else "cv_mean"


def _by_score(table: pd.DataFrame, ascending: bool) -> pd.DataFrame:
    """Best first by each competition's own metric, competitions kept together."""
    # A log loss is better when lower: negate it so "largest first" reads best first for both metrics.
    score = [(-row["cv_loss"] if row["metric"] == "log_loss" else row["cv_mean"]) for _, row in table.iterrows()]
    keyed = table.assign(_score=score).sort_values(
        ["competition", "_score"], ascending=[True, ascending], na_position="last", kind="stable")
    return keyed.drop(columns="_score").reset_index(drop=True)


def sort_summary(table: pd.DataFrame, runs: list[RunRecord], key: str, ascending: bool = False) -> pd.DataFrame:
    """Sort by a table column or a dotted config key; runs without a value go last.

    ``score`` (the default) sorts by each run's competition metric, best first: accuracy
    (``cv_mean``) largest first, log loss (``cv_loss``) smallest first.
    """
    if table.empty:
        return table
    if key == "score":
        return _by_score(table, ascending)
    if key in table.columns:
        values = table[key]
    else:
        known = set().union(*(flatten(r.config) for r in runs))
        if key not in known:
            choices = [c for c in table.columns if not c.startswith("fold")] + ["fold<K>", "any dotted config key"]
            close = difflib.get_close_matches(key, list(table.columns) + sorted(known), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise PipelineError(f"--sort {key!r} is neither a column nor a config key.{hint} "
                                f"Sort keys: {', '.join(choices)}")
        by_name = {r.experiment: r.get(key) for r in runs}
        values = table["experiment"].map(by_name)
    numeric = pd.to_numeric(values, errors="coerce")
    sort_values = numeric if numeric.notna().sum() >= values.notna().sum() else values.astype(str)
    order = sort_values.sort_values(ascending=ascending, na_position="last", kind="stable").index
    return table.loc[order].reset_index(drop=True)


def config_diff(runs: list[RunRecord]) -> pd.DataFrame:
    """The config keys whose values differ between ``runs`` (rows), one column per run.

    ``experiment`` is left out: it is the column header. A key that one run lacks shows as ``<missing>``.
    """
    flat = {r.experiment: flatten(r.config) for r in runs}
    keys = sorted(set().union(*flat.values()) - {"experiment"}) if flat else []
    missing = object()
    rows = {}
    for key in keys:
        values = [flat[r.experiment].get(key, missing) for r in runs]
        if any(v is missing for v in values) or any(not _same_value(values[0], v) for v in values[1:]):
            rows[key] = ["<missing>" if v is missing else v for v in values]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[r.experiment for r in runs]).rename_axis("key")


def _same_value(a: Any, b: Any) -> bool:
    # 1 and 1.0 are the same learning rate; True and 1 are not the same setting
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


# ---------------------------------------------------------------- rendering

def _fmt_time(s: float) -> str:
    if math.isnan(s):
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fold_cell(run: RunRecord, i: int) -> str:
    if i >= len(run.folds):
        return ""
    f = run.folds[i]
    if f.complete:
        return f"{f.score:.4f}" if not math.isnan(f.score) else "?"
    if f.status == "missing":
        return "-"
    epochs = run.get("train.epochs")
    return f"…ep{f.epochs_done}/{epochs}" if f.epochs_done and epochs else "…"


def display_table(table: pd.DataFrame, runs: list[RunRecord]) -> pd.DataFrame:
    """The summary as short strings for reading (``0.9512±0.0043``, ``…ep3/10`` for a running fold)."""
    by_name = {r.experiment: r for r in runs}
    fold_cols = [c for c in table.columns if FOLD_DIR.match(c)]
    out = []
    for _, row in table.iterrows():
        run = by_name[row["experiment"]]
        cv = "-" if math.isnan(row["cv_mean"]) else f"{row['cv_mean']:.4f}"
        if not math.isnan(row["cv_std"]):
            cv += f"±{row['cv_std']:.4f}"
        d = {"experiment": row["experiment"], "competition": row["competition"], "metric": row["metric"],
             "backbone": row["backbone"] or "?",
             "img": "" if row["img_size"] is None else row["img_size"],
             "epochs": "" if row["epochs"] is None else row["epochs"],
             "augment": row["augment"], "cv_acc": cv,
             "cv_loss": "-" if math.isnan(row["cv_loss"]) else f"{row['cv_loss']:.4f}"}
        for c in fold_cols:
            d[c.replace("fold", "f")] = _fold_cell(run, int(c[4:]))
        d["tta_gain"] = "-" if math.isnan(row["tta_gain"]) else f"{row['tta_gain']:+.4f}"
        d["time"] = _fmt_time(row["train_time_s"])
        d["img/s"] = "-" if math.isnan(row["images_per_s"]) else f"{row['images_per_s']:.0f}"
        d["folds"] = f"{row['folds_complete']}/{row['folds_total']}"
        d["disk"] = format_bytes(row["disk_bytes"])
        d["wandb"] = (f"{row['wandb_runs']} ({row['wandb_unsynced']} unsynced)" if row["wandb_unsynced"]
                      else str(row["wandb_runs"]))
        out.append(d)
    return pd.DataFrame(out)


def format_bytes(n: float) -> str:
    """``123M``, ``2.9G``: the disk a run folder uses."""
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{int(n)}B"


def _cell(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def to_markdown(df: pd.DataFrame, index: bool = False) -> str:
    """A GitHub-flavoured markdown table (pandas needs the optional tabulate package for this)."""
    if index:
        df = df.reset_index()
    cols = [str(c) for c in df.columns]
    esc = [[_cell(v).replace("|", "\\|") for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def to_text(df: pd.DataFrame, index: bool = False) -> str:
    """An aligned plain-text table."""
    if df.empty:
        return "(nothing to show)"
    if index:
        df = df.reset_index()
    cols = [str(c) for c in df.columns]
    cells = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
    # numbers right-aligned so digits line up, words left-aligned so names read naturally
    numeric = [all(_NUMBER.match(r[i]) or r[i] in ("", "-") for r in cells) for i in range(len(cols))]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(cols)] + [line(r) for r in cells])


def render(df: pd.DataFrame, fmt: str, index: bool = False) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        df.map(_cell).to_csv(buf, index=index)
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        return to_markdown(df, index=index)
    return to_text(df, index=index)


def runs_json(table: pd.DataFrame, runs: list[RunRecord]) -> list[dict[str, Any]]:
    """The summary rows plus per-fold detail and notes, JSON-ready (NaN -> null)."""
    by_name = {r.experiment: r for r in runs}
    out = []
    for rec in table.to_dict(orient="records"):
        run = by_name[rec["experiment"]]
        rec = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
        rec["folds"] = [{"fold": f.fold, "status": f.status,
                         "val_acc": None if math.isnan(f.score) else f.score,
                         "epochs_done": f.epochs_done,
                         "tta_gain": None if math.isnan(f.tta_gain) else f.tta_gain} for f in run.folds]
        rec["wandb"] = [{"name": w.name, "job_type": w.job_type, "group": w.group, "path": str(w.path),
                         "finished": w.finished, "synced": w.synced} for w in run.wandb]
        rec["notes"] = run.problems
        out.append(rec)
    return out


WANDB_METRICS = ("val_acc", "val_loss", "ema_val_acc", "cv_acc", "cv_logloss", "solution_score")


def wandb_table(runs_root: str | Path, runs: list[RunRecord] | None = None) -> pd.DataFrame:
    """The W&B run folders under ``runs_root/*/wandb/``: name, group, job type, state, main metrics.

    Args:
        runs_root: ``paths.runs``.
        runs: limit to these experiments' folds and the ensembles (``job_type`` ensemble, e.g. under
            ``runs/_ensemble/``) that blended one of them; None lists every folder.
    """
    root = Path(runs_root)
    names = None if runs is None else {r.experiment for r in runs}
    rows = []
    for folder in sorted(p for p in root.iterdir() if (p / "wandb").is_dir()) if root.is_dir() else []:
        for w in find_wandb_runs(folder):
            blended = w.config.get("experiments") if isinstance(w.config.get("experiments"), list) else []
            if names is not None and folder.name not in names and not names.intersection(blended):
                continue
            row: dict[str, Any] = {"folder": folder.name, "name": w.name, "group": w.group, "job_type": w.job_type,
                                   "fold": w.config.get("fold"),
                                   "state": ("finished" if w.finished else "running/killed")
                                   + (", synced" if w.synced else ", offline" if w.offline else "")}
            for m in WANDB_METRICS:
                v = w.summary.get(m)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                    row[m] = v
            weights = {k.split("/", 1)[1]: v for k, v in w.summary.items() if k.startswith("weight/")}
            if isinstance(w.summary.get("weight"), dict):  # "weight/x" may come back nested
                weights.update(w.summary["weight"])
            if weights:
                row["weights"] = " ".join(f"{k}={v:.3f}" for k, v in weights.items())
            row["path"] = str(w.path.relative_to(root))
            rows.append(row)
    columns = ["folder", "name", "group", "job_type", "fold", "state"]
    columns += [m for m in WANDB_METRICS if any(m in r for r in rows)]
    columns += ["weights"] * any("weights" in r for r in rows) + ["path"]
    # object dtype keeps fold an int (or empty for ensembles) instead of a float column
    return pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object) for c in columns})


def _round_floats(df: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    # column by column with object dtype: DataFrame.map would turn an int column with gaps into floats
    return pd.DataFrame({c: pd.Series([round(v, digits) if isinstance(v, float) else v for v in df[c]], dtype=object)
                         for c in df.columns})


def _notes(runs: list[RunRecord]) -> list[str]:
    notes = []
    for r in runs:
        notes.extend(f"{r.experiment}: {p}" for p in r.problems)
        notes.extend(f"{r.experiment}: W&B {w.path.name}: {w.problem}" for w in r.wandb if w.problem)
    return notes


# ---------------------------------------------------------------- the stage

def _check_plot_path(path: Path) -> None:
    from matplotlib.figure import Figure

    kinds = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in kinds:
        raise PipelineError(f"--plot {path}: unknown image type {path.suffix!r}; use one of "
                            f"{', '.join('.' + k for k in sorted(kinds))} (e.g. --plot compare.png)")


def _of_competition(runs: list[RunRecord], slug: str, root: Path) -> list[RunRecord]:
    mine = [r for r in runs if r.competition == slug]
    if not mine:
        others = ", ".join(f"{r.experiment} ({r.competition})" for r in runs[:8]) + (" ..." if len(runs) > 8 else "")
        raise PipelineError(f"no run of competition {slug!r} under {root}/ (runs there: {others}); --all shows "
                            "every competition, --config PATH chooses another")
    return mine


def compare(cfg: Config, experiments: list[str] | None = None, *, sort: str = "score", ascending: bool = False,
            where: list[str] | None = None, diff: bool = False, fmt: str = "table", plot: str | Path | None = None,
            show_wandb: bool = False, notes_to=None, all_competitions: bool = False) -> str:
    """Build the comparison text (and the plot) for the runs under ``cfg.paths.runs``.

    Args:
        cfg: the config: ``paths.runs``, and ``competition`` to choose its runs.
        experiments: run folder names or shell patterns (any competition); when empty, every run of
            the config's competition (of every competition with ``all_competitions``).
        sort: ``score`` (each competition's own metric, best first), a table column (``cv_mean``,
            ``train_time_s``, ...) or a dotted config key.
        ascending: smallest first (default: largest first, like a leaderboard).
        where: ``dotted.key=value`` / ``dotted.key!=value`` conditions on the run configs.
        diff: show only the config keys that differ between the chosen runs.
        fmt: ``table``, ``csv``, ``markdown`` or ``json``.
        plot: write learning curves and the CV bar chart to this image file.
        show_wandb: list the W&B run folders instead of the experiment table.
        notes_to: stream for the notes about incomplete folds and damaged files (default: stderr, so
            the csv/json on stdout stays machine-readable).
    """
    if fmt not in FORMATS:
        raise PipelineError(f"--format {fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    if plot:
        _check_plot_path(Path(plot))
    runs = load_runs(cfg.paths.runs, experiments)
    if not experiments and not all_competitions:
        runs = _of_competition(runs, cfg.competition.slug, Path(cfg.paths.runs))
    runs = filter_runs(runs, where or [])
    if not runs:
        raise PipelineError(f"no run matches --where {' '.join(where or [])}")
    table = sort_summary(summarize(runs), runs, sort, ascending)
    order = {name: i for i, name in enumerate(table["experiment"])}
    runs = sorted(runs, key=lambda r: order[r.experiment])

    if plot:
        from pipeline.compare_plots import plot_runs

        plot_runs(runs, table, path=plot)

    if diff:
        if len(runs) < 2:
            raise PipelineError(f"--diff needs at least two runs; {len(runs)} chosen ({runs[0].experiment})")
        d = config_diff(runs)
        if fmt == "json":
            text = json.dumps({k: dict(zip(d.columns, v)) for k, v in zip(d.index, d.values.tolist())}, indent=2)
        elif d.empty:
            text = "the chosen runs have the same config (apart from the experiment name)"
        else:
            text = render(d, fmt, index=True)
    elif show_wandb:
        w = wandb_table(cfg.paths.runs, runs if experiments or where else None)
        if fmt == "json":
            text = json.dumps([{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}
                               for r in w.to_dict(orient="records")], indent=2, default=str)
        else:
            text = render(_round_floats(w), fmt) if not w.empty else "no W&B run folders under the chosen runs"
    elif fmt == "json":
        text = json.dumps(runs_json(table, runs), indent=2, default=str)
    elif fmt == "csv":
        text = render(table, "csv")
    else:
        text = render(display_table(table, runs), fmt)

    notes = _notes(runs)
    if notes:
        stream = notes_to if notes_to is not None else sys.stderr
        print("notes:\n  " + "\n  ".join(notes), file=stream)
    if plot:
        print(f"plot written to {plot}", file=notes_to if notes_to is not None else sys.stderr)
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.compare",
        description="Compare runs side by side: config, CV accuracy per fold, TTA gain, speed; "
                    "incomplete folds are shown as such.")
    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                   help="run folders under paths.runs to compare (shell patterns like 'digits_*'); default: all")
    p.add_argument("--sort", default="score", metavar="KEY",
                   help="score (the competition's metric, best first: the default), a column (cv_mean, cv_loss, "
                        "cv_std, tta_gain, train_time_s, disk_bytes, ...) or a dotted config key, largest first")
    p.add_argument("--all", dest="all_competitions", action="store_true",
                   help="runs of every competition (default: the config's competition)")
    p.add_argument("--ascending", action="store_true", help="sort smallest first")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose config matches, e.g. --where model.backbone=resnet18 (repeatable; "
                        "KEY!=VALUE excludes)")
    p.add_argument("--diff", action="store_true", help="show only the config keys that differ between the runs")
    p.add_argument("--wandb", action="store_true", help="list the W&B run folders (offline or synced) instead")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--plot", metavar="PNG", help="write learning curves per fold and a CV bar chart to this file")
    add_config_args(p)
    return p


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    all_competitions = args.all_competitions
    if args.config == DEFAULT_CONFIG and not Path(DEFAULT_CONFIG).is_file():
        # Outside the checkout there is no default config; runs/ of the working folder is still worth a look.
        cfg = build_config(apply_overrides({}, args.overrides), source="--set overrides")
        print(f"using no config ({DEFAULT_CONFIG} is not here): the runs under {cfg.paths.runs}/ of every "
              "competition", file=sys.stderr)
        all_competitions = True
    else:
        cfg = config_from_args(args)
    text = compare(cfg, args.experiments, sort=args.sort, ascending=args.ascending, where=args.where,
                   diff=args.diff, fmt=args.fmt, plot=args.plot, show_wandb=args.wandb,
                   all_competitions=all_competitions)
    print(text)
    return text


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
