"""Stage ``train``: one fold of a timm classifier, validated on that fold.

``python -m pipeline.train --fold K`` trains on every row of ``work/<comp>/folds.csv`` whose fold
is not K and validates on fold K (folds/dedup run first when missing). Under
``torchrun --nproc_per_node=N`` it runs DDP (NCCL on GPUs, gloo on the CPU); only rank 0 logs,
writes files and talks to W&B.

Outputs in ``runs/<experiment>/``: ``config.yaml``, ``classes.json`` and ``fold<K>/`` with
``best.pt``, ``last.pt``, ``history.csv``, ``oof.csv`` and ``metrics.json`` (README, "Files between stages").
``--resume`` continues from ``fold<K>/last.pt`` and ends where an uninterrupted run would.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from pipeline import paths
from pipeline.config import Config, add_config_args, config_from_args, save_config
from pipeline.config_keys import describe as describe_changes
from pipeline.config_keys import retrain_changes
from pipeline.data import ImageDataset, ImageReadError, load_competition
from pipeline.data.competition import save_classes
from pipeline.data.transforms import eval_transform, train_transform
from pipeline.engine.amp import resolve_amp, set_tf32
from pipeline.engine.budget import EpochBudget, fold_budget, parse_duration, retarget_scheduler
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.distributed import DistInfo, barrier, cleanup, init_distributed, resolve_device
from pipeline.engine.fit import FitSpec, FitState, Parts, Validation, fit, restore
from pipeline.engine.loop import (
    EvalResult,
    NonFiniteLossError,
    classification_loss,
    create_mixup,
    create_train_loss,
    train_one_epoch,
    validate,
)
from pipeline.engine.optim import create_optimizer, create_scheduler, updates_per_epoch
from pipeline.engine.sampling import SeededAugment, epoch_sampler, loader_workers, seed_epoch
from pipeline.engine.seed import cudnn_autotune, seed_everything, seed_worker
from pipeline.engine.swa import Swa, swa_start_epoch
from pipeline.engine.wandb_run import start_run
from pipeline.errors import PipelineError, cli_entry
from pipeline.finetune import load_start_weights, resolve_training_config
from pipeline.folds import training_fingerprint, training_rows, validation_rows
from pipeline.io import atomic_write_csv, atomic_write_json, read_json
from pipeline.metrics import accuracy, log_loss
from pipeline.models import create_classifier
from pipeline.progress import bar
from pipeline.provenance import data_fingerprint, provenance
from pipeline.soft_training import (
    PackedTargetDataset,
    SoftRows,
    soft_loss_and_mixup,
    soft_rows,
    soft_targets_on,
)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_acc", "ema_val_loss", "ema_val_acc", "lr",
                   "images_per_s", "epoch_time_s"]


# --------------------------------------------------------------------------- data
def _preload(dataset: ImageDataset, images: list[str], what: str, show: bool) -> None:
    dataset.cache = True
    for i in bar(range(len(dataset)), desc=f"caching {what} images", leave=False, enabled=show):
        try:
            dataset.load(i)
        except ImageReadError as exc:
            raise PipelineError(f"{exc} (folds.csv row image={images[i]!r}); replace the file or remove "
                                "the row from the competition's train table") from None


def build_loaders(cfg: Config, folds: pd.DataFrame, fold: int, root: Path, classes: list[str], info: DistInfo,
                  soft: SoftRows | None = None, reader=None):
    """Train loader (shuffled, sharded by ``DistributedSampler``) and this rank's validation shard.

    With ``soft`` (pseudo-labels, distillation) the train loader yields its rows and packed soft
    targets instead of the fold's rows and class indices. ``reader``: ``path -> RGB array`` (the
    resized-image cache's, :func:`pipeline.data.cache.image_reader`), default the original files.

    Returns:
        (train_loader, val_loader, train_rows, val_rows, val_shard) where ``val_shard`` holds the
        indices into ``val_rows`` that ``val_loader`` yields, in order.
    """
    t = cfg.train
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(folds["label"]) - set(index))
    if unknown:
        raise PipelineError(f"folds.csv has labels that are not classes of the competition: {unknown[:5]}; "
                            "delete work/<competition>/folds.csv so it is made again")
    train_rows, val_rows = training_rows(folds, fold), validation_rows(folds, fold)

    def dataset(rows: pd.DataFrame, transform) -> ImageDataset:
        return ImageDataset([root / p for p in rows["image"]], rows["label"].map(index).to_numpy(), transform,
                            reader=reader)

    if soft is not None:
        train_ds = PackedTargetDataset(soft.paths, soft.packed, train_transform(t.img_size, t.augment))
        if reader is not None:
            train_ds.reader = reader
        train_names = list(train_rows["image"]) + soft.paths[len(train_rows):]
    else:
        train_ds = dataset(train_rows, train_transform(t.img_size, t.augment))
        train_names = list(train_rows["image"])
    val_ds = dataset(val_rows, eval_transform(t.img_size, t.augment))
    # A memory-mapped cache is read without decoding and shared through the page cache: a RAM copy
    # would only double it.
    if t.cache_images and getattr(reader, "needs_preload", True):
        # Decoded once, before workers fork (they share the memory); PNGs are not re-read each epoch.
        _preload(train_ds, train_names, "train", info.is_main)
        _preload(val_ds, list(val_rows["image"]), "validation", info.is_main)

    sampler = epoch_sampler(train_ds, cfg.seed, info.rank, info.world_size)
    workers = loader_workers(t.num_workers, info.device)
    common = {"num_workers": workers, "pin_memory": info.device.type == "cuda",
              "worker_init_fn": seed_worker, "generator": torch.Generator().manual_seed(cfg.seed + info.rank),
              "persistent_workers": workers > 0}
    train_loader = DataLoader(SeededAugment(train_ds, cfg.seed), batch_size=t.batch_size, sampler=sampler,
                              drop_last=len(sampler) > t.batch_size, **common)
    # Validation is split without padding (DistributedSampler would repeat images to even out
    # the shards), so after gathering every OOF row appears exactly once.
    val_shard = np.arange(len(val_ds))[info.rank::info.world_size]
    val_loader = DataLoader(Subset(val_ds, val_shard.tolist()), batch_size=t.batch_size * 2, shuffle=False,
                            **common)
    return train_loader, val_loader, train_rows, val_rows, val_shard


# --------------------------------------------------------------------------- model
def build_model(cfg: Config, num_classes: int, info: DistInfo):
    """(bare model, train model (DDP/compiled), eval model, EMA or None).

    The bare model is created with the same seed on every rank; ``bare.state_dict()`` has no
    ``module.`` / ``_orig_mod.`` prefixes and is what checkpoints hold.
    """
    t = cfg.train
    seed_everything(cfg.seed)
    bare = create_classifier(cfg.model, num_classes)
    if t.sync_bn and info.enabled:
        if info.device.type == "cuda":
            bare = torch.nn.SyncBatchNorm.convert_sync_batchnorm(bare)
        elif info.is_main:
            print("train: train.sync_bn is for GPUs (PyTorch's SyncBatchNorm has no CPU version); "
                  "using per-process BatchNorm on the CPU")
    bare = bare.to(info.device)
    if t.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    # use_warmup ramps the decay up from 0, so the EMA is useful in short runs too.
    ema = ModelEmaV3(bare, decay=t.ema_decay, use_warmup=True) if t.ema else None
    model = bare
    if info.enabled:
        model = DistributedDataParallel(bare, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    eval_model = bare
    if t.compile:
        model = torch.compile(model)
        eval_model = torch.compile(bare)
    return bare, model, eval_model, ema


# --------------------------------------------------------------------------- checkpoints
def _score(result: EvalResult, metric: str) -> tuple[float, float]:
    """Larger is better; accuracy ties are broken by the lower loss."""
    if metric == "log_loss":
        return (-result.loss, 0.0)
    return (result.accuracy, -result.loss)


def _metric_value(result: EvalResult, metric: str) -> float:
    return result.loss if metric == "log_loss" else result.accuracy


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume when a RETRAIN key (``pipeline.config_keys``) differs from the checkpoint's."""
    changes = retrain_changes(saved, current)
    if changes:
        raise PipelineError(f"--resume: {path} was made with other settings ({describe_changes(changes)}); resume with "
                            "the same config, or start the fold again without --resume (or under another "
                            "experiment name)")


