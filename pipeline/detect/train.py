"""Train an SSD detector: ``python -m pipeline.detect.train [--config configs/banana_ssd.yaml]``.

Writes ``runs/<experiment>/``: ``config.yaml``, ``classes.json``, ``best.pt`` (best validation
mAP@0.5:0.95), ``last.pt`` (+ optimizer, scheduler, scaler, RNG, history: resumes exactly),
``history.csv`` and ``metrics.json``. ``torchrun --nproc_per_node=N`` trains on N GPUs (DDP).
"""
from __future__ import annotations

import argparse
import math
import shutil
import time

import numpy as np
import pandas as pd
import torch
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from pipeline import paths
from pipeline.config import add_config_args, config_from_args, save_config
from pipeline.detect.anchor_fit import resolve_anchors
from pipeline.detect.boxes import targets_for
from pipeline.detect.config import DEFAULT_DETECT_CONFIG, DetectConfig
from pipeline.detect.data import DetectionDataset, class_names, ensure_dataset, load_split, train_transform
from pipeline.detect.inference import autocast, ground_truth, make_loader, predict_split, run_dir
from pipeline.detect.loss import MultiBoxLoss
from pipeline.detect.metrics import evaluate_detections
from pipeline.detect.models import create_detector
from pipeline.engine.budget import EpochBudget, parse_duration, retarget_scheduler
from pipeline.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.engine.distributed import all_gather_object, barrier, cleanup, init_distributed, reduce_mean
from pipeline.engine.seed import seed_everything, seed_worker
from pipeline.engine.wandb_run import start_run
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json, read_json
from pipeline.progress import bar


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _optimizer(model: torch.nn.Module, cfg: DetectConfig) -> torch.optim.Optimizer:
    # no weight decay on norms and biases, as usual for conv nets
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, cfg: DetectConfig,
                    device: torch.device, epoch: int, show: bool) -> dict[str, float]:
    model.train()
    sums = {"loss": 0.0, "cls_loss": 0.0, "box_loss": 0.0}
    n_images, start = 0, time.perf_counter()
    steps_per_epoch = len(loader)
    for step, (images, boxes, labels, _) in enumerate(bar(loader, desc=f"epoch {epoch}", leave=False,
                                                          enabled=show)):
        images = images.to(device, non_blocking=True)
        boxes, labels = boxes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, cfg.train.amp):
            out = model(images)
        cls_t, box_t = targets_for(out["anchors"], boxes, labels, cfg.train.iou_threshold)
        losses = criterion(out["cls_logits"], out["box_offsets"], cls_t, box_t)
        if not torch.isfinite(losses["loss"]):
            raise PipelineError(f"loss became {losses['loss'].item()} at epoch {epoch}; lower train.lr "
                                f"(now {cfg.train.lr}) or set train.amp=off")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if cfg.train.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(epoch * steps_per_epoch + step + 1)
        for k in sums:
            sums[k] += float(losses[k].detach()) * len(images)
        n_images += len(images)
    elapsed = time.perf_counter() - start
    out = {k: v / max(n_images, 1) for k, v in sums.items()}
    out.update(images_per_s=n_images / elapsed, epoch_time_s=elapsed)
    return out


def validate(model, val, cfg: DetectConfig, device, dist) -> dict:
    """mAP on the validation split; each rank detects its share, the main rank scores."""
    idx = list(range(dist.rank, len(val.paths), dist.world_size))
    dets = predict_split(_bare(model), val, cfg, device, cfg.post.eval_score_threshold, idx, progress=dist.is_main)
    merged: dict = {}
    for part in all_gather_object(dets, dist):
        merged.update(part)
    return evaluate_detections(ground_truth(val), [merged[i] for i in range(len(val.paths))],
                               num_classes=_bare(model).num_classes, score_threshold=cfg.post.score_threshold)


def _state(model, cfg, classes, epoch, best, **extra) -> dict:
    return {"model": _bare(model).state_dict(), "ema": None, "config": cfg.to_dict(), "classes": classes,
            "epoch": epoch, "best_metric": best, **extra}


def detect_budget(cfg: DetectConfig) -> EpochBudget | None:
    """``train.time_budget`` for this training, clock started now; what follows the last epoch is
    one validation of the best weights (when they are not the last)."""
    seconds = parse_duration(cfg.train.time_budget)
    if seconds is None:
        return None
    budget = EpochBudget(seconds, cfg.train.epochs, reserve=lambda val_s: val_s, name=cfg.experiment)
    budget.start()
    return budget


