"""Stage ``dedup``: exact and near-duplicate groups over train and test images.

``python -m pipeline.dedup`` fingerprints every image of the configured competition (train and
test), then:

1. exact duplicates: same decoded pixels (a PNG and a BMP of one image are one);
2. near-duplicate candidates: pHash pairs within ``dedup.phash_max_distance`` bits (chunked,
   vectorised Hamming search; no Python loop over pairs);
3. verification of each candidate by the similarity ``r``: the correlation of the two gray
   thumbnails, the best over a few crops of either (so a cropped, zoomed or shifted copy is
   compared aligned). Brightness and contrast changes leave ``r`` at 1, so a re-encoded, resized
   or brightened copy stays near 1 while distinct images fall away. ``r >= dedup.sure_correlation``
   is a duplicate. Between ``dedup.min_correlation`` and that, the pair must also stand out from
   the images' look-alikes: ``1 - r`` at most ``dedup.neighbour_ratio`` times that of the crowd,
   found as the first big jump among each image's ``dedup.neighbours`` nearest thumbnails that
   are not yet in its group (repeated until the groups stop growing). Two
   different handwritten "1"s correlate at 0.996, as closely as a resized copy, but so do many
   other "1"s around them; a copy is much closer than its crowd. The nearest thumbnails also add
   candidates that pHash misses;
4. groups: connected components over exact and verified pairs; a group whose members are not all
   close to each other (a chain a~b~c with a !~ c) is reported as chained;
5. per group: labels seen, ``conflict`` when train labels disagree, train/test overlap.

Outputs (README, "Files between stages"): ``work/<comp>/dedup.csv`` (image, split, group, exact_group, near_group,
conflict, then label, group_size, phash), ``dedup_report.json`` and ``dedup_sheet.png`` (the
conflicting, overlapping and largest groups). The training policy (``dedup.policy``,
``dedup.conflicts``) is applied by the folds stage; test images are reported, never changed.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import paths
from pipeline.config import Config, DedupConfig, add_config_args, config_from_args
from pipeline.data.competition import DataError, load_competition
from pipeline.dedup_hash import (
    Fingerprints,
    alignment_crops,
    fingerprint_images,
    hamming_pairs,
    nearest_neighbours,
    pair_correlation,
    similarity_matrix,
)
from pipeline.errors import cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json, read_json, stat_stamp

DEDUP_VERSION = 1
DETECTION_KEYS = ("phash_max_distance", "align_crops", "align_side", "mirror", "min_correlation", "sure_correlation", "neighbour_ratio",
                  "neighbours", "flat_std", "flat_max_level_diff", "thumb_size")
MAX_LISTED = 10
MAX_ROUNDS = 4
MAX_CHAIN_CHECK = 1500


def detection_settings(dcfg: DedupConfig, source: dict | None = None) -> dict:
    """The settings that change which images are grouped (not the training policy).

    ``source``: the resized-image cache's settings when thumbnails come from it (absent otherwise).
    """
    out = {"version": DEDUP_VERSION, **{k: getattr(dcfg, k) for k in DETECTION_KEYS}}
    return out if source is None else {**out, "source": source}


def image_source(cfg: Config) -> dict | None:
    """The settings of the resized-image cache dedup reads, or None for the original files."""
    from pipeline.data.cache import resolve_size, settings

    size = resolve_size(cfg.cache, cfg.train)
    return None if size is None else settings(cfg.cache, size)


def input_fingerprint(table: pd.DataFrame) -> str:
    """Digest of every image's name, split, label, size and modification time."""
    h = hashlib.sha256()
    for image, split, label, path in zip(table["image"], table["split"], table["label"], table["path"]):
        h.update(f"{image}\x1f{split}\x1f{'' if pd.isna(label) else label}\x1f{stat_stamp(path)}\x1e".encode())
    return h.hexdigest()[:16]


