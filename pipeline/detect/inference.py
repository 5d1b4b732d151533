"""What train (validation), evaluate and predict share: loaders, AMP, batched inference that
returns boxes in pixels of the original images, and loading a trained run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import paths
from pipeline.detect.config import DetectConfig
from pipeline.detect.data import DetectionDataset, Split, collate, eval_transform
from pipeline.detect.metrics import ImageBoxes
from pipeline.detect.models import create_detector
from pipeline.detect.postprocess import postprocess
from pipeline.detect.tta import View, detect_views, fuse, unflip, view_size
from pipeline.engine.amp import resolve_amp
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.progress import bar


def run_dir(cfg: DetectConfig) -> Path:
    return paths.run_dir(cfg)


def make_loader(ds, batch_size: int, device: torch.device, num_workers: int, shuffle: bool = False,
                sampler=None, generator=None, worker_init_fn=None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0, generator=generator, worker_init_fn=worker_init_fn,
                      drop_last=False)


Member = tuple  # (model, its training config, weight): one model of an ensemble


@torch.no_grad()
def detect_normalised(model: torch.nn.Module, split: Split, cfg: DetectConfig, device: torch.device,
                      score_threshold: float, indices: list[int] | None = None, view: View = View(),
                      progress: bool = True) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One view's detections per image index: ``(boxes normalised xyxy, scores, labels)``, boxes
    mapped back to the unflipped image."""
    size = cfg.model.img_size if view.scale == 1.0 else view_size(cfg.model.img_size, view.scale)
    ds = DetectionDataset(split, size, eval_transform(cfg.train.augment), cache=False)
    if indices is not None:
        ds = torch.utils.data.Subset(ds, indices)
    loader = make_loader(ds, cfg.predict.batch_size, device, cfg.train.num_workers)
    model.eval()
    sigmoid = cfg.train.loss == "focal"
    out: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    desc = f"detect {split.name}" + ("" if view == View() else f" {view.name}")
    for images, _, _, idx in bar(loader, desc=desc, leave=False, enabled=progress):
        images = images.to(device, non_blocking=True)
        with resolve_amp(cfg.train.amp, device).autocast():  # the same precision rule as training
            raw = model(images.flip(-1) if view.hflip else images)
        dets = postprocess(raw["cls_logits"], raw["box_offsets"], raw["anchors"],
                           score_threshold=score_threshold, nms_iou=cfg.post.nms_iou,
                           pre_nms_topk=cfg.post.pre_nms_topk, max_detections=cfg.post.max_detections,
                           sigmoid=sigmoid, class_agnostic=cfg.post.class_agnostic)
        for i, d in zip(idx.tolist(), dets):
            boxes = d["boxes"].float().cpu().numpy()
            out[i] = (unflip(boxes) if view.hflip else boxes, d["scores"].float().cpu().numpy(),
                      d["labels"].cpu().numpy())
    return out


def _pixels(split: Split, i: int, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> ImageBoxes:
    w, h = split.sizes[i]
    return ImageBoxes(boxes * np.array([w, h, w, h], np.float32), labels, scores)


@torch.no_grad()
def predict_split(model: torch.nn.Module, split: Split, cfg: DetectConfig, device: torch.device,
                  score_threshold: float, indices: list[int] | None = None, progress: bool = True,
                  tta: bool = False, members: list[Member] | None = None) -> dict[int, ImageBoxes]:
    """Detections for the images of ``split`` (or its ``indices``), boxes in original-image pixels.

    Args:
        tta: run the views of ``cfg.tta`` and fuse them (``tta.py``); False: the plain view only.
        members: ``(model, training config, weight)`` of every model to merge (``model`` itself
            when None); each runs the views its own training allows, all fused together.
    """
    members = members or [(model, cfg, 1.0)]
    plan = [(m, mcfg, w, v) for m, mcfg, w in members
            for v in (detect_views(cfg.model_copy(update={"train": mcfg.train})) if tta else [View()])]
    if len(plan) == 1 and plan[0][3] == View():
        m, mcfg = plan[0][:2]
        dets = detect_normalised(m, split, mcfg, device, score_threshold, indices, progress=progress)
        return {i: _pixels(split, i, b, lab, s) for i, (b, s, lab) in dets.items()}
    # views detect at the evaluation threshold: a box weak in one view may be strong once fused
    low = min(score_threshold, cfg.post.eval_score_threshold)
    runs = [detect_normalised(m, split, mcfg, device, low, indices, v, progress) for m, mcfg, _, v in plan]
    weights = [float(w) for _, _, w, _ in plan]
    out: dict[int, ImageBoxes] = {}
    for i in runs[0]:
        b, s, lab = fuse([r[i] for r in runs], weights, cfg.tta.iou, cfg.tta.skip_score, cfg.tta.conf_type,
                         cfg.tta.fusion)
        keep = np.flatnonzero(s >= score_threshold)[:cfg.post.max_detections]
        out[i] = _pixels(split, i, b[keep], lab[keep], s[keep])
    return out


def load_members(cfg: DetectConfig, which: str, device: torch.device | str) -> tuple[list[Member], list[str]]:
    """This experiment's model and those of ``ensemble.experiments``, with their training configs and
    weights; every member must know the same classes."""
    names = [cfg.experiment] + [e for e in cfg.ensemble.experiments if e != cfg.experiment]
    weights = cfg.ensemble.weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise PipelineError(f"ensemble.weights has {len(weights)} value(s) for {len(names)} model(s) "
                            f"({', '.join(names)}): give one per model, this experiment first")
    members, classes = [], None
    for name, w in zip(names, weights):
        model, cls, trained = load_trained(cfg.model_copy(update={"experiment": name}), which, device)
        if classes is not None and cls != classes:
            raise PipelineError(f"ensemble: {name} was trained on classes {cls}, {names[0]} on {classes}; "
                                "only models of the same classes can be merged")
        classes = cls
        members.append((model, cfg.model_copy(update={"model": trained.model, "train": trained.train}), w))
    return members, classes


def ground_truth(split: Split) -> list[ImageBoxes]:
    return [ImageBoxes(b, lab) for b, lab in zip(split.boxes, split.labels)]


def load_trained(cfg: DetectConfig, which: str = "best", device: torch.device | str = "cpu"):
    """The model, classes and training config of ``runs/<experiment>/<which>.pt``: its EMA weights
    when training judged the EMA (``used_ema``), as it did when it chose the checkpoint."""
    from pipeline.config import build_config

    folder = run_dir(cfg)
    ckpt = load_checkpoint(folder / paths.checkpoint_name(which), map_location="cpu")
    classes = list(ckpt["classes"])
    trained = build_config(ckpt["config"], DetectConfig, source=str(folder / paths.checkpoint_name(which)))
    model = create_detector(trained.model, len(classes))
    try:
        model.load_state_dict(ckpt["ema"] if ckpt.get("used_ema") and ckpt.get("ema") is not None
                              else ckpt["model"])
    except RuntimeError as exc:
        raise PipelineError(f"{folder / paths.checkpoint_name(which)} does not fit the model it names ({exc}); train again") from None
    saved = folder / paths.CLASSES
    if saved.is_file() and json.loads(saved.read_text())["classes"] != classes:
        raise PipelineError(f"{saved} and {which}.pt disagree about the classes; train the run again")
    return model.to(device).eval(), classes, trained