def fold_is_current(cfg: Config, fold: int, folds: pd.DataFrame) -> tuple[bool, str]:
    """Whether ``fold`` is trained, complete and made with the current settings and folds.

    The same split of config keys as :func:`check_resume_config` decides: only RETRAIN keys matter.
    The fold's own config (recorded in its metrics.json) is compared, else the experiment's.

    Returns:
        (current, reason): the reason says why a fold must be (re)trained.
    """
    run, d = paths.run_dir(cfg), paths.fold_dir(cfg, fold)
    for f in (d / paths.METRICS, d / paths.BEST, d / paths.OOF, run / paths.CONFIG):
        if not f.is_file():
            return False, f"no {f.name}"
    try:
        metrics = read_json(d / paths.METRICS)
        saved = metrics.get("config") or yaml.safe_load((run / paths.CONFIG).read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return False, f"unreadable {paths.METRICS} or {paths.CONFIG}"
    if not metrics.get("complete"):
        return False, "training did not finish"
    changes = retrain_changes(saved, cfg.to_dict())
    if changes:
        return False, f"config changed ({describe_changes(changes, limit=3)})"
    oof_images = set(pd.read_csv(d / paths.OOF, usecols=["image"], dtype=str, keep_default_na=False)["image"])
    if oof_images != set(folds.loc[folds["fold"] == fold, "image"]):
        return False, "folds.csv changed"
    trained_on = metrics.get("train_rows_sha256")
    if trained_on is None:  # trained before folds recorded label fixes: compare the fix files instead
        then = saved.get("competition") or {}
        if (then.get("relabel"), then.get("exclude")) != (cfg.competition.relabel, cfg.competition.exclude):
            return False, "competition.relabel / competition.exclude changed"
    elif trained_on != training_fingerprint(folds, fold):
        return False, "its training images or labels changed (competition.relabel / competition.exclude)"
    return True, "complete"


def sync_validation_labels(cfg: Config, fold: int, folds: pd.DataFrame) -> bool:
    """Give a current fold's oof.csv the validation labels of folds.csv; True when some changed.

    A relabel of one of the fold's own validation images changes nothing the fold trained on, so
    it is not retrained: the labels of oof.csv and the scores of metrics.json are rewritten, and
    its predict.json is removed so that predict makes oof_tta.csv again with the new labels.
    """
    d = paths.fold_dir(cfg, fold)
    oof = pd.read_csv(d / paths.OOF, dtype={"image": str, "label": str}, keep_default_na=False)
    wanted = oof["image"].map(validation_rows(folds, fold).set_index("image")["label"])
    if wanted.isna().any() or wanted.equals(oof["label"]):
        return False
    classes = [c for c in oof.columns if c not in ("image", "label")]
    oof["label"] = wanted
    atomic_write_csv(d / paths.OOF, oof)
    probs = oof[classes].to_numpy(np.float64)
    targets = wanted.map({c: i for i, c in enumerate(classes)}).to_numpy()
    metrics = read_json(d / paths.METRICS)
    metrics.update(val_acc=accuracy(probs, targets), val_loss=log_loss(probs, targets))
    atomic_write_json(d / paths.METRICS, metrics)
    (d / paths.PREDICT).unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------- the fold
def _fold_data(cfg: Config, fold: int, info: DistInfo):
    """folds.csv (made first by rank 0 when missing or stale), the competition's classes and root, and
    the image reader (the resized-image cache's when ``cache.size`` is set, made first by rank 0)."""
    from pipeline.data.cache import image_reader
    from pipeline.folds import ensure_folds  # the folds stage owns folds.csv

    if info.is_main:
        reader = image_reader(cfg, cfg.competition.root)
        folds = ensure_folds(cfg)
    barrier(info)
    if not info.is_main:
        reader = image_reader(cfg, cfg.competition.root, build=False)
        folds = ensure_folds(cfg)
    known = sorted(int(f) for f in folds["fold"].unique() if f >= 0)
    if fold not in known:
        raise PipelineError(f"--fold {fold}: {paths.folds_csv(cfg)} has folds {known}; choose one of them "
                            "(folds.k sets how many)")
    comp = load_competition(cfg.competition)
    return folds, list(comp.classes), comp.root, reader, len(comp.test)


def _fold_budget(cfg: Config, fold: int, n_val: int, n_test: int, verbose: bool) -> EpochBudget | None:
    """``train.time_budget`` for this fold (see ``engine/budget.py``); what follows its training is
    predicting its OOF and test images with every TTA view, estimated from a validation pass."""
    views = max(1, len(cfg.tta))

    def reserve(val_s: float) -> float:
        return val_s * (1 + n_test / max(1, n_val)) * views

    def done(k: int, since: float) -> bool:
        m = paths.fold_dir(cfg, k) / paths.METRICS
        return m.is_file() and m.stat().st_mtime >= since

    return fold_budget(parse_duration(cfg.train.time_budget), paths.run_dir(cfg), fold, done, cfg.train.epochs,
                       reserve, f"train: fold {fold}", verbose)


def _no_last_pt(cfg: Config, fold: int, option: str) -> PipelineError:
    last_path = paths.fold_dir(cfg, fold) / paths.LAST
    metrics = paths.fold_dir(cfg, fold) / paths.METRICS
    if metrics.is_file() and read_json(metrics).get("complete"):
        return PipelineError(f"{option}: fold {fold} is complete and its {last_path} was dropped (train.keep_last: "
                             "false); train it again with more epochs (--set train.epochs=N) instead")
    return PipelineError(f"{option}: {last_path} does not exist; train fold {fold} without {option} first")


def _resume_checkpoint(cfg: Config, fold: int, folds: pd.DataFrame) -> dict[str, Any]:
    """last.pt of the fold, loaded to the CPU, after checking it was made with the same RETRAIN keys
    and the same training rows (label fixes)."""
    last_path = paths.fold_dir(cfg, fold) / paths.LAST
    if not last_path.is_file():
        raise _no_last_pt(cfg, fold, "--resume")
    ckpt = load_checkpoint(last_path, map_location="cpu")
    check_resume_config(ckpt["config"], cfg.to_dict(), last_path)
    _check_training_rows(ckpt, folds, fold, last_path, "--resume")
    return ckpt


def _check_training_rows(ckpt: dict[str, Any], folds: pd.DataFrame, fold: int, last_path: Path, option: str) -> None:
    """Label fixes are not config keys a checkpoint can be compared on: its training rows are."""
    if ckpt.get("train_rows_sha256") not in (None, training_fingerprint(folds, fold)):
        raise PipelineError(f"{option}: {last_path} was trained on other images or labels (competition.relabel / "
                            f"competition.exclude changed since); train the fold again without {option}")


def _extend_checkpoint(cfg: Config, fold: int, extra: int, folds: pd.DataFrame) -> dict[str, Any]:
    """last.pt of a finished fold, ready to run ``extra`` more epochs: ``cfg.train.epochs`` becomes the
    new total, the schedule is made again for it (not restored), and early stopping starts afresh."""
    last_path = paths.fold_dir(cfg, fold) / paths.LAST
    if not last_path.is_file():
        raise _no_last_pt(cfg, fold, "--extend")
    ckpt = load_checkpoint(last_path, map_location="cpu")
    if not ckpt.get("finished"):
        raise PipelineError(f"--extend: fold {fold} did not finish ({last_path} is from epoch {int(ckpt['epoch']) + 1}); "
                            "continue it with --resume first")
    done = int(ckpt["epoch"]) + 1
    saved = copy.deepcopy(ckpt["config"])
    saved.setdefault("train", {})["epochs"] = done + extra
    cfg.train.epochs = done + extra
    check_resume_config(saved, cfg.to_dict(), last_path)
    _check_training_rows(ckpt, folds, fold, last_path, "--extend")
    return {**ckpt, "config": saved, "scheduler": None, "finished": False, "stop_reason": "", "bad_epochs": 0}


def set_aside_changed_experiment(cfg: Config) -> Path | None:
    """Move ``runs/<experiment>/`` aside (:func:`pipeline.experiments.set_aside`) when a fold of it is
    complete and its saved training settings (RETRAIN keys) differ from ``cfg``: a new model under an
    old name must not delete what was trained. Returns the new place, or None when nothing moved."""
    from pipeline.experiments import saved_config, set_aside

    saved = saved_config(cfg, cfg.experiment)
    changes = retrain_changes(saved, cfg.to_dict()) if saved else []
    run = paths.run_dir(cfg)
    complete = [d for d in run.glob("fold*") if (d / paths.METRICS).is_file()
                and read_json(d / paths.METRICS).get("complete")] if changes else []
    if not complete:
        return None
    return set_aside(cfg, f"{len(complete)} complete fold(s) made with other training settings: "
                          f"{describe_changes(changes, limit=3)}")


def _start_outputs(cfg: Config, fold: int, classes: list[str], fresh: bool, info: DistInfo) -> None:
    """Remove a fresh start's stale outputs (only now that every setting has proved usable) and
    write the experiment's config.yaml and classes.json."""
    if not info.is_main:
        return
    fold_dir, run_root = paths.fold_dir(cfg, fold), paths.run_dir(cfg)
    if fresh and any((fold_dir / name).exists() for name in paths.FOLD_OUTPUTS):
        print(f"train: starting fold {fold} again; removing the earlier outputs in {fold_dir} "
              "(use --resume to continue instead)")
        for name in paths.FOLD_OUTPUTS:
            (fold_dir / name).unlink(missing_ok=True)
    save_config(cfg, run_root / paths.CONFIG)
    save_classes(classes, run_root / paths.CLASSES)
    fold_dir.mkdir(parents=True, exist_ok=True)


def _evaluator(cfg: Config, eval_model, ema, val_loader, n_val: int, val_shard: np.ndarray, amp, info: DistInfo):
    """``evaluate(epoch)`` for the engine: the model and its EMA on the fold; with EMA on, the EMA
    is judged (as timm does) and its probabilities are what oof.csv will hold."""
    metric, t = cfg.competition.metric, cfg.train

    def evaluate(epoch: int) -> Validation:
        inputs = dict(channels_last=t.channels_last, mean=t.augment.mean, std=t.augment.std)
        res = validate(eval_model, val_loader, n_val, val_shard, info=info, amp=amp, **inputs)
        ema_res = None
        if ema is not None:
            ema_res = validate(ema.module, val_loader, n_val, val_shard, info=info, amp=amp, desc="valid ema",
                               **inputs)
        chosen = ema_res if ema_res is not None else res
        nan = float("nan")
        return Validation(
            score=_score(chosen, metric), metric=_metric_value(chosen, metric),
            row={"val_loss": res.loss, "val_acc": res.accuracy,
                 "ema_val_loss": ema_res.loss if ema_res is not None else nan,
                 "ema_val_acc": ema_res.accuracy if ema_res is not None else nan},
            keep={"best_probs": torch.from_numpy(np.asarray(chosen.probs, np.float32))})

    return evaluate


def _describe(fold: int, epochs: int):
    def describe(row: dict[str, float], improved: bool) -> str:
        ema = f" ema_val_acc {row['ema_val_acc']:.4f}" if not np.isnan(row["ema_val_acc"]) else ""
        return (f"fold {fold} epoch {int(row['epoch'])}/{epochs}: train_loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}{ema} lr {row['lr']:.2e} "
                f"{row['images_per_s']:.0f} img/s {row['epoch_time_s']:.1f}s{' *' if improved else ''}")

    return describe


def train_fold(cfg: Config, fold: int, resume: bool = False, force: bool = False, extend: int = 0) -> dict[str, Any]:
    """Train fold ``fold`` and write its outputs; returns the fold's metrics (metrics.json).

    A fresh start under the name of an experiment trained with other settings first moves that
    experiment to ``runs/<experiment>@<time>/`` (``force``: replace it instead). ``extend`` runs that
    many more epochs on a finished fold from its last.pt, with the schedule stretched to the new
    total (``cfg.train.epochs`` becomes that total).

    Steps: folds and classes; the checkpoint to resume (if any); model, loaders, optimizer,
    schedule, AMP scaler and loss; the engine's epoch loop (:func:`pipeline.engine.fit.fit`); then
    oof.csv and metrics.json from the best epoch.

    Raises:
        PipelineError: a user-fixable problem (no such fold, nothing to resume, NaN loss, ...).
    """
    info = init_distributed(cfg.device)
    cfg = resolve_training_config(cfg, quiet=not info.is_main)
    t = cfg.train
    folds, classes, root, reader, n_test = _fold_data(cfg, fold, info)
    if resume and extend:
        raise PipelineError("--resume and --extend do not go together: --resume finishes an interrupted fold, "
                            "--extend adds epochs to a finished one")
    ckpt = _extend_checkpoint(cfg, fold, extend, folds) if extend else _resume_checkpoint(cfg, fold, folds) if resume else None
    if ckpt is None and info.is_main and not force:
        set_aside_changed_experiment(cfg)
    if ckpt is not None and ckpt.get("finished"):
        if info.is_main:
            print(f"train: fold {fold} of {cfg.experiment} is already complete; writing its outputs again")
            return _finish_fold(cfg, fold, ckpt, folds, classes, swa=_final_swa(cfg, fold))
        return {}

    cudnn_autotune(info.device)
    set_tf32(info.device, t.tf32)
    amp = resolve_amp(t.amp, info.device)
    # The model first: a bad backbone name or weights file fails before minutes of image caching.
    bare, model, eval_model, ema = build_model(cfg, len(classes), info)
    if cfg.finetune.enabled and ckpt is None:
        loaded = load_start_weights(cfg, fold, bare, classes)
        if ema is not None:
            ema.module.load_state_dict(bare.state_dict())
        if info.is_main:
            print(f"train: fold {fold} continues from {loaded} at {t.img_size} px")
    soft = None
    if soft_targets_on(cfg):
        soft = soft_rows(cfg, fold, folds, training_rows(folds, fold), classes, root)
    train_loader, val_loader, train_rows, val_rows, val_shard = build_loaders(cfg, folds, fold, root, classes, info,
                                                                              soft, reader)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise PipelineError(f"fold {fold} has {len(train_rows)} training and {len(val_rows)} validation images; "
                            "use fewer folds (folds.k)")
    optimizer = create_optimizer(bare, t, cfg.model.head_lr_mult)
    scheduler = create_scheduler(optimizer, t, updates_per_epoch(len(train_loader), t.accum_steps))
    parts = Parts(model, bare, optimizer, scheduler, amp.grad_scaler(), ema)
    if soft is not None:
        criterion, mixup = soft_loss_and_mixup(cfg, len(classes))
    else:
        mixup = create_mixup(t, len(classes))
        criterion = create_train_loss(t, mixup)
    loss_fn = classification_loss(criterion, amp=amp, device=info.device, mixup=mixup, channels_last=t.channels_last,
                                  mean=t.augment.mean, std=t.augment.std)
    swa = _swa(cfg, fold, bare, optimizer, resumed=ckpt is not None)
    seed_everything(cfg.seed + info.rank)  # data order, Mixup and dropout differ between ranks
    state = restore(parts, ckpt, info) if ckpt is not None else FitState()
    if ckpt is not None and info.is_main and extend:
        print(f"train: --extend: fold {fold} of {cfg.experiment} continues from epoch {state.epoch} to {t.epochs} "
              f"from last.pt. The cosine schedule is stretched to {t.epochs} epochs from here on, so the learning "
              "rate rises again from where the finished run left it; a fresh run of "
              f"{t.epochs} epochs would have decayed slowly from the start and ends elsewhere.")
    elif ckpt is not None and info.is_main:
        print(f"train: resuming fold {fold} of {cfg.experiment} after epoch {state.epoch}")

    _start_outputs(cfg, fold, classes, fresh=ckpt is None, info=info)
    if soft is not None and info.is_main:
        atomic_write_json(paths.fold_dir(cfg, fold) / paths.SECOND_ROUND, soft.record)
    if info.is_main:
        print(f"train: fold {fold} of {cfg.experiment}: {cfg.model.backbone}, {len(train_rows)} train / "
              f"{len(val_rows)} validation images, {len(classes)} classes, {t.epochs} epochs on {info.device}"
              f"{f' x{info.world_size}' if info.enabled else ''} (amp {amp.name})")
    wandb_run = start_run(cfg.wandb, paths.run_dir(cfg), name=f"{cfg.experiment}-fold{fold}", group=cfg.experiment,
                          job_type="train", config={**cfg.to_dict(), "fold": fold}, enabled=info.is_main,
                          run_id=state.wandb_id)
    state.wandb_id = getattr(wandb_run, "id", None)

    def train_epoch(epoch: int, num_updates: int):
        seed_epoch(train_loader, epoch)
        if mixup is not None and t.mixup_off_epoch and epoch >= t.mixup_off_epoch:
            mixup.mixup_enabled = False  # still yields (smoothed) one-hot soft targets
        try:
            stats = train_one_epoch(model, train_loader, optimizer, loss_fn, epoch=epoch, info=info,
                                    scaler=parts.scaler, num_updates=num_updates,
                                    scheduler=None if swa is not None and swa.owns_schedule(epoch) else scheduler,
                                    accum_steps=t.accum_steps, clip_grad=t.clip_grad, ema=ema,
                                    desc=f"fold {fold} epoch {epoch + 1}/{t.epochs}")
        except ImageReadError as exc:
            raise PipelineError(f"{str(exc).splitlines()[0]}; replace the file or remove its row") from None
        if swa is not None and swa.end_epoch(bare, epoch) and info.is_main:
            swa.save(paths.fold_dir(cfg, fold) / paths.SWA)  # before last.pt: a resume never adds an epoch twice
        return stats

    n_updates = updates_per_epoch(len(train_loader), t.accum_steps)
    spec = FitSpec(epochs=t.epochs, out_dir=paths.fold_dir(cfg, fold),
                   meta={"config": cfg.to_dict(), "classes": classes, "metric": cfg.competition.metric,
                         "train_rows_sha256": training_fingerprint(folds, fold)},
                   history_columns=HISTORY_COLUMNS, patience=t.early_stopping_patience, name=f"train: fold {fold}",
                   budget=_fold_budget(cfg, fold, len(val_rows), n_test, info.is_main),
                   on_plan=lambda n: retarget_scheduler(scheduler, n, n_updates))
    ok = False
    try:
        fit(parts, state, spec, info, train_epoch=train_epoch,
            evaluate=_evaluator(cfg, eval_model, ema, val_loader, len(val_rows), val_shard, amp, info),
            wandb_run=wandb_run, describe=_describe(fold, t.epochs))
        barrier(info)
        final_swa = None
        if swa is not None:
            final_swa = _finish_swa(cfg, fold, swa, train_loader, val_loader, len(val_rows), val_shard, amp, info,
                                    classes)
        metrics: dict[str, Any] = {}
        if info.is_main:
            metrics = _finish_fold(cfg, fold, load_checkpoint(spec.out_dir / paths.LAST), folds, classes,
                                   n_train=len(train_rows), swa=final_swa)
            wandb_run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})
            if not t.keep_last:
                (spec.out_dir / paths.LAST).unlink(missing_ok=True)
                print(f"train: dropped {spec.out_dir / paths.LAST} (train.keep_last: false); best.pt stays")
            if extend:
                print(f"train: fold {fold} now has {t.epochs} epochs; set train.epochs: {t.epochs} in the config "
                      "(and extend the other folds the same way) so that pipeline.run counts them as current")
        ok = True
        return metrics
    except NonFiniteLossError as exc:
        kept = "" if (spec.out_dir / paths.LAST).is_file() else " (no epoch had completed, so there is no last.pt)"
        raise PipelineError(f"fold {fold}: {exc}{kept}") from None
    finally:
        wandb_run.finish(exit_code=0 if ok else 1)


