"""Stage ``train``: one fold of a timm classifier, validated on that fold.

``python -m pipeline.train --fold K`` trains on every row of ``work/<comp>/folds.csv`` whose fold
is not K and validates on fold K (folds/dedup run first when missing). Under
``torchrun --nproc_per_node=N`` it runs DDP (NCCL on GPUs, gloo on the CPU); only rank 0 logs,
writes files and talks to W&B.

Outputs in ``runs/<experiment>/``: ``config.yaml``, ``classes.json`` and ``fold<K>/`` with
``best.pt``, ``last.pt``, ``history.csv``, ``oof.csv`` and ``metrics.json`` (design.md).
``--resume`` continues from ``fold<K>/last.pt`` and ends where an uninterrupted run would.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from pipeline import paths, progress
from pipeline.config import Config, add_config_args, config_from_args, save_config
from pipeline.data import ImageDataset, ImageReadError, load_competition
from pipeline.data.competition import save_classes
from pipeline.data.transforms import eval_transform, train_transform
from pipeline.engine.amp import resolve_amp
from pipeline.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.engine.distributed import DistInfo, all_gather_object, barrier, cleanup, init_distributed
from pipeline.engine.loop import (
    EvalResult,
    NonFiniteLossError,
    create_mixup,
    create_train_loss,
    train_one_epoch,
    validate,
)
from pipeline.engine.optim import create_optimizer, create_scheduler, updates_per_epoch
from pipeline.engine.seed import seed_everything
from pipeline.engine.wandb_run import start_run
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json
from pipeline.models import create_classifier
from pipeline.progress import bar

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_acc", "ema_val_loss", "ema_val_acc", "lr",
                   "images_per_s", "epoch_time_s"]
# A fresh start removes these: outputs of an older model of the fold (predict's too) would be stale.
# Keys that may differ between a run and its --resume: they change neither the math nor the data order.
RESUME_FREE_KEYS = {"train.num_workers", "train.cache_images", "train.compile", "train.early_stopping_patience",
                    "device", "wandb", "paths", "predict", "ensemble", "tta"}


# --------------------------------------------------------------------------- data
class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` from a ``DistributedSampler`` so that the dataset can seed each
    image's augmentation by (seed, epoch, index)."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((index, self.epoch) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededAugment(Dataset):
    """An :class:`ImageDataset` whose item ``(index, epoch)`` is augmented with generators seeded by
    (seed, epoch, index).

    albumentations 2 keeps its own random generators, which the global seeds do not reach and which
    every DataLoader worker would otherwise copy. Seeding per image makes an epoch's augmentation
    the same whatever the number of workers, with persistent workers, and after ``--resume``.
    """

    def __init__(self, dataset: ImageDataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        rng = np.random.default_rng([self.seed, epoch, index])
        self.dataset.transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        return self.dataset[index]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy and random seeded from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def seed_epoch(loader: DataLoader, epoch: int) -> None:
    """Start epoch ``epoch``: its shuffling and augmentation depend on (seed, epoch, rank) alone,
    which is what lets ``--resume`` reproduce the uninterrupted run exactly."""
    loader.sampler.set_epoch(epoch)


def _preload(dataset: ImageDataset, images: list[str], what: str, show: bool) -> None:
    dataset.cache = True
    for i in bar(range(len(dataset)), desc=f"caching {what} images", leave=False, enabled=show):
        try:
            dataset.load(i)
        except ImageReadError as exc:
            raise PipelineError(f"{exc} (folds.csv row image={images[i]!r}); replace the file or remove "
                                "the row from the competition's train table") from None


def build_loaders(cfg: Config, folds: pd.DataFrame, fold: int, root: Path, classes: list[str], info: DistInfo):
    """Train loader (shuffled, sharded by ``DistributedSampler``) and this rank's validation shard.

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
    train_rows = folds[folds["fold"] != fold].reset_index(drop=True)
    val_rows = folds[folds["fold"] == fold].reset_index(drop=True)

    def dataset(rows: pd.DataFrame, transform) -> ImageDataset:
        return ImageDataset([root / p for p in rows["image"]], rows["label"].map(index).to_numpy(), transform)

    train_ds = dataset(train_rows, train_transform(t.img_size, t.augment))
    val_ds = dataset(val_rows, eval_transform(t.img_size, t.augment))
    if t.cache_images:
        # Decoded once, before workers fork (they share the memory); PNGs are not re-read each epoch.
        _preload(train_ds, list(train_rows["image"]), "train", info.is_main)
        _preload(val_ds, list(val_rows["image"]), "validation", info.is_main)

    sampler = EpochSampler(DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                              shuffle=True, seed=cfg.seed))
    common = {"num_workers": t.num_workers, "pin_memory": info.device.type == "cuda",
              "worker_init_fn": seed_worker, "generator": torch.Generator().manual_seed(cfg.seed + info.rank),
              "persistent_workers": t.num_workers > 0}
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