def _merge_candidates(hash_pairs: np.ndarray, knn_idx: np.ndarray, knn_r: np.ndarray, floor: float) -> np.ndarray:
    """pHash pairs plus each image's nearest thumbnails above ``floor``, as unique ``i < j`` pairs."""
    rows = np.repeat(np.arange(len(knn_idx)), knn_idx.shape[1])
    cols, r = knn_idx.ravel(), knn_r.ravel()
    keep = r >= floor
    knn = np.stack([np.minimum(rows, cols)[keep], np.maximum(rows, cols)[keep]], axis=1)
    both = np.concatenate([hash_pairs.reshape(-1, 2), knn]).astype(np.int64)
    return np.unique(both, axis=0) if len(both) else both


def look_alike_level(knn_idx: np.ndarray, knn_r: np.ndarray, group: np.ndarray, ratio: float) -> np.ndarray:
    """Per image, the similarity of its look-alikes: where its copies end and the crowd begins.

    Among each image's nearest neighbours (best first), those already in its group are left out.
    Copies sit far closer than anything else, so the gaps ``1 - r`` jump at the end of them: the
    first neighbour whose gap is more than ``1 / ratio`` times the one before is the start of the
    crowd. Without such a jump the nearest neighbour is already crowd. Called again after each
    round of verification, so a group with copies at several distances is found copy by copy.
    """
    n, k = knn_r.shape
    if k == 0:
        return np.full(n, -np.inf)
    # A neighbour in the group is replaced by the farthest one seen: the crowd beyond the k nearest
    # is at most that close, so a group that fills the list never makes its crowd look far away.
    farthest = knn_r[:, -1:].astype(np.float64)
    below = np.where(group[knn_idx] == group[:, None], farthest, knn_r.astype(np.float64))
    below = -np.sort(-below, axis=1)
    gaps = 1.0 - below  # ascending; inf where missing
    with np.errstate(invalid="ignore"):
        jump = gaps[:, :-1] <= ratio * gaps[:, 1:]
    first = np.where(jump.any(axis=1), jump.argmax(axis=1) + 1, 0)
    return below[np.arange(n), first]


def verify_pairs(fp: Fingerprints, pairs: np.ndarray, corr: np.ndarray, crowd: np.ndarray,
                 dcfg: DedupConfig) -> np.ndarray:
    """Which candidate pairs are near duplicates (bool per pair); see the module docstring.

    Args:
        crowd: per image, the similarity of its look-alikes (``look_alike_level``).
    """
    i, j = pairs[:, 0], pairs[:, 1]
    gap = 1.0 - corr.astype(np.float64)
    crowd_gap = 1.0 - crowd.astype(np.float64)  # inf where an image has no look-alikes
    sure = corr >= dcfg.sure_correlation
    stands_out = gap <= dcfg.neighbour_ratio * np.minimum(crowd_gap[i], crowd_gap[j])
    ok = sure | ((corr >= dcfg.min_correlation) & stands_out)
    # Correlation means nothing on a flat image (noise only): two flat images are duplicates when
    # their gray levels agree; a flat and a textured one never are.
    flat = fp.level[:, 1] < dcfg.flat_std
    both = flat[i] & flat[j]
    same_level = np.abs(fp.level[i, 0] - fp.level[j, 0]) <= dcfg.flat_max_level_diff
    return np.where(both, same_level, ok & ~(flat[i] | flat[j]))


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component label per node, numbered by each component's first (lowest) row."""
    if len(pairs) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    return first[comp]


def _exact_pairs(pixel_hash: list[str]) -> np.ndarray:
    codes = pd.factorize(pd.Series(pixel_hash))[0]
    first = pd.Series(np.arange(len(codes))).groupby(codes).transform("min").to_numpy()
    rows = np.nonzero(first != np.arange(len(codes)))[0]
    return np.stack([first[rows], rows], axis=1).astype(np.int64) if len(rows) else np.zeros((0, 2), np.int64)


