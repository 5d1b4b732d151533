"""Runs side by side: ``python -m pipeline.compare [EXPERIMENT ...]``.

Reads every ``runs/<experiment>/`` (config.yaml, and per fold history.csv, metrics.json,
predict.json; the W&B run folders under ``wandb/``) and prints one row per experiment: backbone,
image size, epochs, key augmentations, CV accuracy mean ± std over the complete folds, per-fold
scores, TTA gain, train time, images/s and how many folds are complete. A fold that is still
running, was killed, or left a half-written file is shown as incomplete, never as an error.

The same functions (:func:`load_runs`, :func:`summarize`, :func:`config_diff`,
:func:`pipeline.compare_plots.plot_runs`) drive ``notebooks/compare_runs.ipynb``.
"""
from __future__ import annotations

import argparse
import difflib
import fnmatch
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.compare_wandb import WandbRun, find_wandb_runs
from pipeline.config import Config, add_config_args, config_from_args
from pipeline.errors import PipelineError, cli_entry

FORMATS = ("table", "csv", "markdown", "json")
_FOLD_DIR = re.compile(r"^fold(\d+)$")
_NUMBER = re.compile(r"^(….*|[+-]?\d[\d.,:/hms±e+-]*)$")


@dataclass
class FoldRecord:
    """One ``fold<K>/`` folder as found on disk."""

    fold: int
    path: Path
    status: str  # "complete", "incomplete" or "missing" (folder not created yet)
    metrics: dict[str, Any] | None = None
    history: pd.DataFrame | None = None
    predict: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def score(self) -> float:
        """Validation accuracy of a complete fold (NaN otherwise)."""
        if not self.complete:
            return math.nan
        return _float(self.metrics.get("val_acc"))

    @property
    def epochs_done(self) -> int:
        return 0 if self.history is None else len(self.history)

    @property
    def tta_gain(self) -> float:
        p = self.predict or {}
        return _float(p.get("oof_acc_tta")) - _float(p.get("oof_acc"))


@dataclass
class RunRecord:
    """One ``runs/<experiment>/`` folder: its resolved config, folds and W&B runs."""

    experiment: str
    path: Path
    config: dict[str, Any]
    folds: list[FoldRecord]
    wandb: list[WandbRun] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def complete_folds(self) -> list[FoldRecord]:
        return [f for f in self.folds if f.complete]

    @property
    def is_complete(self) -> bool:
        return bool(self.folds) and all(f.complete for f in self.folds)

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``model.backbone``)."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path} is half-written or damaged ({exc}); shown as incomplete")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} does not hold a JSON object; ignored")
        return None
    return data