def _check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if key in RESUME_FREE_KEYS:
                continue
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = flat(saved), flat(current)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise PipelineError(f"--resume: {path} was made with other settings ({shown}); resume with the same "
                            "config, or start the fold again without --resume (or under another experiment name)")


def _weights(state: dict | None) -> dict | None:
    return None if state is None else {k: v.detach().cpu() for k, v in state.items()}


# --------------------------------------------------------------------------- the fold
def train_fold(cfg: Config, fold: int, resume: bool = False) -> dict[str, Any]:
    """Train fold ``fold`` and write its outputs; returns the fold's metrics (metrics.json).

    Raises:
        PipelineError: a user-fixable problem (no such fold, nothing to resume, NaN loss, ...).
    """
    info = init_distributed(cfg.device)
    t = cfg.train
    metric = cfg.competition.metric
    fold_dir = paths.fold_dir(cfg, fold)
    last_path, best_path = fold_dir / paths.LAST, fold_dir / paths.BEST
    config_dict = cfg.to_dict()

    from pipeline.folds import ensure_folds  # the folds stage owns folds.csv

    if info.is_main:
        folds = ensure_folds(cfg)
    barrier(info)
    if not info.is_main:
        folds = ensure_folds(cfg)
    known = sorted(int(f) for f in folds["fold"].unique() if f >= 0)
    if fold not in known:
        raise PipelineError(f"--fold {fold}: {paths.folds_csv(cfg)} has folds {known}; choose one of them "
                            "(folds.k sets how many)")
    comp = load_competition(cfg.competition)
    classes = list(comp.classes)

    ckpt = None
    if resume:
        if not last_path.is_file():
            raise PipelineError(f"--resume: {last_path} does not exist; train fold {fold} without --resume first")
        ckpt = load_checkpoint(last_path)
        _check_resume_config(ckpt["config"], config_dict, last_path)
        if ckpt.get("finished"):
            if info.is_main:
                print(f"train: fold {fold} of {cfg.experiment} is already complete ({last_path}); "
                      "writing its outputs again")
                return _finish_fold(cfg, fold, ckpt, folds, classes)
            return {}

    if info.device.type == "cuda":
        # Fastest kernels on GPUs; the reproducibility promise is for the CPU.
        torch.backends.cudnn.benchmark = True
    amp = resolve_amp(t.amp, info.device)
    # The model first: a bad backbone name or weights file fails before minutes of image caching.
    bare, model, eval_model, ema = build_model(cfg, len(classes), info)
    train_loader, val_loader, train_rows, val_rows, val_shard = build_loaders(
        cfg, folds, fold, comp.root, classes, info)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise PipelineError(f"fold {fold} has {len(train_rows)} training and {len(val_rows)} validation images; "
                            "use fewer folds (folds.k)")
    optimizer = create_optimizer(bare, t, cfg.model.head_lr_mult)
    n_updates = updates_per_epoch(len(train_loader), t.accum_steps)
    scheduler = create_scheduler(optimizer, t, n_updates)
    scaler = amp.grad_scaler()
    mixup = create_mixup(t, len(classes))
    loss_fn = create_train_loss(t, mixup)
    seed_everything(cfg.seed + info.rank)  # data order, Mixup and dropout differ between ranks

    history: list[dict[str, float]] = []
    start_epoch, num_updates, bad_epochs = 0, 0, 0
    best: dict[str, Any] = {"score": None, "epoch": -1, "metric": float("nan"), "probs": None}
    if ckpt is not None:
        bare.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        ranks = ckpt.get("rng_ranks") or []
        set_rng_state(ranks[info.rank] if len(ranks) == info.world_size else ckpt["rng"])
        history = list(ckpt["history"])
        start_epoch, num_updates, bad_epochs = ckpt["epoch"] + 1, ckpt["num_updates"], ckpt["bad_epochs"]
        best = {"score": tuple(ckpt["best_score"]), "epoch": ckpt["best_epoch"], "metric": ckpt["best_metric"],
                "probs": ckpt["best_probs"].numpy()}
        if info.is_main:
            print(f"train: resuming fold {fold} of {cfg.experiment} after epoch {start_epoch} ({last_path})")

    run_root = paths.run_dir(cfg)
    if info.is_main and ckpt is None and any((fold_dir / name).exists() for name in paths.FOLD_OUTPUTS):
        # Only now, once every setting has proved usable, are the older outputs given up.
        print(f"train: starting fold {fold} again; removing the earlier outputs in {fold_dir} "
              "(use --resume to continue instead)")
        for name in paths.FOLD_OUTPUTS:
            (fold_dir / name).unlink(missing_ok=True)
    if info.is_main:
        save_config(cfg, run_root / paths.CONFIG)
        save_classes(classes, run_root / paths.CLASSES)
        fold_dir.mkdir(parents=True, exist_ok=True)
        print(f"train: fold {fold} of {cfg.experiment}: {cfg.model.backbone}, {len(train_rows)} train / "
              f"{len(val_rows)} validation images, {len(classes)} classes, {t.epochs} epochs on {info.device}"
              f"{f' x{info.world_size}' if info.enabled else ''} (amp {amp.name})")
    wandb_run = start_run(cfg.wandb, run_root, name=f"{cfg.experiment}-fold{fold}", group=cfg.experiment,
                          job_type="train", config={**config_dict, "fold": fold}, enabled=info.is_main)
    ok = False
    try:
        for epoch in range(start_epoch, t.epochs):
            t0 = time.perf_counter()
            seed_epoch(train_loader, epoch)
            if mixup is not None and t.mixup_off_epoch and epoch >= t.mixup_off_epoch:
                mixup.mixup_enabled = False  # still yields (smoothed) one-hot soft targets
            try:
                stats = train_one_epoch(
                    model, train_loader, optimizer, loss_fn, epoch=epoch, info=info, amp=amp, scaler=scaler,
                    scheduler=scheduler, num_updates=num_updates, accum_steps=t.accum_steps,
                    clip_grad=t.clip_grad, mixup=mixup, ema=ema, channels_last=t.channels_last,
                    desc=f"fold {fold} epoch {epoch + 1}/{t.epochs}")
            except ImageReadError as exc:
                raise PipelineError(f"{str(exc).splitlines()[0]}; replace the file or remove its row") from None
            num_updates = stats.num_updates
            res = validate(eval_model, val_loader, len(val_rows), val_shard, info=info, amp=amp,
                           channels_last=t.channels_last)
            ema_res = None
            if ema is not None:
                ema_res = validate(ema.module, val_loader, len(val_rows), val_shard, info=info, amp=amp,
                                   channels_last=t.channels_last, desc="valid ema")
            chosen = ema_res if ema_res is not None else res  # as timm: with EMA on, the EMA is judged
            score = _score(chosen, metric)
            improved = best["score"] is None or score > best["score"]
            if improved:
                best = {"score": score, "epoch": epoch, "metric": _metric_value(chosen, metric),
                        "probs": chosen.probs}
                bad_epochs = 0
            else:
                bad_epochs += 1
            row = {"epoch": epoch, "train_loss": stats.loss, "val_loss": res.loss, "val_acc": res.accuracy,
                   "ema_val_loss": ema_res.loss if ema_res is not None else float("nan"),
                   "ema_val_acc": ema_res.accuracy if ema_res is not None else float("nan"),
                   "lr": stats.lr, "images_per_s": stats.images_per_s,
                   "epoch_time_s": time.perf_counter() - t0}
            history.append(row)
            stop = bool(t.early_stopping_patience and bad_epochs >= t.early_stopping_patience)
            finished = stop or epoch + 1 == t.epochs
            rng_ranks = all_gather_object(rng_state(), info)
            if info.is_main:
                weights = {"model": _weights(bare.state_dict()),
                           "ema": _weights(ema.module.state_dict()) if ema is not None else None,
                           "config": config_dict, "classes": classes, "epoch": epoch}
                if improved:
                    save_checkpoint(best_path, {**weights, "best_metric": best["metric"], "used_ema": ema is not None,
                                                "metric": metric})
                save_checkpoint(last_path, {
                    **weights, "best_metric": best["metric"], "used_ema": ema is not None, "metric": metric,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict(), "rng": rng_ranks[0], "rng_ranks": rng_ranks,
                    "history": history, "num_updates": num_updates, "bad_epochs": bad_epochs,
                    "best_epoch": best["epoch"], "best_score": list(best["score"]),
                    "best_probs": torch.from_numpy(np.asarray(best["probs"], np.float32)),
                    "finished": finished, "world_size": info.world_size,
                })
                atomic_write_csv(fold_dir / paths.HISTORY, pd.DataFrame(history, columns=HISTORY_COLUMNS))
                wandb_run.log({k: v for k, v in row.items() if k != "epoch"} | {"epoch": epoch + 1}, step=epoch)
                ema_note = f" ema_val_acc {ema_res.accuracy:.4f}" if ema_res is not None else ""
                progress.line(f"fold {fold} epoch {epoch + 1}/{t.epochs}: train_loss {stats.loss:.4f} "
                           f"val_loss {res.loss:.4f} val_acc {res.accuracy:.4f}{ema_note} lr {stats.lr:.2e} "
                           f"{stats.images_per_s:.0f} img/s {row['epoch_time_s']:.1f}s{' *' if improved else ''}")
            if stop:
                if info.is_main:
                    print(f"train: early stop after epoch {epoch + 1}: no better {metric} for "
                          f"{t.early_stopping_patience} epochs (best epoch {best['epoch'] + 1})")
                break
        barrier(info)
        metrics: dict[str, Any] = {}
        if info.is_main:
            metrics = _finish_fold(cfg, fold, load_checkpoint(last_path), folds, classes,
                                   n_train=len(train_rows))
            wandb_run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})
        ok = True
        return metrics
    except NonFiniteLossError as exc:
        kept = "" if last_path.is_file() else " (no epoch had completed, so there is no last.pt)"
        raise PipelineError(f"fold {fold}: {exc}{kept}") from None
    finally:
        wandb_run.finish(exit_code=0 if ok else 1)


