"""Stage ``folds``: leak-free stratified k-fold split, grouped by duplicate group.

``python -m pipeline.folds`` reads the competition's train table and, when the dedup stage has
run, ``work/<comp>/dedup.csv``; applies the dedup training policy (``dedup.policy``:
keep_all | keep_one, ``dedup.conflicts``: drop | majority | keep) and splits with scikit-learn's
``StratifiedGroupKFold`` so that no duplicate group is ever split across folds.

Outputs (design.md): ``work/<comp>/folds.csv`` (image, label, group, fold) and
``work/<comp>/folds.json`` (the settings and input fingerprint that made it).

A class whose images form a single duplicate group cannot be both trained on and validated:
its rows get ``fold = -1``, meaning "always in training, never validated", so every fold's
model still sees the class. Train selects ``fold != k`` for training and ``fold == k`` for
validation, which handles -1 with no special case.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline import paths
from pipeline.config import Config, add_config_args, config_from_args
from pipeline.dedup import dedup_is_current, ensure_dedup
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json, read_json

FOLDS_VERSION = 1
NEVER_VALIDATED = -1
MAX_BALANCE_CLASSES = 20


def warn(message: str) -> None:
    """A warning the user should read, printed as one line (not a Python warning with a traceback line)."""
    print(f"warning: {message}", file=sys.stderr)


def _fingerprint_frame(df: pd.DataFrame, columns: list[str]) -> str:
    h = hashlib.sha256()
    for col in columns:
        h.update(col.encode())
        h.update("\x1f".join(df[col].astype(str).tolist()).encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _settings(cfg: Config, train: pd.DataFrame) -> dict:
    """What folds.csv depends on; a mismatch with folds.json means it must be made again."""
    return {
        "version": FOLDS_VERSION,
        "k": cfg.folds.k,
        "seed": cfg.folds.seed,
        "dedup_policy": cfg.dedup.policy,
        "dedup_conflicts": cfg.dedup.conflicts,
        "train_fingerprint": _fingerprint_frame(train, ["image", "label"]),
        "dedup_fingerprint": _file_digest(paths.dedup_csv(cfg)),
    }


def _read_groups(cfg: Config, train: pd.DataFrame) -> pd.DataFrame:
    """Train rows with ``group`` and ``conflict`` columns, from dedup.csv or one group per image."""
    path = paths.dedup_csv(cfg)
    if not path.is_file():
        warn(f"{path} not found: every image is its own group, so duplicates may leak across folds; "
             "run `python -m pipeline.dedup` first")
        return train.assign(group=[f"i{i}" for i in range(len(train))], conflict=False)
    if not dedup_is_current(cfg):
        warn(f"{path} was made from other images or dedup settings; run `python -m pipeline.dedup` to refresh it")
    try:
        dedup = pd.read_csv(path, dtype={"image": str, "group": str, "split": str}, keep_default_na=False)
    except Exception as exc:  # pandas raises many kinds; the user needs the file name
        raise PipelineError(f"{path} could not be read as CSV ({exc}); run `python -m pipeline.dedup` again") from None
    missing = [c for c in ("image", "split", "group", "conflict") if c not in dedup.columns]
    if missing:
        raise PipelineError(f"{path} has no column {missing}; run `python -m pipeline.dedup` again to rebuild it")
    dedup = dedup[dedup["split"] == "train"].drop_duplicates("image")
    merged = train.merge(dedup[["image", "group", "conflict"]], on="image", how="left")
    absent = merged["group"].isna()
    if absent.any():
        raise PipelineError(
            f"{path} has no row for {int(absent.sum())} train image(s), e.g. {merged.loc[absent, 'image'].iloc[0]!r}; "
            "the train table changed since dedup ran: run `python -m pipeline.dedup` again"
        )
    merged["conflict"] = merged["conflict"].astype(str).str.lower().isin(["true", "1"])
    return merged


def apply_policy(table: pd.DataFrame, policy: str, conflicts: str) -> tuple[pd.DataFrame, dict]:
    """Apply the dedup training policy to train rows with ``image, label, group, conflict``.

    Args:
        table: train rows in table order (the first row of a group is the one ``keep_one`` keeps).
        policy: ``keep_all`` keeps every image (grouped); ``keep_one`` keeps one image per group.
        conflicts: conflicting groups (labels disagree) are dropped (``drop``), relabelled with
            their majority label (``majority``; dropped on a tie) or left as they are (``keep``).

    Returns:
        The kept rows and counts of what was changed.
    """
    table = table.copy()
    stats = {"n_in": len(table), "conflict_groups": 0, "dropped_conflict": 0, "relabelled": 0,
             "dropped_tie": 0, "dropped_keep_one": 0}
    label_counts = table.groupby("group")["label"].nunique()
    conflicted = set(label_counts.index[label_counts > 1])
    stats["conflict_groups"] = len(conflicted)
    in_conflict = table["group"].isin(conflicted)
    if conflicts == "drop":
        stats["dropped_conflict"] = int(in_conflict.sum())
        table = table[~in_conflict]
    elif conflicts == "majority" and conflicted:
        sub = table[in_conflict]
        counts = sub.groupby(["group", "label"]).size().rename("n").reset_index()
        counts = counts.sort_values(["group", "n", "label"], ascending=[True, False, True])
        top = counts.groupby("group").head(2)
        ties = {g for g, n in top.groupby("group")["n"] if len(n) > 1 and n.iloc[0] == n.iloc[1]}
        majority = counts.drop_duplicates("group").set_index("group")["label"]
        tie_rows = table["group"].isin(ties)
        stats["dropped_tie"] = int(tie_rows.sum())
        table = table[~tie_rows]
        fix = table["group"].isin(conflicted)
        new = table.loc[fix, "group"].map(majority)
        stats["relabelled"] = int((new != table.loc[fix, "label"]).sum())
        table.loc[fix, "label"] = new
    if policy == "keep_one":
        keep = ~table.duplicated("group", keep="first")
        stats["dropped_keep_one"] = int((~keep).sum())
        table = table[keep]
    stats["n_out"] = len(table)
    return table.reset_index(drop=True), stats


def assign_folds(table: pd.DataFrame, k: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Stratified, grouped fold numbers for ``table`` (``label`` and ``group`` columns).

    Classes present in a single group get ``NEVER_VALIDATED`` (always trained on); classes with
    fewer groups than ``k`` are still split but appear in only some validation folds.

    Returns:
        The fold of each row and a list of warnings for rare classes.
    """
    groups_per_class = table.groupby("label")["group"].nunique()
    single = set(groups_per_class.index[groups_per_class == 1])
    rare = sorted(set(groups_per_class.index[groups_per_class < k]) - single)
    notes = []
    if single:
        notes.append(f"{len(single)} class(es) with one image group are never validated (fold -1) so training "
                     f"still sees them: {sorted(single)[:10]}")
    if rare:
        notes.append(f"{len(rare)} class(es) have fewer image groups than k={k} and are validated in only some "
                     f"folds: {rare[:10]}")
    fold = np.full(len(table), NEVER_VALIDATED, dtype=int)
    # A whole group stays together: a group holding such a class (a kept conflict) is never validated.
    held = set(table.loc[table["label"].isin(single), "group"])
    splittable = ~table["group"].isin(held).to_numpy()
    sub = table[splittable]
    if sub["group"].nunique() < k:
        raise PipelineError(
            f"only {sub['group'].nunique()} image group(s) can be validated but folds.k={k}; "
            "lower folds.k (e.g. --set folds.k=2) or add training images"
        )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    sub_fold = np.empty(len(sub), dtype=int)
    with warnings.catch_warnings():
        # sklearn warns about classes smaller than k; we report those ourselves, by name.
        warnings.filterwarnings("ignore", message="The least populated class")
        for f, (_, val_idx) in enumerate(splitter.split(np.zeros(len(sub)), sub["label"], sub["group"])):
            sub_fold[val_idx] = f
    fold[splittable] = sub_fold
    return fold, notes


