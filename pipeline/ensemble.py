"""Stage ``ensemble``: blend experiments with weights chosen on out-of-fold predictions.

``python -m pipeline.ensemble`` takes every experiment of the configured competition whose folds
all have OOF and test predictions (or ``--experiments A B ...``). Per experiment the fold test
probabilities are averaged and the OOF predictions assembled over the folds; the weights across
experiments are then chosen on the OOF log loss (``ensemble.method``):

- ``optimize``: scipy SLSQP, weights in [0, 1] summing to 1 (the default);
- ``caruana``: greedy forward selection with replacement (Caruana et al. 2004);
- ``fixed``: ``ensemble.weights`` from the config; ``mean``: equal weights.

It prints a table of CV scores and weights and writes the blended test probabilities as a
submission (``submissions/<name>_<timestamp>.csv`` + ``.json``), scored against the hidden
solution when the competition has one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from pipeline import blending, paths
from pipeline.config import Config, add_config_args, config_from_args
from pipeline.errors import PipelineError, cli_entry
from pipeline.experiments import Members, choose_members, experiment_folds, missing_predictions, saved_config
from pipeline.experiments import discover_experiments as discover_experiments  # where callers look for it
from pipeline.io import read_json
from pipeline.label_fixes import submission_record
from pipeline.metrics import accuracy, log_loss
from pipeline.provenance import data_fingerprint, provenance

ENSEMBLE_RUN_DIR = "_ensemble"  # W&B records of blends; not an experiment (it has no config.yaml)


# ----------------------------------------------------------------------------- weights


def _true_class_probs(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(M, N, C)`` model probabilities -> ``(N, M)`` probability each model gives the true class."""
    return probs[:, np.arange(len(y)), y].T


def average_folds(fold_probs: list[np.ndarray]) -> np.ndarray:
    """A member's test probabilities: the plain mean of its folds' ``(N, C)`` probabilities.

    Shared with ``pipeline.infer``, so a package predicts exactly what the ensemble blended.
    """
    return sum(fold_probs) / len(fold_probs)


