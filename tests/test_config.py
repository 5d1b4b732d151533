"""Config: YAML + --set overrides, one clear message per problem, every shipped config validates."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    Config,
    ConfigError,
    add_config_args,
    apply_overrides,
    build_config,
    config_from_args,
    load_config,
    save_config,
)
from pipeline.errors import PipelineError, cli_entry

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "default.yaml"
# The detection recipes (*_ssd.yaml) have their own schema (tests/test_detect_readers.py validates them).
SHIPPED = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if not p.name.endswith("_ssd.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, Config) and cfg.experiment


def test_leaves_recipe_is_the_gpu_recipe():
    cfg = load_config(REPO / "configs" / "leaves_resnet50d.yaml")
    t = cfg.train
    assert (cfg.model.backbone, cfg.model.pretrained, t.img_size, t.batch_size) == ("resnet50d", True, 224, 64)
    assert t.optimizer == "adamw" and t.scheduler == "cosine" and t.warmup_epochs > 0
    assert t.mixup_alpha > 0 and t.cutmix_alpha > 0 and t.label_smoothing > 0 and t.ema
    assert t.augment.hflip > 0 and t.augment.vflip > 0 and cfg.tta == ["d4"]
    assert cfg.folds.k == 5 and t.num_workers == "auto" and 25 <= t.epochs <= 40
    assert cfg.competition.root == str(REPO / "data" / "classify-leaves") and cfg.competition.build is None


def test_overrides_are_yaml_scalars():
    cfg = load_config(DEFAULT, [
        "train.epochs=3", "train.lr=1e-4", "train.ema=true", "model.pretrained=weights/r18.pth",
        "tta=[identity, hflip]", "competition.test_csv=null", "experiment=2024",
        "competition.train_image={id}.png", "wandb.tags=[a, b]", " train.batch_size = 8 ",
    ])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-4) and cfg.train.ema is True
    assert cfg.model.pretrained == str(Path.cwd() / "weights" / "r18.pth")  # --set: the working folder
    assert cfg.tta == ["identity", "hflip"] and cfg.competition.test_csv is None
    assert cfg.experiment == "2024"  # a number where a name is expected is taken as text
    assert cfg.competition.train_image == "{id}.png"  # not YAML's {id: null}
    assert cfg.wandb.tags == ["a", "b"] and cfg.train.batch_size == 8
    # The last of two overrides of one key wins; the file itself is untouched.
    assert load_config(DEFAULT, ["train.epochs=3", "train.epochs=4"]).train.epochs == 4
    assert load_config(DEFAULT).train.epochs == yaml.safe_load(DEFAULT.read_text())["train"]["epochs"]


def test_apply_overrides_copies_and_creates_sections():
    data = {"train": {"epochs": 1}}
    out = apply_overrides(data, ["train.augment.hflip=0.5", "model.backbone=resnet10t"])
    assert out == {"train": {"epochs": 1, "augment": {"hflip": 0.5}}, "model": {"backbone": "resnet10t"}}
    assert data == {"train": {"epochs": 1}}


@pytest.mark.parametrize("override, expected", [
    ("trian.epochs=1", "unknown key 'trian.epochs'. Did you mean train.epochs?"),
    ("train.epoch=1", "unknown key 'train.epoch'. Did you mean train.epochs? Known keys under 'train': "),
    ("traim.augment.hfip=1", "Did you mean train.augment.hflip?"),
    ("train.epochs=abc", "'train.epochs' = 'abc': must be a valid integer"),
    ("train.epochs=2.5", "'train.epochs' = 2.5: must be a valid integer"),
    ("train.epochs=0", "'train.epochs' = 0: must be greater than or equal to 1"),
    ("train.optimizer=adamm", "'train.optimizer' = 'adamm': allowed values: 'adam', 'adamw' or 'sgd'"),
    ("tta=[identity, flip]", "'tta[1]' = 'flip': allowed values: 'identity', 'hflip'"),
    ("tta=hflip", "'tta' = 'hflip': must be a list"),
    ("model.pretrained=[1]", "'model.pretrained' = [1]: must be a valid boolean or must be a valid string"),
    ("train=3", "'train' = 3: 'train' is a section of keys"),
    ("ensemble.weights={a: x}", "'ensemble.weights.a' = 'x': must be a valid number"),
    ("train.augment.ratio_min=2", "'train.augment': ratio_min 2.0 is larger than ratio_max"),
    ("train.augment.mean=[0.5]", "mean needs three values"),
    ("experiment=runs/x", "'experiment' = 'runs/x': must be a plain folder name"),
    ("competition.train_image=train/x.png", "must contain the field {id}"),
    ("competition.test_image=test/{name}.png", "must contain the field {id}"),
    ("competition.test_image=test/{id.png", "is not a valid path template"),
    ("wandb.mode=online!", "'wandb.mode' = 'online!': allowed values: 'offline', 'online' or 'disabled'"),
])
def test_bad_overrides_name_key_value_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT, [override])
    msg = str(info.value)
    assert msg.startswith(f"invalid config ({DEFAULT} with --set overrides):")
    assert expected in msg
    assert len(msg.splitlines()) == 2  # one problem, one line


@pytest.mark.parametrize("override, expected", [
    ("train.epochs", "expected dotted.key=value"),
    ("=3", "is not a dotted key"),
    ("train..epochs=3", "is not a dotted key"),
    ("train.epochs.max=3", "'epochs' holds a value, not a section of keys"),
])
def test_malformed_overrides(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(DEFAULT, [override])


def test_several_problems_are_listed_together():
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT, ["train.epochs=0", "train.lr=-1", "model.backbon=x"])
    lines = str(info.value).splitlines()
    assert len(lines) == 4
    assert any("'train.epochs'" in x for x in lines) and any("'train.lr'" in x for x in lines)
    assert any("unknown key 'model.backbon'. Did you mean model.backbone?" in x for x in lines)


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist; pass --config PATH"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line 3, column 2: expected <block end"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of keys, not list"):
        load_config(bad)
    bad.write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line 4, column 3: found the key 'epochs' twice"):
        load_config(bad)
    bad.write_bytes("experiment: \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(bad)
    bad.write_text("trian:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"invalid config \(.*bad.yaml\):\n  unknown key 'trian.epochs'"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("\ufeff# only a comment\n")
    assert load_config(empty) == Config()


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(DEFAULT, ["train.epochs=2", "tta=[d4]", "model.pretrained=w.pth", "ensemble.weights={a: 0.5}"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert build_config(cfg.to_dict()) == cfg


def test_build_config_with_other_schema():
    from pipeline.config import TrainConfig

    assert build_config({"epochs": 2}, TrainConfig).epochs == 2
    with pytest.raises(ConfigError, match="unknown key 'epoch'. Did you mean epochs?"):
        build_config({"epoch": 2}, TrainConfig, source="train section")


def test_argparse_helpers(tmp_path):
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args(["--set", "train.epochs=2", "--set", "seed=7"])
    assert args.config == "configs/default.yaml"
    args.config = str(DEFAULT)
    cfg = config_from_args(args)
    assert cfg.train.epochs == 2 and cfg.seed == 7


def test_cli_entry_prints_one_line_and_exits_2(capsys):
    def main(argv):
        load_config(DEFAULT, argv)

    assert cli_entry(main, ["trian.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config") and "Traceback" not in err

    def fails(argv):
        raise PipelineError("folds.csv is missing; run python -m pipeline.folds")

    assert cli_entry(fails, []) == 2
    assert capsys.readouterr().err == "error: folds.csv is missing; run python -m pipeline.folds\n"
    assert cli_entry(lambda argv: None, []) == 0


def test_digits_command_help_and_typo_exit_code():
    out = subprocess.run([sys.executable, "-m", "pipeline.data.digits", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--force" in out.stdout and "planted.json" in out.stdout