def balance_table(folds: pd.DataFrame, k: int) -> str:
    """Per-fold class balance as text (counts per class, or a summary when there are many classes)."""
    counts = pd.crosstab(folds["label"], folds["fold"]).reindex(columns=range(k), fill_value=0)
    total = folds[folds["fold"] >= 0].groupby("fold").size().reindex(range(k), fill_value=0)
    groups = folds[folds["fold"] >= 0].groupby("fold")["group"].nunique().reindex(range(k), fill_value=0)
    shown = len(counts) <= MAX_BALANCE_CLASSES
    # Whole class names: cut to a fixed width, miniature_pinscher and miniature_poodle read the same.
    w = max([10] + [len(str(c)) + 1 for c in counts.index] if shown else [10])
    lines = ["fold".ljust(w) + "".join(f"{f:>7d}" for f in range(k)),
             "images".ljust(w) + "".join(f"{n:>7d}" for n in total),
             "groups".ljust(w) + "".join(f"{n:>7d}" for n in groups)]
    if shown:
        lines += [str(c).ljust(w) + "".join(f"{n:>7d}" for n in counts.loc[c]) for c in counts.index]
    else:
        share = counts.div(counts.sum(axis=1).replace(0, 1), axis=0)
        spread = (share.max(axis=1) - share.min(axis=1)).sort_values(ascending=False)
        lines.append(f"{len(counts)} classes; largest spread of a class's share across folds: "
                     + ", ".join(f"{c} {v:.2f}" for c, v in spread.head(5).items()))
    never = int((folds["fold"] == NEVER_VALIDATED).sum())
    if never:
        lines.append(f"fold -1 (always trained on): {never} image(s)")
    return "\n".join(lines)


