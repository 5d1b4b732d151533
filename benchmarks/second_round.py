"""What each second-round lever buys on a harder digits competition, judged on the hidden solution.

The embedded digits are too easy (the first round scores 0.99+), so this builds a harder variant:
the same competition with only a fraction of the training images (``--fraction``, default a third)
and optionally flipped training labels (``--label-noise``, when the digits builder has that
option). The test images and the hidden solution stay the same.

It trains the first round (two architectures, blended with the default SLSQP weights), then each
lever, and prints one row per lever: OOF accuracy and log loss (what a competitor sees) and
accuracy on the hidden solution (the judge: a blend can always match OOF by adding members), with
the difference to the first-round blend. Levers that did not help are printed like the rest. With
``--label-noise``, the ``audit`` lever runs ``pipeline.analyze --write-fixes --min-confidence 0`` on the
first-round resnet10t, excludes every image cleanlab flags and trains again (alone, and with the
path's pseudo-labels and distillation).

    python benchmarks/second_round.py                        # a third of the images, 5 folds
    python benchmarks/second_round.py --fraction 0.25 --epochs 8 --out work/second_round
    python benchmarks/second_round.py --levers hill_climb stack swa   # a subset

Each experiment is a real ``pipeline.run`` (train every fold, predict with TTA); their logs go to
``<out>/logs/``. Expect a few minutes per trained lever on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.digits import build_digits, private_dir  # noqa: E402

LEVERS = ["hill_climb", "stack", "power", "swa", "pseudo", "pseudo_leaky", "distill", "seeds", "finetune", "round2",
          "audit"]


def build_variant(out: Path, fraction: float, label_noise: float, seed: int = 0) -> Path:
    """The digits competition with ``fraction`` of the train rows and ``label_noise`` (the builder's options)."""
    root = out / "data" / f"digits_f{fraction:.2f}_n{label_noise:.2f}"
    return build_digits(root, seed=seed, label_noise=label_noise, train_fraction=fraction)


class Bench:
    def __init__(self, out: Path, root: Path, epochs: int, folds: int):
        self.out, self.root = out, root
        self.base = [f"competition.root={root}", "competition.name=digits_hard", "competition.build=null",
                     f"competition.solution={private_dir(root) / 'solution.csv'}",
                     f"paths.work={out / 'work'}", f"paths.runs={out / 'runs'}",
                     f"paths.submissions={out / 'submissions'}", "wandb.mode=disabled",
                     f"train.epochs={epochs}", f"folds.k={folds}"]
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.train_only = self.blend_only = False
        self.times: dict[str, float] = {}

    def cfg(self, *overrides: str):
        return load_config(REPO / "configs" / "default.yaml", self.base + list(overrides))

    def train(self, name: str, *overrides: str) -> None:
        """``pipeline.run`` of one experiment (skips work that is up to date)."""
        from pipeline.run import run_all

        if self.blend_only:
            return

        cfg = self.cfg(f"experiment={name}", f"ensemble.experiments=[{name}]", *overrides)
        t = time.time()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            run_all(cfg)
        (self.out / "logs" / f"{name}.log").write_text(log.getvalue())
        self.times[name] = time.time() - t
        print(f"  trained {name} ({self.times[name]:.0f}s)", flush=True)

    def blend(self, lever: str, names: list[str], *overrides: str, always: bool = False) -> dict | None:
        from pipeline.ensemble import run_ensemble

        if self.train_only and not always:
            return None

        cfg = self.cfg(f"experiment={names[0]}", *overrides)
        res = run_ensemble(cfg, names, name=lever.replace(" ", "_").replace("(", "").replace(")", ""), quiet=True)
        row = {"submission": str(res.submission), "lever": lever, "members": "+".join(names), "method": cfg.ensemble.method,
               "oof_acc": res.cv_acc, "oof_logloss": res.cv_logloss, "hidden_acc": res.solution_score,
               "train_s": sum(self.times.get(n, 0.0) for n in names)}
        if not self.train_only:
            self.rows.append(row)
        print(f"  {lever:<28} OOF acc {row['oof_acc']:.4f} log loss {row['oof_logloss']:.4f} "
              f"hidden acc {row['hidden_acc']:.4f}", flush=True)
        return row

    def fold_metrics(self, name: str) -> list[dict]:
        from pipeline import paths

        cfg = self.cfg(f"experiment={name}")
        return [json.loads((paths.fold_dir(cfg, k) / paths.METRICS).read_text()) for k in range(cfg.folds.k)]

    def swa_vs_ema(self, name: str) -> None:
        ms = self.fold_metrics(name)
        swa = np.mean([m["swa_val_acc"] for m in ms])
        ema = np.mean([m["best_epoch_val_acc"] for m in ms])
        self.notes.append(f"{name}: mean fold val acc, SWA model {swa:.4f} vs best EMA epoch {ema:.4f} (same run)")
        print("  " + self.notes[-1], flush=True)

    def views(self, name: str) -> None:
        from pipeline import paths

        cfg = self.cfg(f"experiment={name}")
        per = [json.loads((paths.fold_dir(cfg, k) / paths.PREDICT).read_text())["oof_acc_per_view"]
               for k in range(cfg.folds.k)]
        means = {v: np.mean([p[v] for p in per]) for v in per[0]}
        self.notes.append(f"{name}: mean fold OOF acc per TTA view: "
                          + ", ".join(f"{v} {a:.4f}" for v, a in means.items()))
        print("  " + self.notes[-1], flush=True)

    def audit(self, name: str) -> Path:
        """``pipeline.analyze --write-fixes --min-confidence 0`` on ``name``: every cleanlab label issue as a
        draft exclude.csv (kept if it is already there), scored against the flips the builder planted."""
        from pipeline import paths
        from pipeline.analyze import analyze

        cfg = self.cfg(f"experiment={name}")
        draft = paths.analysis_dir(cfg, name) / paths.EXCLUDE_DRAFT
        if not draft.is_file():
            analyze(cfg, write_fixes=True, min_confidence=0.0, adversarial=False, quiet=True)
        flips = json.loads((private_dir(self.root) / "planted.json").read_text())["label_noise"]["flips"]
        train = set(pd.read_csv(self.root / "train.csv", dtype=str)["image"])
        planted = {f["image"] for f in flips} & train
        found = set(pd.read_csv(draft, dtype=str)["image"])
        hits = len(found & planted)
        self.notes.append(f"audit of {name}: {len(found)} images excluded, precision {hits / max(len(found), 1):.3f}, "
                          f"recall {hits / max(len(planted), 1):.3f} against the {len(planted)} planted flips")
        print("  " + self.notes[-1], flush=True)
        return draft

    def table(self) -> str:
        df = pd.DataFrame(self.rows)
        base = df.iloc[0]
        df["d_oof_acc"] = df["oof_acc"] - base["oof_acc"]
        df["d_hidden_acc"] = df["hidden_acc"] - base["hidden_acc"]
        lines = [f"{'lever':<30} {'oof_acc':>8} {'oof_ll':>8} {'hidden':>8} {'d_hidden':>9}  members"]
        for r in df.itertuples():
            lines.append(f"{r.lever:<30} {r.oof_acc:>8.4f} {r.oof_logloss:>8.4f} {r.hidden_acc:>8.4f} "
                         f"{r.d_hidden_acc:>+9.4f}  {r.members} ({r.method})")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="work/second_round", help="folder for data, runs and logs")
    parser.add_argument("--fraction", type=float, default=1 / 3, help="share of the training images kept")
    parser.add_argument("--label-noise", type=float, default=0.0, help="share of training labels flipped")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine more threads spin-wait)")
    parser.add_argument("--train-only", action="store_true", help="train every experiment, blend nothing")
    parser.add_argument("--blend-only", action="store_true",
                        help="train nothing: blend and report the experiments already trained in --out")
    parser.add_argument("--levers", nargs="+", default=LEVERS, choices=LEVERS)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    import os

    import torch

    torch.set_num_threads(args.threads)

    os.system("uptime")
    root = build_variant(out, args.fraction, args.label_noise)
    bench = Bench(out, root, args.epochs, args.folds)
    bench.train_only, bench.blend_only = args.train_only, args.blend_only
    n_train = len(pd.read_csv(root / "train.csv"))
    print(f"harder digits: {n_train} training images ({args.fraction:.2f} of them), label noise "
          f"{args.label_noise}, {args.folds} folds, {args.epochs} epochs; outputs in {out}")

    print("first round")
    bench.train("r1_resnet10t")
    bench.train("r1_resnet18", "model.backbone=resnet18")
    first = ["r1_resnet10t", "r1_resnet18"]
    first_blend = bench.blend("first round (optimize)", first, always=True)
    bench.blend("  single resnet10t", ["r1_resnet10t"])
    bench.blend("  single resnet18", ["r1_resnet18"])
    levers = set(args.levers)
    print("levers")
    if "hill_climb" in levers:
        bench.blend("hill_climb", first, "ensemble.method=hill_climb")
    if "stack" in levers:
        bench.blend("stack", first, "ensemble.method=stack")
    if "power" in levers:
        bench.blend("power merge", first, "ensemble.merge=power")
    if "swa" in levers:
        # SWA and EMA on the same run: metrics.json keeps the best EMA epoch beside the SWA model.
        bench.train("r2_swa", "train.swa.last_n=3", "train.ema=true")
        bench.blend("SWA last 3 (resnet10t, EMA on)", ["r2_swa"])
        if not args.train_only:
            bench.swa_vs_ema("r2_swa")
    students = []
    if "pseudo" in levers:
        bench.train("r2_pseudo", "pseudo.from=[r1_resnet10t, r1_resnet18]", "pseudo.threshold=0.9")
        bench.blend("pseudo-labels (resnet10t)", ["r2_pseudo"])
        students.append("r2_pseudo")
    if "pseudo_leaky" in levers:
        # The same student taught by the first-round submission (every fold's models mixed): its CV is
        # optimistic, which the hidden solution shows.
        bench.train("r2_pseudo_leaky", f"pseudo.from={first_blend['submission'].replace('.csv', '.json')}",
                    "pseudo.threshold=0.9")
        bench.blend("pseudo-labels from a submission (leaky)", ["r2_pseudo_leaky"])
    if "distill" in levers:
        bench.train("r2_distill", "distill.teacher=[r1_resnet10t, r1_resnet18]", "distill.alpha=0.5",
                    "distill.temperature=2.0")
        bench.blend("distilled (resnet10t)", ["r2_distill"])
        students.append("r2_distill")
    if "seeds" in levers:
        bench.train("r2_seeds", "seeds=[1, 2]")
        bench.blend("2 seeds averaged (resnet10t)", ["r2_seeds"])
        students.append("r2_seeds")
    if "finetune" in levers:
        bench.train("r2_finetune", "finetune.from=r1_resnet10t", "finetune.img_size=48", "finetune.epochs=3",
                    "finetune.lr=0.0005", "tta=[identity, zoom_1.125, scale_1.15]")
        bench.blend("finetune 48 px (resnet10t)", ["r2_finetune"])
        if not args.train_only:
            bench.views("r2_finetune")
    if "round2" in levers:
        # The README's path (configs/digits_round2.yaml): one student with pseudo-labels and distillation.
        bench.train("r2_round2", "pseudo.from=[r1_resnet10t, r1_resnet18]", "pseudo.threshold=0.9",
                    "distill.teacher=[r1_resnet10t, r1_resnet18]", "distill.alpha=0.5", "distill.temperature=2.0")
        bench.blend("student: pseudo + distill", ["r2_round2"])
        bench.blend("round 2 path (hill_climb)", first + ["r2_round2"], "ensemble.method=hill_climb")
    if "audit" in levers and args.label_noise > 0:
        # The label audit fed back (last: its exclusions change folds.csv, which the levers above must not see):
        # the first-round recipe without every image cleanlab flags, then the path's student on top of it.
        draft = bench.audit("r1_resnet10t")
        bench.train("r2_audit", f"competition.exclude={draft}")
        bench.blend("audit: cleanlab issues excluded", ["r2_audit"])
        bench.train("r2_audit_round2", f"competition.exclude={draft}", "pseudo.from=[r1_resnet10t, r1_resnet18]",
                    "pseudo.threshold=0.9", "distill.teacher=[r1_resnet10t, r1_resnet18]", "distill.alpha=0.5",
                    "distill.temperature=2.0")
        bench.blend("audit + pseudo + distill", ["r2_audit_round2"])
        bench.blend("audit path (hill_climb)", first + ["r2_audit", "r2_audit_round2"], "ensemble.method=hill_climb")
    if "round2" in levers and students:
        bench.blend("round 2 blend (hill_climb)", first + students, "ensemble.method=hill_climb")
        bench.blend("round 2 blend (optimize)", first + students)
    if args.train_only:
        return
    print()
    print(bench.table())
    for note in bench.notes:
        print(note)
    os.system("uptime")


if __name__ == "__main__":
    main()