def _chained(members: np.ndarray, fp: Fingerprints, dcfg: DedupConfig) -> tuple[bool, float, list[int]]:
    """Whether a group holds two members that are not close themselves (joined only through others).

    A huge group (thousands of blank images, say) is checked on an even sample of its members, so
    the all-pairs matrix stays small.
    """
    if len(members) > MAX_CHAIN_CHECK:
        members = members[np.linspace(0, len(members) - 1, MAX_CHAIN_CHECK).astype(int)]
    t = fp.thumb[members]
    gram = similarity_matrix(t, t)
    gram = np.maximum(gram, gram.T)
    flat = fp.level[members, 1] < dcfg.flat_std
    gram[np.ix_(flat, flat)] = 1.0  # flat members were matched on gray level, not correlation
    np.fill_diagonal(gram, 1.0)
    a, b = np.unravel_index(int(np.argmin(gram)), gram.shape)
    worst = float(gram[a, b])
    return worst < dcfg.min_correlation, worst, [int(members[a]), int(members[b])]


def find_duplicates(table: pd.DataFrame, dcfg: DedupConfig, progress: bool = True, reader=None,
                    pixel_hashes: list[str] | None = None,
                    fingerprints: Fingerprints | None = None) -> tuple[pd.DataFrame, dict]:
    """Group duplicates in ``table`` (columns image, path, split, label).

    ``reader`` and ``pixel_hashes``: the resized-image cache's reader and the hashes of the original
    pixels it recorded (default: decode the originals). ``fingerprints``: already computed ones
    (benchmarks time the later steps at sizes they cannot decode).

    Returns:
        The dedup table (one row per image, the columns of dedup.csv) and the report dict
        (without competition-level fields).

    Raises:
        DataError: some images could not be read; the message lists them by name.
    """
    t0 = time.perf_counter()
    n = len(table)
    fp = fingerprints
    if fp is None:
        fp = fingerprint_images(table["path"].tolist(), dcfg.thumb_size, workers=dcfg.workers, progress=progress,
                                crops=alignment_crops(dcfg.align_crops, dcfg.align_side), mirror=dcfg.mirror,
                                **({"reader": reader} if reader is not None else {}), pixel_hashes=pixel_hashes)
    bad = [f"{img}: {err}" for img, err in zip(table["image"], fp.errors) if err]
    if bad:
        shown = "\n  ".join(bad[:MAX_LISTED]) + (f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
        raise DataError(f"{len(bad)} image(s) could not be read:\n  {shown}\nReplace or remove them and run again.")
    t_hash = time.perf_counter()

    exact = _exact_pairs(fp.pixel_hash)
    hash_pairs, _ = hamming_pairs(fp.phash, dcfg.phash_max_distance, workers=max(1, dcfg.workers))
    # The nearest thumbnails give each image's look-alike level, and add candidates that pHash
    # misses (small crops and rotations move many of its 64 bits).
    knn_idx, knn_r = nearest_neighbours(fp.thumb, dcfg.neighbours,
                                        also=[fp.thumb.shape[1] - 1] if dcfg.mirror else [])
    cand = _merge_candidates(hash_pairs, knn_idx, knn_r, dcfg.min_correlation)
    dist = np.bitwise_count(fp.phash[cand[:, 0]] ^ fp.phash[cand[:, 1]])
    same_pixels = np.asarray(fp.pixel_hash, dtype=object)
    not_exact = same_pixels[cand[:, 0]] != same_pixels[cand[:, 1]] if len(cand) else np.zeros(0, bool)
    t_search = time.perf_counter()
    corr = pair_correlation(fp.thumb, cand)
    # Rounds: each verified copy joins its group and stops counting as crowd for the next round.
    group = _components(n, np.concatenate([exact, cand[corr >= dcfg.sure_correlation]]))
    for _ in range(MAX_ROUNDS):
        crowd = look_alike_level(knn_idx, knn_r, group, dcfg.neighbour_ratio)
        ok = verify_pairs(fp, cand, corr, crowd, dcfg)
        grown = _components(n, np.concatenate([exact, cand[ok]]))
        if (grown == group).all():
            break
        group = grown
    near = cand[ok & not_exact]
    near_r, near_d = corr[ok & not_exact], dist[ok & not_exact]
    t_verify = time.perf_counter()

    exact_group = _components(n, exact)
    near_group = _components(n, near)
    group = _components(n, np.concatenate([exact, near]))
    out = pd.DataFrame({
        "image": table["image"].to_numpy(), "split": table["split"].to_numpy(),
        "group": group, "exact_group": exact_group, "near_group": near_group,
    })
    labels = table["label"].where(table["split"] == "train")
    out["label"] = labels.fillna("").astype(str).to_numpy()
    train_labels = out[out["split"] == "train"].groupby("group")["label"].nunique()
    conflicted = set(train_labels.index[train_labels > 1])
    out.insert(5, "conflict", out["group"].isin(conflicted))
    out["group_size"] = out.groupby("group")["image"].transform("size")
    out["phash"] = [f"{int(h):016x}" for h in fp.phash]

    groups, chained = [], []
    for gid, rows in out[out["group_size"] > 1].groupby("group").groups.items():
        members = np.asarray(rows)
        sub = out.loc[members]
        is_chained, worst, worst_pair = _chained(members, fp, dcfg)
        is_chained = is_chained and len(members) > 2
        all_exact = sub["exact_group"].nunique() == 1
        entry = {
            "group": int(gid), "size": len(members), "kind": "exact" if all_exact else "near",
            "images": sub["image"].tolist(), "splits": sub["split"].tolist(), "labels": sub["label"].tolist(),
            "train_labels": sorted(set(sub.loc[sub["split"] == "train", "label"])),
            "conflict": bool(gid in conflicted), "overlap": bool(sub["split"].nunique() > 1),
            "min_correlation": round(worst, 4),
        }
        if is_chained:
            entry["chained"] = {"min_correlation": round(worst, 4), "images": out.loc[worst_pair, "image"].tolist()}
            chained.append(int(gid))
        groups.append(entry)
    groups.sort(key=lambda g: (-g["size"], g["group"]))
    t_end = time.perf_counter()

    n_test_dup = int(((out["split"] == "test") & out["group"].isin(
        out.loc[out["split"] == "train", "group"])).sum())
    report = {
        "settings": detection_settings(dcfg),
        "counts": {
            "images": n, "train": int((out["split"] == "train").sum()), "test": int((out["split"] == "test").sum()),
            "exact_pairs": len(exact), "phash_pairs": len(hash_pairs), "candidate_pairs": len(cand), "verified_near_pairs": len(near),
            "groups": len(groups), "images_in_groups": int((out["group_size"] > 1).sum()),
            "removable_duplicates": int((out["group_size"] > 1).sum()) - len(groups),
            "conflict_groups": len(conflicted), "overlap_groups": sum(g["overlap"] for g in groups),
            "test_images_also_in_train": n_test_dup, "chained_groups": len(chained),
        },
        "conflicts": [g for g in groups if g["conflict"]],
        "overlaps": [g for g in groups if g["overlap"]],
        "chained": chained,
        "groups": groups,
        "near_pairs": [
            {"images": [out.at[int(a), "image"], out.at[int(b), "image"]], "correlation": round(float(r), 4),
             "phash_distance": int(d)} for (a, b), r, d in zip(near, near_r, near_d)
        ],
        "timing_s": {"hash": round(t_hash - t0, 3), "search": round(t_search - t_hash, 3),
                     "verify": round(t_verify - t_search, 3), "total": round(t_end - t0, 3)},
    }
    return out, report


def run_dedup(cfg: Config, quiet: bool = False) -> pd.DataFrame:
    """Run the dedup stage for ``cfg``: write dedup.csv, dedup_report.json and the contact sheet."""
    from pipeline.dedup_sheet import contact_sheet

    comp = load_competition(cfg.competition)
    table = comp.all_images()
    started = time.perf_counter()
    source = image_source(cfg)
    reader, hashes = None, None
    if source is not None:
        from pipeline.prepare import ensure_cache

        cache = ensure_cache(cfg, quiet=quiet)
        reader, hashes = cache.reader(comp.root), cache.pixel_hashes(table["image"].tolist())
    out, report = find_duplicates(table, cfg.dedup, progress=not quiet, reader=reader, pixel_hashes=hashes)
    report["settings"] = detection_settings(cfg.dedup, source)
    sheet = paths.dedup_sheet(cfg)
    shown = contact_sheet(report, comp.root, sheet, max_groups=cfg.dedup.sheet_groups,
                          **({"reader": reader} if reader is not None else {}))
    report = {
        "competition": cfg.competition.slug, "root": str(comp.root),
        "input_fingerprint": input_fingerprint(table),
        **report,
        "contact_sheet": sheet.name if shown else None,
    }
    report["timing_s"]["total"] = round(time.perf_counter() - started, 3)
    atomic_write_csv(paths.dedup_csv(cfg), out)
    atomic_write_json(paths.dedup_report(cfg), report)
    if not quiet:
        print(summary(report, cfg))
    return out


def summary(report: dict, cfg: Config) -> str:
    """The one-screen summary printed at the end of the stage."""
    c, t, s = report["counts"], report["timing_s"], report["settings"]
    lines = [
        f"dedup {report['competition']}: {c['images']} images ({c['train']} train, {c['test']} test) in {t['total']:.1f}s "
        f"(hash {t['hash']:.1f}s, search {t['search']:.2f}s, verify {t['verify']:.2f}s)",
        f"  exact pairs {c['exact_pairs']}; candidates: pHash <= {s['phash_max_distance']} bits {c['phash_pairs']}, "
        f"with nearest thumbnails {c['candidate_pairs']}; verified near pairs {c['verified_near_pairs']}",
        f"  {c['groups']} duplicate groups hold {c['images_in_groups']} images ({c['removable_duplicates']} removable)",
        f"  conflicting labels: {c['conflict_groups']} group(s); train/test overlap: {c['overlap_groups']} group(s), "
        f"{c['test_images_also_in_train']} test image(s); chained: {c['chained_groups']}",
    ]
    for title, key in (("conflicts", "conflicts"), ("train/test overlaps", "overlaps")):
        for g in report[key][:5]:
            members = ", ".join(f"{img} ({sp}{': ' + lab if lab else ''})"
                                for img, sp, lab in zip(g["images"][:4], g["splits"], g["labels"]))
            more = f" +{g['size'] - 4}" if g["size"] > 4 else ""
            lines.append(f"  {title[:-1] if title.endswith('s') else title}: {members}{more}")
    for g in [g for g in report["groups"] if g["group"] in set(report["chained"])][:5]:
        lines.append(f"  chained group {g['group']} ({g['size']} images): {g['chained']['images'][0]} and "
                     f"{g['chained']['images'][1]} correlate only {g['chained']['min_correlation']}; check them")
    lines.append(f"  training policy (applied by folds): {cfg.dedup.policy}, conflicts {cfg.dedup.conflicts}; "
                 "test images are never changed")
    lines.append(f"  wrote {paths.dedup_csv(cfg)}, {paths.dedup_report(cfg).name}"
                 + (f", {report['contact_sheet']}" if report.get("contact_sheet") else ""))
    return "\n".join(lines)


def dedup_is_current(cfg: Config, table: pd.DataFrame | None = None) -> bool:
    """Whether dedup.csv and its report exist and match the current images and detection settings."""
    csv, rep = paths.dedup_csv(cfg), paths.dedup_report(cfg)
    if not (csv.is_file() and rep.is_file()):
        return False
    try:
        report = read_json(rep)
    except ValueError:
        return False
    if table is None:
        table = load_competition(cfg.competition).all_images()
    return report.get("settings") == detection_settings(cfg.dedup, image_source(cfg)) and \
        report.get("input_fingerprint") == input_fingerprint(table)


def ensure_dedup(cfg: Config) -> Path:
    """Run dedup when its outputs are missing or stale (one line says so); returns dedup.csv."""
    if not dedup_is_current(cfg):
        reason = "missing" if not paths.dedup_csv(cfg).is_file() else "made from other images or settings"
        print(f"dedup: {paths.dedup_csv(cfg)} {reason}; running dedup now (python -m pipeline.dedup)")
        run_dedup(cfg, quiet=True)
    return paths.dedup_csv(cfg)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.dedup",
        description="Exact and near-duplicate groups, conflicting labels and train/test overlap; "
                    "writes work/<comp>/dedup.csv, dedup_report.json and dedup_sheet.png.",
    )
    add_config_args(parser)
    args = parser.parse_args(argv)
    return run_dedup(config_from_args(args))


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