def _finish_fold(cfg: Config, fold: int, ckpt: dict[str, Any], folds: pd.DataFrame, classes: list[str],
                 n_train: int | None = None) -> dict[str, Any]:
    """Write oof.csv (the best epoch's validation probabilities) and metrics.json from ``last.pt``."""
    fold_dir = paths.fold_dir(cfg, fold)
    val_rows = folds[folds["fold"] == fold].reset_index(drop=True)
    probs = ckpt["best_probs"].numpy()
    if len(probs) != len(val_rows):
        raise PipelineError(f"{fold_dir / 'last.pt'} holds {len(probs)} validation rows but folds.csv has "
                            f"{len(val_rows)} in fold {fold}; folds.csv changed since, train the fold again")
    oof = pd.concat([val_rows[["image", "label"]], pd.DataFrame(probs, columns=classes)], axis=1)
    atomic_write_csv(fold_dir / paths.OOF, oof)
    history = pd.DataFrame(ckpt["history"], columns=HISTORY_COLUMNS)
    used_ema = bool(ckpt["used_ema"])
    index = {c: i for i, c in enumerate(classes)}
    targets = val_rows["label"].map(index).to_numpy()
    p_true = np.clip(probs[np.arange(len(targets)), targets], 1e-15, 1.0)
    metrics = {
        "experiment": cfg.experiment, "fold": fold, "backbone": cfg.model.backbone, "img_size": cfg.train.img_size,
        "epochs_run": len(history), "best_epoch": int(ckpt["best_epoch"]),
        "val_acc": float((probs.argmax(1) == targets).mean()),
        "val_loss": float(-np.log(p_true).mean()),
        "used_ema": used_ema,
        "n_train": int(n_train if n_train is not None else (folds["fold"] != fold).sum()),
        "n_val": len(val_rows),
        "train_time_s": float(history["epoch_time_s"].sum()),
        "images_per_s": float(history["images_per_s"].mean()),
        "complete": True,
    }
    atomic_write_json(fold_dir / paths.METRICS, metrics)
    print(f"train: fold {fold} done: best epoch {metrics['best_epoch'] + 1}, val_acc {metrics['val_acc']:.4f}, "
          f"val_loss {metrics['val_loss']:.4f}{' (EMA weights)' if used_ema else ''}; outputs in {fold_dir}")
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
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        return train_fold(cfg, args.fold, resume=args.resume)
    finally:
        cleanup(DistInfo(world_size=int(os.environ.get("WORLD_SIZE", "1"))))


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
