"""Configuration: YAML file + ``--set dotted.key=value`` overrides, validated by pydantic.

Every stage turns its command line into a validated config object here and nowhere else.
Unknown keys, wrong types and bad values raise :class:`ConfigError` with one message that
names the key, the value and what is allowed.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
import string
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = "configs/default.yaml"


class ConfigError(ValueError):
    """A user-caused configuration problem; the message says what to fix."""


class _PathKey:
    """Marks a config key that holds a file or folder: relative values are read from the folder of
    the config file that wrote them (``--set`` values from the working folder); see :func:`load_config`."""

    def __repr__(self) -> str:
        return "PATH_KEY"


PATH_KEY = _PathKey()
PathStr = Annotated[str, PATH_KEY]


def _is_relative_path(value: Any) -> bool:
    if not isinstance(value, str) or not value.strip():
        return False
    text = value.strip()
    # Booleans written as text (model.pretrained: "true"), URLs and hub names are not files.
    if text.lower() in ("true", "false", "yes", "no", "none", "null", "0", "1") or ":" in text.split("/")[0]:
        return False
    return not Path(text).expanduser().is_absolute()


def _absolute(value: str, base: str | Path) -> str:
    # normpath, not resolve(): a symlinked data folder keeps the name the user gave it.
    return os.path.normpath(os.path.join(os.path.abspath(base), os.path.expanduser(value.strip())))


class Section(BaseModel):
    # coerce_numbers_to_str: `--set experiment=2024` or an id column named 0 are strings, not errors.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


def _make_paths_absolute(section: BaseModel, base: Path) -> None:
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if PATH_KEY in field.metadata and _is_relative_path(value):
            section.__dict__[name] = _absolute(value, base)  # __dict__: no re-validation loop
        elif isinstance(value, BaseModel):
            _make_paths_absolute(value, base)


def _plain_folder_name(v: str) -> str:
    if not v or "/" in v or "\\" in v or v.startswith(".") or ":" in v:
        raise ValueError("must be a plain folder name (no '/', '\\' or ':', not starting with '.')")
    return v


class PathsConfig(Section):
    work: PathStr = "work"
    runs: PathStr = "runs"
    submissions: PathStr = "submissions"
    packages: PathStr = "packages"


class CompetitionConfig(Section):
    name: str | None = None
    root: PathStr = "data/digits"
    train_csv: str = "train.csv"
    test_csv: str | None = "test.csv"
    # Where test ids come from: test_dir (file names without extension) when set, else test_csv,
    # else the sample submission.
    test_dir: str | None = None
    test_extensions: list[str] = [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"]
    sample_submission: str = "sample_submission.csv"
    id_column: str = "image"
    label_column: str = "label"
    train_image: str = "{id}"
    test_image: str = "{id}"
    submission_form: Literal["label", "probabilities"] = "label"
    metric: Literal["accuracy", "log_loss"] = "accuracy"
    solution: Annotated[str | None, PATH_KEY] = None
    # Label fixes (pipeline/label_fixes.py): a CSV image,label of corrections; a CSV of images to drop.
    relabel: Annotated[str | None, PATH_KEY] = None
    exclude: Annotated[str | None, PATH_KEY] = None
    build: Literal["digits"] | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str | None) -> str | None:
        return None if v is None else _plain_folder_name(v)

    @field_validator("train_image", "test_image")
    @classmethod
    def _template_has_id(cls, v: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"is not a valid path template ({exc}); write e.g. 'train/{{id}}.png'") from None
        if fields != {"id"}:
            raise ValueError("must contain the field {id} (the id column's value) and no other {...} field, "
                             "e.g. 'train/{id}.png' or '{id}' when the id is already the path")
        return v

    @property
    def slug(self) -> str:
        """Folder name under ``paths.work``: ``name``, else the name of ``root``."""
        return self.name or Path(self.root).resolve().name or "competition"


class DedupConfig(Section):
    # Candidates: pHash Hamming distance plus each image's nearest thumbnails; verification: the
    # correlation r of thumb_size^2 gray thumbnails, aligned over small crops. r >= sure_correlation
    # is a duplicate; r >= min_correlation only if 1 - r is at most neighbour_ratio times that of
    # the image's look-alikes (the first big jump among its `neighbours` nearest), so look-alikes
    # (two handwritten "1"s) are not merged. Defaults measured with benchmarks/dedup.py.
    phash_max_distance: int = Field(14, ge=0, le=64)
    min_correlation: float = Field(0.93, ge=-1.0, le=1.0)
    sure_correlation: float = Field(0.998, ge=-1.0, le=1.0)
    neighbour_ratio: float = Field(0.3, gt=0.0, le=1.0)
    neighbours: int = Field(16, ge=1)
    flat_std: float = Field(3.0, ge=0.0)
    flat_max_level_diff: float = Field(10.0, ge=0.0)
    thumb_size: int = Field(16, ge=4, le=128)
    align_crops: list[float] = [0.03, 0.06]  # centre crops compared too (fraction cut per side)
    align_side: float = Field(0.04, ge=0.0, lt=0.5)  # and crops of one side (0: none)
    mirror: bool = True  # a horizontally flipped copy is a duplicate too
    policy: Literal["keep_all", "keep_one"] = "keep_all"
    conflicts: Literal["drop", "majority", "keep"] = "drop"
    workers: int = Field(2, ge=0)
    sheet_groups: int = Field(12, ge=0)


class FoldsConfig(Section):
    k: int = Field(5, ge=2, le=50)
    seed: int = 42
    # A column of the train table (patient, site, session): its groups, joined with the duplicate
    # groups, never span two folds.
    group_column: str | None = None


class ModelConfig(Section):
    backbone: str = "resnet18"
    pretrained: Annotated[bool | str, PATH_KEY] = False
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

    @model_validator(mode="after")
    def _consistent(self) -> AugmentConfig:
        if self.ratio_min > self.ratio_max:
            raise ValueError(f"ratio_min {self.ratio_min} is larger than ratio_max {self.ratio_max}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs three values (R, G, B), got {getattr(self, name)}")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be positive, got {self.std}")
        return self


class SwaConfig(Section):
    # Average the weights at the end of each epoch from start_epoch (counted from 1) on, or of the
    # last last_n epochs; BatchNorm statistics are recomputed for the average. Both null: off.
    start_epoch: int | None = Field(None, ge=1)
    last_n: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0.0)  # SWALR's constant rate over the averaged epochs; null: the run's schedule
    anneal_epochs: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_way(self) -> SwaConfig:
        if self.start_epoch is not None and self.last_n is not None:
            raise ValueError("set start_epoch or last_n, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.start_epoch is not None or self.last_n is not None


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    # auto: from the competition's image sizes and the backbone's stride (pipeline/image_size.py).
    img_size: int | Literal["auto"] = 32
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
    # TensorFloat-32 for float32 matmuls and convolutions on CUDA GPUs (Ampere and newer): 10-bit
    # mantissa products, float32 sums; what runs outside autocast (amp=off, the float32 head) gets
    # the tensor cores. Set once when training or prediction starts; nothing on the CPU.
    tf32: bool = True
    sync_bn: bool = False
    early_stopping_patience: int = Field(0, ge=0)
    # wall time of the whole pipeline.run of the experiment ("15m", "1h30m", "90s"): the epochs are
    # chosen from a timed epoch so that every fold, prediction and TTA fit (engine/budget.py)
    time_budget: str | None = None
    # DataLoader worker processes; auto: min(CPU cores - 1, 8) per GPU process on CUDA, 0 on the CPU
    # (there the model's own threads use every core, and a worker competing with them was slower)
    num_workers: int | Literal["auto"] = "auto"
    cache_images: bool = True
    # false: drop last.pt (optimizer state and both weight copies) once the fold is complete; best.pt
    # stays. Saves most of a fold's disk, but --extend then has nothing to continue from.
    keep_last: bool = True
    augment: AugmentConfig = AugmentConfig()
    swa: SwaConfig = SwaConfig()

    @field_validator("time_budget")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        from pipeline.engine.budget import parse_duration

        parse_duration(v)
        return v

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be 0 or more, or auto")
        return v

    @field_validator("img_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 8:
            raise ValueError("must be at least 8 (pixels), or auto")
        return v


class CacheConfig(Section):
    """The resized-image cache (``python -m pipeline.prepare``): off while ``size`` is null."""

    # Short side in pixels after resizing (aspect kept; never enlarged). auto: 1.15 x train.img_size
    # (and at least what the eval resize needs), so random crops still have pixels to spare.
    size: int | Literal["auto"] | None = None
    # jpeg: quality-`jpeg_quality` files (small, a decode per read); png: lossless files;
    # memmap: one uint8 array with per-image offsets and shapes (no decode at all, the most disk).
    format: Literal["jpeg", "png", "memmap"] = "jpeg"
    jpeg_quality: int = Field(95, ge=50, le=100)
    workers: int = Field(0, ge=0)  # threads that build it; 0: one per CPU core

    @field_validator("size")
    @classmethod
    def _size_is_sane(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 8:
            raise ValueError("must be at least 8 pixels, 'auto' or null (no cache)")
        return v


TtaName = Literal[
    "identity", "hflip", "vflip", "transpose", "rot90", "rot180", "rot270", "transverse",
    "d4", "five_crop", "ten_crop", "scale_0.875", "scale_1.125", "scale_1.25",
    "zoom_0.875", "zoom_1.0625", "zoom_1.125", "zoom_1.25", "scale_1.15", "zoom_1.15",
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
    method: Literal["optimize", "caruana", "hill_climb", "stack", "fixed", "mean"] = "optimize"
    weights: dict[str, float] = {}
    caruana_iterations: int = Field(50, ge=1)
    # How weighted members are combined: softmax mean, mean of p**power (renormalised), or per-class ranks.
    merge: Literal["mean", "power", "rank"] = "mean"
    power: float = Field(2.0, gt=0.0)
    # hill_climb: mixing weights tried are step, 2*step, ..., 0.5; negative ones only when allowed
    # (they fit OOF noise).
    hill_climb_step: float = Field(0.01, gt=0.0, le=0.5)
    hill_climb_iterations: int = Field(100, ge=1)
    allow_negative: bool = False
    # stack: inverse L2 strength of the level-2 logistic regression.
    stack_c: float = Field(1.0, gt=0.0)
    use_tta: bool = True
    # Blend weights are chosen without the OOF rows competition.exclude lists (labels the audit says are
    # wrong would reward members that learnt them; stack's level-2 model too); true fits them on every row.
    # The CV table uses every row.
    fit_excluded: bool = False
    name: str | None = None


# What a Kaggle GPU/CPU image is assumed to provide (pip distribution names): the package's wheels
# are installed on top of these with pip --no-index, and the rehearsal's fresh venv sees exactly these.
KAGGLE_PROVIDED = ["torch", "torchvision", "timm", "albumentations", "opencv-python-headless", "scikit-learn",
                   "scipy", "pandas", "numpy", "pyyaml", "pydantic", "tqdm", "matplotlib", "wandb", "ipykernel"]


class PackageConfig(Section):
    """``pipeline.package``: what goes into an inference package and the target it must run on."""

    name: str | None = None  # folder under paths.packages; default: the submission's name
    dtype: Literal["float32", "float16"] = "float32"
    extra_wheels: list[str] = []  # dependencies the target image lacks (fetched with --with-deps)
    provided: list[str] = KAGGLE_PROVIDED
    python_version: str = "3.11"  # of the target image, for pip download --with-deps
    platform: str = "manylinux2014_x86_64"
    kaggle_input: str = "/kaggle/input"
    target: str = "cpu"  # t4x2 | p100 | cpu | <factor>: target seconds per local second
    limit: str = "9h"


class PseudoConfig(Section):
    # Test images with confident teacher predictions join training. `from` names teacher experiments
    # (fold k learns from the teacher's fold-k test predictions only) or a submission .json (all folds
    # mixed: CV becomes optimistic; accepted with a warning that is recorded).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              populate_by_name=True)
    source: list[str] | str | None = Field(None, alias="from")
    threshold: float = Field(0.9, ge=0.0, le=1.0)
    soft: bool = False
    weight: float = Field(1.0, gt=0.0)

    @property
    def enabled(self) -> bool:
        return bool(self.source)


class DistillConfig(Section):
    # The student learns from the teacher blend's OOF probabilities for its training images plus the labels.
    teacher: list[str] = []
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0)

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


class FinetuneConfig(Section):
    # A higher-resolution stage: each fold starts from fold k's best weights of experiment `from`
    # and trains at img_size for epochs at lr (these replace train.img_size/epochs/lr).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              populate_by_name=True)
    source: str | None = Field(None, alias="from")
    img_size: int | None = Field(None, ge=8)
    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0.0)

    @property
    def enabled(self) -> bool:
        return bool(self.source)


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "kaggle-pipeline"
    entity: str | None = None
    tags: list[str] = []


class SlurmConfig(Section):
    """submitit's Slurm executor settings: one array job over the folds, one array task per fold."""

    # auto: Slurm where sbatch exists, else submitit's local executor (real subprocesses on this machine).
    cluster: Literal["auto", "slurm", "local"] = "auto"
    partition: str | None = None
    gpus_per_node: int | None = Field(None, ge=0)  # GPUs of one fold's job; None: launcher.gpus_per_fold (0: CPU)
    cpus_per_task: int = Field(8, ge=1)
    mem_gb: float = Field(32.0, gt=0)
    timeout_min: int = Field(240, ge=1)
    array_parallelism: int = Field(32, ge=1)  # how many folds Slurm runs at once
    max_requeues: int = Field(3, ge=0)  # times a preempted or timed-out fold is requeued (resuming from last.pt)
    additional: dict[str, str | int] = {}  # more sbatch options, e.g. {account: myproj, qos: high}
    setup: list[str] = []  # shell lines run first in each job, e.g. "source .venv/bin/activate"
    job_name: str | None = None  # default: the experiment


