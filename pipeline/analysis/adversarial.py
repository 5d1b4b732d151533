"""Adversarial validation: can a classifier tell train images from test images by the model's features?

An AUC near 0.5 means test looks like train to the model, so CV is a fair guess of the test score;
well above 0.5 means a shift (other camera, season, site) that CV does not see.

The features are the trained model's pooled features (the layer before the head). A fold's model
trained on most train images and may remember them, which alone would tell them from test; so each
fold's model only embeds the images it never trained on: its validation fold and the test set. A
logistic regression is cross-validated on them per fold (scikit-learn), giving each train image an
out-of-fold probability of being a test image and each fold an AUC.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.progress import bar


@dataclass
class AdversarialResult:
    auc: float                      # mean over folds
    fold_auc: dict[int, float]
    scores: pd.DataFrame            # train images: image, fold, test_likeness, most test-like first
    n_test: int


def _features(model: torch.nn.Module, image_paths: list[str], transform, device: torch.device, amp: str,
              batch_size: int, to_input) -> np.ndarray:
    from pipeline.data import ImageDataset
    from pipeline.engine.amp import resolve_amp

    loader = torch.utils.data.DataLoader(ImageDataset(image_paths, transform=transform), batch_size=batch_size,
                                         shuffle=False, pin_memory=device.type == "cuda")
    autocast = resolve_amp(amp, device).autocast
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            with autocast():
                f = model.forward_head(model.forward_features(to_input(x)), pre_logits=True)
            out.append(f.float().flatten(1))
    return torch.cat(out).cpu().numpy()


def _cv_scores(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_splits = int(min(5, np.bincount(y).min()))
    if n_splits < 2:
        raise PipelineError("adversarial validation needs at least two train and two test images")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    return cross_val_predict(clf, x, y, cv=cv, method="predict_proba")[:, 1]


def adversarial_validation(cfg: Config, oof_images: list[str], oof_folds: np.ndarray,
                           progress: bool = True) -> AdversarialResult:
    """Per fold: the fold model's features of its validation images and of the test images."""
    from sklearn.metrics import roc_auc_score

    from pipeline.data import load_competition
    from pipeline.data.device_input import DeviceInput
    from pipeline.data.transforms import eval_transform
    from pipeline.engine.distributed import resolve_device
    from pipeline.predict import load_fold_model

    comp = load_competition(cfg.competition)
    if len(comp.test) < 2:
        raise PipelineError("adversarial validation needs test images; the competition has fewer than two")
    device = resolve_device(cfg.device)
    test_paths = [str(comp.root / p) for p in comp.test["image"]]
    images = np.asarray(oof_images)
    ks = sorted(int(k) for k in np.unique(oof_folds) if k >= 0
                and (paths.fold_dir(cfg, int(k)) / paths.BEST).is_file())
    if not ks:
        raise PipelineError(f"no fold of {cfg.experiment!r} has best.pt; adversarial validation needs the trained "
                            "models (train first, or run with --no-adversarial)")
    fold_auc, parts = {}, []
    for k in bar(ks, enabled=progress, desc="adversarial validation", leave=False):
        model, train_cfg, _, _ = load_fold_model(cfg, k, device)
        transform = eval_transform(train_cfg.train.img_size, train_cfg.train.augment)
        val = images[oof_folds == k]
        run = dict(transform=transform, device=device, amp=train_cfg.train.amp, batch_size=cfg.predict.batch_size,
                   to_input=DeviceInput.for_training(train_cfg.train, device))
        x = np.concatenate([_features(model, [str(comp.root / p) for p in val], **run),
                            _features(model, test_paths, **run)])
        y = np.r_[np.zeros(len(val), int), np.ones(len(test_paths), int)]
        s = _cv_scores(x, y, cfg.seed + k)
        fold_auc[k] = float(roc_auc_score(y, s))
        parts.append(pd.DataFrame({"image": val, "fold": k, "test_likeness": s[:len(val)]}))
    scores = pd.concat(parts, ignore_index=True).sort_values("test_likeness", ascending=False, ignore_index=True)
    return AdversarialResult(float(np.mean(list(fold_auc.values()))), fold_auc, scores, len(test_paths))
