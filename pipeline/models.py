"""Classifier factory: any timm backbone with a fresh head for the competition's classes."""
from __future__ import annotations

import difflib
import types
from pathlib import Path

import timm
import torch

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError


def close_model_names(name: str, n: int = 5) -> list[str]:
    """timm model names that look like ``name`` (for "did you mean" messages)."""
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    if len(close) < n:
        # A substring match catches "resnet" -> "resnet18" where edit distance is too strict.
        close += [m for m in timm.list_models(f"*{name}*") if m not in close][: n - len(close)]
    return close


def _pretrained_source(pretrained: bool | str) -> bool | Path:
    """``False``/``True``, or the local weights file (strings "true"/"false" count as booleans)."""
    if isinstance(pretrained, bool):
        return pretrained
    text = str(pretrained).strip()
    if text.lower() in ("", "false", "no", "none", "0"):
        return False
    if text.lower() in ("true", "yes", "1"):
        return True
    path = Path(text).expanduser()
    if not path.is_file():
        raise PipelineError(f"model.pretrained = {text!r}: no such weights file; give an existing .pth/.pt/"
                            ".safetensors file, true (download from the hub) or false (random init)")
    return path


def create_classifier(model_cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """Build ``model_cfg.backbone`` from timm with ``num_classes`` outputs.

    Args:
        model_cfg: the ``model`` config section (backbone, pretrained, drop_rate, drop_path_rate).
        num_classes: size of the new classification head.

    Raises:
        PipelineError: unknown backbone (lists close timm names), or pretrained weights that cannot
            be had (no network, no weights for this model, unreadable or mismatched file).
    """
    name = model_cfg.backbone
    if not timm.is_model(name):
        close = close_model_names(name)
        hint = f" Close timm names: {', '.join(close)}." if close else ""
        raise PipelineError(f"model.backbone = {name!r} is not a timm model.{hint} "
                            "List all with python -c \"import timm; print(timm.list_models('*name*'))\"")
    source = _pretrained_source(model_cfg.pretrained)
    kwargs: dict = {"num_classes": num_classes, "drop_rate": model_cfg.drop_rate}
    # Not every architecture takes drop_path_rate; pass it only when asked for.
    if model_cfg.drop_path_rate > 0:
        kwargs["drop_path_rate"] = model_cfg.drop_path_rate
    if isinstance(source, Path):
        kwargs["pretrained_cfg_overlay"] = {"file": str(source)}
    try:
        model = timm.create_model(name, pretrained=bool(source), **kwargs)
    except TypeError as exc:
        if "drop_path_rate" in str(exc):
            raise PipelineError(f"model.backbone {name!r} does not support drop path; "
                                "use --set model.drop_path_rate=0") from None
        raise
    except Exception as exc:
        if not source:
            raise
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:3])[:300]
        if isinstance(source, Path):
            advice = "Check that the file holds weights of this backbone (set model.backbone to match it)."
            where = f"the file {source}"
        else:
            advice = ("Without network access set model.pretrained to a local weights file, or false to "
                      "start from random weights.")
            where = "the timm / Hugging Face hub"
        raise PipelineError(
            f"model.pretrained: could not load weights for {name!r} from {where} "
            f"({type(exc).__name__}: {detail}). {advice}"
        ) from None
    if isinstance(source, Path):
        _check_file_matched(model, source)
    return head_in_fp32(model)


def _fp32_forward(self: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        return type(self).forward(self, x.float(), *args, **kwargs)


def head_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Run the classification head in float32 even under autocast.

    Under bf16 autocast the logits would be rounded to 8 bits of mantissa, and with them the OOF
    probabilities, the log loss that picks the best epoch and the ensemble weights chosen on them.
    The head is a small share of the compute. The forward is bound as a method (not a closure) so
    that a deep copy, such as the EMA's, runs its own head.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Module) and any(True for _ in head.parameters()):
        head.forward = types.MethodType(_fp32_forward, head)
    return model


def load_classifier(model_cfg: ModelConfig, num_classes: int, state: dict[str, torch.Tensor],
                    source: str) -> torch.nn.Module:
    """``model_cfg.backbone`` with ``num_classes`` outputs holding the weights ``state`` (CPU, eval mode).

    The one way a trained model is rebuilt, by ``pipeline.predict`` from a fold's checkpoint and by
    ``pipeline.infer`` from a package: float16 weights are copied into the float32 model.

    Raises:
        PipelineError: the weights do not fit the backbone and class count (names ``source``).
    """
    # No pretrained download: the state dict holds every weight.
    model = create_classifier(model_cfg.model_copy(update={"pretrained": False}), num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PipelineError(f"{source}: the weights do not fit {model_cfg.backbone} with {num_classes} classes "
                            f"({str(exc).splitlines()[0]}); retrain the fold") from None
    return model.eval()


def _check_file_matched(model: torch.nn.Module, path: Path) -> None:
    """timm loads a file non-strictly when the head is replaced; make sure the body did load."""
    from timm.models import load_state_dict

    loaded = set(load_state_dict(str(path)).keys())
    head = {f"{prefix}." for prefix in _as_tuple(model.pretrained_cfg.get("classifier"))}
    missing = [k for k in model.state_dict() if k not in loaded and not any(k.startswith(h) for h in head)]
    if missing:
        raise PipelineError(
            f"model.pretrained = {str(path)!r}: the file has no weights for {len(missing)} tensors of "
            f"{model.pretrained_cfg.get('architecture', 'the model')} (e.g. {', '.join(missing[:3])}); "
            "is it a checkpoint of another backbone? Set model.backbone to match it."
        )


def _as_tuple(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def head_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the classification head (timm's ``get_classifier()``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, torch.nn.Module):
        return list(head.parameters())
    return []