def _swa(cfg: Config, fold: int, bare: torch.nn.Module, optimizer, resumed: bool) -> Swa | None:
    """The fold's weight average (``train.swa``), continued from its swa.pt on ``--resume``."""
    s = cfg.train.swa
    start = swa_start_epoch(s if s.enabled else None, cfg.train.epochs)
    if start is None:
        return None
    swa = Swa(bare, start, optimizer, lr=s.lr, anneal_epochs=s.anneal_epochs)
    path = paths.fold_dir(cfg, fold) / paths.SWA
    if resumed and path.is_file():
        swa.load(path)
    return swa


def _finish_swa(cfg: Config, fold: int, swa: Swa, train_loader, val_loader, n_val: int, val_shard: np.ndarray,
                amp, info: DistInfo, classes: list[str]) -> dict[str, Any]:
    """BatchNorm statistics for the averaged weights, their validation, and the fold's best.pt made of them."""
    seed_epoch(train_loader, cfg.train.epochs)  # a fixed pass over the training data, as in any epoch
    inputs = dict(channels_last=cfg.train.channels_last, mean=cfg.train.augment.mean, std=cfg.train.augment.std)
    swa.update_bn(train_loader, info.device, **inputs)
    res = validate(swa.module, val_loader, n_val, val_shard, info=info, amp=amp, desc="valid swa", **inputs)
    final = {"val_acc": res.accuracy, "val_loss": res.loss, "epochs": [e + 1 for e in swa.epochs],
             "probs": torch.from_numpy(np.asarray(res.probs, np.float32))}
    if info.is_main:
        fold_dir = paths.fold_dir(cfg, fold)
        swa.save(fold_dir / paths.SWA, final=final)
        # The averaged weights are the fold's model: predict, finetune and packages read best.pt.
        from pipeline.engine.checkpoint import save_checkpoint

        save_checkpoint(fold_dir / paths.BEST, {"model": swa.state_dict()["model"], "ema": None, "used_ema": False,
                                                "used_swa": True, "config": cfg.to_dict(), "classes": classes,
                                                "metric": cfg.competition.metric, "epoch": cfg.train.epochs - 1,
                                                "best_metric": res.loss if cfg.competition.metric == "log_loss"
                                                else res.accuracy})
        print(f"train: fold {fold} SWA over epochs {final['epochs'][0]}-{final['epochs'][-1]}: val_acc "
              f"{res.accuracy:.4f}, val_loss {res.loss:.4f} (BatchNorm statistics recomputed)")
    return final