def make_folds(cfg: Config, quiet: bool = False) -> pd.DataFrame:
    """Build ``folds.csv`` and ``folds.json`` for ``cfg``; returns the folds table.

    Args:
        cfg: the resolved config (``competition``, ``dedup`` policy, ``folds``, ``paths``).
        quiet: do not print the balance table.
    """
    from pipeline.data import load_competition

    comp = load_competition(cfg.competition)
    train = comp.train[["image", "label"]].reset_index(drop=True)
    settings = _settings(cfg, train)
    table = _read_groups(cfg, train)
    kept, stats = apply_policy(table, cfg.dedup.policy, cfg.dedup.conflicts)
    fold, notes = assign_folds(kept, cfg.folds.k, cfg.folds.seed)
    folds = kept.assign(fold=fold)[["image", "label", "group", "fold"]]
    for note in notes:
        warn(note)
    out = paths.folds_csv(cfg)
    atomic_write_csv(out, folds)
    atomic_write_json(paths.folds_json(cfg), {**settings, "policy_stats": stats, "n_images": len(folds),
                                             "n_groups": int(folds["group"].nunique()), "notes": notes})
    if not quiet:
        dropped = stats["n_in"] - stats["n_out"]
        why = ", ".join(f"{n} {what}" for what, n in (
            ("in conflicting groups", stats["dropped_conflict"]), ("in tied conflicts", stats["dropped_tie"]),
            ("extra copies (keep_one)", stats["dropped_keep_one"])) if n)
        print(f"folds: {len(folds)} train images in {folds['group'].nunique()} groups, k={cfg.folds.k}, "
              f"seed={cfg.folds.seed}; dedup policy {cfg.dedup.policy}, conflicts {cfg.dedup.conflicts}: "
              f"dropped {dropped}{f' ({why})' if why else ''}, relabelled {stats['relabelled']}")
        print(balance_table(folds, cfg.folds.k))
        print(f"wrote {out}")
    return folds


def _read_folds(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"image": str, "label": str, "group": str}, keep_default_na=False)


def folds_are_current(cfg: Config) -> bool:
    """Whether folds.csv exists and was made from the current inputs with the current settings."""
    from pipeline.data import load_competition

    csv, meta = paths.folds_csv(cfg), paths.folds_json(cfg)
    if not (csv.is_file() and meta.is_file()):
        return False
    try:
        recorded = read_json(meta)
    except ValueError:
        return False
    train = load_competition(cfg.competition).train[["image", "label"]].reset_index(drop=True)
    current = _settings(cfg, train)
    return all(recorded.get(key) == value for key, value in current.items())


def ensure_folds(cfg: Config) -> pd.DataFrame:
    """Return folds.csv (image, label, group, fold), making dedup and folds first when needed.

    Dedup runs when its outputs are missing or were made from other inputs or settings; folds
    are made again when folds.json records other settings (k, seed, dedup policy) or inputs.
    """
    ensure_dedup(cfg)
    if not folds_are_current(cfg):
        reason = "missing" if not paths.folds_csv(cfg).is_file() else "made with other settings or inputs"
        print(f"folds: {paths.folds_csv(cfg)} {reason}; making it now (python -m pipeline.folds)")
        make_folds(cfg, quiet=True)
    return _read_folds(paths.folds_csv(cfg))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.folds",
        description="Stratified k-fold split grouped by duplicate group; writes work/<comp>/folds.csv.",
    )
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    return make_folds(cfg)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
