"""Second-round blending: merges other than the mean, hill climbing, and a stacked level-2 model.

- ``merge`` (``ensemble.merge``) is how members' probabilities are combined once weighted:
  ``mean`` (weighted softmax average), ``power`` (weighted mean of ``p ** ensemble.power``, rows
  renormalised: confident members count more) and ``rank`` (each class column ranked over the
  rows first, as for rank-based metrics such as AUC; the result is a score, not a calibrated
  probability).
- ``hill_climb_weights``: greedy hill climbing with replacement (the Kaggle-forum recipe): start
  from the best single member, then repeatedly mix in the member and step ``w`` that most lower
  the OOF log loss, ``blend <- (1 - w) * blend + w * member``, until no step helps. A member can
  be added again. Weights are non-negative unless ``allow_negative`` (negative weights overfit
  OOF, so they are only used when asked for).
- ``stack_predictions``: a level-2 logistic regression on the members' OOF logits (log
  probabilities). Its own OOF predictions come from an inner cross-validation over the
  competition's folds (a row is always predicted by a model that did not see it), so its CV score
  is as honest as the members'; the test predictions come from one fit on every OOF row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression

from pipeline.errors import PipelineError

EPS = 1e-15


# ----------------------------------------------------------------------------- merges


def transform(probs: np.ndarray, merge: str, power: float = 2.0) -> np.ndarray:
    """Each member's ``(M, N, C)`` probabilities in the space where ``merge`` averages them."""
    if merge == "mean":
        return probs
    if merge == "power":
        return probs ** power
    if merge == "rank":
        # Ranks within each (member, class) column over the rows, scaled into (0, 1].
        return rankdata(probs, axis=1) / probs.shape[1]
    raise PipelineError(f"ensemble.merge {merge!r} is not mean, power or rank")


