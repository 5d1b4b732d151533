"""CV against the public leaderboard: ``python -m pipeline.package --scores [--scores-csv CSV]``.

Reads the user's Kaggle submissions with their public scores, from the Kaggle CLI
(``kaggle competitions submissions -c <competition> --csv``: fileName, date, description,
status, publicScore, privateScore) or, offline, from a CSV in that form the user exported; matches
each row to our submission JSON by file name (``submissions/<name>_<time>.csv``), and plots public
score against the CV score of the blend (the competition's metric: accuracy, else log loss), with
the submissions whose gap to the others' typical gap is large flagged: there CV and leaderboard
disagree (a leak, a shift between train and test, or an overfit public split).

Writes ``submissions/cv_vs_public.csv`` and ``cv_vs_public.png``.
"""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io import atomic_save_figure, atomic_write_csv, read_json


def kaggle_submissions(competition: str) -> str:
    """The Kaggle CLI's CSV listing of the user's submissions to ``competition``."""
    if shutil.which("kaggle") is None:
        raise PipelineError("the kaggle command is not installed (pip install kaggle, and ~/.kaggle/kaggle.json); "
                            "offline, export your submissions as CSV and give --scores-csv PATH")
    res = subprocess.run(["kaggle", "competitions", "submissions", "-c", competition, "--csv"],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise PipelineError(f"kaggle competitions submissions -c {competition} failed: "
                            f"{(res.stderr or res.stdout).strip()[:500]}")
    return res.stdout


def parse_submissions(text: str, source: str) -> pd.DataFrame:
    """fileName and publicScore of each scored submission (the CLI may print a warning line first)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "fileName" in line and "publicScore" in line), None)
    if start is None:
        raise PipelineError(f"{source}: no header with fileName and publicScore; expected the output of "
                            "kaggle competitions submissions -c <competition> --csv")
    df = pd.read_csv(io.StringIO("\n".join(lines[start:])), dtype=str, keep_default_na=False)
    df["public"] = pd.to_numeric(df["publicScore"], errors="coerce")
    return df[df["public"].notna()].reset_index(drop=True)


def our_submissions(cfg: Config) -> pd.DataFrame:
    """file name, CV score and metric of each submission JSON of the competition."""
    rows = []
    for js in sorted(paths.submissions_dir(cfg).glob("*.json")):
        try:
            meta = read_json(js)
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or meta.get("competition") != cfg.competition.slug:
            continue
        blend = (meta.get("cv") or {}).get("blend") or {}
        if cfg.competition.metric == "accuracy" and cfg.competition.submission_form == "label":
            metric, value = "accuracy", blend.get("acc_tta") if blend.get("acc_tta") is not None else blend.get("acc")
        else:
            metric = "log_loss"
            value = blend.get("logloss_tta") if blend.get("logloss_tta") is not None else blend.get("logloss")
        if value is not None:
            rows.append({"fileName": js.with_suffix(".csv").name, "cv": float(value), "metric": metric,
                         "experiments": ",".join(meta.get("experiments", []))})
    return pd.DataFrame(rows, columns=["fileName", "cv", "metric", "experiments"])


def flag_divergent(cv: np.ndarray, public: np.ndarray, min_gap: float = 0.01) -> np.ndarray:
    """Submissions whose public-minus-CV gap is far from the others' median gap (robust: 3 MADs)."""
    gap = public - cv
    med = np.median(gap)
    mad = np.median(np.abs(gap - med)) * 1.4826
    return np.abs(gap - med) > max(3 * mad, min_gap)


def cv_vs_public(cfg: Config, csv: str | None = None, competition: str | None = None,
                 quiet: bool = False) -> pd.DataFrame:
    """Match leaderboard scores to our submissions, flag divergence, write a table and a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    say = (lambda *a: None) if quiet else print
    if csv:
        if not Path(csv).is_file():
            raise PipelineError(f"--scores-csv {csv} does not exist")
        lb = parse_submissions(Path(csv).read_text(encoding="utf-8-sig"), csv)
    else:
        comp = competition or cfg.competition.name
        if not comp:
            raise PipelineError("--scores needs the Kaggle competition: --competition SLUG (or competition.name)")
        lb = parse_submissions(kaggle_submissions(comp), f"kaggle competitions submissions -c {comp}")
    ours = our_submissions(cfg)
    table = lb[["fileName", "date", "description", "public"]].merge(ours, on="fileName", how="inner") \
        if "date" in lb and "description" in lb else lb[["fileName", "public"]].merge(ours, on="fileName")
    if table.empty:
        raise PipelineError(f"none of the {len(lb)} scored Kaggle submissions matches a submission JSON in "
                            f"{paths.submissions_dir(cfg)}/ by file name; submit the files pipeline.ensemble wrote, "
                            "under their own names")
    table["gap"] = table["public"] - table["cv"]
    table["divergent"] = flag_divergent(table["cv"].to_numpy(), table["public"].to_numpy())
    out = paths.submissions_dir(cfg)
    atomic_write_csv(out / "cv_vs_public.csv", table)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ok = ~table["divergent"]
    ax.scatter(table.loc[ok, "cv"], table.loc[ok, "public"], label="agrees")
    ax.scatter(table.loc[~ok, "cv"], table.loc[~ok, "public"], color="tab:red", marker="x", s=60, label="divergent")
    lo = min(table["cv"].min(), table["public"].min())
    hi = max(table["cv"].max(), table["public"].max())
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--", label="public = CV")
    for r in table.itertuples():
        ax.annotate(r.fileName.rsplit("_", 1)[0], (r.cv, r.public), fontsize=7, alpha=0.8)
    metric = table["metric"].iloc[0]
    ax.set_xlabel(f"CV ({metric}, out-of-fold blend)")
    ax.set_ylabel(f"public leaderboard ({metric})")
    ax.set_title(f"{cfg.competition.slug}: CV against public score")
    ax.legend(fontsize=8)
    atomic_save_figure(out / "cv_vs_public.png", fig)
    plt.close(fig)
    say(f"scores: {len(table)} of {len(lb)} scored submissions matched; "
        f"{int(table['divergent'].sum())} divergent (public - CV far from the median gap "
        f"{np.median(table['gap']):+.4f})")
    for r in table.itertuples():
        say(f"  {r.fileName:<44} CV {r.cv:.4f}  public {r.public:.4f}  gap {r.gap:+.4f}"
            f"{'  <- divergent' if r.divergent else ''}")
    if len(table) > 2:
        rho = pd.Series(table["cv"]).corr(pd.Series(table["public"]), method="spearman")
        say(f"scores: rank correlation of CV and public score {rho:.2f}")
    say(f"scores: {out / 'cv_vs_public.png'}, {out / 'cv_vs_public.csv'}")
    return table
