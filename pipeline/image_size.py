"""``train.img_size: auto``: the training size from the competition's images and the backbone.

A CNN's last feature map is the input divided by its total stride (32 for ResNets and ConvNeXts):
a 32 px image through a ResNet ends at 1x1 before the head, and every spatial pattern has been
pooled away by then. So:

- images smaller than ``MIN_FEATURE_MAP`` x stride (128 px for stride 32) are upscaled to it;
- images larger than the backbone's recipe size (its timm ``pretrained_cfg`` input size, e.g. 224)
  are trained at the recipe size, as it was pretrained;
- in between, the images' own size, rounded to a multiple of the stride;
- backbones with a fixed input size (ViTs with learnt position embeddings) take their own.

The size is the median short side of (a sample of) the train images, read from the file headers.
The choice and the reason are printed, and the resolved number is what the run's config records.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import Config

MIN_FEATURE_MAP = 4   # feature map side before the head that still holds spatial structure
SAMPLE = 500          # images whose headers are read


def backbone_geometry(backbone: str) -> tuple[int, int, bool]:
    """(total stride, recipe input size, fixed input size) of a timm backbone."""
    import timm

    model = timm.create_model(backbone, pretrained=False)
    info = getattr(model, "feature_info", None)
    stride = int(info[-1]["reduction"]) if info else 32
    recipe = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return stride, recipe, bool(model.pretrained_cfg.get("fixed_input_size", False))


def median_short_side(paths: list[str | Path], seed: int = 0) -> int | None:
    from pipeline.data.images import image_size

    if len(paths) > SAMPLE:
        pick = np.random.default_rng(seed).choice(len(paths), SAMPLE, replace=False)
        paths = [paths[i] for i in pick]
    sides = [min(s) for s in (image_size(p) for p in paths) if s]
    return int(np.median(sides)) if sides else None


def choose_img_size(native: int | None, stride: int, recipe: int, fixed: bool) -> tuple[int, str]:
    """The training size and why."""
    if fixed:
        return recipe, f"the backbone takes a fixed input size of {recipe} px"
    if native is None:
        return recipe, f"no image size could be read; the backbone's recipe size {recipe} px"
    smallest = stride * MIN_FEATURE_MAP
    if native < smallest:
        return smallest, (f"images are {native} px; upscaled so the total stride {stride} leaves a "
                          f"{MIN_FEATURE_MAP}x{MIN_FEATURE_MAP} feature map before the head "
                          f"(at {native} px it would be {max(1, native // stride)}x{max(1, native // stride)})")
    if native > recipe:
        return recipe, f"images are {native} px; trained at the backbone's recipe size {recipe} px"
    size = max(smallest, int(round(native / stride)) * stride)
    return size, f"images are {native} px; their own size rounded to a multiple of the stride {stride}"


def resolve_img_size(cfg: Config, quiet: bool = False) -> Config:
    """``cfg`` with ``train.img_size: auto`` replaced by the chosen size (unchanged otherwise)."""
    if cfg.train.img_size != "auto":
        return cfg
    from pipeline.data import load_competition

    comp = load_competition(cfg.competition)
    stride, recipe, fixed = backbone_geometry(cfg.model.backbone)
    native = median_short_side(comp.train["path"].tolist(), cfg.seed)
    size, why = choose_img_size(native, stride, recipe, fixed)
    if not quiet:
        print(f"train.img_size: auto -> {size} px for {cfg.model.backbone}: {why}")
    out = cfg.model_copy(deep=True)
    out.train.img_size = size
    return out