def _final_swa(cfg: Config, fold: int) -> dict[str, Any] | None:
    path = paths.fold_dir(cfg, fold) / paths.SWA
    if not cfg.train.swa.enabled or not path.is_file():
        return None
    return load_checkpoint(path).get("final")


def _finish_fold(cfg: Config, fold: int, ckpt: dict[str, Any], folds: pd.DataFrame, classes: list[str],
                 n_train: int | None = None, swa: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write oof.csv (the best epoch's validation probabilities, or the SWA model's) and metrics.json."""
    fold_dir = paths.fold_dir(cfg, fold)
    val_rows = validation_rows(folds, fold)
    probs = ckpt["best_keep"]["best_probs"].numpy()
    best_epoch_probs = probs
    if swa is not None:
        probs = swa["probs"].numpy()
    if len(probs) != len(val_rows):
        raise PipelineError(f"{fold_dir / 'last.pt'} holds {len(probs)} validation rows but folds.csv has "
                            f"{len(val_rows)} in fold {fold}; folds.csv changed since, train the fold again")
    oof = pd.concat([val_rows[["image", "label"]], pd.DataFrame(probs, columns=classes)], axis=1)
    atomic_write_csv(fold_dir / paths.OOF, oof)
    history = pd.DataFrame(ckpt["history"], columns=HISTORY_COLUMNS)
    used_ema = bool(ckpt["used_ema"]) and swa is None
    index = {c: i for i, c in enumerate(classes)}
    targets = val_rows["label"].map(index).to_numpy()
    metrics = {
        "experiment": cfg.experiment, "fold": fold, "backbone": cfg.model.backbone, "img_size": cfg.train.img_size,
        "epochs_run": len(history), "best_epoch": int(ckpt["best_epoch"]) + 1,  # counted from 1, as history.csv
        "val_acc": accuracy(probs, targets),
        "val_loss": log_loss(probs, targets),
        "used_ema": used_ema,
        "n_train": int(n_train if n_train is not None else len(training_rows(folds, fold))),
        # What the fold trained on (labels included): run retrains only folds whose training rows a
        # label fix changed; a fix of a validation label alone only rewrites the labels of oof.csv.
        "train_rows_sha256": training_fingerprint(folds, fold),
        "n_val": len(val_rows),
        "train_time_s": float(history["epoch_time_s"].sum()),
        "images_per_s": float(history["images_per_s"].mean()),
        "complete": True,
        "config": ckpt["config"],  # what fold_is_current compares (config.yaml is the experiment's latest)
        "provenance": provenance(device=resolve_device(cfg.device), data=data_fingerprint(cfg),
                                 world_size=int(ckpt.get("world_size", 1))),
    }
    if swa is not None:
        # The same run's best epoch (its EMA weights when train.ema is on) beside the SWA model.
        p_best = np.clip(best_epoch_probs[np.arange(len(targets)), targets], 1e-15, 1.0)
        metrics.update({"used_swa": True, "swa_epochs": list(swa["epochs"]), "swa_val_acc": metrics["val_acc"],
                        "best_epoch_val_acc": float((best_epoch_probs.argmax(1) == targets).mean()),
                        "best_epoch_val_loss": float(-np.log(p_best).mean()),
                        "best_epoch_used_ema": bool(ckpt["used_ema"])})
    atomic_write_json(fold_dir / paths.METRICS, metrics)
    which = " (SWA weights)" if swa is not None else " (EMA weights)" if used_ema else ""
    print(f"train: fold {fold} done: best epoch {metrics['best_epoch']}, val_acc {metrics['val_acc']:.4f}, "
          f"val_loss {metrics['val_loss']:.4f}{which}; outputs in {fold_dir}")
    return metrics


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train one fold: every other fold of folds.csv trains, fold K validates. "
                    "For N GPUs: torchrun --nproc_per_node=N -m pipeline.train --fold K",
    )
    parser.add_argument("--fold", type=int, default=0, help="the fold to validate on (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from runs/<experiment>/fold<K>/last.pt")
    parser.add_argument("--extend", type=int, default=0, metavar="EPOCHS",
                        help="run EPOCHS more epochs on a finished fold from its last.pt, the schedule stretched to "
                             "the new total (not the same as a fresh run of that many epochs)")
    parser.add_argument("--force", action="store_true",
                        help="replace an experiment of this name trained with other settings (default: it is kept "
                             "as runs/<experiment>@<time>/)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.extend < 0:
        parser.error("--extend takes a positive number of epochs")
    cfg = config_from_args(args)
    from pipeline.locks import FoldLock

    # One lock per fold, held by rank 0 for all ranks: another process on this fold is waited for.
    lock = FoldLock(cfg, args.fold) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    try:
        with lock:
            return train_fold(cfg, args.fold, resume=args.resume, force=args.force, extend=args.extend)
    finally:
        cleanup(DistInfo(world_size=int(os.environ.get("WORLD_SIZE", "1"))))


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
