"""Train an SSD detector: ``python -m pipeline.detect.train [--config configs/banana_ssd.yaml]``.

Writes ``runs/<experiment>/``: ``config.yaml``, ``classes.json``, ``best.pt`` (best validation
mAP@0.5:0.95), ``last.pt`` (+ optimizer, scheduler, scaler, every rank's RNG, history: resumes
exactly), ``history.csv`` and ``metrics.json``. ``torchrun --nproc_per_node=N`` trains on N GPUs
(DDP); ``train.batch_size`` is per process, as in classification.

The epoch loop, AMP, EMA, the schedule, checkpoints, the NaN check agreed across ranks, the time
limit decided on rank 0, throughput and W&B come from :mod:`pipeline.engine`; this module only
adds what is about boxes: the detection loss function (anchor matching + multibox loss) and the
mAP validation.
"""
from __future__ import annotations

import argparse
import shutil
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from pipeline import paths
from pipeline.config import add_config_args, config_from_args, save_config
from pipeline.config_keys import describe as describe_changes
from pipeline.config_keys import retrain_changes
from pipeline.detect.anchor_fit import resolve_anchors
from pipeline.detect.boxes import targets_for
from pipeline.detect.config import DEFAULT_DETECT_CONFIG, DetectConfig
from pipeline.detect.data import (
    DetectionDataset,
    Split,
    class_names,
    ensure_dataset,
    load_split,
    train_transform,
)
from pipeline.detect.inference import ground_truth, make_loader, predict_split, run_dir
from pipeline.detect.loss import MultiBoxLoss
from pipeline.detect.metrics import evaluate_detections
from pipeline.detect.models import create_detector
from pipeline.engine.amp import Amp, resolve_amp, set_tf32
from pipeline.engine.budget import EpochBudget, parse_duration, retarget_scheduler
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.distributed import DistInfo, all_gather_object, barrier, cleanup, init_distributed
from pipeline.engine.fit import FitSpec, FitState, Parts, Validation, fit, restore
from pipeline.engine.loop import LossFn, train_one_epoch
from pipeline.engine.optim import create_optimizer, create_scheduler, updates_per_epoch
from pipeline.engine.sampling import SeededAugment, epoch_sampler, seed_epoch
from pipeline.engine.seed import cudnn_autotune, seed_everything, seed_worker
from pipeline.engine.wandb_run import start_run
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_json, read_json
from pipeline.provenance import provenance, split_fingerprint

HISTORY_COLUMNS = ["epoch", "train_loss", "cls_loss", "box_loss", "val_map_50", "val_map_50_95", "lr",
                   "images_per_s", "epoch_time_s"]
# May change between a run and its resume although they retrain (pipeline.config_keys): a finished
# run is extended to more epochs by raising train.epochs.
EXTENDABLE = ("train.epochs",)


def detection_loss(criterion: MultiBoxLoss, *, amp: Amp, device: torch.device, iou_threshold: float) -> LossFn:
    """The detector's loss function for the engine's loop: anchor matching, then the multibox loss
    (``loss``, ``cls_loss``, ``box_loss``); the forward pass alone runs under autocast.

    Off the CPU nothing here waits for the device (no ``.item()``, no boolean indexing, no
    data-dependent shapes: matching and loss run ``sync_free``); the engine reads the losses back
    every ``CHECK_EVERY`` steps and agrees NaNs across ranks there."""

    def loss_fn(model: torch.nn.Module, batch) -> tuple[dict[str, torch.Tensor], int]:
        images, boxes, labels, _ = batch
        images = images.to(device, non_blocking=True)
        boxes, labels = boxes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with amp.autocast():
            out = model(images)
        cls_t, box_t = targets_for(out["anchors"], boxes, labels, iou_threshold, grid=out.get("anchor_grid"),
                                   sync_free=device.type != "cpu")
        return criterion(out["cls_logits"].float(), out["box_offsets"].float(), cls_t, box_t), len(images)

    return loss_fn


