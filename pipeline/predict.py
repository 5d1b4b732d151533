"""Stage ``predict``: test-time-augmented predictions of a trained fold, for its OOF and test images.

``python -m pipeline.predict --fold K`` (or ``--all-folds``; no argument means every fold) loads
``runs/<experiment>/fold<K>/best.pt`` (its EMA weights where training chose them) and writes:

- ``test.csv``: image + one probability column per class (order of ``classes.json``), after TTA;
- ``oof_tta.csv``: the fold's validation images in the form of ``oof.csv``, after TTA, so the gain
  of TTA is measured on the fold;
- ``predict.json``: the views, the merge, OOF accuracy / log loss without and with TTA, per view.

TTA views come from the ``tta`` config list (see :mod:`pipeline.tta`); ``predict.tta_flips``
switches mirrored and rotated views off (``auto``: off when training used no flips, as for digits).
A fold whose outputs were made from the same checkpoint and settings is skipped unless ``--force``.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from pipeline import paths
from pipeline.config import Config, ConfigError, add_config_args, build_config, config_from_args
from pipeline.engine.amp import set_tf32
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.distributed import resolve_device
from pipeline.engine.sampling import loader_workers
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json, read_json
from pipeline.metrics import accuracy, log_loss
from pipeline.provenance import data_fingerprint, provenance
from pipeline.tta import build_views, flips_allowed, merge_log_probs, predict_views

PREDICT_VERSION = 1


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _digest(values: list[str]) -> str:
    return hashlib.sha256("\x1f".join(values).encode()).hexdigest()[:16]


def _training_config(ckpt: dict[str, Any], cfg: Config, where: Path) -> Config:
    """The resolved config the fold was trained with (model, image size, normalization)."""
    data = ckpt.get("config")
    if not isinstance(data, dict):
        return cfg
    try:
        return build_config(data, source=f"{where} (config saved in the checkpoint)")
    except ConfigError:
        # A checkpoint from an older schema: only the model and train sections matter here.
        merged = cfg.to_dict()
        merged["model"], merged["train"] = data.get("model", merged["model"]), data.get("train", merged["train"])
        return build_config(merged, source=str(where))


def _settings(cfg: Config, train_cfg: Config, best: Path, test_images: list[str]) -> dict[str, Any]:
    """What the outputs depend on; recorded in predict.json and compared to skip up-to-date folds."""
    aug = train_cfg.train.augment
    return {
        "version": PREDICT_VERSION,
        "tta": list(cfg.tta),
        "merge": cfg.predict.tta_merge,
        "flips": flips_allowed(cfg.predict.tta_flips, aug.hflip, aug.vflip),
        "crop_scale": cfg.predict.crop_scale,
        "use_ema": cfg.predict.use_ema,
        "checkpoint": _stamp(best),
        "test_images": _digest(test_images),
    }


def prediction_is_current(cfg: Config, fold: int) -> bool:
    """Whether fold ``fold`` of ``cfg.experiment`` has TTA outputs made from its checkpoint with these settings."""
    d = paths.fold_dir(cfg, fold)
    files = [d / f for f in (paths.PREDICT, paths.TEST, paths.OOF_TTA, paths.BEST)]
    if not all(f.is_file() for f in files):
        return False
    try:
        recorded = read_json(d / paths.PREDICT).get("settings", {})
        ckpt_cfg = yaml.safe_load((paths.run_dir(cfg) / paths.CONFIG).read_text())
        train_cfg = build_config(ckpt_cfg) if isinstance(ckpt_cfg, dict) else cfg
    except (OSError, ValueError, ConfigError, yaml.YAMLError):
        return False
    from pipeline.data import load_competition

    test_images = load_competition(cfg.competition).test["image"].tolist()
    return recorded == _settings(cfg, train_cfg, d / paths.BEST, test_images)


def _loader(image_paths: list[str], transform, cfg: Config, device: torch.device,
            reader=None) -> torch.utils.data.DataLoader:
    from pipeline.data import ImageDataset

    ds = ImageDataset(image_paths, transform=transform, reader=reader)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.predict.batch_size, shuffle=False,
                                       num_workers=loader_workers(cfg.train.num_workers, device),
                                       pin_memory=device.type == "cuda",
                                       persistent_workers=False)


def _prob_frame(images: list[str], probs: np.ndarray, classes: list[str], labels: list[str] | None = None):
    df = pd.DataFrame(probs, columns=classes)
    if labels is not None:
        df.insert(0, "label", labels)
    df.insert(0, "image", images)
    return df


def load_fold_model(cfg: Config, fold: int, device: torch.device) -> tuple[torch.nn.Module, Config, list[str], str]:
    """The fold's best model on ``device`` in eval mode, its training config, classes and which weights."""
    from pipeline.models import load_classifier

    d = paths.fold_dir(cfg, fold)
    best = d / paths.BEST
    if not best.is_file():
        raise PipelineError(f"{best} does not exist; train the fold first: python -m pipeline.train --fold {fold}"
                            f" --set experiment={cfg.experiment}")
    ckpt = load_checkpoint(best)
    for key in ("model", "classes"):
        if key not in ckpt:
            raise PipelineError(f"{best} has no {key!r} entry; it was not written by pipeline.train: retrain the fold")
    train_cfg = _training_config(ckpt, cfg, best)
    classes = list(ckpt["classes"])
    metrics = read_json(d / paths.METRICS) if (d / paths.METRICS).is_file() else {}
    # EMA weights only when training judged them better (metrics.used_ema), so OOF and TTA OOF match.
    use_ema = cfg.predict.use_ema and ckpt.get("ema") is not None and bool(metrics.get("used_ema", True))
    if not cfg.predict.use_ema and ckpt.get("weights") == "ema":
        print(f"predict: {best} holds only the EMA weights that training validated (best.pt is weights only); "
              "predict.use_ema: false has no other weights to use there")
    state = ckpt["ema"] if use_ema else ckpt["model"]
    model = load_classifier(train_cfg.model, len(classes), state, str(best))
    model.to(device).eval()
    if train_cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    set_tf32(device, train_cfg.train.tf32)
    return model, train_cfg, classes, "ema" if use_ema else "model"


