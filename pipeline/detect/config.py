"""The detection track's config schema, built from the shared sections of ``pipeline.config``."""
from __future__ import annotations

import os
import sys
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import PATH_KEY, PathStr, RunConfig, Section

DEFAULT_DETECT_CONFIG = "configs/banana_ssd.yaml"


class DetectCompetitionConfig(Section):
    """Where the detection data is: ``competition.root``, the key classification uses too."""

    root: PathStr = "data/shapes"
    # The reader (design.md's competition.format); data.format, the first name, is still read.
    format: Literal["banana", "coco", "yolo", "voc"] | None = None


class DetectDataConfig(Section):
    # The old name of competition.root: accepted with a message and moved there, so always None
    # after validation (the readers take the folder from competition.root).
    root: Annotated[str | None, PATH_KEY] = None
    # banana: label.csv per split; coco: instances JSON; yolo: labels/*.txt; voc: Annotations/*.xml
    format: Literal["banana", "coco", "yolo", "voc"] = "banana"
    train: str = "train"
    val: str = "val"
    test: str | None = "test"
    # Where a split's images and labels are: a value holding {split} is relative to root, any
    # other to <root>/<split>/; null tries the format's usual places (pipeline/detect/layout.py).
    images: str | None = None
    labels: str | None = None
    # yolo: the class names (data.yaml `names`, or one name per line); null tries data.yaml,
    # dataset.yaml, classes.txt, obj.names in root
    classes_file: str | None = None
    # Labels of the test split kept outside the competition folder (as Kaggle keeps its solution).
    test_labels: Annotated[str | None, PATH_KEY] = "data/shapes_private/test/label.csv"
    classes: list[str] | None = None
    build: Literal["shapes"] | None = None
    cache_images: bool = True


class DetectModelConfig(Section):
    arch: Literal["tiny_ssd", "timm_ssd"] = "tiny_ssd"
    backbone: str = "resnet18"
    pretrained: Annotated[bool | str, PATH_KEY] = False
    img_size: int = Field(256, ge=32)
    # auto: shapes fitted to the training boxes by k-means (IoU distance); training writes them
    # to anchor_shapes (per feature map, per anchor [width, height] as fractions of the input)
    anchors: Literal["d2l", "torchvision", "auto"] = "d2l"
    anchor_shapes: list[list[list[float]]] | None = None
    min_size: float = Field(0.2, gt=0.0, le=1.0)
    max_size: float = Field(0.88, gt=0.0, le=1.5)
    ratios: list[float] = [1.0, 2.0, 0.5]
    extra_blocks: int = Field(3, ge=0, le=6)
    extra_channels: int = Field(256, ge=8)
    width: int = Field(1, ge=1, le=8)

    @field_validator("anchor_shapes")
    @classmethod
    def _shapes_are_pairs(cls, v: list[list[list[float]]] | None) -> list[list[list[float]]] | None:
        if v is None:
            return v
        if not v or any(not level or len(level) != len(v[0]) for level in v):
            raise ValueError("must list, per feature map, the same number of [width, height] pairs")
        if any(len(wh) != 2 or min(wh) <= 0 for level in v for wh in level):
            raise ValueError("every anchor shape must be [width, height] with both > 0 (fractions of the input)")
        return v

    @field_validator("ratios")
    @classmethod
    def _ratios_positive(cls, v: list[float]) -> list[float]:
        if not v or any(r <= 0 for r in v):
            raise ValueError("must be a non-empty list of positive aspect ratios, e.g. [1, 2, 0.5]")
        return v


class DetectAugmentConfig(Section):
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    crop: float = Field(0.5, ge=0.0, le=1.0)
    zoom_out: float = Field(0.3, ge=0.0, le=1.0)
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)
    mean: list[float] = [0.485, 0.456, 0.406]
    std: list[float] = [0.229, 0.224, 0.225]


