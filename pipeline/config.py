"""Configuration: YAML file + ``--set dotted.key=value`` overrides, validated by pydantic.

Every stage turns its command line into a validated config object here and nowhere else.
Unknown keys, wrong types and bad values raise :class:`ConfigError` with one message that
names the key, the value and what is allowed.
"""
from __future__ import annotations

import argparse
import copy
import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG = "configs/default.yaml"


class ConfigError(ValueError):
    """A user-caused configuration problem; the message says what to fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(Section):
    work: str = "work"
    runs: str = "runs"
    submissions: str = "submissions"


class CompetitionConfig(Section):
    name: str | None = None
    root: str = "data/digits"
    train_csv: str = "train.csv"
    test_csv: str | None = "test.csv"
    test_dir: str | None = None
    test_extensions: list[str] = [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"]
    sample_submission: str = "sample_submission.csv"
    id_column: str = "image"
    label_column: str = "label"
    train_image: str = "{id}"
    test_image: str = "{id}"
    submission_form: Literal["label", "probabilities"] = "label"
    metric: Literal["accuracy", "log_loss"] = "accuracy"
    solution: str | None = None
    build: Literal["digits"] | None = None

    @property
    def slug(self) -> str:
        return self.name or Path(self.root).name


class DedupConfig(Section):
    phash_max_distance: int = Field(12, ge=0, le=64)
    min_correlation: float = Field(0.95, ge=-1.0, le=1.0)
    thumb_size: int = Field(16, ge=4, le=128)
    policy: Literal["keep_all", "keep_one"] = "keep_all"
    conflicts: Literal["drop", "majority", "keep"] = "drop"
    workers: int = Field(2, ge=0)


class FoldsConfig(Section):
    k: int = Field(5, ge=2, le=50)
    seed: int = 42


class ModelConfig(Section):
    backbone: str = "resnet18"
    pretrained: bool | str = False
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    head_lr_mult: float = Field(1.0, gt=0.0)


class AugmentConfig(Section):
    scale_min: float = Field(0.08, gt=0.0, le=1.0)
    ratio_min: float = Field(0.75, gt=0.0)
    ratio_max: float = Field(1.3333, gt=0.0)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    rotate: float = Field(0.0, ge=0.0, le=180.0)
    color_jitter: float = Field(0.0, ge=0.0, le=1.0)
    mean: list[float] = [0.485, 0.456, 0.406]
    std: list[float] = [0.229, 0.224, 0.225]
    eval_crop_pct: float = Field(1.0, gt=0.0, le=1.0)


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    img_size: int = Field(32, ge=8)
    lr: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    scheduler: Literal["cosine", "none"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    warmup_lr: float = Field(1e-5, ge=0.0)
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0)
    mixup_switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    mixup_off_epoch: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    accum_steps: int = Field(1, ge=1)
    clip_grad: float | None = Field(None, gt=0.0)
    ema: bool = False
    ema_decay: float = Field(0.998, gt=0.0, lt=1.0)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    early_stopping_patience: int = Field(0, ge=0)
    num_workers: int = Field(0, ge=0)
    cache_images: bool = True
    augment: AugmentConfig = AugmentConfig()


TtaName = Literal[
    "identity", "hflip", "vflip", "transpose", "rot90", "rot180", "rot270", "transverse",
    "d4", "five_crop", "ten_crop", "scale_0.875", "scale_1.125", "scale_1.25",
]


class PredictConfig(Section):
    batch_size: int = Field(256, ge=1)
    tta_merge: Literal["mean", "geometric"] = "mean"
    # auto: keep mirrored/rotated TTA views only if training flipped images (digits, text: it did not).
    tta_flips: bool | Literal["auto"] = "auto"
    crop_scale: float = Field(1.125, ge=1.0, le=2.0)
    use_ema: bool = True


class EnsembleConfig(Section):
    experiments: list[str] = []
    method: Literal["optimize", "caruana", "fixed", "mean"] = "optimize"
    weights: dict[str, float] = {}
    caruana_iterations: int = Field(50, ge=1)
    use_tta: bool = True
    name: str | None = None


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "kaggle-pipeline"
    entity: str | None = None
    tags: list[str] = []


class Config(Section):
    experiment: str = "digits_resnet18"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    paths: PathsConfig = PathsConfig()
    competition: CompetitionConfig = CompetitionConfig()
    dedup: DedupConfig = DedupConfig()
    folds: FoldsConfig = FoldsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tta: list[TtaName] = ["identity"]
    predict: PredictConfig = PredictConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    wandb: WandbConfig = WandbConfig()

    @field_validator("experiment")
    @classmethod
    def _experiment_is_a_folder_name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


C = TypeVar("C", bound=BaseModel)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.epochs=3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: the key {key!r} is not a dotted key such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value {raw!r} is not valid YAML ({exc})") from None
    return key.split("."), value


def _known_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in schema.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, full + "."))
    return keys


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` applied (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        parts, value = _parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} holds a value, not a section of keys")
            node = child
        node[parts[-1]] = value
    return data


def _format_errors(err: ValidationError, data: dict[str, Any], schema: type[BaseModel], source: str) -> str:
    known = _known_keys(schema)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            siblings = [k.rsplit(".", 1)[-1] for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
            lines.append(f"unknown key '{key}'.{hint} Known keys here: {', '.join(sorted(siblings))}")
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"'{key}' = {value!r} is not allowed; allowed values: {allowed}")
        else:
            lines.append(f"'{key}' = {value!r}: {e['msg']}")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any], schema: type[C] = Config, source: str = "config") -> C:
    """Validate a plain dict into ``schema``, raising :class:`ConfigError` on any problem."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, data, schema, source)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema: type[C] = Config,
    default_path: str = DEFAULT_CONFIG,
) -> C:
    """Read ``path`` (YAML), apply ``overrides`` and validate.

    Args:
        path: YAML file; ``None`` means ``default_path``.
        overrides: ``dotted.key=value`` strings, values parsed as YAML scalars.
        schema: the pydantic model to validate against.
        default_path: used when ``path`` is None.
    """
    path = Path(path or default_path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config PATH to an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    return build_config(data, schema, source=str(path) + (" with --set overrides" if overrides else ""))


def save_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    from pipeline.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def add_config_args(parser: argparse.ArgumentParser, default_path: str = DEFAULT_CONFIG) -> argparse.ArgumentParser:
    """Add the ``--config`` and ``--set`` options every command takes."""
    parser.add_argument("--config", default=default_path, metavar="PATH",
                        help=f"YAML config file (default: {default_path})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable; values are YAML)")
    return parser


def config_from_args(args: argparse.Namespace, schema: type[C] = Config) -> C:
    return load_config(args.config, args.overrides, schema=schema)
