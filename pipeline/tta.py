"""Test-time augmentation on whole batches: flips, the d4 group, multi-scale, five/ten crop.

Every view is a tensor function on a normalized ``(N, C, H, W)`` batch, so a batch of any size
goes through each view in one call (no Python loop per image). Views are merged per image by
the mean of the softmax (default) or the geometric mean (mean of log-probabilities, renormalized).

Names accepted in the ``tta`` config list:
``identity hflip vflip transpose rot90 rot180 rot270 transverse`` (single views), ``d4`` (all 8
of the dihedral group), ``scale_<s>`` (multi-scale: resize by s, the CNN sees the new size; models
with a fixed input size get ``zoom_<s>`` instead), ``zoom_<s>`` (resize by s, then center-crop or
edge-pad back to the input size), ``five_crop`` (4 corners + center of the batch upscaled by
``predict.crop_scale``), ``ten_crop`` (five crops and their mirror images).

Measured on the embedded digits (32 px, resnet18, fold 0): ``scale_1.125`` drops a view's OOF
accuracy to 0.16 (at 32 px one more output cell changes the whole feature map), while
``zoom_1.125`` raises it from 0.993 to 0.997: small images want zoom, large ones can take scale.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError

Tensor = torch.Tensor


@dataclass(frozen=True)
class View:
    """One test-time view: ``fn`` maps a batch to a batch; ``mirrors`` if it flips or rotates."""

    name: str
    fn: Callable[[Tensor], Tensor]
    mirrors: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _rot(k: int) -> Callable[[Tensor], Tensor]:
    return lambda x: torch.rot90(x, k, dims=(-2, -1))


_GEOMETRIC: dict[str, tuple[Callable[[Tensor], Tensor], bool]] = {
    "identity": (lambda x: x, False),
    "hflip": (lambda x: x.flip(-1), True),
    "vflip": (lambda x: x.flip(-2), True),
    "transpose": (lambda x: x.transpose(-2, -1), True),
    "rot90": (_rot(1), True),
    "rot180": (_rot(2), True),
    "rot270": (_rot(3), True),
    "transverse": (lambda x: x.flip((-2, -1)).transpose(-2, -1), True),
}
D4 = ["identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "transverse"]


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    if (h, w) == tuple(x.shape[-2:]):
        return x
    down = h < x.shape[-2] or w < x.shape[-1]
    # antialias only matters (and only costs) when shrinking.
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=down)


def _fit(x: Tensor, h: int, w: int) -> Tensor:
    """Center-crop or edge-pad ``x`` back to ``(h, w)`` for models that need a fixed input size."""
    dh, dw = x.shape[-2] - h, x.shape[-1] - w
    if dh > 0 or dw > 0:
        top, left = max(dh, 0) // 2, max(dw, 0) // 2
        x = x[..., top:top + min(h, x.shape[-2]), left:left + min(w, x.shape[-1])]
    dh, dw = h - x.shape[-2], w - x.shape[-1]
    if dh > 0 or dw > 0:
        x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="replicate")
    return x


def _scale_view(name: str, keep_size: bool) -> View:
    """``scale_<s>``: resize by s (the model sees the new size); ``zoom_<s>``: resize by s, then
    center-crop (s > 1) or edge-pad (s < 1) back to the input size."""
    try:
        s = float(name.split("_", 1)[1])
    except (IndexError, ValueError):
        raise PipelineError(f"tta: {name!r} is not scale_<factor> or zoom_<factor>, e.g. zoom_1.125") from None
    if not 0.25 <= s <= 4.0:
        raise PipelineError(f"tta: {name!r}: the factor must be between 0.25 and 4")

    def fn(x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        y = _resize(x, max(1, round(h * s)), max(1, round(w * s)))
        return _fit(y, h, w) if keep_size else y

    return View(name, fn)


def _crop_views(crop_scale: float, mirrored: bool) -> list[View]:
    """Four corners and the center of the batch upscaled by ``crop_scale`` (crop = input size)."""

    def make(pos: str, flip: bool) -> View:
        def fn(x: Tensor) -> Tensor:
            h, w = x.shape[-2:]
            big = _resize(x, round(h * crop_scale), round(w * crop_scale))
            bh, bw = big.shape[-2:]
            top = {"t": 0, "b": bh - h, "c": (bh - h) // 2}[pos[0]]
            left = {"l": 0, "r": bw - w, "c": (bw - w) // 2}[pos[1]]
            y = big[..., top:top + h, left:left + w]
            return y.flip(-1) if flip else y

        return View(f"crop_{pos}" + ("+hflip" if flip else ""), fn, mirrors=flip)

    positions = ["tl", "tr", "bl", "br", "cc"]
    views = [make(p, False) for p in positions]
    if mirrored:
        views += [make(p, True) for p in positions]
    return views


def build_views(names: Sequence[str], *, flips: bool = True, crop_scale: float = 1.125,
                fixed_size: bool = False) -> tuple[list[View], list[str]]:
    """Expand the configured TTA names into distinct views.

    Args:
        names: the ``tta`` config list (``d4``, ``five_crop`` and ``ten_crop`` expand to several views).
        flips: False drops every view that mirrors or rotates the image (digits, text).
        crop_scale: upscaling before five/ten crop.
        fixed_size: the model takes only its training size; ``scale_`` views act as ``zoom_``.

    Returns:
        The views in order without repeats, and the names of views dropped because flips are off.
    """
    if not names:
        raise PipelineError("tta: the list is empty; use [identity] for no test-time augmentation")
    views: list[View] = []
    for name in names:
        if name == "d4":
            views += [View(n, *_GEOMETRIC[n]) for n in D4]
        elif name in _GEOMETRIC:
            views.append(View(name, *_GEOMETRIC[name]))
        elif name.startswith("scale_"):
            views.append(_scale_view(name, keep_size=fixed_size))
        elif name.startswith("zoom_"):
            views.append(_scale_view(name, keep_size=True))
        elif name in ("five_crop", "ten_crop"):
            views += _crop_views(crop_scale, mirrored=name == "ten_crop")
        else:
            raise PipelineError(f"tta: unknown transform {name!r}; known: {', '.join(D4)}, d4, "
                                "scale_<factor>, zoom_<factor>, five_crop, ten_crop")
    seen: dict[str, View] = {}
    dropped = []
    for v in views:
        if v.mirrors and not flips:
            if v.name not in dropped:
                dropped.append(v.name)
        else:
            seen.setdefault(v.name, v)
    if not seen:
        raise PipelineError(f"tta: every view of {list(names)} mirrors or rotates and flips are off; "
                            "add identity (or scale_/five_crop) to the tta list, or set predict.tta_flips=true")
    return list(seen.values()), dropped


def flips_allowed(setting: bool | str, hflip_p: float, vflip_p: float) -> bool:
    """``predict.tta_flips``: ``auto`` keeps mirrored views only when training used flips."""
    if setting == "auto":
        return hflip_p > 0 or vflip_p > 0
    return bool(setting)


def merge_log_probs(log_probs: Tensor, method: str = "mean") -> Tensor:
    """Merge ``(V, N, C)`` per-view log-softmax into ``(N, C)`` probabilities.

    ``mean`` averages the probabilities; ``geometric`` averages the log-probabilities and
    renormalizes (a view that is confidently wrong counts more).
    """
    if method == "mean":
        return log_probs.exp().mean(0)
    if method == "geometric":
        return torch.softmax(log_probs.mean(0), dim=-1)
    raise PipelineError(f"predict.tta_merge: {method!r} is not mean or geometric")


STACK_IMAGES = 512  # most images in one stacked forward pass (views x batch), so memory stays bounded


def _forward_views(model: torch.nn.Module, x: Tensor, views: Sequence[View], autocast, channels_last: bool) -> Tensor:
    """``(V, B, C)`` log-softmax of the views of one batch.

    Views of the same output shape are concatenated and run in one forward pass (up to
    :data:`STACK_IMAGES` images): a batch of 32 through 8 views is then one pass of 256, not
    eight small ones that each pay the per-layer launch and dispatch costs. In eval mode each
    image's output does not depend on what else is in the batch, so the results are those of
    one pass per view (to float rounding).
    """
    xs = [view(x) for view in views]
    out: list[Tensor | None] = [None] * len(xs)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, xv in enumerate(xs):
        by_shape.setdefault(tuple(xv.shape), []).append(i)
    per_pass = max(1, STACK_IMAGES // max(len(x), 1))
    for members in by_shape.values():
        for start in range(0, len(members), per_pass):
            chunk = members[start:start + per_pass]
            xv = torch.cat([xs[i] for i in chunk]) if len(chunk) > 1 else xs[chunk[0]]
            if channels_last:
                xv = xv.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(xv)
            logp = torch.log_softmax(logits.float(), dim=-1)
            for i, part in zip(chunk, logp.split(len(x))):
                out[i] = part
    return torch.stack(out)


@torch.inference_mode()
def predict_views(model: torch.nn.Module, batches: Iterable, views: Sequence[View], *,
                  device: torch.device, amp: str = "auto", channels_last: bool = False,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  progress: bool = False, desc: str = "predict", to_cpu: bool = True) -> Tensor:
    """Log-softmax of every view for every image: a ``(V, N, C)`` float32 tensor, on the CPU (or left
    on ``device`` with ``to_cpu=False``, for a caller that gathers many batches before one transfer).

    Args:
        model: the classifier (put in eval mode here).
        batches: iterable of ``(images, targets)`` or image tensors ``(B, C, H, W)``: uint8 pixels
            (normalised on the device by ``mean``/``std``) or already normalised floats.
        views: from :func:`build_views`; applied to the normalised batch on the device.
    """
    from pipeline.data.device_input import DeviceInput
    from pipeline.engine.amp import resolve_amp
    from pipeline.progress import bar

    autocast = resolve_amp(amp, device).autocast  # the same precision rules as training
    to_input = DeviceInput(device, mean, std)
    model.eval()
    out: list[Tensor] = []
    it = bar(batches, desc=desc, leave=False, enabled=progress)
    for batch in it:
        x = to_input(batch[0] if isinstance(batch, (list, tuple)) else batch)
        out.append(_forward_views(model, x, views, autocast, channels_last))
    if not out:
        return torch.empty(len(views), 0, 0)
    logp = torch.cat(out, dim=1)
    return logp.cpu() if to_cpu else logp  # one transfer at the end, not a host sync per batch