def combine(transformed: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sum of transformed members, clipped at 0 and renormalised to rows summing to 1.

    For ``mean`` with non-negative weights summing to 1 this is exactly the weighted average.
    """
    mix = np.clip(np.tensordot(np.asarray(weights, np.float64), transformed, axes=1), 0.0, None)
    total = mix.sum(1, keepdims=True)
    n_classes = mix.shape[1]
    return np.where(total > 0, mix / np.where(total > 0, total, 1.0), 1.0 / n_classes)


def merged(probs: np.ndarray, weights: np.ndarray, merge: str = "mean", power: float = 2.0) -> np.ndarray:
    """The blend of ``(M, N, C)`` member probabilities under ``merge``."""
    return combine(transform(probs, merge, power), weights)


def _loss(blended: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(blended[np.arange(len(y)), y], EPS, 1.0)).mean())


def merged_log_loss(transformed: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    return _loss(combine(transformed, weights), y)


def optimize_merged_weights(transformed: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 minimising the log loss of a ``power``/``rank`` blend.

    The blend is not linear in the weights after renormalisation, so unlike the mean's SLSQP
    this uses numerical gradients; a handful of members keeps that cheap.
    """
    m = transformed.shape[0]
    start = np.full(m, 1.0 / m)
    if m == 1:
        return np.ones(1)
    res = minimize(lambda w: merged_log_loss(transformed, y, w), start, method="SLSQP",
                   bounds=[(0.0, 1.0)] * m, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                   options={"maxiter": 200, "ftol": 1e-10})
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else start
    candidates = [w, start] + [np.eye(m)[i] for i in range(m)]
    return min(candidates, key=lambda c: merged_log_loss(transformed, y, c))


def caruana_merged_weights(transformed: np.ndarray, y: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Caruana's forward selection with replacement for a ``power``/``rank`` blend (weights = counts)."""
    m = transformed.shape[0]
    counts = np.zeros(m)
    best, best_loss = np.eye(m)[0], np.inf
    for _ in range(max(1, iterations)):
        trials = [merged_log_loss(transformed, y, counts + np.eye(m)[j]) for j in range(m)]
        j = int(np.argmin(trials))
        counts[j] += 1
        if trials[j] < best_loss - 1e-12:
            best, best_loss = counts.copy(), trials[j]
    return best / best.sum()


# ----------------------------------------------------------------------------- hill climbing


def hill_climb_weights(transformed: np.ndarray, y: np.ndarray, *, step: float = 0.01, max_weight: float = 0.5,
                       iterations: int = 100, allow_negative: bool = False, tol: float = 1e-7) -> np.ndarray:
    """Greedy hill climbing with replacement on the OOF log loss.

    Args:
        transformed: ``(M, N, C)`` members in merge space (``transform``).
        step: spacing of the tried mixing weights ``w`` in ``step, 2 step, ..., max_weight``
            (and their negatives with ``allow_negative``).
        iterations: at most this many additions.
        tol: stop when the best addition lowers the log loss by less than this.

    Returns:
        One weight per member, summing to 1 (non-negative unless ``allow_negative``).
    """
    m = transformed.shape[0]
    singles = [merged_log_loss(transformed, y, np.eye(m)[j]) for j in range(m)]
    weights = np.eye(m)[int(np.argmin(singles))]
    current = min(singles)
    grid = np.arange(1, int(round(max_weight / step)) + 1) * step
    if allow_negative:
        grid = np.concatenate([grid, -grid])
    base = np.tensordot(weights, transformed, axes=1)
    for _ in range(max(0, iterations)):
        best = (current, None, None)
        for j in range(m):
            for w in grid:
                loss = _loss(_renormalised((1.0 - w) * base + w * transformed[j]), y)
                if loss < best[0] - tol:
                    best = (loss, j, w)
        if best[1] is None:
            break
        current, j, w = best
        weights = (1.0 - w) * weights
        weights[j] += w
        base = (1.0 - w) * base + w * transformed[j]
    return weights


def _renormalised(mix: np.ndarray) -> np.ndarray:
    mix = np.clip(mix, 0.0, None)
    total = mix.sum(1, keepdims=True)
    return np.where(total > 0, mix / np.where(total > 0, total, 1.0), 1.0 / mix.shape[1])


# ----------------------------------------------------------------------------- stacking


@dataclass
class StackResult:
    """A level-2 model's honest OOF predictions, its test predictions and what it learned."""

    oof: np.ndarray                       # (N, C) from the inner CV: each row by a model that never saw it
    test: np.ndarray                      # (T, C) from the fit on every OOF row
    member_share: np.ndarray              # (M,) share of the coefficients' absolute mass per member
    inner_folds: list[int]
    splits: list[dict[str, Any]] = field(default_factory=list)  # per inner fold: n_fit, n_predicted


def stack_features(probs: np.ndarray) -> np.ndarray:
    """``(M, N, C)`` probabilities -> ``(N, M * C)`` logits (log probabilities, clipped)."""
    logp = np.log(np.clip(probs, 1e-7, 1.0))
    return np.concatenate(list(logp), axis=1)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> LogisticRegression:
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    return model.fit(x, y)


def _predict(model: LogisticRegression, x: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(x), n_classes))
    # A class missing from the fit rows has no column in predict_proba: it gets probability 0.
    out[:, model.classes_] = model.predict_proba(x)
    return out


def stack_predictions(oof_probs: np.ndarray, test_probs: np.ndarray, y: np.ndarray, folds: np.ndarray,
                      c: float = 1.0, seed: int = 0, fit_rows: np.ndarray | None = None) -> StackResult:
    """Level-2 logistic regression on member logits with an inner CV over ``folds``.

    Args:
        oof_probs: ``(M, N, C)`` members' OOF probabilities.
        test_probs: ``(M, T, C)`` members' test probabilities.
        y: ``(N,)`` true classes.
        folds: ``(N,)`` the fold of each OOF row (the competition's folds, so duplicate groups
            stay together); rows of fold k are predicted by a model fit on the other folds.
        c: inverse regularisation strength of the logistic regression.
        fit_rows: ``(N,)`` mask of the rows whose labels the models may be fit on (default all); every
            row is still predicted.
    """
    n_classes = oof_probs.shape[2]
    use = np.ones(len(y), dtype=bool) if fit_rows is None else np.asarray(fit_rows, dtype=bool)
    x, x_test = stack_features(oof_probs), stack_features(test_probs)
    inner = sorted(int(k) for k in np.unique(folds))
    if len(inner) < 2:
        raise PipelineError("ensemble.method=stack needs OOF rows from at least two folds for its inner CV")
    oof = np.zeros((len(y), n_classes))
    splits = []
    for k in inner:
        held = folds == k
        model = _fit(x[~held & use], y[~held & use], c, seed)
        oof[held] = _predict(model, x[held], n_classes)
        splits.append({"fold": k, "n_fit": int((~held & use).sum()), "n_predicted": int(held.sum())})
    final = _fit(x[use], y[use], c, seed)
    test = _predict(final, x_test, n_classes)
    m = oof_probs.shape[0]
    mass = np.abs(final.coef_).reshape(final.coef_.shape[0], m, n_classes).sum(axis=(0, 2))
    share = mass / mass.sum() if mass.sum() > 0 else np.full(m, 1.0 / m)
    return StackResult(oof, test, share, inner, splits)