def _read_history(path: Path, problems: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        problems.append(f"{path} could not be read ({exc}); learning curve left out")
        return None
    if "epoch" not in df.columns:
        problems.append(f"{path} has no 'epoch' column (columns: {list(df.columns)}); learning curve left out")
        return None
    return df


def load_fold(path: Path, fold: int) -> FoldRecord:
    """Read one fold folder; every problem becomes a note and the fold is marked incomplete."""
    if not path.is_dir():
        return FoldRecord(fold=fold, path=path, status="missing")
    problems: list[str] = []
    metrics = _read_json(path / "metrics.json", problems)
    history = _read_history(path / "history.csv", problems)
    predict = _read_json(path / "predict.json", problems)
    complete = bool(metrics and metrics.get("complete") is True)
    if metrics and not complete:
        problems.append(f"{path / 'metrics.json'} is not marked complete; shown as incomplete")
    return FoldRecord(fold=fold, path=path, status="complete" if complete else "incomplete",
                      metrics=metrics, history=history, predict=predict, problems=problems)


def is_run_folder(path: Path) -> bool:
    """A classification run: ``fold<K>/`` folders, or a ``config.yaml`` before the first fold starts.

    Detection runs (``pipeline.detect``) keep history.csv, metrics.json and checkpoints at the top
    of their folder instead of per fold; they are not comparable here and are left out.
    """
    if not path.is_dir():
        return False
    if any(_FOLD_DIR.match(p.name) and p.is_dir() for p in path.iterdir()):
        return True
    return (path / "config.yaml").is_file() and not any(
        (path / name).exists() for name in ("metrics.json", "history.csv", "last.pt", "best.pt"))


def load_run(path: str | Path) -> RunRecord:
    """Read ``runs/<experiment>/`` (config, every fold, W&B runs) without raising on partial runs."""
    path = Path(path)
    problems: list[str] = []
    config: dict[str, Any] = {}
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        try:
            loaded = yaml.safe_load(cfg_path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
            if not isinstance(loaded, dict):
                problems.append(f"{cfg_path} does not hold a mapping of keys; config columns left empty")
        except (OSError, yaml.YAMLError) as exc:
            problems.append(f"{cfg_path} could not be read ({exc}); config columns left empty")
    else:
        problems.append(f"{cfg_path} is missing (training has not written it yet)")

    found = {int(m.group(1)): p for p in path.iterdir() if p.is_dir() and (m := _FOLD_DIR.match(p.name))}
    k = config.get("folds", {}).get("k") if isinstance(config.get("folds"), dict) else None
    # folds.k says how many folds make the run; a smoke run of fold 0 alone is then 1/k complete
    total = max(k if isinstance(k, int) and k > 0 else 0, max(found) + 1 if found else 0)
    folds = [load_fold(found.get(i, path / f"fold{i}"), i) for i in range(total)]
    for f in folds:
        problems.extend(f.problems)
    return RunRecord(experiment=path.name, path=path, config=config, folds=folds,
                     wandb=find_wandb_runs(path), problems=problems)


def load_runs(runs_root: str | Path, experiments: list[str] | None = None) -> list[RunRecord]:
    """Every run folder under ``runs_root``, or those named (shell-style patterns allowed).

    Raises:
        PipelineError: no runs at all, or a name that matches no run folder.
    """
    root = Path(runs_root)
    available = sorted(p.name for p in root.iterdir() if is_run_folder(p)) if root.is_dir() else []
    if not available:
        raise PipelineError(f"no runs found under {root}/; train one first (python -m pipeline.train --fold 0) "
                            "or point paths.runs at your runs folder with --set paths.runs=PATH")
    if experiments:
        chosen: list[str] = []
        for name in experiments:
            hits = fnmatch.filter(available, name)
            if not hits:
                close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise PipelineError(f"no run folder {root / name}.{hint} Runs there: {', '.join(available)}")
            chosen.extend(h for h in hits if h not in chosen)
    else:
        chosen = available
    return [load_run(root / name) for name in chosen]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> ``{"model.backbone": ..., ...}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


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


def augment_summary(run: RunRecord) -> str:
    """The augmentations that change results most, in a few characters (``mixup0.2 cutmix1 ls0.1 ema``)."""
    parts = []
    for key, short in (("train.mixup_alpha", "mixup"), ("train.cutmix_alpha", "cutmix"),
                       ("train.label_smoothing", "ls")):
        v = _float(run.get(key))
        if v > 0:
            parts.append(f"{short}{v:g}")
    if run.get("train.ema") is True:
        parts.append("ema")
    return " ".join(parts) or "none"


def summarize(runs: list[RunRecord]) -> pd.DataFrame:
    """One row per run with raw values (numbers stay numbers; NaN where a run has none)."""
    k_max = max((len(r.folds) for r in runs), default=0)
    rows = []
    for r in runs:
        done = r.complete_folds
        scores = [f.score for f in done]
        gains = [g for g in (f.tta_gain for f in done) if not math.isnan(g)]
        losses = [v for v in (_float(f.metrics.get("val_loss")) for f in done) if not math.isnan(v)]
        speeds = [_float(f.metrics.get("images_per_s")) for f in done]
        row: dict[str, Any] = {
            "experiment": r.experiment,
            "backbone": r.get("model.backbone"),
            "img_size": r.get("train.img_size"),
            "epochs": r.get("train.epochs"),
            "augment": augment_summary(r),
            "cv_mean": float(np.mean(scores)) if scores else math.nan,
            # sample std over folds (ddof=1): the spread a new fold would show; NaN with one fold
            "cv_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else math.nan,
            "cv_loss": float(np.mean(losses)) if losses else math.nan,
        }
        for i in range(k_max):
            row[f"fold{i}"] = r.folds[i].score if i < len(r.folds) else math.nan
        row.update({
            "tta_gain": float(np.mean(gains)) if gains else math.nan,
            "train_time_s": float(np.nansum([_float(f.metrics.get("train_time_s")) for f in done])) if done
            else math.nan,
            "images_per_s": float(np.nanmean(speeds)) if speeds and not all(map(math.isnan, speeds)) else math.nan,
            "folds_complete": len(done),
            "folds_total": len(r.folds),
            "status": "complete" if r.is_complete else "incomplete",
            "wandb_runs": len(r.wandb),
            "wandb_unsynced": sum(1 for w in r.wandb if w.offline and not w.synced),
        })
        rows.append(row)
    return pd.DataFrame(rows)


def sort_summary(table: pd.DataFrame, runs: list[RunRecord], key: str, ascending: bool = False) -> pd.DataFrame:
    """Sort by a table column or a dotted config key; runs without a value go last."""
    if table.empty:
        return table
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
    fold_cols = [c for c in table.columns if _FOLD_DIR.match(c)]
    out = []
    for _, row in table.iterrows():
        run = by_name[row["experiment"]]
        cv = "-" if math.isnan(row["cv_mean"]) else f"{row['cv_mean']:.4f}"
        if not math.isnan(row["cv_std"]):
            cv += f"±{row['cv_std']:.4f}"
        d = {"experiment": row["experiment"], "backbone": row["backbone"] or "?",
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
        d["wandb"] = (f"{row['wandb_runs']} ({row['wandb_unsynced']} unsynced)" if row["wandb_unsynced"]
                      else str(row["wandb_runs"]))
        out.append(d)
    return pd.DataFrame(out)


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


def compare(cfg: Config, experiments: list[str] | None = None, *, sort: str = "cv_mean", ascending: bool = False,
            where: list[str] | None = None, diff: bool = False, fmt: str = "table", plot: str | Path | None = None,
            show_wandb: bool = False, notes_to=None) -> str:
    """Build the comparison text (and the plot) for the runs under ``cfg.paths.runs``.

    Args:
        cfg: the config; only ``paths.runs`` is used.
        experiments: run folder names or shell patterns; all runs when empty.
        sort: a table column (``cv_mean``, ``train_time_s``, ...) or a dotted config key.
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
    runs = filter_runs(load_runs(cfg.paths.runs, experiments), where or [])
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
    p.add_argument("--sort", default="cv_mean", metavar="KEY",
                   help="column (cv_mean, cv_std, tta_gain, train_time_s, images_per_s, ...) or dotted config "
                        "key to sort by, largest first (default: cv_mean)")
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
    cfg = config_from_args(args)
    text = compare(cfg, args.experiments, sort=args.sort, ascending=args.ascending, where=args.where,
                   diff=args.diff, fmt=args.fmt, plot=args.plot, show_wandb=args.wandb)
    print(text)
    return text


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