def blend(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average of ``(M, N, C)`` probabilities."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), probs, axes=1)


def optimize_weights(probs: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log loss of the blend (SLSQP).

    The log loss of a blend depends only on each model's probability of the true class, so the
    objective and its gradient are computed on an ``(N, M)`` matrix, not the full blend.
    """
    m = probs.shape[0]
    if m == 1:
        return np.ones(1)
    q = _true_class_probs(probs, y)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        mix = np.clip(q @ w, eps, None)
        return float(-np.log(mix).mean()), -(q / mix[:, None]).mean(0)

    start = np.full(m, 1.0 / m)
    res = minimize(loss, start, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(m)}],
                   options={"maxiter": 500, "ftol": 1e-10})
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else start
    # SLSQP can stop early on flat objectives; never return worse than uniform or the best single model.
    candidates = [w, start] + [np.eye(m)[i] for i in range(m)]
    return min(candidates, key=lambda c: loss(c)[0])


def caruana_weights(probs: np.ndarray, y: np.ndarray, iterations: int = 50, eps: float = 1e-15) -> np.ndarray:
    """Greedy forward selection with replacement: repeatedly add the model that most lowers the
    log loss of the running average, starting from the best single model; weights are the counts."""
    m = probs.shape[0]
    q = _true_class_probs(probs, y)
    counts = np.zeros(m)
    total = np.zeros(len(y))
    best, best_loss = None, np.inf
    for _ in range(max(1, iterations)):
        n = counts.sum()
        trial = (total[:, None] + q) / (n + 1)  # (N, M): the average if model j were added
        losses = -np.log(np.clip(trial, eps, None)).mean(0)
        j = int(np.argmin(losses))
        counts[j] += 1
        total += q[:, j]
        # Keep the best bag seen: a forced addition late in the run can make the blend worse.
        if losses[j] < best_loss - 1e-12:
            best, best_loss = counts.copy(), losses[j]
    return best / best.sum()


def fixed_weights(names: list[str], weights: dict[str, float]) -> np.ndarray:
    """``ensemble.weights`` for these experiments (missing ones get 0), normalised to sum 1."""
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise PipelineError(f"ensemble.weights names {unknown}, which are not among the blended experiments "
                            f"{names}; fix the names or add them with --experiments")
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    if (w < 0).any() or w.sum() <= 0:
        raise PipelineError(f"ensemble.weights {weights} must be non-negative with a positive sum")
    return w / w.sum()


def choose_weights(method: str, probs: np.ndarray, y: np.ndarray, names: list[str],
                   fixed: dict[str, float] | None = None, iterations: int = 50, merge: str = "mean",
                   power: float = 2.0, step: float = 0.01, allow_negative: bool = False,
                   climb_iterations: int = 100) -> np.ndarray:
    """Weights by ``method`` (optimize | caruana | hill_climb | fixed | mean) on OOF probabilities ``(M, N, C)``,
    for the blend ``merge`` (mean | power | rank) makes of them."""
    m = probs.shape[0]
    if method == "fixed":
        return fixed_weights(names, fixed or {})
    if method == "mean":
        return np.full(m, 1.0 / m)
    if method == "hill_climb":
        return blending.hill_climb_weights(blending.transform(probs, merge, power), y, step=step,
                                           iterations=climb_iterations, allow_negative=allow_negative)
    if method == "optimize":
        if merge == "mean":
            return optimize_weights(probs, y)
        return blending.optimize_merged_weights(blending.transform(probs, merge, power), y)
    if method == "caruana":
        if merge == "mean":
            return caruana_weights(probs, y, iterations)
        return blending.caruana_merged_weights(blending.transform(probs, merge, power), y, iterations)
    raise PipelineError(f"ensemble.method {method!r} is not optimize, caruana, hill_climb, stack, fixed or mean")


@dataclass
class Blend:
    """The blended OOF (as weighted, and without TTA), test probabilities, and how they were made."""

    weights: np.ndarray
    oof: np.ndarray
    oof_plain: np.ndarray
    test: np.ndarray
    detail: dict[str, Any]


def blend_members(ens, oof: np.ndarray, oof_plain: np.ndarray, test: np.ndarray, y: np.ndarray,
                  names: list[str], folds: np.ndarray | None = None, seed: int = 0,
                  fit_rows: np.ndarray | None = None) -> Blend:
    """Blend ``(M, N, C)`` member predictions by ``ens.method`` / ``ens.merge`` (the ``ensemble`` section).

    ``stack`` fits a level-2 logistic regression with an inner CV over ``folds`` (see
    :mod:`pipeline.blending`); every other method chooses weights and merges. Both fit on the OOF
    rows ``fit_rows`` (a boolean mask; default all) and predict every row.
    """
    if ens.method == "stack":
        if folds is None:
            raise PipelineError("ensemble.method=stack needs the fold of every OOF row (folds.csv)")
        st = blending.stack_predictions(oof, test, y, folds, c=ens.stack_c, fit_rows=fit_rows)
        plain = blending.stack_predictions(oof_plain, test, y, folds, c=ens.stack_c, fit_rows=fit_rows).oof
        detail = {"stack": {"C": ens.stack_c, "inner_folds": st.inner_folds, "splits": st.splits,
                            "member_share": {n: float(v) for n, v in zip(names, st.member_share)}}}
        return Blend(st.member_share, st.oof, plain, st.test, detail)
    fit = slice(None) if fit_rows is None else fit_rows
    w = choose_weights(ens.method, oof[:, fit], y[fit], names, ens.weights, ens.caruana_iterations, ens.merge, ens.power,
                       ens.hill_climb_step, ens.allow_negative, ens.hill_climb_iterations)
    merge = dict(merge=ens.merge, power=ens.power)
    detail = {"merge": ens.merge, **({"power": ens.power} if ens.merge == "power" else {})}
    return Blend(w, blending.merged(oof, w, **merge), blending.merged(oof_plain, w, **merge),
                 blending.merged(test, w, **merge), detail)


# ----------------------------------------------------------------------------- experiments


@dataclass
class ExperimentPredictions:
    """One experiment's predictions over all its folds."""

    name: str
    classes: list[str]
    folds: list[int]
    oof: pd.DataFrame                     # image, label, probability columns (sorted by image)
    oof_tta: pd.DataFrame | None          # same rows after TTA, or None if predict did not run
    test: pd.DataFrame                    # image, fold-averaged probability columns
    tta: list[str] = field(default_factory=list)


def _read_probs(path: Path, classes: list[str], with_label: bool) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; run python -m pipeline.predict for that fold")
    df = pd.read_csv(path, dtype={"image": str, "label": str}, keep_default_na=False)
    expected = ["image"] + (["label"] if with_label else []) + classes
    if list(df.columns) != expected:
        raise PipelineError(f"{path} has columns {list(df.columns)[:6]}..., expected image"
                            f"{', label' if with_label else ''} and one column per class of classes.json; "
                            "predict that fold again")
    return df


def load_experiment(cfg: Config, name: str, folds: list[int] | None = None) -> ExperimentPredictions:
    """Read all folds (or ``folds``) of one experiment: OOF (with and without TTA) and fold-averaged
    test probabilities."""
    run = paths.run_dir(cfg, name)
    if not (run / paths.CLASSES).is_file():
        raise PipelineError(f"{run}/classes.json is missing; train experiment {name!r} first")
    classes = list(read_json(run / paths.CLASSES)["classes"])
    folds = folds or experiment_folds(cfg, name)
    oofs, oof_ttas, tests, tta = [], [], [], []
    for k in folds:
        d = paths.fold_dir(cfg, k, name)
        oofs.append(_read_probs(d / paths.OOF, classes, True))
        oof_ttas.append(_read_probs(d / paths.OOF_TTA, classes, True) if (d / paths.OOF_TTA).is_file() else None)
        tests.append(_read_probs(d / paths.TEST, classes, False).set_index("image"))
        if (d / paths.PREDICT).is_file():
            tta = list(read_json(d / paths.PREDICT).get("tta", []))
    oof = pd.concat(oofs, ignore_index=True).sort_values("image", ignore_index=True)
    if oof["image"].duplicated().any():
        dup = oof.loc[oof["image"].duplicated(), "image"].iloc[0]
        raise PipelineError(f"experiment {name!r}: image {dup!r} is in the OOF predictions of two folds; "
                            "its folds were trained on different folds.csv files: retrain it")
    oof_tta = None
    if all(t is not None for t in oof_ttas):
        oof_tta = pd.concat(oof_ttas, ignore_index=True).sort_values("image", ignore_index=True)
    images = tests[0].index
    for k, t in zip(folds, tests):
        if not t.index.sort_values().equals(images.sort_values()):
            raise PipelineError(f"experiment {name!r}: fold{k}/test.csv covers other images than fold{folds[0]}; "
                                "predict every fold again")
    test = average_folds([t.loc[images, classes].to_numpy(np.float64) for t in tests])
    test_df = pd.DataFrame(test, columns=classes)
    test_df.insert(0, "image", images.to_numpy())
    return ExperimentPredictions(name, classes, folds, oof, oof_tta, test_df, tta)


def oof_folds(cfg: Config, images: pd.Series) -> np.ndarray:
    """The fold of each OOF image in ``folds.csv`` (the stacker's inner CV follows the competition's folds)."""
    path = paths.folds_csv(cfg)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; ensemble.method=stack needs it: run python -m pipeline.folds")
    fold_of = pd.read_csv(path, usecols=["image", "fold"], dtype={"image": str}, keep_default_na=False)
    fold_of = dict(zip(fold_of["image"], fold_of["fold"].astype(int)))
    missing = [i for i in images if i not in fold_of]
    if missing:
        raise PipelineError(f"{path} has no row for OOF images such as {missing[:3]}; folds.csv changed since "
                            "training: retrain the experiments or use another ensemble.method")
    return np.array([fold_of[i] for i in images])


def trusted_rows(cfg: Config, images: pd.Series) -> np.ndarray | None:
    """Mask of the OOF images whose labels blend weights may be fit on: all but those ``folds.csv``
    marks excluded (``competition.exclude``), unless ``ensemble.fit_excluded``; None when that is every row."""
    from pipeline.folds import read_folds

    path = paths.folds_csv(cfg)
    if cfg.ensemble.fit_excluded or not cfg.competition.exclude or not path.is_file():
        return None
    excluded = set(read_folds(path).query("excluded")["image"])
    mask = ~images.isin(excluded).to_numpy()
    return None if mask.all() else mask


def inputs_fingerprint(cfg: Config, names: list[str]) -> str:
    """A digest of the prediction files of ``names`` and the ensemble settings (run's skip check)."""
    h = hashlib.sha256()
    h.update(json.dumps({"ensemble": cfg.ensemble.model_dump(mode="json"), "experiments": sorted(names),
                         "competition": cfg.competition.model_dump(mode="json")}, sort_keys=True).encode())
    for name in sorted(names):
        for k in experiment_folds(cfg, name):
            for f in (paths.OOF, paths.OOF_TTA, paths.TEST):
                p = paths.fold_dir(cfg, k, name) / f
                st = p.stat() if p.is_file() else None
                h.update(f"{name}/{k}/{f}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- stage


@dataclass
class EnsembleResult:
    experiments: list[str]
    weights: dict[str, float]
    method: str
    table: pd.DataFrame
    cv_acc: float
    cv_logloss: float
    submission: Path
    solution_score: float | None
    meta: dict[str, Any]


def _scores(oof: pd.DataFrame | None, classes: list[str], y: np.ndarray) -> tuple[float, float]:
    if oof is None:
        return float("nan"), float("nan")
    p = oof[classes].to_numpy(np.float64)
    return accuracy(p, y), log_loss(p, y)


def format_table(table: pd.DataFrame) -> str:
    """The CV table as aligned text (acc / log loss without and with TTA, weight)."""
    def fmt(v: Any, digits: int) -> str:
        return "-" if isinstance(v, float) and np.isnan(v) else f"{v:.{digits}f}"

    header = f"{'experiment':<28} {'folds':>5} {'acc':>7} {'logloss':>8} {'acc_tta':>7} {'ll_tta':>8} {'weight':>7}"
    lines = [header, "-" * len(header)]
    for r in table.itertuples(index=False):
        weight = "" if r.experiment == "blend" else fmt(r.weight, 3)
        lines.append(f"{r.experiment:<28} {r.folds:>5} {fmt(r.acc, 4):>7} {fmt(r.logloss, 4):>8} "
                     f"{fmt(r.acc_tta, 4):>7} {fmt(r.logloss_tta, 4):>8} {weight:>7}")
    return "\n".join(lines)


def _check_names(cfg: Config, members: Members) -> None:
    if not members.names:
        left = "".join(f"\n  {n}: {why}" for n, why in members.skipped.items())
        raise PipelineError(f"no experiment of competition {cfg.competition.slug!r} under {cfg.paths.runs}/ can be "
                            "blended: each needs OOF and test predictions for every fold of the current folds.csv; "
                            "run python -m pipeline.run (or pipeline.train and pipeline.predict --all-folds) first"
                            + (f". Left out:{left}" if left else ""))
    for n in members.names:
        missing = missing_predictions(cfg, n, members.folds.get(n))
        if missing:
            raise PipelineError(f"experiment {n!r} has no {', '.join(missing[:4])}; run python -m pipeline.predict "
                                f"--all-folds --set experiment={n}")


def load_members(cfg: Config, names: list[str], folds: dict[str, list[int]] | None = None
                 ) -> tuple[list[ExperimentPredictions], list[str], np.ndarray]:
    """Every member's predictions (of ``folds[name]`` where given), their shared classes and the OOF
    targets; members must agree on classes and OOF images (the same competition and folds)."""
    exps = [load_experiment(cfg, n, (folds or {}).get(n)) for n in names]
    classes = exps[0].classes
    for e in exps[1:]:
        if e.classes != classes:
            raise PipelineError(f"experiments {exps[0].name!r} and {e.name!r} have different classes.json; "
                                "only runs of the same competition can be blended")
    ref = exps[0].oof
    for e in exps[1:]:
        if not e.oof["image"].equals(ref["image"]):
            only = sorted(set(e.oof["image"]) ^ set(ref["image"]))
            raise PipelineError(f"experiments {exps[0].name!r} and {e.name!r} have OOF predictions for different "
                                f"images (e.g. {only[:3]}); they were trained on different folds.csv "
                                "(dedup policy?): retrain one with the other's settings")
    index = {c: i for i, c in enumerate(classes)}
    return exps, classes, ref["label"].map(index).to_numpy()


def member_arrays(exps: list[ExperimentPredictions], classes: list[str], use_tta: bool):
    """``(M, N, C)`` OOF probabilities to weigh (after TTA when ``use_tta``), the same without TTA,
    ``(M, T, C)`` test probabilities in one image order, and that order."""
    test_images = exps[0].test["image"]
    for e in exps[1:]:
        if set(e.test["image"]) != set(test_images):
            raise PipelineError(f"experiments {exps[0].name!r} and {e.name!r} predicted different test images; "
                                "predict both again on the current competition")
    oof = np.stack([(e.oof_tta if use_tta else e.oof)[classes].to_numpy(np.float64) for e in exps])
    oof_plain = np.stack([e.oof[classes].to_numpy(np.float64) for e in exps])
    test = np.stack([e.test.set_index("image").loc[test_images, classes].to_numpy(np.float64) for e in exps])
    return oof, oof_plain, test, test_images


def cv_table(exps: list[ExperimentPredictions], classes: list[str], y: np.ndarray, mixed: Blend,
             use_tta: bool) -> pd.DataFrame:
    """Per member and for the blend: OOF accuracy and log loss without and with TTA, and the weight."""
    rows = []
    for e, wi in zip(exps, mixed.weights):
        acc, ll = _scores(e.oof, classes, y)
        acc_t, ll_t = _scores(e.oof_tta, classes, y)
        rows.append(dict(experiment=e.name, folds=len(e.folds), acc=acc, logloss=ll, acc_tta=acc_t,
                         logloss_tta=ll_t, weight=float(wi)))
    b_acc, b_ll = accuracy(mixed.oof, y), log_loss(mixed.oof, y)
    rows.append(dict(experiment="blend", folds=len(exps[0].folds), acc=accuracy(mixed.oof_plain, y),
                     logloss=log_loss(mixed.oof_plain, y), acc_tta=b_acc if use_tta else float("nan"),
                     logloss_tta=b_ll if use_tta else float("nan"), weight=1.0))
    return pd.DataFrame(rows)


def submission_frame(cfg: Config, test_images: pd.Series, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """The blended test probabilities in the sample submission's form, checked against it."""
    from pipeline.data import load_competition
    from pipeline.submission import build_submission, validate_submission

    comp = load_competition(cfg.competition)
    id_of = dict(zip(comp.test["image"], comp.test["id"]))
    unknown = [i for i in test_images if i not in id_of]
    if unknown:
        raise PipelineError(f"test predictions name images that are not in the competition's test table "
                            f"(e.g. {unknown[:3]}); predict again on the current competition")
    sub = build_submission(comp.sample_submission, cfg.competition, [id_of[i] for i in test_images], probs, classes)
    validate_submission(sub, comp.sample_submission, cfg.competition, classes,
                        source=str(comp.root / cfg.competition.sample_submission))
    return sub


def second_round_levers(cfg: Config, names: list[str]) -> dict[str, Any]:
    """Per blended experiment, the second-round levers it trained with (from its saved config) and
    whether its pseudo-labels were fold-safe (from its folds' second_round.json): for the submission JSON."""
    out: dict[str, Any] = {}
    for n in names:
        data = saved_config(cfg, n) or {}
        used: dict[str, Any] = {}
        for key, on in (("pseudo", "source"), ("distill", "teacher"), ("finetune", "source")):
            section = data.get(key) or {}
            if section.get(on):
                used[key] = section
        swa = (data.get("train") or {}).get("swa") or {}
        if swa.get("start_epoch") or swa.get("last_n"):
            used["train.swa"] = swa
        if data.get("seeds"):
            used["seeds"] = data["seeds"]
        unsafe = []
        for k in experiment_folds(cfg, n):
            rec = paths.fold_dir(cfg, k, n) / paths.SECOND_ROUND
            if rec.is_file() and not (read_json(rec).get("pseudo") or {}).get("fold_safe", True):
                unsafe.append(k)
        if unsafe:
            used["warning"] = f"pseudo-labels from a submission in folds {unsafe}: this experiment's CV is optimistic"
        if used:
            out[n] = used
    return out


def _meta(cfg: Config, exps: list[ExperimentPredictions], weights: dict[str, float], mixed: Blend, use_tta: bool,
          table: pd.DataFrame, n_test: int, fingerprint: str, skipped: dict[str, str]) -> dict[str, Any]:
    return {
        "competition": cfg.competition.slug,
        "experiments": [e.name for e in exps],
        "skipped": dict(skipped),  # experiments left out of the blend, and why
        "folds": {e.name: e.folds for e in exps},
        "method": cfg.ensemble.method,
        "weights": weights,
        **mixed.detail,
        "tta": {e.name: e.tta for e in exps},
        "second_round": second_round_levers(cfg, [e.name for e in exps]),
        "used_tta_oof": use_tta,
        "cv": {r["experiment"]: {k: None if np.isnan(r[k]) else r[k] for k in ("acc", "logloss", "acc_tta",
                                                                                 "logloss_tta")}
               for r in table.to_dict("records")},
        "cv_metric": "log_loss (weights), accuracy",
        "n_test": int(n_test),
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "label_fixes": submission_record(cfg, [e.name for e in exps], lambda n: saved_config(cfg, n)),
        "provenance": provenance(data=data_fingerprint(cfg)),
    }


def _score_against_solution(cfg: Config, sub: pd.DataFrame, meta: dict[str, Any]) -> float | None:
    from pipeline.submission import score_submission

    if not (cfg.competition.solution and Path(cfg.competition.solution).is_file()):
        return None
    score = score_submission(sub, cfg.competition.solution, cfg.competition)
    meta["solution_score"] = {"metric": cfg.competition.metric if cfg.competition.submission_form == "label"
                              else "log_loss", "value": score}
    return score


def _log_blend(cfg: Config, path: Path, names: list[str], weights: dict[str, float], cv_acc: float,
               cv_logloss: float, solution_score: float | None) -> None:
    from pipeline.engine.wandb_run import start_run

    wb = start_run(cfg.wandb, Path(cfg.paths.runs) / ENSEMBLE_RUN_DIR, name=path.stem, group="ensemble",
                   job_type="ensemble", config={**cfg.to_dict(), "experiments": names, "weights": weights})
    wb.log({"cv_acc": cv_acc, "cv_logloss": cv_logloss, **{f"weight/{n}": v for n, v in weights.items()},
            **({"solution_score": solution_score} if solution_score is not None else {})})
    wb.finish()


def run_ensemble(cfg: Config, experiments: list[str] | None = None, name: str | None = None,
                 quiet: bool = False, members: Members | None = None) -> EnsembleResult:
    """Blend ``experiments`` (default: the current experiment plus ``ensemble.experiments``, or every
    current one of the competition; see :func:`pipeline.experiments.choose_members`) and write a submission.

    Experiments that cannot be blended (trained on another folds.csv, incomplete, not trained) are
    skipped with one line each, unless named in ``experiments``, and recorded in the JSON.

    Steps: check the members and load their predictions; blend them (weights chosen on the OOF
    predictions, or a stacker); score the blend (the CV table); the submission frame from the
    blended test predictions; write it with its metadata, score it against a hidden solution, log
    the blend to W&B.

    Returns:
        The weights, CV table, submission path and (when the competition has a hidden solution) its score.
    """
    from pipeline.submission import write_submission

    say = (lambda *a: None) if quiet else print
    members = members or choose_members(cfg, explicit=experiments)
    for skipped, why in members.skipped.items():
        say(f"ensemble: skipping {skipped}: {why}")
    _check_names(cfg, members)
    names = list(members.names)
    fingerprint = inputs_fingerprint(cfg, names)
    exps, classes, y = load_members(cfg, names, members.folds)
    use_tta = cfg.ensemble.use_tta and all(e.oof_tta is not None for e in exps)
    oof, oof_plain, test, test_images = member_arrays(exps, classes, use_tta)
    folds = oof_folds(cfg, exps[0].oof["image"]) if cfg.ensemble.method == "stack" else None
    fit_rows = trusted_rows(cfg, exps[0].oof["image"])
    mixed = blend_members(cfg.ensemble, oof, oof_plain, test, y, names, folds, cfg.seed, fit_rows)
    weights = {n: float(v) for n, v in zip(names, mixed.weights)}
    table = cv_table(exps, classes, y, mixed, use_tta)
    sub = submission_frame(cfg, test_images, mixed.test, classes)

    meta = _meta(cfg, exps, weights, mixed, use_tta, table, len(sub), fingerprint, members.skipped)
    n_fit = len(y) if fit_rows is None else int(fit_rows.sum())
    meta["weights_fit_on"] = {"rows": n_fit, "of": len(y), "left_out": "competition.exclude" if n_fit < len(y) else None}
    solution_score = _score_against_solution(cfg, sub, meta)
    sub_name = name or cfg.ensemble.name or (names[0] if len(names) == 1 else "blend")
    if members.folds:  # run --partial: not every fold; the name and the JSON say so
        sub_name += "_partial"
        meta["partial_folds"] = members.folds
    path = write_submission(sub, paths.submissions_dir(cfg), sub_name, meta)
    b_acc, b_ll = accuracy(mixed.oof, y), log_loss(mixed.oof, y)
    _log_blend(cfg, path, names, weights, b_acc, b_ll, solution_score)

    say(format_table(table))
    rows = f" of {n_fit} rows, competition.exclude's {len(y) - n_fit} left out" if n_fit < len(y) else ""
    say(f"weights ({cfg.ensemble.method}, on {'TTA ' if use_tta else ''}OOF log loss{rows}): "
        + ", ".join(f"{n}={v:.3f}" for n, v in weights.items()))
    say(f"submission: {path}")
    if solution_score is not None:
        say(f"score against the hidden solution {cfg.competition.solution}: "
            f"{meta['solution_score']['metric']} {solution_score:.4f}")
    return EnsembleResult(names, weights, cfg.ensemble.method, table, b_acc, b_ll, path, solution_score, meta)


# ----------------------------------------------------------------------------- up to date


def latest_matching_submission(cfg: Config, names: list[str]) -> EnsembleResult | None:
    """The newest submission made from the current prediction files of ``names`` and the current
    ensemble settings (the fingerprint in its ``.json``), as a result; None when there is none."""
    folder = paths.submissions_dir(cfg)
    if not folder.is_dir():
        return None
    fingerprint = inputs_fingerprint(cfg, names)
    for js in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            meta = read_json(js)
        except (OSError, ValueError):
            continue
        if meta.get("fingerprint") == fingerprint and js.with_suffix(".csv").is_file():
            return _result_from_meta(js.with_suffix(".csv"), meta, names)
    return None


def _result_from_meta(path: Path, meta: dict[str, Any], names: list[str]) -> EnsembleResult:
    cv, weights, folds = meta.get("cv", {}), meta.get("weights", {}), meta.get("folds", {})

    def num(v: Any) -> float:
        return float("nan") if v is None else float(v)

    rows = [{"experiment": n,
             "folds": len(folds.get(n, [])) if n != "blend" else len(next(iter(folds.values()), [])),
             **{k: num(cv.get(n, {}).get(k)) for k in ("acc", "logloss", "acc_tta", "logloss_tta")},
             "weight": num(weights.get(n)) if n != "blend" else 1.0} for n in [*names, "blend"]]
    blend_cv = cv.get("blend", {})
    acc = blend_cv.get("acc_tta") if blend_cv.get("acc_tta") is not None else blend_cv.get("acc")
    ll = blend_cv.get("logloss_tta") if blend_cv.get("logloss_tta") is not None else blend_cv.get("logloss")
    score = (meta.get("solution_score") or {}).get("value")
    return EnsembleResult(list(names), {k: float(v) for k, v in weights.items()}, meta.get("method", ""),
                          pd.DataFrame(rows), num(acc), num(ll), path, score, meta)


def ensure_submission(cfg: Config, members: Members, name: str | None = None,
                      quiet: bool = False) -> tuple[EnsembleResult, bool]:
    """The up-to-date submission for ``members``: the newest matching one, else a new blend.

    Returns:
        (result, made): ``made`` is False when an existing submission was up to date.
    """
    _check_names(cfg, members)
    found = latest_matching_submission(cfg, members.names)
    if found is not None:
        return found, False
    return run_ensemble(cfg, name=name, quiet=quiet, members=members), True


def main(argv: list[str] | None = None) -> EnsembleResult:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--experiments", nargs="+", metavar="NAME",
                        help="exactly these experiments (default: the current one plus ensemble.experiments, "
                             "else every complete one of the competition on the current folds.csv)")
    parser.add_argument("--method", choices=["optimize", "caruana", "hill_climb", "stack", "fixed", "mean"],
                        help="how to choose the weights (default: ensemble.method)")
    parser.add_argument("--name", help="submission file name prefix (default: ensemble.name, the experiment or 'blend')")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.method:
        cfg.ensemble.method = args.method
    return run_ensemble(cfg, args.experiments, args.name)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