def model_views(model: torch.nn.Module, tta: list[str], flips: bool, crop_scale: float):
    """The TTA views of ``tta`` for ``model`` (``scale_`` views act as ``zoom_`` on fixed-size models)."""
    fixed = bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False))
    return build_views(tta, flips=flips, crop_scale=crop_scale, fixed_size=fixed)


def predict_fold(cfg: Config, fold: int, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Write test.csv, oof_tta.csv and predict.json for one fold; returns the predict.json content."""
    from pipeline.data import load_competition
    from pipeline.data.cache import image_reader
    from pipeline.data.transforms import eval_transform

    d = paths.fold_dir(cfg, fold)
    if not force and prediction_is_current(cfg, fold):
        info = read_json(d / paths.PREDICT)
        if not quiet:
            print(f"predict fold{fold}: up to date ({d / paths.TEST}); --force to redo")
        return info
    oof_path = d / paths.OOF
    if not oof_path.is_file():
        raise PipelineError(f"{oof_path} does not exist; the fold's training did not finish: "
                            f"python -m pipeline.train --fold {fold} --set experiment={cfg.experiment}")
    device = resolve_device(cfg.device)
    model, train_cfg, classes, weights = load_fold_model(cfg, fold, device)
    comp = load_competition(cfg.competition)
    aug = train_cfg.train.augment
    flips = flips_allowed(cfg.predict.tta_flips, aug.hflip, aug.vflip)
    views, dropped = model_views(model, cfg.tta, flips, cfg.predict.crop_scale)
    if dropped and not quiet:
        print(f"predict: flips off (training used none; set predict.tta_flips=true to keep them): "
              f"dropped {', '.join(dropped)}")

    oof = pd.read_csv(oof_path, dtype={"image": str, "label": str}, keep_default_na=False)
    missing_cols = [c for c in ["image", "label"] + classes if c not in oof.columns]
    if missing_cols:
        raise PipelineError(f"{oof_path} lacks columns {missing_cols[:5]}; retrain the fold")
    transform = eval_transform(train_cfg.train.img_size, aug)
    # The images as training saw them: the resized-image cache of the checkpoint's settings, if any.
    reader = image_reader(cfg, comp.root, cache=train_cfg.cache, train=train_cfg.train)
    run = dict(device=device, amp=train_cfg.train.amp, channels_last=train_cfg.train.channels_last, mean=aug.mean,
               std=aug.std, progress=not quiet)
    oof_paths = [str(comp.root / p) for p in oof["image"]]
    logp_oof = predict_views(model, _loader(oof_paths, transform, cfg, device, reader), views,
                             desc=f"fold{fold} oof", **run)
    logp_test = predict_views(model, _loader(comp.test["path"].tolist(), transform, cfg, device, reader), views,
                              desc=f"fold{fold} test", **run)

    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(oof["label"]) - set(index))
    if unknown:
        raise PipelineError(f"{oof_path}: labels {unknown[:5]} are not in the checkpoint's classes; retrain the fold")
    y = oof["label"].map(index).to_numpy()
    p_plain = oof[classes].to_numpy(np.float64)
    p_tta = merge_log_probs(logp_oof, cfg.predict.tta_merge).double().numpy()
    p_test = merge_log_probs(logp_test, cfg.predict.tta_merge).double().numpy()
    per_view = {v.name: accuracy(logp_oof[i].double().exp().numpy(), y) for i, v in enumerate(views)}

    atomic_write_csv(d / paths.OOF_TTA, _prob_frame(oof["image"].tolist(), p_tta, classes, oof["label"].tolist()))
    atomic_write_csv(d / paths.TEST, _prob_frame(comp.test["image"].tolist(), p_test, classes))
    info = {
        "tta": [v.name for v in views],
        "merge": cfg.predict.tta_merge,
        "oof_acc": accuracy(p_plain, y),
        "oof_logloss": log_loss(p_plain, y),
        "oof_acc_tta": accuracy(p_tta, y),
        "oof_logloss_tta": log_loss(p_tta, y),
        "n_test": len(comp.test),
        "n_oof": len(oof),
        "weights": weights,
        "dropped_views": dropped,
        "oof_acc_per_view": per_view,
        "settings": _settings(cfg, train_cfg, d / paths.BEST, comp.test["image"].tolist()),
        "provenance": provenance(device=device, data=data_fingerprint(cfg)),
    }
    atomic_write_json(d / paths.PREDICT, info)
    if not quiet:
        print(f"predict fold{fold}: {len(views)} view(s) [{', '.join(info['tta'])}], {cfg.predict.tta_merge} merge; "
              f"OOF acc {info['oof_acc']:.4f} -> {info['oof_acc_tta']:.4f}, log loss {info['oof_logloss']:.4f} -> "
              f"{info['oof_logloss_tta']:.4f} with TTA; {len(comp.test)} test images -> {d / 'test.csv'}")
    return info


def run_folds(cfg: Config) -> list[int]:
    """The folds of ``cfg.experiment``: ``folds.k`` of its saved config (else of ``cfg``)."""
    saved = paths.run_dir(cfg) / paths.CONFIG
    k = cfg.folds.k
    if saved.is_file():
        data = yaml.safe_load(saved.read_text()) or {}
        k = int((data.get("folds") or {}).get("k", k))
    return list(range(k))


def predict_folds(cfg: Config, folds: list[int] | None = None, force: bool = False,
                  quiet: bool = False) -> dict[int, dict[str, Any]]:
    """Predict each of ``folds`` (default: all folds of the experiment), each while holding its lock."""
    from pipeline.locks import FoldLock

    out = {}
    for k in folds if folds is not None else run_folds(cfg):
        with FoldLock(cfg, k):  # never beside a process that trains or predicts this fold
            out[k] = predict_fold(cfg, k, force=force, quiet=quiet)
    return out


def main(argv: list[str] | None = None) -> dict[int, dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, action="append", metavar="K", help="fold to predict (repeatable)")
    which.add_argument("--all-folds", action="store_true", help="every fold of the experiment (the default)")
    parser.add_argument("--force", action="store_true", help="predict again even if the outputs are up to date")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    folds = None if args.all_folds or not args.fold else args.fold
    if folds is not None:
        known = run_folds(cfg)
        bad = [k for k in folds if k not in known]
        if bad:
            raise PipelineError(f"--fold {bad[0]}: experiment {cfg.experiment!r} has folds {known[0]}..{known[-1]}")
    return predict_folds(cfg, folds, force=args.force)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
