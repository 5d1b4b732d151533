"""Stage ``analyze``: what the model gets wrong, from the out-of-fold predictions.

``python -m pipeline.analyze [--experiment NAME | --blend]`` reads the OOF predictions of an
experiment (``runs/<experiment>/fold*/oof_tta.csv`` when every fold has one, else ``oof.csv``) or
of the newest submission's blend (its experiments and weights, from ``submissions/*.json``), plus
``work/<competition>/dedup.csv`` when dedup has run, and writes to ``runs/<experiment>/analysis/``
(``work/<competition>/analysis/`` for the blend):

- ``per_class.csv``: support, precision, recall, F1, confidences per class (worst first);
- ``confusion.png`` (row-normalised, confused classes side by side, readable at hundreds of
  classes) and ``confused_pairs.csv``;
- ``top_losses.png``: the highest-loss images with given label, prediction and probability;
- ``calibration.png`` and the expected calibration error;
- ``label_issues.csv`` / ``label_issues.png``: likely label errors from cleanlab, joined with
  the duplicate groups (and images of conflicting groups);
- ``adversarial.csv`` / ``adversarial.png``: adversarial validation on the trained model's
  features (needs the folds' ``best.pt``; ``--no-adversarial`` skips it);
- ``exclude.csv`` and ``relabel.csv`` with ``--write-fixes``: the same images, as a draft list for
  ``competition.exclude`` and as corrections (the label the model backs) for ``competition.relabel``,
  to edit and then use one of;
- ``summary.json`` and ``report.md`` linking it all; a short summary on the console.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.analysis import scores
from pipeline.analysis.label_issues import draft_exclusions, draft_relabels, find_issues, read_dedup_groups
from pipeline.analysis.oof import Oof, load_blend_oof, load_experiment_oof
from pipeline.analysis.plots import plot_calibration, plot_confusion
from pipeline.analysis.report import write_report
from pipeline.analysis.sheet import Tile, contact_sheet
from pipeline.config import Config, add_config_args, config_from_args
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json, atomic_write_text
from pipeline.metrics import accuracy, log_loss

SHOWN_WORST = 5


@dataclass
class Analysis:
    out_dir: Path
    summary: dict[str, Any]
    per_class: pd.DataFrame
    confused_pairs: pd.DataFrame
    label_issues: pd.DataFrame
    adversarial: pd.DataFrame | None
    exclude_csv: Path | None
    relabel_csv: Path | None = None


def _losses(oof: Oof) -> np.ndarray:
    return -np.log(np.clip(oof.probs[np.arange(len(oof.labels)), oof.labels], 1e-15, 1.0))


def _top_loss_tiles(oof: Oof, root: Path, n: int) -> list[Tile]:
    loss = _losses(oof)
    tiles = []
    for i in np.argsort(-loss, kind="stable")[:n]:
        pred = oof.predicted[i]
        tiles.append(Tile(root / oof.images[i], f"{Path(oof.images[i]).name}\ngiven: {oof.classes[oof.labels[i]]}\n"
                          f"pred: {oof.classes[pred]} {oof.probs[i, pred]:.2f}\nloss {loss[i]:.2f}"))
    return tiles


def _issue_tiles(issues: pd.DataFrame, root: Path, n: int) -> list[Tile]:
    return [Tile(root / r.image, f"{Path(r.image).name}\ngiven: {r.given}\nsuggest: {r.suggested} "
                 f"{r.suggested_prob:.2f}" + (f"\ngroup {r.group}: {r.group_labels}" if r.in_conflicting_group else ""),
                 "red" if r.in_conflicting_group else None)
            for r in issues.head(n).itertuples(index=False)]


def analyze(cfg: Config, experiment: str | None = None, blend: bool = False, top: int = 24,
            write_fixes: bool = False, min_confidence: float = 0.9, adversarial: bool = True,
            quiet: bool = False) -> Analysis:
    """Write the analysis files of ``experiment`` (default ``cfg.experiment``) or of the blend."""
    from pipeline.data import load_competition

    if blend and experiment:
        raise PipelineError("give --experiment NAME or --blend, not both")
    say = (lambda *a: None) if quiet else print
    start = time.time()
    name = experiment or cfg.experiment
    oof = load_blend_oof(cfg) if blend else load_experiment_oof(cfg, name)
    out = paths.analysis_dir(cfg, name, blend=blend)
    comp = load_competition(cfg.competition)
    title = f"{comp.slug}: {oof.source}"

    table = scores.per_class(oof.labels, oof.probs, oof.classes)
    atomic_write_csv(out / "per_class.csv", table)
    cm = scores.confusion(oof.labels, oof.probs, len(oof.classes))
    pairs = scores.confused_pairs(cm, oof.labels, oof.probs, oof.classes)
    atomic_write_csv(out / "confused_pairs.csv", pairs)
    order = scores.confusion_order(oof.labels, oof.probs, len(oof.classes))
    plot_confusion(cm, order, oof.classes, pairs, out / "confusion.png", title)
    contact_sheet(_top_loss_tiles(oof, comp.root, top), out / "top_losses.png", f"highest OOF losses: {title}")
    bins = scores.calibration_bins(oof.labels, oof.probs)
    ece = scores.expected_calibration_error(oof.labels, oof.probs)
    plot_calibration(bins, ece, out / "calibration.png", title)

    dedup = read_dedup_groups(paths.dedup_csv(cfg))
    issues = find_issues(oof, dedup)
    atomic_write_csv(out / paths.LABEL_ISSUES, issues)
    sheet = contact_sheet(_issue_tiles(issues, comp.root, top), out / "label_issues.png",
                          f"likely label errors (red: duplicate group with disagreeing labels): {title}")
    if sheet is None:
        (out / "label_issues.png").unlink(missing_ok=True)  # an older run's picture would contradict the CSV
    exclude_csv = relabel_csv = None
    if write_fixes:  # drafts a user may have edited are never overwritten (both checked before either is written)
        for name in (paths.EXCLUDE_DRAFT, paths.RELABEL_DRAFT):
            if (out / name).exists():
                raise FileExistsError(f"{out / name} exists (a draft you may have edited): move it away to write "
                                      f"new drafts")
        exclude_csv = atomic_write_csv(out / paths.EXCLUDE_DRAFT, draft_exclusions(issues, min_confidence), overwrite=False)
        relabel_csv = atomic_write_csv(out / paths.RELABEL_DRAFT, draft_relabels(issues, min_confidence), overwrite=False)

    cleanlab = issues["found_by"].str.startswith("cleanlab")
    summary: dict[str, Any] = {
        "source": oof.source, "experiments": oof.experiments, "weights": oof.weights,
        "n_images": len(oof.images), "n_classes": len(oof.classes),
        "accuracy": accuracy(oof.probs, oof.labels), "log_loss": log_loss(oof.probs, oof.labels), "ece": ece,
        "issues_cleanlab": int(cleanlab.sum()),
        "issues_in_conflict": int((cleanlab & issues["in_conflicting_group"]).sum()),
        "issues_conflict_only": int((~cleanlab).sum()),
        "worst_classes": table.head(SHOWN_WORST)[["class", "f1", "support"]].to_dict("records"),
        "top_pairs": pairs.head(SHOWN_WORST)[["given", "predicted", "count"]].to_dict("records"),
        "exclude_csv": str(exclude_csv) if exclude_csv else None,
        "relabel_csv": str(relabel_csv) if relabel_csv else None,
        "min_confidence": min_confidence if write_fixes else None,
    }
    adv = None
    if adversarial:
        from pipeline.analysis.adversarial import adversarial_validation

        adv_cfg = cfg.model_copy(update={"experiment": max(oof.weights, key=oof.weights.get)})
        result = adversarial_validation(adv_cfg, oof.images, oof.folds, progress=not quiet)
        adv = result.scores
        atomic_write_csv(out / "adversarial.csv", adv)
        label_of = dict(zip(oof.images, oof.label_names))
        contact_sheet([Tile(comp.root / r.image, f"{Path(r.image).name}\n{label_of[r.image]}\n"
                            f"test-likeness {r.test_likeness:.2f}") for r in adv.head(top).itertuples(index=False)],
                      out / "adversarial.png", f"train images most like test (AUC {result.auc:.3f}): "
                      f"{adv_cfg.experiment}")
        summary.update(adversarial_auc=result.auc, adversarial_fold_auc=result.fold_auc,
                       adversarial_experiment=adv_cfg.experiment)
    atomic_write_json(out / paths.ANALYSIS_SUMMARY, summary)
    atomic_write_text(out / "report.md", write_report(out, summary, table, pairs, issues, adv))

    say(f"analyze {oof.source}: {summary['n_images']} OOF images, {summary['n_classes']} classes, accuracy "
        f"{summary['accuracy']:.4f}, log loss {summary['log_loss']:.4f}, ECE {ece:.4f}")
    say("  worst classes (F1): " + ", ".join(f"{r['class']} {r['f1']:.3f} (n={r['support']})"
                                              for r in summary["worst_classes"]))
    if len(pairs):
        say("  most confused (given -> predicted): " + ", ".join(
            f"{r['given']} -> {r['predicted']} {r['count']}" for r in summary["top_pairs"]))
    say(f"  label issues: {summary['issues_cleanlab']} found by cleanlab ({summary['issues_in_conflict']} in "
        f"conflicting duplicate groups), {summary['issues_conflict_only']} more in conflicting groups")
    if adv is not None:
        say(f"  adversarial validation: train vs test AUC {summary['adversarial_auc']:.3f} "
            f"({'no shift seen' if summary['adversarial_auc'] < 0.6 else 'a shift: check adversarial.png'})")
    if exclude_csv:
        n = len(pd.read_csv(exclude_csv))
        say(f"  draft exclusions: {n} image(s) with another label at p >= {min_confidence} -> {exclude_csv}; "
            f"edit it, then --set competition.exclude={exclude_csv}")
        say(f"  draft corrections: the same {n} image(s) with the label the model backs -> {relabel_csv}; "
            f"or --set competition.relabel={relabel_csv}")
    say(f"  wrote {out}/ (report.md) in {time.time() - start:.0f}s")
    return Analysis(out, summary, table, pairs, issues, adv, exclude_csv, relabel_csv)


def main(argv: list[str] | None = None) -> Analysis:
    parser = argparse.ArgumentParser(prog="python -m pipeline.analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--experiment", metavar="NAME", help="the experiment to analyse (default: the config's)")
    which.add_argument("--blend", action="store_true", help="analyse the newest submission's blend instead")
    parser.add_argument("--top", type=int, default=24, help="images on each contact sheet (default 24)")
    parser.add_argument("--write-fixes", action="store_true",
                        help="also write draft exclude.csv and relabel.csv of the label issues above --min-confidence")
    parser.add_argument("--min-confidence", type=float, default=0.9,
                        help="probability the model must give another label for --write-fixes (default 0.9)")
    parser.add_argument("--no-adversarial", action="store_true",
                        help="skip adversarial validation (it runs each fold's model over its images and the test set)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if not 0.0 <= args.min_confidence <= 1.0:
        parser.error(f"--min-confidence {args.min_confidence}: must be a probability between 0 and 1")
    cfg = config_from_args(args)
    return analyze(cfg, experiment=args.experiment, blend=args.blend, top=args.top, write_fixes=args.write_fixes,
                   min_confidence=args.min_confidence, adversarial=not args.no_adversarial)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
