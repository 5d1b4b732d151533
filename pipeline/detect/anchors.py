"""Anchor boxes in normalised ``(xmin, ymin, xmax, ymax)`` coordinates, one set per feature map.

Two styles, both ordered location-major (all anchors of pixel (0, 0), then (0, 1), ...), the
order in which the SSD heads flatten their outputs:

* ``d2l``: the course's ``multibox_prior``: sizes ``s_1..s_n`` and ratios ``r_1..r_m`` give the
  ``n + m - 1`` boxes ``(s_i, r_1)`` and ``(s_1, r_j)`` per location, vectorised here.
* ``torchvision``: SSD-paper default boxes from ``torchvision``'s ``DefaultBoxGenerator``.
* ``auto``: shapes fitted to the training boxes (``anchor_fit.py``), given per feature map.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def level_sizes(num_levels: int, min_size: float = 0.2, max_size: float = 0.88) -> list[list[float]]:
    """Per-level ``[s_k, sqrt(s_k * s_{k+1})]`` with ``s_k`` evenly spaced from min to max.

    With 5 levels, 0.2 and 0.88 this gives the course's TinySSD sizes
    ``[[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]``.
    """
    if num_levels == 1:
        scales = [min_size, max_size]
    else:
        step = (max_size - min_size) / (num_levels - 1)
        scales = [min_size + step * k for k in range(num_levels)] + [max_size + step]
    return [[round(scales[k], 3), round(math.sqrt(scales[k] * scales[k + 1]), 3)] for k in range(num_levels)]


def multibox_prior(height: int, width: int, sizes: list[float], ratios: list[float],
                   aspect: float = 1.0) -> torch.Tensor:
    """The course's multibox prior for one ``height x width`` feature map, without loops.

    Args:
        sizes: box sizes as fractions of the image side.
        ratios: width/height ratios; ``sizes[0]`` pairs with every ratio, ``ratios[0]`` with every size.
        aspect: input image height / width (the course scales widths by it).

    Returns:
        ``(height * width * (len(sizes) + len(ratios) - 1), 4)`` boxes.
    """
    s = torch.tensor(sizes, dtype=torch.float32)
    r = torch.tensor(ratios, dtype=torch.float32)
    w = torch.cat([s * math.sqrt(ratios[0]), s[0] * torch.sqrt(r[1:])]) * aspect
    h = torch.cat([s / math.sqrt(ratios[0]), s[0] / torch.sqrt(r[1:])])
    cy = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    cx = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")
    centers = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
    half = torch.stack([-w, -h, w, h], dim=-1).unsqueeze(0) / 2
    return (centers + half).reshape(-1, 4)


def anchors_per_location(style: str, num_sizes: int, ratios: list[float]) -> int:
    if style in ("d2l", "auto"):  # auto fits as many shapes per location as d2l would place
        return num_sizes + len(ratios) - 1
    return 2 + 2 * len(_tv_ratios(ratios))


def _tv_ratios(ratios: list[float]) -> list[float]:
    # torchvision adds each ratio r > 1 together with 1/r; our d2l-style list holds both, so keep r > 1.
    out = sorted({round(max(r, 1 / r), 6) for r in ratios if abs(r - 1.0) > 1e-6})
    return out


@lru_cache(maxsize=32)
def _cached(style: str, shapes: tuple[tuple[int, int], ...], min_size: float, max_size: float,
            ratios: tuple[float, ...], image_hw: tuple[int, int]) -> torch.Tensor:
    sizes = level_sizes(len(shapes), min_size, max_size)
    if style == "d2l":
        aspect = image_hw[0] / image_hw[1]
        return torch.cat([multibox_prior(h, w, sz, list(ratios), aspect) for (h, w), sz in zip(shapes, sizes)])
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList

    scales = [sz[0] for sz in sizes] + [sizes[-1][1] ** 2 / sizes[-1][0]]
    gen = DefaultBoxGenerator([_tv_ratios(list(ratios))] * len(shapes), scales=scales)
    images = ImageList(torch.zeros(1, 3, *image_hw), [image_hw])
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    boxes = gen(images, feats)[0]
    return boxes / torch.tensor([image_hw[1], image_hw[0], image_hw[1], image_hw[0]], dtype=boxes.dtype)


def make_anchors(style: str, shapes: list[tuple[int, int]], min_size: float, max_size: float,
                 ratios: list[float], image_hw: tuple[int, int], level_wh=None) -> torch.Tensor:
    """All anchors of a model whose feature maps have ``shapes`` (cached per shape tuple).

    Args:
        level_wh: ``auto`` style only: per feature map, the fitted ``[width, height]`` of each anchor.

    Returns:
        ``(num_anchors, 4)`` float32 CPU tensor; callers move it to their device once.
    """
    key = tuple((int(h), int(w)) for h, w in shapes)
    if style == "auto":
        if level_wh is None or len(level_wh) != len(key):
            raise ValueError(f"auto anchors need one list of shapes per feature map ({len(key)}), got "
                             f"{None if level_wh is None else len(level_wh)}")
        return _cached_explicit(key, tuple(tuple(tuple(float(v) for v in wh) for wh in lv) for lv in level_wh))
    return _cached(style, key, float(min_size), float(max_size), tuple(float(r) for r in ratios),
                   (int(image_hw[0]), int(image_hw[1])))


@lru_cache(maxsize=32)
def _cached_explicit(shapes: tuple[tuple[int, int], ...], level_wh: tuple) -> torch.Tensor:
    return explicit_anchors(list(shapes), level_wh)


def level_shapes_d2l(num_levels: int, min_size: float, max_size: float,
                     ratios: list[float]) -> list[list[list[float]]]:
    """The ``[width, height]`` of each d2l anchor per level, in :func:`multibox_prior`'s order (square input)."""
    out = []
    for sizes in level_sizes(num_levels, min_size, max_size):
        shapes = [[s * math.sqrt(ratios[0]), s / math.sqrt(ratios[0])] for s in sizes]
        shapes += [[sizes[0] * math.sqrt(r), sizes[0] / math.sqrt(r)] for r in ratios[1:]]
        out.append(shapes)
    return out


def explicit_anchors(shapes: list[tuple[int, int]], level_wh) -> torch.Tensor:
    """Anchors of given ``[width, height]`` per level (``model.anchors: auto``), centred on every cell."""
    out = []
    for (h, w), whs in zip(shapes, level_wh):
        wh = torch.tensor(whs, dtype=torch.float32).reshape(-1, 2)
        cy = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        cx = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
        half = torch.cat([-wh, wh], dim=-1).unsqueeze(0) / 2
        out.append((centres + half).reshape(-1, 4))
    return torch.cat(out)