def validate(model: torch.nn.Module, val: Split, cfg: DetectConfig, dist: DistInfo) -> dict:
    """mAP on the validation split; each rank detects its share, every rank scores the whole."""
    idx = list(range(dist.rank, len(val.paths), dist.world_size))
    dets = predict_split(model, val, cfg, dist.device, cfg.post.eval_score_threshold, idx, progress=dist.is_main)
    merged: dict = {}
    for part in all_gather_object(dets, dist):
        merged.update(part)
    return evaluate_detections(ground_truth(val), [merged[i] for i in range(len(val.paths))],
                               num_classes=model.num_classes, score_threshold=cfg.post.score_threshold)


def detect_budget(cfg: DetectConfig) -> EpochBudget | None:
    """``train.time_budget`` for this training, clock started now; what follows the last epoch is
    one validation of the best weights (when they are not the last)."""
    seconds = parse_duration(cfg.train.time_budget)
    if seconds is None:
        return None
    budget = EpochBudget(seconds, cfg.train.epochs, reserve=lambda val_s: val_s, name=cfg.experiment)
    budget.start()
    return budget


def _prepare_folder(cfg: DetectConfig, resume: bool, fresh: bool, dist: DistInfo) -> None:
    out_dir = run_dir(cfg)
    if dist.is_main:
        ensure_dataset(cfg)
        if fresh and out_dir.exists():
            shutil.rmtree(out_dir)
        if not resume and (out_dir / paths.LAST).is_file():
            raise PipelineError(f"{out_dir} already holds a run; pass --fresh to start over or choose "
                                "another --set experiment=NAME")
    barrier(dist)


def _resume_checkpoint(cfg: DetectConfig, classes: list[str]) -> dict[str, Any] | None:
    """last.pt to continue from (loaded to the CPU), checked against the current settings."""
    last = run_dir(cfg) / paths.LAST
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last, map_location="cpu")
    changes = [c for c in retrain_changes(ckpt["config"], cfg.to_dict()) if c[0] not in EXTENDABLE]
    if changes or ckpt["classes"] != classes:
        why = describe_changes(changes) if changes else f"classes {ckpt['classes']} -> {classes}"
        raise PipelineError(f"{last} was trained with other settings ({why}); pass --fresh to start over or "
                            "choose another --set experiment=NAME")
    return ckpt