class DetectTrainConfig(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    min_lr: float = Field(1e-5, ge=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["cosine", "none"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    iou_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    loss: Literal["hard_negative", "focal", "plain"] = "hard_negative"
    neg_pos_ratio: float = Field(3.0, gt=0.0)
    focal_alpha: float = Field(0.25, ge=0.0, le=1.0)
    focal_gamma: float = Field(2.0, ge=0.0)
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    box_weight: float = Field(1.0, ge=0.0)
    clip_grad: float | None = Field(10.0, gt=0.0)
    warmup_lr: float = Field(1e-5, ge=0.0)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA GPUs that have it (as train.tf32 in classification)
    # EMA of the weights (timm ModelEmaV3, decay warmed up from 0): judged, saved as best and used
    # by evaluate and predict when on, as in classification.
    ema: bool = False
    ema_decay: float = Field(0.998, gt=0.0, lt=1.0)
    num_workers: int = Field(0, ge=0)
    eval_every: int = Field(1, ge=1)
    max_minutes: float | None = Field(None, gt=0.0)
    # wall time for the whole training ("10m", "1h30m", "90s"): picks the epochs (engine/budget.py)
    time_budget: str | None = None

    @field_validator("time_budget")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        from pipeline.engine.budget import parse_duration

        parse_duration(v)
        return v
    augment: DetectAugmentConfig = DetectAugmentConfig()


class DetectPostConfig(Section):
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    eval_score_threshold: float = Field(0.01, ge=0.0, le=1.0)
    nms_iou: float = Field(0.45, gt=0.0, le=1.0)
    pre_nms_topk: int = Field(400, ge=1)
    max_detections: int = Field(100, ge=1)
    class_agnostic: bool = False


class DetectPredictConfig(Section):
    split: str | None = None  # None: data.test
    batch_size: int = Field(32, ge=1)
    draw: bool = False
    draw_max: int = Field(16, ge=1)


class DetectTtaConfig(Section):
    # null: flip only when training flipped (train.augment.hflip > 0); true/false to force it
    hflip: bool | None = None
    scales: list[float] = [1.0]  # input sizes as multiples of model.img_size
    fusion: Literal["wbf", "nms"] = "wbf"  # weighted box fusion, or NMS over the views' boxes
    iou: float = Field(0.55, gt=0.0, le=1.0)  # boxes of one class overlapping this much are merged
    skip_score: float = Field(0.0, ge=0.0, le=1.0)  # boxes below this score are left out of fusion
    conf_type: Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"] = "avg"

    @field_validator("scales")
    @classmethod
    def _scales_positive(cls, v: list[float]) -> list[float]:
        if not v or any(s <= 0 or s > 4 for s in v):
            raise ValueError("must be a non-empty list of scales in (0, 4], e.g. [1.0] or [0.8, 1.0, 1.2]")
        return v


class DetectEnsembleConfig(Section):
    # other experiments whose models join this one's (same classes), merged by tta.fusion
    experiments: list[str] = []
    weights: list[float] | None = None  # this experiment first, then the listed ones; null: equal


class DetectSubmissionConfig(Section):
    # boxes: a row per box (image,label,score,xmin,ymin,xmax,ymax); prediction_string: a row per image
    form: Literal["boxes", "prediction_string"] = "boxes"
    prediction_string: str = "{score} {xmin} {ymin} {width} {height}"  # per box; fields in submission.py
    coordinates: Literal["pixels", "normalized"] = "pixels"
    id_column: str = "image_id"
    prediction_column: str = "PredictionString"
    image_id: Literal["stem", "name"] = "stem"  # an image's id: file name without extension, or with
    sample_submission: str | None = None  # relative to competition.root; ids and order are checked against it

    @field_validator("prediction_string")
    @classmethod
    def _template(cls, v: str) -> str:
        from pipeline.detect.submission import check_template

        return check_template(v)


class DetectConfig(RunConfig):
    experiment: str = "shapes_tinyssd"
    competition: DetectCompetitionConfig = DetectCompetitionConfig()
    data: DetectDataConfig = DetectDataConfig()
    model: DetectModelConfig = DetectModelConfig()
    train: DetectTrainConfig = DetectTrainConfig()
    post: DetectPostConfig = DetectPostConfig()
    predict: DetectPredictConfig = DetectPredictConfig()
    tta: DetectTtaConfig = DetectTtaConfig()
    ensemble: DetectEnsembleConfig = DetectEnsembleConfig()
    submission: DetectSubmissionConfig = DetectSubmissionConfig()

    @model_validator(mode="before")
    @classmethod
    def _data_root_is_competition_root(cls, data: Any) -> Any:
        """``data.root`` (the old key) becomes ``competition.root``, with a message when they differ."""
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            return data
        old = data["data"].get("root")
        if old is None:
            return data
        comp = dict(data.get("competition") or {})
        if comp.get("root") is None or os.path.normpath(str(comp["root"])) != os.path.normpath(str(old)):
            print(f"config: data.root is deprecated; the detection data folder is competition.root, as in "
                  f"classification. Using competition.root={old}", file=sys.stderr)
            comp["root"] = old
        return {**data, "competition": comp, "data": {k: v for k, v in data["data"].items() if k != "root"}}

    @model_validator(mode="after")
    def _mirror_format(self) -> DetectConfig:
        fmt, old = self.competition.format, self.data.format
        if fmt is None:
            self.competition.__dict__["format"] = old
        elif old != "banana" and old != fmt:
            raise ValueError(f"competition.format is {fmt!r} but data.format is {old!r}: set competition.format "
                             "only (data.format is its old name)")
        else:
            self.data.__dict__["format"] = fmt  # the old key kept equal (the readers read competition.format)
        return self
