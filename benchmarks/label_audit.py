"""Benchmark of the label audit: does ``pipeline.analyze`` find planted label errors, and does
acting on them help the score that matters?

1. Builds the embedded digits competition with ``--label-noise`` (default 3% of the train labels
   flipped, half of them between the two most-confused classes; listed in planted.json).
2. Runs the whole pipeline on it (``pipeline.run``: dedup, folds, train every fold, TTA, ensemble).
3. Runs ``pipeline.analyze`` and prints precision and recall of ``label_issues.csv`` (the images
   cleanlab flags) against the planted flips, overall and per kind of flip.
4. Excludes what the audit found (``competition.exclude``) and runs the pipeline again: fold ids
   stay, so the same images are validated (with their given labels), and prints the hidden-solution
   accuracy before and after (the judge), with CV beside it, against the given labels and against
   the true ones (known here from planted.json).

    python benchmarks/label_audit.py [--out work/label_audit] [--noise 0.03] [--epochs 8]
        [--img-size 32] [--backbone resnet10t] [--folds 5] [--relabel]

``--relabel`` also runs a third variant that relabels the issues with the model's suggestion
instead of dropping them. Each run of the pipeline trains every fold; on 2 CPU cores the defaults
take minutes per run (print ``uptime`` beside the figures).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.analysis.oof import load_experiment_oof  # noqa: E402
from pipeline.analyze import analyze  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.digits import build_digits, private_dir  # noqa: E402
from pipeline.io import atomic_write_csv, read_json  # noqa: E402
from pipeline.run import run_all  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def precision_recall(found: set[str], planted: set[str]) -> tuple[float, float, int]:
    hit = len(found & planted)
    return hit / max(len(found), 1), hit / max(len(planted), 1), hit


def cv_scores(cfg, experiment: str, true_label: dict[str, str]) -> dict[str, float]:
    """OOF accuracy (after TTA) against the given labels and against the true ones, every OOF image."""
    oof = load_experiment_oof(cfg, experiment)
    pred = [oof.classes[i] for i in oof.predicted]
    given = oof.label_names
    true = [true_label.get(img, g) for img, g in zip(oof.images, given)]
    return {"cv_given": float(np.mean([p == g for p, g in zip(pred, given)])),
            "cv_true": float(np.mean([p == t for p, t in zip(pred, true)])), "n_oof": len(pred)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="work/label_audit", help="folder for data, runs and submissions")
    parser.add_argument("--noise", type=float, default=0.03, help="fraction of train labels flipped")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--relabel", action="store_true", help="also relabel the issues instead of dropping them")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    root = out / "data" / "digits_noisy"
    build_digits(root, label_noise=args.noise)
    flips = read_json(private_dir(root) / "planted.json")["label_noise"]["flips"]
    planted = {f["image"] for f in flips}
    kind = {f["image"]: f["kind"] for f in flips}
    true_label = {f["image"]: f["true"] for f in flips}
    base = [f"paths.work={out / 'work'}", f"paths.runs={out / 'runs'}", f"paths.submissions={out / 'submissions'}",
            f"competition.root={root}", f"competition.solution={private_dir(root) / 'solution.csv'}",
            "competition.name=digits_noisy", "wandb.mode=disabled", f"train.epochs={args.epochs}",
            f"train.img_size={args.img_size}", f"model.backbone={args.backbone}", f"folds.k={args.folds}"]
    print(f"label audit: {len(planted)} planted flips ({args.noise:.0%} of the train labels; "
          f"{sum(k == 'pair' for k in kind.values())} between {' and '.join(read_json(private_dir(root) / 'planted.json')['label_noise']['confused_pair'])}); "
          f"{args.backbone}, {args.img_size} px, {args.epochs} epochs, {args.folds} folds; load {_load()}")

    results = {}
    t = time.time()
    cfg = load_config(REPO / "configs" / "default.yaml", [*base, "experiment=audit_noisy",
                                                          "ensemble.experiments=[audit_noisy]"])
    summary = run_all(cfg)
    results["noisy"] = {"solution": summary.solution_score, **cv_scores(cfg, "audit_noisy", true_label),
                        "train_s": time.time() - t}

    t = time.time()
    report = analyze(cfg, adversarial=False, quiet=True)
    issues = report.label_issues
    found = set(issues.loc[issues["found_by"].str.startswith("cleanlab"), "image"])
    p, r, hit = precision_recall(found, planted)
    print(f"\nanalyze ({time.time() - t:.0f}s): {len(found)} label issues found by cleanlab, {hit} of them planted flips")
    print(f"  precision {p:.3f}  recall {r:.3f}   (aim: recall >= 0.8 at precision >= 0.6)")
    for k in ("pair", "random"):
        sub = {img for img in planted if kind[img] == k}
        print(f"  {k:<6} flips: recall {precision_recall(found, sub)[1]:.3f} ({len(found & sub)}/{len(sub)})")
    ranked = issues.loc[issues["found_by"].str.startswith("cleanlab"), "image"].tolist()  # worst first
    hits = np.cumsum([img in planted for img in ranked])
    reach = np.flatnonzero(hits >= 0.8 * len(planted))
    if len(reach):
        n = int(reach[0]) + 1
        print(f"  cleanlab's ranking: recall 0.8 is reached at its top {n} issues, precision there {hits[n - 1] / n:.3f}")
    for thr in (0.5, 0.7, 0.9):
        top = set(issues.loc[issues["found_by"].str.startswith("cleanlab") & (issues["suggested_prob"] >= thr), "image"])
        tp, tr, _ = precision_recall(top, planted)
        print(f"  issues with the suggested label at p >= {thr}: {len(top):>3} images, precision {tp:.3f}, recall {tr:.3f}")

    fixes = out / "fixes"
    atomic_write_csv(fixes / "exclude.csv", issues.loc[issues["image"].isin(found), ["image", "given", "suggested"]])
    variants = [("excluded", "competition.exclude", fixes / "exclude.csv")]
    if args.relabel:
        atomic_write_csv(fixes / "relabel.csv", issues.loc[issues["image"].isin(found), ["image", "suggested"]]
                         .rename(columns={"suggested": "label"}))
        variants.append(("relabelled", "competition.relabel", fixes / "relabel.csv"))
    for name, key, path in variants:
        t = time.time()
        vcfg = load_config(REPO / "configs" / "default.yaml", [*base, f"experiment=audit_{name}", f"{key}={path}",
                                                               f"ensemble.experiments=[audit_{name}]"])
        s = run_all(vcfg)
        results[name] = {"solution": s.solution_score, **cv_scores(vcfg, f"audit_{name}", true_label),
                         "train_s": time.time() - t}

    print(f"\n{'variant':<12} {'hidden acc':>10} {'CV given':>9} {'CV true':>8} {'OOF imgs':>8} {'seconds':>8}")
    for name, res in results.items():
        print(f"{name:<12} {res['solution']:>10.4f} {res['cv_given']:>9.4f} {res['cv_true']:>8.4f} "
              f"{res['n_oof']:>8d} {res['train_s']:>8.0f}")
    print("(CV on the same OOF images in every variant: 'given' against the labels of that variant's folds.csv, "
          f"'true' against the unflipped labels; load {_load()})")


if __name__ == "__main__":
    main()
