"""train.img_size: auto picks a size from the images and the backbone's stride, and says why."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.image_size import backbone_geometry, choose_img_size, resolve_img_size


@pytest.mark.parametrize("native,expected", [(32, 128), (150, 160), (600, 224), (None, 224)])
def test_choice_by_native_size(native, expected):
    size, why = choose_img_size(native, stride=32, recipe=224, fixed=False)
    assert size == expected and why


def test_small_images_are_upscaled_for_a_useful_feature_map():
    size, why = choose_img_size(32, stride=32, recipe=224, fixed=False)
    assert size == 128 and "1x1" in why and "4x4" in why


def test_fixed_size_backbones_keep_their_size():
    assert choose_img_size(32, 16, 224, fixed=True)[0] == 224


def test_geometry_of_real_timm_backbones():
    assert backbone_geometry("resnet10t") == (32, 176, False)


def test_auto_resolves_on_the_digits(make_cfg, capsys):
    cfg = resolve_img_size(make_cfg("train.img_size=auto"))
    assert cfg.train.img_size == 128  # 32 px digits through a stride-32 ResNet
    assert "auto -> 128 px" in capsys.readouterr().out
    assert make_cfg("train.img_size=48").train.img_size == 48
    with pytest.raises(ConfigError, match="img_size"):
        load_config(None, ["train.img_size=4"])
