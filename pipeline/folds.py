"""Stage ``folds``: leak-free stratified k-fold split, grouped by duplicate group.

``python -m pipeline.folds`` reads the competition's train table and, when the dedup stage has
run, ``work/<comp>/dedup.csv``; applies the dedup training policy (``dedup.policy``:
keep_all | keep_one, ``dedup.conflicts``: drop | majority | keep) and splits with scikit-learn's
``StratifiedGroupKFold`` so that no duplicate group is ever split across folds.

``folds.group_column`` (a patient, site or session id in the train table) is joined with the
duplicate groups: images linked by either share a group, so no group of either kind spans two folds.

``competition.relabel`` and ``competition.exclude`` (:mod:`pipeline.label_fixes`) are applied after
the folds are assigned from the labels as given, so fold ids never move: ``label`` holds the
corrected label and ``excluded`` marks images training skips (validation keeps them).

Outputs (README, "Files between stages"): ``work/<comp>/folds.csv`` (image, label, group, fold, excluded) and
``work/<comp>/folds.json`` (the settings and input fingerprint that made it, and the label fixes).

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
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
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


def _user_groups(cfg: Config, comp) -> pd.Series | None:
    from pipeline.data.competition import read_train_column

    if not cfg.folds.group_column:
        return None
    return read_train_column(comp, cfg.folds.group_column, "folds.group_column")


# Settings recorded only while used (see _settings).
OPTIONAL_SETTINGS = ("relabel_sha256", "exclude_sha256", "group_column", "group_fingerprint")


def _settings(cfg: Config, train: pd.DataFrame, user_groups: pd.Series | None) -> dict:
    """What folds.csv depends on; a mismatch with folds.json means it must be made again."""
    fixes = {key: _file_digest(Path(path)) if path else None
             for key, path in (("relabel_sha256", cfg.competition.relabel),
                               ("exclude_sha256", cfg.competition.exclude))}
    groups = None if user_groups is None else _fingerprint_frame(train.assign(g=user_groups), ["image", "g"])
    return {
        "version": FOLDS_VERSION,
        "k": cfg.folds.k,
        "seed": cfg.folds.seed,
        "dedup_policy": cfg.dedup.policy,
        "dedup_conflicts": cfg.dedup.conflicts,
        "train_fingerprint": _fingerprint_frame(train, ["image", "label"]),
        "dedup_fingerprint": _file_digest(paths.dedup_csv(cfg)),
        # Keys added later are left out while unused, so older folds.json files stay current.
        **{k: v for k, v in fixes.items() if v is not None},
        **({"group_column": cfg.folds.group_column, "group_fingerprint": groups} if groups else {}),
    }


def join_groups(table: pd.DataFrame, user: pd.Series) -> tuple[pd.DataFrame, int]:
    """Merge ``table['group']`` (duplicate groups) with the user's groups (``user``, aligned; '' = none).

    Images sharing a duplicate group or a user group end in one group: the connected components
    of the graph linking each image to both of its groups. A merged group is named after its first
    duplicate group (table order), so names stay unique and readable.

    Returns:
        The table with the joined ``group`` column, and how many duplicate groups were merged away.
    """
    n = len(table)
    dedup_code, dedup_names = pd.factorize(table["group"])
    has_user = (user != "").to_numpy()
    user_code, user_names = pd.factorize(user[has_user])
    image_ids = np.arange(n)
    rows = np.r_[image_ids, image_ids[has_user]]
    cols = np.r_[n + dedup_code, n + len(dedup_names) + user_code]
    size = n + len(dedup_names) + len(user_names)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    first = pd.Series(table["group"].to_numpy()).groupby(component[:n]).transform("first")
    merged = table.assign(group=first.to_numpy())
    return merged, int(table["group"].nunique() - merged["group"].nunique())


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
    from pipeline.label_fixes import apply_label_fixes, read_label_fixes

    comp = load_competition(cfg.competition)
    fixes = read_label_fixes(comp)  # a bad fix list stops here, before anything is written
    train = comp.train[["image", "label"]].reset_index(drop=True)
    user_groups = _user_groups(cfg, comp)
    settings = _settings(cfg, train, user_groups)
    table = _read_groups(cfg, train)
    # The policy judges duplicate groups alone: a patient's images may rightly have several labels.
    kept, stats = apply_policy(table, cfg.dedup.policy, cfg.dedup.conflicts)
    if user_groups is not None:
        kept, stats["merged_by_group_column"] = join_groups(
            kept, kept["image"].map(dict(zip(train["image"], user_groups))))
    fold, notes = assign_folds(kept, cfg.folds.k, cfg.folds.seed)
    # Folds come from the labels as given; the fixes only then: fold ids never move with them.
    assigned = kept.assign(fold=fold)[["image", "label", "group", "fold"]]
    folds = apply_label_fixes(assigned, fixes)
    fix_record = fixes.record(folds, assigned.set_index("image")["label"])
    for note in notes:
        warn(note)
    if fix_record["not_in_folds"]:
        warn(f"{len(fix_record['not_in_folds'])} image(s) of competition.relabel/exclude are not in folds.csv (the "
             f"dedup policy dropped them), e.g. {fix_record['not_in_folds'][0]!r}; a fix cannot bring them back")
    out = paths.folds_csv(cfg)
    atomic_write_csv(out, folds)
    atomic_write_json(paths.folds_json(cfg), {**settings, "policy_stats": stats, "n_images": len(folds),
                                             "n_groups": int(folds["group"].nunique()), "notes": notes,
                                             "label_fixes": fix_record})
    if not quiet:
        dropped = stats["n_in"] - stats["n_out"]
        why = ", ".join(f"{n} {what}" for what, n in (
            ("in conflicting groups", stats["dropped_conflict"]), ("in tied conflicts", stats["dropped_tie"]),
            ("extra copies (keep_one)", stats["dropped_keep_one"])) if n)
        print(f"folds: {len(folds)} train images in {folds['group'].nunique()} groups, k={cfg.folds.k}, "
              f"seed={cfg.folds.seed}; dedup policy {cfg.dedup.policy}, conflicts {cfg.dedup.conflicts}: "
              f"dropped {dropped}{f' ({why})' if why else ''}, relabelled {stats['relabelled']}")
        if fixes.sources:
            print(f"label fixes: {len(fix_record['relabelled'])} image(s) relabelled, {len(fix_record['excluded'])} "
                  "excluded from training (still validated, with their corrected labels); fold ids unchanged")
        if user_groups is not None:
            print(f"folds.group_column {cfg.folds.group_column!r} joined with the duplicate groups: "
                  f"{stats['merged_by_group_column']} duplicate group(s) merged")
        print(balance_table(folds, cfg.folds.k))
        print(f"wrote {out}")
    return folds


def read_folds(path: Path) -> pd.DataFrame:
    folds = pd.read_csv(path, dtype={"image": str, "label": str, "group": str}, keep_default_na=False)
    if "excluded" not in folds.columns:  # written before label fixes existed
        folds["excluded"] = False
    folds["excluded"] = folds["excluded"].astype(str).str.lower().isin(["true", "1"])
    return folds


def training_rows(folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The rows fold ``fold`` trains on: every other fold (and -1), without the excluded images."""
    # A table built without label fixes (by hand, in a test or a notebook) excludes nothing.
    excluded = folds["excluded"].astype(bool) if "excluded" in folds.columns else False
    return folds[(folds["fold"] != fold) & ~excluded].reset_index(drop=True)


def training_fingerprint(folds: pd.DataFrame, fold: int) -> str:
    """A digest of the (image, label) pairs fold ``fold`` trains on, in any order."""
    rows = training_rows(folds, fold).sort_values("image")
    return _fingerprint_frame(rows, ["image", "label"])


def validation_rows(folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The rows fold ``fold`` is validated on: all of them, excluded or not, with corrected labels."""
    return folds[folds["fold"] == fold].reset_index(drop=True)


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
    comp = load_competition(cfg.competition)
    train = comp.train[["image", "label"]].reset_index(drop=True)
    current = _settings(cfg, train, _user_groups(cfg, comp))
    # An optional input that was used and no longer is (label fixes or a group column taken out of
    # the config) makes folds.csv stale too: it still carries their changes.
    dropped = [key for key in OPTIONAL_SETTINGS if key in recorded and key not in current]
    return not dropped and all(recorded.get(key) == value for key, value in current.items())


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
    return read_folds(paths.folds_csv(cfg))


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
