"""Numbers of an error analysis: per-class scores, the confusion matrix and its order, calibration."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def per_class(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Support, precision, recall, F1 (scikit-learn) and confidences per class, worst F1 first.

    ``mean_confidence`` is the mean top probability of the images predicted as the class (compare it
    with precision: higher means over-confident); ``mean_p_given`` the mean probability the model
    gives the class on the images labelled with it.
    """
    c = len(classes)
    pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=np.arange(c), zero_division=0)
    top = probs.max(1)
    conf = np.array([top[pred == k].mean() if (pred == k).any() else np.nan for k in range(c)])
    p_given = np.array([probs[labels == k, k].mean() if (labels == k).any() else np.nan for k in range(c)])
    table = pd.DataFrame({"class": classes, "support": support, "precision": precision, "recall": recall,
                          "f1": f1, "predicted": np.bincount(pred, minlength=c), "mean_confidence": conf,
                          "mean_p_given": p_given})
    return table.sort_values(["f1", "support"], ascending=[True, False], kind="stable", ignore_index=True)


def confusion(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts: rows are given labels, columns predicted classes."""
    return confusion_matrix(labels, probs.argmax(1), labels=np.arange(n_classes))


def confused_pairs(cm: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Every (given, predicted) pair with at least one error, most errors first.

    ``share`` is the fraction of the given class predicted as the other; ``mean_prob`` the mean
    probability the model puts on the other class over the given class's images (it ranks pairs
    even where errors are few).
    """
    rows = []
    support = cm.sum(1)
    for i, j in zip(*np.nonzero(cm - np.diag(np.diag(cm)))):
        rows.append({"given": classes[i], "predicted": classes[j], "count": int(cm[i, j]),
                     "share": cm[i, j] / max(support[i], 1), "mean_prob": float(probs[labels == i, j].mean())})
    table = pd.DataFrame(rows, columns=["given", "predicted", "count", "share", "mean_prob"])
    return table.sort_values(["count", "mean_prob"], ascending=False, kind="stable", ignore_index=True)


def confusion_order(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> np.ndarray:
    """A class order that puts classes the model confuses next to each other.

    Hierarchical clustering (average linkage, optimal leaf order) of the classes on a distance
    made from the mean probability the model gives each other class; probabilities rank pairs
    even where a fold set makes no hard error.
    """
    if n_classes < 3:
        return np.arange(n_classes)
    mass = np.zeros((n_classes, n_classes))
    np.add.at(mass, labels, probs)
    mass /= np.maximum(np.bincount(labels, minlength=n_classes), 1)[:, None]
    sim = (mass + mass.T) / 2
    np.fill_diagonal(sim, 0.0)
    dist = 1.0 - sim / max(sim.max(), 1e-12)
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average", optimal_ordering=True))


def calibration_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> pd.DataFrame:
    """Top-label reliability table: per equal-width confidence bin, count, mean confidence, accuracy."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = which == b
        rows.append({"low": edges[b], "high": edges[b + 1], "count": int(m.sum()),
                     "confidence": float(conf[m].mean()) if m.any() else np.nan,
                     "accuracy": float(correct[m].mean()) if m.any() else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    bins = calibration_bins(labels, probs, n_bins)
    used = bins[bins["count"] > 0]
    return float((used["count"] * (used["confidence"] - used["accuracy"]).abs()).sum() / max(len(labels), 1))