class LauncherConfig(Section):
    """How ``pipeline.run`` runs the folds; none of these keys changes what a fold computes."""

    kind: Literal["local", "submitit"] = "local"
    parallel: int = Field(1, ge=1)  # local: folds at once (1: one after another in the pipeline.run process)
    gpus_per_fold: int = Field(1, ge=1)  # > 1: each fold runs DDP under torchrun over that many GPUs
    threads_per_fold: int | None = Field(None, ge=1)  # CPU threads of each fold; None: the cores / parallel
    slurm: SlurmConfig = SlurmConfig()


class RunConfig(Section):
    """What every run config has, classification and detection alike."""

    experiment: str = "run"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    paths: PathsConfig = PathsConfig()
    wandb: WandbConfig = WandbConfig()

    @field_validator("experiment")
    @classmethod
    def _experiment_is_a_folder_name(cls, v: str) -> str:
        return _plain_folder_name(v)

    @model_validator(mode="after")
    def _absolute_paths(self) -> RunConfig:
        # Every run config holds absolute paths, so a saved config.yaml means the same files wherever
        # it is read from. What is still relative here (defaults, --set values) is read from the
        # working folder; load_config has already read the file's own values from the file's folder.
        _make_paths_absolute(self, Path.cwd())
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Config(RunConfig):
    experiment: str = "digits_resnet18"
    competition: CompetitionConfig = CompetitionConfig()
    dedup: DedupConfig = DedupConfig()
    folds: FoldsConfig = FoldsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tta: list[TtaName] = ["identity"]
    predict: PredictConfig = PredictConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    package: PackageConfig = PackageConfig()
    pseudo: PseudoConfig = PseudoConfig()
    distill: DistillConfig = DistillConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    # Several seeds of this recipe as members of one experiment, averaged before blending.
    seeds: list[int] = []
    cache: CacheConfig = CacheConfig()
    launcher: LauncherConfig = LauncherConfig()


