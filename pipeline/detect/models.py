"""SSD detectors: the course's TinySSD, and an SSD head over any timm backbone.

Both return per-anchor class logits ``(B, A, C + 1)`` (index 0 = background), box offsets
``(B, A, 4)`` and the anchors ``(A, 4)`` of the feature maps they saw.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch
from torch import nn

from pipeline.detect.anchors import anchors_per_location, make_anchors
from pipeline.detect.boxes import AnchorGrid
from pipeline.detect.config import DetectModelConfig
from pipeline.errors import PipelineError


def down_sample_blk(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU then 2x2 max-pool: halves height and width (TinySSD's block)."""
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers += [nn.Conv2d(c, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SSD(nn.Module):
    """Multi-scale heads over a list of feature maps; subclasses define :meth:`features`."""

    def __init__(self, channels: list[int], num_classes: int, cfg: DetectModelConfig) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.anchor_style, self.ratios = cfg.anchors, list(cfg.ratios)
        self.min_size, self.max_size = cfg.min_size, cfg.max_size
        self.anchor_shapes = cfg.anchor_shapes if cfg.anchors == "auto" else None
        k = len(self.anchor_shapes[0]) if self.anchor_shapes else anchors_per_location(cfg.anchors, 2, cfg.ratios)
        self.k = k
        self.cls_heads = nn.ModuleList(nn.Conv2d(c, k * (num_classes + 1), 3, padding=1) for c in channels)
        self.box_heads = nn.ModuleList(nn.Conv2d(c, k * 4, 3, padding=1) for c in channels)
        self._anchor_cache: dict = {}

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def init_foreground_prior(self, prior: float = 0.01) -> None:
        """Start every foreground sigmoid at ``prior`` (RetinaNet's init) so that focal loss is not
        swamped by thousands of confident-looking background anchors in the first steps."""
        for head in self.cls_heads:
            bias = head.bias.view(self.k, self.num_classes + 1)
            bias[:, 1:] = -math.log((1 - prior) / prior)

    def anchors_for(self, shapes: list[tuple[int, int]], image_hw: tuple[int, int],
                    device: torch.device) -> torch.Tensor:
        return self._anchors_and_grid(shapes, image_hw, device)[0]

    def _anchors_and_grid(self, shapes: list[tuple[int, int]], image_hw: tuple[int, int],
                          device: torch.device) -> tuple[torch.Tensor, AnchorGrid | None]:
        key = (tuple(shapes), tuple(image_hw), str(device))
        if key not in self._anchor_cache:
            if self.anchor_style == "auto" and (not self.anchor_shapes or len(self.anchor_shapes) != len(shapes)):
                raise PipelineError(
                    f"model.anchors=auto needs fitted shapes for {len(shapes)} feature maps in model.anchor_shapes "
                    f"(has {len(self.anchor_shapes or [])}); training fits them: leave anchor_shapes null there")
            anchors = make_anchors(self.anchor_style, shapes, self.min_size, self.max_size, self.ratios, image_hw,
                                   self.anchor_shapes).to(device)
            # areas, centres and grid layout for matching, computed once (None if not a grid)
            self._anchor_cache[key] = anchors, AnchorGrid.build(anchors, [(h, w, self.k) for h, w in shapes])
        return self._anchor_cache[key]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        b = x.shape[0]
        # channels-last then flatten: anchors of one location are contiguous, as make_anchors orders them
        cls = torch.cat([h(f).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes + 1)
                         for f, h in zip(feats, self.cls_heads)], dim=1)
        box = torch.cat([h(f).permute(0, 2, 3, 1).reshape(b, -1, 4) for f, h in zip(feats, self.box_heads)], dim=1)
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]
        anchors, grid = self._anchors_and_grid(shapes, (int(x.shape[-2]), int(x.shape[-1])), x.device)
        # anchor_grid: the anchors' layout and areas for matching (pipeline.detect.boxes.AnchorGrid)
        return {"cls_logits": cls, "box_offsets": box, "anchors": anchors, "anchor_grid": grid}


class TinySSD(SSD):
    """The course's TinySSD: base net 3-16-32-64, then 128-channel blocks, then a global max pool.

    ``width`` multiplies every channel count (1 = the course's network).
    """

    def __init__(self, num_classes: int, cfg: DetectModelConfig) -> None:
        w = cfg.width
        chans = [16 * w, 32 * w, 64 * w]
        top = 128 * w
        super().__init__([chans[-1], top, top, top, top], num_classes, cfg)
        base = [down_sample_blk(c_in, c_out) for c_in, c_out in zip([3] + chans[:-1], chans)]
        self.blocks = nn.ModuleList([
            nn.Sequential(*base),
            down_sample_blk(chans[-1], top),
            down_sample_blk(top, top),
            down_sample_blk(top, top),
            nn.AdaptiveMaxPool2d((1, 1)),
        ])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for blk in self.blocks:
            x = blk(x)
            out.append(x)
        return out


def _extra_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout // 2, 1, bias=False), nn.BatchNorm2d(cout // 2), nn.ReLU(inplace=True),
        nn.Conv2d(cout // 2, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class TimmSSD(SSD):
    """SSD heads on the last two feature maps of a timm backbone plus extra stride-2 blocks."""

    def __init__(self, num_classes: int, cfg: DetectModelConfig) -> None:
        backbone = create_backbone(cfg)
        chans = list(backbone.feature_info.channels())
        extra_c = cfg.extra_channels
        super().__init__(chans + [extra_c] * cfg.extra_blocks, num_classes, cfg)
        self.backbone = backbone
        self.extras = nn.ModuleList(_extra_block(c, extra_c) for c in [chans[-1]] + [extra_c] * (cfg.extra_blocks - 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = list(self.backbone(x))
        y = feats[-1]
        for blk in self.extras:
            y = blk(y)
            feats.append(y)
        return feats


def create_backbone(cfg: DetectModelConfig) -> nn.Module:
    """timm ``features_only`` backbone returning its last two feature maps (strides 16 and 32)."""
    import timm

    if not timm.is_model(cfg.backbone):
        close = difflib.get_close_matches(cfg.backbone, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Close timm names: {', '.join(close)}." if close else " See timm.list_models()."
        raise PipelineError(f"model.backbone={cfg.backbone!r} is not a timm model.{hint}")
    kwargs: dict = {"features_only": True, "out_indices": (-2, -1)}
    if isinstance(cfg.pretrained, str):
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise PipelineError(f"model.pretrained={cfg.pretrained!r}: no such weights file; "
                                "give a path to a .pth/.safetensors file, true, or false")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    else:
        kwargs["pretrained"] = cfg.pretrained
    try:
        return timm.create_model(cfg.backbone, **kwargs)
    except Exception as exc:  # download failure, incompatible weights
        raise PipelineError(f"could not create backbone {cfg.backbone!r} (pretrained={cfg.pretrained!r}): "
                            f"{type(exc).__name__}: {exc}") from None


def create_detector(cfg: DetectModelConfig, num_classes: int) -> SSD:
    """The detector named by ``cfg.arch`` for ``num_classes`` foreground classes."""
    if cfg.arch == "tiny_ssd":
        return TinySSD(num_classes, cfg)
    return TimmSSD(num_classes, cfg)
