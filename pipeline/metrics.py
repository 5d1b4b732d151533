"""Scores on probability arrays, shared by training, prediction, ensembling and analysis.

One definition of each metric, so a fold's ``metrics.json``, ``predict.json`` and an ensemble's
CV table can never disagree on what "log loss" means.
"""
from __future__ import annotations

import numpy as np


def log_loss(probs: np.ndarray, targets: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped to [eps, 1])."""
    p = np.clip(probs[np.arange(len(targets)), targets], eps, 1.0)
    return float(-np.log(p).mean())


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Share of rows whose most probable class is the target."""
    return float((probs.argmax(1) == targets).mean())