C = TypeVar("C", bound=BaseModel)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.epochs=3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: the key {key!r} is not a dotted key such as train.lr")
    if not raw.strip():
        return key.split("."), ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        # Not YAML (e.g. "{id}.png", an unclosed quote): take the text as written; the schema
        # still checks it, and a template needs no shell-hostile quoting.
        return key.split("."), raw.strip()
    if isinstance(value, dict) and ":" not in raw:
        # "{id}" parses as YAML's set form {id: null}; nobody means that on a command line.
        value = raw.strip()
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


def _error_key(loc: tuple, schema: type[BaseModel]) -> str:
    """Dotted key of a pydantic error location, without the union-member tags pydantic adds."""
    key, ann = "", schema
    for part in loc:
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if isinstance(part, int):
            key += f"[{part}]"
            ann = (get_args(ann) or (None,))[0]
        elif model is not None:  # a field, or an unknown key (extra_forbidden)
            key = f"{key}.{part}" if key else str(part)
            ann = model.model_fields[part].annotation if part in model.model_fields else None
        elif get_origin(ann) is dict:
            key += f".{part}"
            ann = (get_args(ann) or (None, None))[-1]
        # else: a union member tag such as 'bool' or "literal['auto']": not part of the key
    return key


def _leaf_keys(key: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaf_keys(f"{key}.{k}", v)]
    return [key]


