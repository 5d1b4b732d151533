"""report.md: every view of an analysis on one page, linking its files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def _table(df: pd.DataFrame, floats: str = "{:.3f}") -> str:
    """A markdown table (pandas' to_markdown needs tabulate, which we do not depend on)."""
    cols = list(df.columns)

    def cell(v) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else floats.format(v)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_report(out: Path, s: dict, per_class: pd.DataFrame, pairs: pd.DataFrame, issues: pd.DataFrame,
                 adversarial: pd.DataFrame | None, rows: int = 15) -> str:
    """The markdown text of report.md (written by the caller); ``s`` is the summary dict."""
    parts = [
        f"# Error analysis: {s['source']}",
        "",
        f"{s['n_images']} out-of-fold images, {s['n_classes']} classes: accuracy **{s['accuracy']:.4f}**, "
        f"log loss {s['log_loss']:.4f}, expected calibration error {s['ece']:.4f}.",
        "",
        "Files: [per_class.csv](per_class.csv), [confused_pairs.csv](confused_pairs.csv), "
        "[label_issues.csv](label_issues.csv), [summary.json](summary.json)"
        + (", [adversarial.csv](adversarial.csv)" if adversarial is not None else "")
        + (", [exclude.csv](exclude.csv) (draft)" if s.get("exclude_csv") else "") + ".",
        "",
        "## Worst classes",
        "",
        _table(per_class.head(rows)),
        "",
        "## Confusions",
        "",
        "Rows are given labels, columns predictions, each row normalised; classes are ordered so that "
        "the ones the model confuses sit together.",
        "",
        "![confusion matrix](confusion.png)",
        "",
        _table(pairs.head(rows)) if len(pairs) else "No errors.",
        "",
        "## Highest losses",
        "",
        "![top losses](top_losses.png)",
        "",
        "## Calibration",
        "",
        f"Expected calibration error (15 bins of top-label confidence): {s['ece']:.4f}.",
        "",
        "![calibration](calibration.png)",
        "",
        "## Likely label errors",
        "",
        f"{s['issues_cleanlab']} image(s) flagged by cleanlab's confident learning on the OOF probabilities "
        f"({s['issues_in_conflict']} of them in a duplicate group whose labels disagree), and "
        f"{s['issues_conflict_only']} more in conflicting duplicate groups. To act on them, list corrections "
        "in a CSV (image,label) for `competition.relabel`, or images to drop from training for "
        "`competition.exclude` (`--write-fixes` drafts the latter); fold ids stay and validation keeps "
        "every image, so CV before and after is measured on the same images.",
        "",
        "![label issues](label_issues.png)" if s["issues_cleanlab"] + s["issues_conflict_only"] else "",
        "",
        _table(issues.head(rows)) if len(issues) else "None found.",
        "",
    ]
    if adversarial is not None:
        verdict = ("test looks like train to the model" if s["adversarial_auc"] < 0.6 else
                   "a shift between train and test: CV may not predict the test score")
        folds = ", ".join(f"fold {k}: {v:.3f}" for k, v in s["adversarial_fold_auc"].items())
        parts += [
            "## Adversarial validation",
            "",
            f"A logistic regression on the model's features tells train from test with cross-validated AUC "
            f"**{s['adversarial_auc']:.3f}** ({folds}): {verdict}. Each fold's model embeds only images it never "
            "trained on. The train images that look most like test:",
            "",
            "![most test-like train images](adversarial.png)",
            "",
        ]
    return "\n".join(parts)