def build_model(cfg: DetectConfig, num_classes: int, dist: DistInfo):
    """(bare model, train model (DDP), EMA or None); the same initial weights on every rank."""
    seed_everything(cfg.seed)
    bare = create_detector(cfg.model, num_classes)
    if cfg.train.loss == "focal":
        bare.init_foreground_prior()
    bare = bare.to(dist.device)
    ema = ModelEmaV3(bare, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema else None
    model = bare
    if dist.enabled:
        model = DistributedDataParallel(bare, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return bare, model, ema


def build_loader(cfg: DetectConfig, split: Split, dist: DistInfo):
    """Shuffled and split by rank; order and augmentation depend on (seed, epoch, image) alone."""
    ds = DetectionDataset(split, cfg.model.img_size, train_transform(cfg.model.img_size, cfg.train.augment),
                          cache=cfg.data.cache_images)
    return make_loader(SeededAugment(ds, cfg.seed), cfg.train.batch_size, dist.device, cfg.train.num_workers,
                       sampler=epoch_sampler(ds, cfg.seed, dist.rank, dist.world_size),
                       generator=torch.Generator().manual_seed(cfg.seed + dist.rank), worker_init_fn=seed_worker)


def _describe(row: dict[str, float], improved: bool) -> str:
    return (f"epoch {int(row['epoch']):3d}  loss {row['train_loss']:.3f} (cls {row['cls_loss']:.3f} "
            f"box {row['box_loss']:.3f})  val mAP@.5 {row['val_map_50']:.3f}  mAP@.5:.95 {row['val_map_50_95']:.3f}"
            f"  {row['images_per_s']:.0f} img/s  {row['epoch_time_s']:.0f}s{' *' if improved else ''}")


def _result(cfg: DetectConfig, classes: list[str], state: FitState, val_metrics: dict, n_train: int,
            n_val: int, used_ema: bool, prov: dict[str, Any], budget: EpochBudget | None) -> dict[str, Any]:
    return {
        "experiment": cfg.experiment, "arch": cfg.model.arch, "backbone": cfg.model.backbone,
        "img_size": cfg.model.img_size, "anchors": cfg.model.anchors, "loss": cfg.train.loss,
        "epochs_run": len(state.history), "best_epoch": state.best_epoch + 1,  # counted from 1, as history.csv
        "used_ema": used_ema,
        "map_50": val_metrics["map_50"], "map_50_95": val_metrics["map_50_95"],
        "ap_50": dict(zip(classes, val_metrics["ap_50"])), "ap_50_95": dict(zip(classes, val_metrics["ap_50_95"])),
        "precision": val_metrics["precision"], "recall": val_metrics["recall"],
        "score_threshold": cfg.post.score_threshold, "split": cfg.data.val,
        "n_train": n_train, "n_val": n_val, "train_time_s": state.train_time_s,
        "images_per_s": float(np.mean([h["images_per_s"] for h in state.history])), "complete": True,
        "time_budget_s": budget.seconds if budget else None,
        "time_budget_notes": budget.notes if budget else [],
        "provenance": prov,
    }


def train(cfg: DetectConfig, resume: bool = True, fresh: bool = False) -> dict:
    """Train ``cfg.model`` on ``data.train``, validating on ``data.val``; returns metrics.json's content.

    Steps: the run folder (and the embedded data on first use); classes and splits; last.pt to
    resume from; model, EMA, loader, optimizer, schedule and scaler; the engine's epoch loop; the
    best checkpoint's validation metrics into metrics.json.
    """
    dist = init_distributed(cfg.device)
    out_dir = run_dir(cfg)
    budget = detect_budget(cfg)
    try:
        _prepare_folder(cfg, resume, fresh, dist)
        classes = class_names(cfg)
        train_split = load_split(cfg, cfg.data.train, classes)
        val_split = load_split(cfg, cfg.data.val, classes)
        cfg = resolve_anchors(cfg, train_split, len(classes), verbose=dist.is_main)  # model.anchors: auto
        ckpt = _resume_checkpoint(cfg, classes) if resume else None
        if ckpt is not None and ckpt["epoch"] + 1 >= cfg.train.epochs and (out_dir / paths.METRICS).is_file():
            if dist.is_main:
                print(f"{out_dir} is already trained for {cfg.train.epochs} epochs; --fresh starts over")
            return read_json(out_dir / paths.METRICS)

        cudnn_autotune(dist.device)
        set_tf32(dist.device, cfg.train.tf32)
        amp = resolve_amp(cfg.train.amp, dist.device)
        bare, model, ema = build_model(cfg, len(classes), dist)
        loader = build_loader(cfg, train_split, dist)
        optimizer = create_optimizer(bare, cfg.train)
        scheduler = create_scheduler(optimizer, cfg.train, updates_per_epoch(len(loader), 1))
        parts = Parts(model, bare, optimizer, scheduler, amp.grad_scaler(), ema)
        criterion = MultiBoxLoss(cfg.train.loss, cfg.train.neg_pos_ratio, cfg.train.focal_alpha,
                                 cfg.train.focal_gamma, cfg.train.box_loss, cfg.train.box_weight)
        loss_fn = detection_loss(criterion, amp=amp, device=dist.device, iou_threshold=cfg.train.iou_threshold)
        seed_everything(cfg.seed + dist.rank)
        state = restore(parts, ckpt, dist) if ckpt is not None else FitState()
        # with EMA on, the EMA weights are judged and saved as best (as in classification)
        judged = ema.module if ema is not None else bare
        if dist.is_main:
            save_config(cfg, out_dir / paths.CONFIG)
            atomic_write_json(out_dir / paths.CLASSES, {"classes": classes})
            if ckpt is not None and state.epoch < cfg.train.epochs:
                print(f"resuming {out_dir} after epoch {state.epoch - 1} (best mAP@0.5:0.95 {state.best_metric:.4f})")
            print(f"training {cfg.model.arch} ({cfg.model.backbone if cfg.model.arch == 'timm_ssd' else 'course layout'}) "
                  f"at {cfg.model.img_size}px on {len(train_split.paths)} images, {len(classes)} classes "
                  f"{classes}, {cfg.train.epochs} epochs, device {dist.device}, world size {dist.world_size} "
                  f"(amp {amp.name}{', ema' if ema is not None else ''})")
        run = start_run(cfg.wandb, out_dir, name=cfg.experiment, group=cfg.experiment, job_type="detect-train",
                        config=cfg.to_dict(), enabled=dist.is_main, run_id=state.wandb_id)
        state.wandb_id = getattr(run, "id", None)
        last_val: dict[str, Any] = {}

        def train_epoch(epoch: int, num_updates: int):
            seed_epoch(loader, epoch)
            return train_one_epoch(model, loader, optimizer, loss_fn, epoch=epoch, info=dist, scaler=parts.scaler,
                                   scheduler=scheduler, num_updates=num_updates, clip_grad=cfg.train.clip_grad,
                                   ema=ema, desc=f"epoch {epoch}")

        def evaluate(epoch: int) -> Validation:
            m = validate(judged, val_split, cfg, dist)
            last_val.update(epoch=epoch, metrics=m)
            return Validation(score=(m["map_50_95"],), metric=m["map_50_95"],
                              row={"val_map_50": m["map_50"], "val_map_50_95": m["map_50_95"]})

        spec = FitSpec(epochs=cfg.train.epochs, out_dir=out_dir, meta={"config": cfg.to_dict(), "classes": classes},
                       history_columns=HISTORY_COLUMNS, eval_every=cfg.train.eval_every,
                       time_limit_s=cfg.train.max_minutes * 60 if cfg.train.max_minutes else None, name="detect",
                       budget=budget, on_plan=lambda n: retarget_scheduler(scheduler, n, len(loader)))
        ok = False
        try:
            state = fit(parts, state, spec, dist, train_epoch=train_epoch, evaluate=evaluate, wandb_run=run,
                        describe=_describe)
            # report the best checkpoint's validation metrics (the weights evaluate and predict use)
            barrier(dist)  # best.pt is written by rank 0; every rank scores the same weights
            best = load_checkpoint(out_dir / paths.BEST, map_location="cpu")
            # best.pt holds the validated weights only (the EMA's when EMA is on); older ones both
            judged.load_state_dict(best["ema"] if best.get("ema") is not None else best["model"])
            val_metrics = last_val["metrics"] if last_val.get("epoch") == state.best_epoch \
                else validate(judged, val_split, cfg, dist)
            prov = provenance(device=dist.device, data=split_fingerprint(train_split, val_split),
                              world_size=dist.world_size)
            result = _result(cfg, classes, state, val_metrics, len(train_split.paths), len(val_split.paths),
                             ema is not None, prov, budget)
            if dist.is_main:
                atomic_write_json(out_dir / paths.METRICS, result)
                run.summary.update({"map_50": result["map_50"], "map_50_95": result["map_50_95"]})
                print(f"done in {state.train_time_s / 60:.1f} min: best epoch {state.best_epoch + 1}, val mAP@0.5 "
                      f"{result['map_50']:.4f}, mAP@0.5:0.95 {result['map_50_95']:.4f} -> {out_dir}")
            ok = True
            return result
        finally:
            run.finish(exit_code=0 if ok else 1)
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
