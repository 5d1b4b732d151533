"""What train (validation), evaluate and predict share: loaders, AMP, batched inference that
returns boxes in pixels of the original images, and loading a trained run."""
from __future__ import annotations

import contextlib
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
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.progress import bar


def run_dir(cfg: DetectConfig) -> Path:
    return paths.run_dir(cfg)


def autocast(device: torch.device, amp: str):
    """Mixed precision on CUDA (fp16 for ``auto``/``fp16``, bf16 asked for explicitly); CPU runs fp32
    except with ``bf16``."""
    if amp == "off" or (device.type != "cuda" and amp != "bf16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_loader(ds, batch_size: int, device: torch.device, num_workers: int, shuffle: bool = False,
                sampler=None, generator=None, worker_init_fn=None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0, generator=generator, worker_init_fn=worker_init_fn,
                      drop_last=False)


@torch.no_grad()
def predict_split(model: torch.nn.Module, split: Split, cfg: DetectConfig, device: torch.device,
                  score_threshold: float, indices: list[int] | None = None,
                  progress: bool = True) -> dict[int, ImageBoxes]:
    """Detections for the images of ``split`` (or its ``indices``), boxes in original-image pixels."""
    ds = DetectionDataset(split, cfg.model.img_size, eval_transform(cfg.train.augment), cache=False)
    if indices is not None:
        ds = torch.utils.data.Subset(ds, indices)
    loader = make_loader(ds, cfg.predict.batch_size, device, cfg.train.num_workers)
    model.eval()
    sigmoid = cfg.train.loss == "focal"
    out: dict[int, ImageBoxes] = {}
    for images, _, _, idx in bar(loader, desc=f"detect {split.name}", leave=False, enabled=progress):
        with autocast(device, cfg.train.amp):
            raw = model(images.to(device, non_blocking=True))
        dets = postprocess(raw["cls_logits"], raw["box_offsets"], raw["anchors"],
                           score_threshold=score_threshold, nms_iou=cfg.post.nms_iou,
                           pre_nms_topk=cfg.post.pre_nms_topk, max_detections=cfg.post.max_detections,
                           sigmoid=sigmoid, class_agnostic=cfg.post.class_agnostic)
        for i, d in zip(idx.tolist(), dets):
            w, h = split.sizes[i]
            scale = np.array([w, h, w, h], np.float32)
            out[i] = ImageBoxes(d["boxes"].float().cpu().numpy() * scale, d["labels"].cpu().numpy(),
                                d["scores"].float().cpu().numpy())
    return out


def ground_truth(split: Split) -> list[ImageBoxes]:
    return [ImageBoxes(b, lab) for b, lab in zip(split.boxes, split.labels)]


def load_trained(cfg: DetectConfig, which: str = "best", device: torch.device | str = "cpu"):
    """The model, classes and training config of ``runs/<experiment>/<which>.pt``."""
    from pipeline.config import build_config

    folder = run_dir(cfg)
    ckpt = load_checkpoint(folder / paths.checkpoint_name(which), map_location="cpu")
    classes = list(ckpt["classes"])
    trained = build_config(ckpt["config"], DetectConfig, source=str(folder / paths.checkpoint_name(which)))
    model = create_detector(trained.model, len(classes))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise PipelineError(f"{folder / paths.checkpoint_name(which)} does not fit the model it names ({exc}); train again") from None
    saved = folder / paths.CLASSES
    if saved.is_file() and json.loads(saved.read_text())["classes"] != classes:
        raise PipelineError(f"{saved} and {which}.pt disagree about the classes; train the run again")
    return model.to(device).eval(), classes, trained