def train(cfg: DetectConfig, resume: bool = True, fresh: bool = False) -> dict:
    """Train ``cfg.model`` on ``data.train``, validating on ``data.val``; returns metrics.json's content."""
    budget = detect_budget(cfg)
    dist = init_distributed(cfg.device)
    device = dist.device
    out_dir = run_dir(cfg)
    try:
        if dist.is_main:
            ensure_dataset(cfg)
            if fresh and out_dir.exists():
                shutil.rmtree(out_dir)
            if not resume and (out_dir / paths.LAST).is_file():
                raise PipelineError(f"{out_dir} already holds a run; pass --fresh to start over or choose "
                                    "another --set experiment=NAME")
        barrier(dist)
        generator = seed_everything(cfg.seed + dist.rank)
        classes = class_names(cfg)
        train_split = load_split(cfg, cfg.data.train, classes)
        val_split = load_split(cfg, cfg.data.val, classes)
        cfg = resolve_anchors(cfg, train_split, len(classes), verbose=dist.is_main)  # model.anchors: auto
        if dist.is_main:
            save_config(cfg, out_dir / paths.CONFIG)
            atomic_write_json(out_dir / paths.CLASSES, {"classes": classes})

        model = create_detector(cfg.model, len(classes))
        if cfg.train.loss == "focal":
            model.init_foreground_prior()
        model = model.to(device)
        if dist.enabled:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = _optimizer(model, cfg)
        ds = DetectionDataset(train_split, cfg.model.img_size, train_transform(cfg.model.img_size, cfg.train.augment),
                              cache=cfg.data.cache_images)
        sampler = DistributedSampler(ds, shuffle=True, seed=cfg.seed) if dist.enabled else None
        per_rank = max(1, cfg.train.batch_size // dist.world_size)
        loader = make_loader(ds, per_rank, device, cfg.train.num_workers, shuffle=True, sampler=sampler,
                             generator=generator, worker_init_fn=seed_worker)
        steps = len(loader)
        scheduler = CosineLRScheduler(
            optimizer, t_initial=cfg.train.epochs * steps, lr_min=cfg.train.min_lr,
            warmup_t=int(cfg.train.warmup_epochs * steps), warmup_lr_init=cfg.train.lr * 0.01, t_in_epochs=False,
        ) if cfg.train.scheduler == "cosine" else CosineLRScheduler(optimizer, t_initial=10**9, lr_min=cfg.train.lr,
                                                                    t_in_epochs=False)
        use_scaler = device.type == "cuda" and cfg.train.amp in ("auto", "fp16")
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        criterion = MultiBoxLoss(cfg.train.loss, cfg.train.neg_pos_ratio, cfg.train.focal_alpha,
                                 cfg.train.focal_gamma, cfg.train.box_loss, cfg.train.box_weight)

        start_epoch, best, best_epoch, history, prior_time = 0, -1.0, -1, [], 0.0
        last = out_dir / paths.LAST
        if resume and last.is_file():
            ckpt = load_checkpoint(last, map_location=device)
            if ckpt["config"]["model"] != cfg.model.model_dump(mode="json") or ckpt["classes"] != classes:
                raise PipelineError(f"{last} was trained with another model config or classes; pass --fresh "
                                    "to start over or choose another --set experiment=NAME")
            _bare(model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            start_epoch, best = ckpt["epoch"] + 1, ckpt["best_metric"]
            history = list(ckpt["history"])
            best_epoch = int(ckpt.get("best_epoch", -1))
            prior_time = float(ckpt.get("train_time_s", 0.0))
            if dist.is_main and start_epoch < cfg.train.epochs:
                print(f"resuming {out_dir} after epoch {ckpt['epoch']} (best mAP@0.5:0.95 {best:.4f})")
        if start_epoch >= cfg.train.epochs and (out_dir / paths.METRICS).is_file():
            if dist.is_main:
                print(f"{out_dir} is already trained for {cfg.train.epochs} epochs; --fresh starts over")
            return read_json(out_dir / paths.METRICS)

        run = start_run(cfg.wandb, out_dir, name=cfg.experiment, group=cfg.experiment, job_type="detect-train",
                        config=cfg.to_dict(), enabled=dist.is_main)
        if dist.is_main:
            print(f"training {cfg.model.arch} ({cfg.model.backbone if cfg.model.arch == 'timm_ssd' else 'course layout'}) "
                  f"at {cfg.model.img_size}px on {len(train_split.paths)} images, {len(classes)} classes "
                  f"{classes}, {cfg.train.epochs} epochs, device {device}, world size {dist.world_size}")
        t0 = time.perf_counter()
        metrics_val: dict = {}
        total = cfg.train.epochs
        epoch = start_epoch
        while epoch < total:
            if sampler is not None:
                sampler.set_epoch(epoch)
            stats = train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, cfg, device, epoch,
                                    dist.is_main)
            stats = {k: reduce_mean(v, dist) for k, v in stats.items()}
            stats["images_per_s"] *= dist.world_size  # throughput of all ranks together
            row = {"epoch": epoch, "train_loss": stats["loss"], "cls_loss": stats["cls_loss"],
                   "box_loss": stats["box_loss"], "val_map_50": float("nan"), "val_map_50_95": float("nan"),
                   "lr": optimizer.param_groups[0]["lr"], "images_per_s": stats["images_per_s"],
                   "epoch_time_s": stats["epoch_time_s"]}
            final = epoch == total - 1
            val_s = 0.0
            if (epoch + 1) % cfg.train.eval_every == 0 or final or budget is not None:
                tv = time.perf_counter()
                metrics_val = validate(model, val_split, cfg, device, dist)
                val_s = time.perf_counter() - tv
                row.update(val_map_50=metrics_val["map_50"], val_map_50_95=metrics_val["map_50_95"])
                if metrics_val["map_50_95"] > best:
                    best, best_epoch = metrics_val["map_50_95"], epoch
                    if dist.is_main:
                        save_checkpoint(out_dir / paths.BEST, _state(model, cfg, classes, epoch, best))
            history.append(row)
            elapsed = prior_time + time.perf_counter() - t0
            if dist.is_main:
                save_checkpoint(last, _state(model, cfg, classes, epoch, best, optimizer=optimizer.state_dict(),
                                             scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                                             rng=rng_state(), history=history, best_epoch=best_epoch,
                                             train_time_s=elapsed))
                atomic_write_csv(out_dir / paths.HISTORY, pd.DataFrame(history))
                run.log({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}, step=epoch)
                print(f"epoch {epoch:3d}  loss {row['train_loss']:.3f} (cls {row['cls_loss']:.3f} box {row['box_loss']:.3f})"
                      f"  val mAP@.5 {row['val_map_50']:.3f}  mAP@.5:.95 {row['val_map_50_95']:.3f}"
                      f"  {row['images_per_s']:.0f} img/s  {row['epoch_time_s']:.0f}s", flush=True)
            if budget is not None:
                planned, message = budget.after_epoch(epoch + 1, stats["epoch_time_s"] + val_s, val_s)
                planned = all_gather_object(planned, dist)[0]  # rank 0 decides: clocks differ between ranks
                if message and dist.is_main:
                    print(message, flush=True)
                if planned != total:
                    retarget_scheduler(scheduler, planned, steps)
                    total = planned
            if cfg.train.max_minutes and elapsed > cfg.train.max_minutes * 60 and not final:
                if dist.is_main:
                    print(f"stopping after epoch {epoch}: train.max_minutes={cfg.train.max_minutes} reached")
                if not math.isnan(row["val_map_50_95"]):
                    break
            epoch += 1
        train_time = prior_time + time.perf_counter() - t0
        # report the best checkpoint's validation metrics (the one evaluate/predict use)
        barrier(dist)  # best.pt is written by the main rank; every rank scores the same weights
        _bare(model).load_state_dict(load_checkpoint(out_dir / paths.BEST, map_location=device)["model"])
        if best_epoch != history[-1]["epoch"]:
            metrics_val = validate(model, val_split, cfg, device, dist)
        result = {
            "experiment": cfg.experiment, "arch": cfg.model.arch, "backbone": cfg.model.backbone,
            "img_size": cfg.model.img_size, "anchors": cfg.model.anchors, "loss": cfg.train.loss,
            "epochs_run": len(history), "best_epoch": best_epoch,
            "map_50": metrics_val["map_50"], "map_50_95": metrics_val["map_50_95"],
            "ap_50": dict(zip(classes, metrics_val["ap_50"])), "ap_50_95": dict(zip(classes, metrics_val["ap_50_95"])),
            "precision": metrics_val["precision"], "recall": metrics_val["recall"],
            "score_threshold": cfg.post.score_threshold, "split": cfg.data.val,
            "n_train": len(train_split.paths), "n_val": len(val_split.paths), "train_time_s": train_time,
            "images_per_s": float(np.mean([h["images_per_s"] for h in history])), "complete": True,
            "time_budget_s": budget.seconds if budget else None,
            "time_budget_notes": budget.notes if budget else [],
        }
        if dist.is_main:
            atomic_write_json(out_dir / paths.METRICS, result)
            run.summary.update({"map_50": result["map_50"], "map_50_95": result["map_50_95"]})
            run.finish()
            print(f"done in {train_time / 60:.1f} min: best epoch {best_epoch}, val mAP@0.5 {result['map_50']:.4f}, "
                  f"mAP@0.5:0.95 {result['map_50_95']:.4f} -> {out_dir}")
        return result
    finally:
        cleanup(dist)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.detect.train", description=__doc__.split("\n\n")[0])
    add_config_args(parser, DEFAULT_DETECT_CONFIG)
    parser.add_argument("--fresh", action="store_true", help="delete runs/<experiment>/ and start over")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="fail instead of resuming when runs/<experiment>/last.pt exists")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, DetectConfig)
    return train(cfg, resume=args.resume, fresh=args.fresh)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
