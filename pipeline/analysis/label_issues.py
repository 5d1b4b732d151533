"""Likely label errors: cleanlab's confident learning on the OOF probabilities, joined with dedup groups.

Out-of-fold probabilities are what confident learning needs: no image was scored by a model that
trained on it. cleanlab (``cleanlab.filter.find_label_issues``) estimates the joint distribution of
given and true labels and flags the images whose label is least likely; each flagged image is then
joined with its duplicate group from ``dedup.csv``, and images of groups whose labels disagree
(dedup conflicts the folds policy kept) are listed too, found by either.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.analysis.oof import Oof
from pipeline.errors import PipelineError

COLUMNS = ["image", "given", "suggested", "self_confidence", "suggested_prob", "found_by", "fold", "group",
           "group_size", "in_conflicting_group", "group_labels"]


def read_dedup_groups(path: Path) -> pd.DataFrame | None:
    """Train rows of dedup.csv: image, group, group_size, in_conflicting_group, group_labels; None if absent."""
    if not path.is_file():
        return None
    try:
        dedup = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many kinds; the user needs the file name
        raise PipelineError(f"{path} could not be read as CSV ({exc}); run python -m pipeline.dedup again") from None
    missing = [c for c in ("image", "split", "group", "conflict", "label") if c not in dedup.columns]
    if missing:
        raise PipelineError(f"{path} has no column {missing}; run python -m pipeline.dedup again")
    train = dedup[dedup["split"] == "train"].drop_duplicates("image")
    labels = train.groupby("group")["label"].agg(lambda s: "|".join(sorted(set(s))))
    size = dedup.groupby("group")["image"].size()
    return pd.DataFrame({"image": train["image"], "group": train["group"],
                         "group_size": train["group"].map(size).astype(int),
                         "in_conflicting_group": train["conflict"].str.lower().isin(["true", "1"]),
                         "group_labels": train["group"].map(labels)})


def find_issues(oof: Oof, dedup: pd.DataFrame | None) -> pd.DataFrame:
    """label_issues.csv's rows: cleanlab's issues (worst first), then conflicting-group images it missed."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.unique(oof.labels)
    # cleanlab wants labels 0..K-1 with every class present; a class seen only in fold -1 has no OOF row.
    remap = np.full(len(oof.classes), -1)
    remap[present] = np.arange(len(present))
    labels = remap[oof.labels]
    probs = oof.probs[:, present]
    probs = probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")

    table = pd.DataFrame({
        "image": oof.images,
        "given": oof.label_names,
        "suggested": [oof.classes[i] for i in oof.predicted],
        "self_confidence": quality,
        "suggested_prob": oof.probs.max(1),
        "fold": oof.folds,
    })
    if dedup is not None:
        table = table.merge(dedup, on="image", how="left")
        table["in_conflicting_group"] = table["in_conflicting_group"].fillna(False).astype(bool)
    else:
        table = table.assign(group="", group_size=1, in_conflicting_group=False, group_labels="")
    flagged = np.zeros(len(table), bool)
    flagged[ranked] = True
    table["found_by"] = np.where(flagged & table["in_conflicting_group"], "cleanlab+dedup conflict",
                                 np.where(flagged, "cleanlab", "dedup conflict"))
    issues = table.iloc[ranked]
    conflicts = table[~flagged & table["in_conflicting_group"].to_numpy()].sort_values("self_confidence")
    return pd.concat([issues, conflicts], ignore_index=True)[COLUMNS]


def draft_exclusions(issues: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    """The issues where the model backs another label with at least ``min_confidence``: a draft exclude.csv."""
    return _confident(issues, min_confidence)[["image", "given", "suggested", "suggested_prob", "found_by"]]


def draft_relabels(issues: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    """The same images as ``draft_exclusions``, each with the label the model backs: a draft relabel.csv
    (``image,label`` first, as ``competition.relabel`` reads it; the other columns are for the reader)."""
    pick = _confident(issues, min_confidence)
    return pd.DataFrame({"image": pick["image"], "label": pick["suggested"], "given": pick["given"],
                         "suggested_prob": pick["suggested_prob"], "found_by": pick["found_by"]})


def _confident(issues: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    pick = issues[(issues["suggested"] != issues["given"]) & (issues["suggested_prob"] >= min_confidence)]
    return pick.reset_index(drop=True)