def _section_fields(schema: type[BaseModel], key: str) -> list[str]:
    node: Any = schema
    for part in filter(None, key.split(".")):
        ann = node.model_fields[part].annotation if part in node.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        node = ann
    return sorted(node.model_fields)


def _format_errors(err: ValidationError, data: dict[str, Any], schema: type[BaseModel], source: str) -> str:
    known = _known_keys(schema)
    grouped: dict[str, list[dict]] = {}
    for e in err.errors():
        grouped.setdefault(_error_key(e["loc"], schema), []).append(e)
    lines = []
    for key, errs in grouped.items():
        value = errs[0].get("input")
        types = {e["type"] for e in errs}
        if "extra_forbidden" in types:
            typed = _leaf_keys(key, value)
            close = [m for t in typed for m in difflib.get_close_matches(t, known, n=1, cutoff=0.6)]
            close = list(dict.fromkeys(close or difflib.get_close_matches(key, known, n=3, cutoff=0.6)))
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            here = f" under '{parent}'" if parent else ""
            lines.append(f"unknown key '{typed[0] if len(typed) == 1 else key}'.{hint} "
                         f"Known keys{here}: {', '.join(_section_fields(schema, parent))}")
        elif types & {"model_type", "model_attributes_type", "dict_type"} and _section_fields(schema, key):
            fields = _section_fields(schema, key)
            lines.append(f"'{key}' = {value!r}: '{key}' is a section of keys ({', '.join(fields[:6])}"
                         f"{', ...' if len(fields) > 6 else ''}), not a value; set e.g. {key}.{fields[0]}=...")
        else:
            msgs = []
            for e in errs:
                if e["type"] == "literal_error":
                    msg = f"allowed values: {e.get('ctx', {}).get('expected', '')}"
                elif e["type"] == "list_type":
                    msg = "must be a list, e.g. [a, b] (quote it on a command line: --set 'key=[a, b]')"
                else:
                    msg = e["msg"].replace("Value error, ", "").replace("Input should be", "must be")
                    msg = msg.split(", unable to")[0]  # pydantic's parser detail says nothing more
                msgs.append(msg)
            text = " or ".join(dict.fromkeys(msgs))
            # A check across a section's keys: the whole section as "value" would only be noise.
            shown = f"'{key}'" if isinstance(value, dict) else f"'{key}' = {value!r}"
            lines.append(f"{shown}: {text}")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any], schema: type[C] = Config, source: str = "config") -> C:
    """Validate a plain dict into ``schema``, raising :class:`ConfigError` on any problem."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, data, schema, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str | int | float | bool):
            continue  # unhashable keys: construct_mapping reports them
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"found the key {key!r} twice; keep one",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def path_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of ``schema`` that hold a file or folder (declared with ``PATH_KEY``)."""
    keys = []
    for name, field in schema.model_fields.items():
        if PATH_KEY in field.metadata:
            keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(path_keys(ann, f"{prefix}{name}."))
    return keys


def absolute_path_values(flat: dict[str, Any], base: str | Path | None = None) -> dict[str, Any]:
    """A flattened config (``{"competition.root": ...}``) with relative values of path keys made
    absolute against ``base`` (the working folder): a config saved before configs held absolute
    paths then compares equal to today's."""
    from pipeline.detect.config import DetectConfig

    keys = set(path_keys(Config)) | set(path_keys(DetectConfig))
    base = Path.cwd() if base is None else base
    return {k: (_absolute(v, base) if k in keys and _is_relative_path(v) else v) for k, v in flat.items()}


def resolve_paths(data: dict[str, Any], schema: type[BaseModel], base: str | Path) -> dict[str, Any]:
    """A copy of ``data`` whose relative path values (keys of :func:`path_keys`) are made absolute
    against ``base``; other values are left as they are."""
    data = copy.deepcopy(data)
    for key in path_keys(schema):
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and _is_relative_path(node.get(leaf)):
            node[leaf] = _absolute(node[leaf], base)
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema: type[C] = Config,
    default_path: str = DEFAULT_CONFIG,
) -> C:
    """Read ``path`` (YAML), apply ``overrides`` and validate.

    Relative values of path keys (:func:`path_keys`: ``competition.root``, ``paths.runs``, ...) are
    made absolute: those written in the file against the file's folder, those of ``overrides`` and
    defaults against the working folder.

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
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    # Relative paths in the file are read from its folder, so a config beside its data works from
    # any working folder; --set values are typed at a prompt and read from the working folder.
    data = apply_overrides(resolve_paths(data, schema, path.parent), overrides or [])
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
                        help="override a config key, e.g. --set train.epochs=3 (repeatable; values are YAML; "
                             "relative paths are read from the working folder)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars and no per-epoch lines (results, warnings and errors still print)")
    return parser


def describe(cfg: BaseModel, config_path: str | Path, overrides: list[str] | None = None) -> str:
    """``using config X, competition Y (root), experiment Z``: which files a command works on."""
    n = len(overrides or [])
    parts = [f"using config {config_path}" + (f" with {n} --set override{'s' if n > 1 else ''}" if n else "")]
    comp = getattr(cfg, "competition", None)
    if comp is not None and hasattr(comp, "slug"):
        parts.append(f"competition {comp.slug} ({comp.root})")
    elif comp is not None and hasattr(comp, "root"):  # detection: a folder, no competition slug
        parts.append(f"data {comp.root}")
    if hasattr(cfg, "experiment"):
        parts.append(f"experiment {cfg.experiment}")
    return ", ".join(parts)


def config_from_args(args: argparse.Namespace, schema: type[C] = Config, announce: bool = True) -> C:
    """The validated config named by ``--config`` with the ``--set`` overrides of ``args``.

    With ``announce`` the command's first line (on stderr, so piped tables stay clean; rank 0 only
    under torchrun) says which config, competition and experiment it uses: without ``--config`` a
    command silently working on the default competition is a surprise.
    """
    from pipeline import progress

    if getattr(args, "quiet", False):
        progress.set_quiet(True)
    cfg = load_config(args.config, args.overrides, schema=schema)
    if announce and os.environ.get("RANK", "0") == "0":
        print(describe(cfg, args.config, args.overrides), file=sys.stderr, flush=True)
    return cfg
