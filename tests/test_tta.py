"""TTA views and merging, checked on models whose outputs are known exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.tta import D4, build_views, flips_allowed, merge_log_probs, predict_views


class CornerModel(torch.nn.Module):
    """Logits = (value of the top-left pixel, value of the top-right pixel) of channel 0.

    Under hflip the two swap, so the per-view outputs are known in closed form.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1]], dim=1)


def _batch() -> torch.Tensor:
    x = torch.zeros(3, 1, 4, 4)
    x[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 2.0])   # left corner
    x[:, 0, 0, -1] = torch.tensor([1.0, 0.0, -1.0])  # right corner
    return x


def test_d4_views_are_the_eight_distinct_symmetries():
    views, dropped = build_views(["identity", "d4"])
    assert [v.name for v in views] == D4 and not dropped
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    outs = {tuple(v(x).flatten().tolist()) for v in views}
    assert len(outs) == 8  # all different, and each a permutation of the same pixels
    assert all(sorted(o) == list(range(16)) for o in outs)
    # transverse is the transpose about the anti-diagonal: rot90 of the transpose.
    t = dict((v.name, v) for v in views)
    assert torch.equal(t["transverse"](x), torch.rot90(x.transpose(-2, -1), 2, dims=(-2, -1)))


def test_mean_and_geometric_merge_match_hand_computation():
    views, _ = build_views(["identity", "hflip"])
    logp = predict_views(CornerModel(), [(_batch(), torch.zeros(3))], views, device=torch.device("cpu"))
    assert logp.shape == (2, 3, 2)
    a, b = _batch()[:, 0, 0, 0], _batch()[:, 0, 0, -1]
    p_id = torch.softmax(torch.stack([a, b], 1), 1)
    p_flip = torch.softmax(torch.stack([b, a], 1), 1)
    mean = merge_log_probs(logp, "mean")
    torch.testing.assert_close(mean, (p_id + p_flip) / 2)
    # identity and its mirror disagree symmetrically: the mean is exactly 0.5 / 0.5.
    torch.testing.assert_close(mean, torch.full((3, 2), 0.5))
    geo = merge_log_probs(logp, "geometric")
    g = torch.sqrt(p_id * p_flip)
    torch.testing.assert_close(geo, g / g.sum(1, keepdim=True))
    torch.testing.assert_close(geo.sum(1), torch.ones(3))


def test_geometric_mean_differs_from_mean_for_unequal_views():
    logp = torch.log(torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]]))
    mean = merge_log_probs(logp, "mean")[0]
    geo = merge_log_probs(logp, "geometric")[0]
    assert math.isclose(mean[0].item(), 0.7, rel_tol=1e-6)
    expected = math.sqrt(0.45) / (math.sqrt(0.45) + math.sqrt(0.05))
    assert math.isclose(geo[0].item(), expected, rel_tol=1e-6)


def test_flips_off_drops_every_mirrored_view_for_digits(make_cfg):
    cfg = make_cfg("tta=[identity,hflip,d4,ten_crop,scale_1.125]")
    assert cfg.train.augment.hflip == 0 and cfg.train.augment.vflip == 0  # digits are not mirror-symmetric
    flips = flips_allowed(cfg.predict.tta_flips, cfg.train.augment.hflip, cfg.train.augment.vflip)
    assert flips is False
    views, dropped = build_views(cfg.tta, flips=flips)
    names = [v.name for v in views]
    assert names == ["identity", "crop_tl", "crop_tr", "crop_bl", "crop_br", "crop_cc", "scale_1.125"]
    assert {"hflip", "vflip", "rot90", "transpose", "crop_cc+hflip"} <= set(dropped)
    assert flips_allowed(True, 0.0, 0.0) and not flips_allowed(False, 0.5, 0.0) and flips_allowed("auto", 0.5, 0)


def test_only_mirrored_views_with_flips_off_is_a_clear_error():
    with pytest.raises(PipelineError, match="flips are off"):
        build_views(["hflip"], flips=False)


def test_scale_and_crop_views_keep_batches_and_sizes():
    x = torch.randn(5, 3, 32, 32)
    views, _ = build_views(["scale_1.25", "scale_0.875", "five_crop"], crop_scale=1.25)
    by = {v.name: v for v in views}
    assert by["scale_1.25"](x).shape == (5, 3, 40, 40)
    assert by["scale_0.875"](x).shape == (5, 3, 28, 28)
    for pos in ("tl", "tr", "bl", "br", "cc"):
        assert by[f"crop_{pos}"](x).shape == (5, 3, 32, 32)
    # zoom keeps the input size, and so does scale for a fixed-size model
    fixed, _ = build_views(["scale_1.25", "scale_0.875"], fixed_size=True)
    zoom, _ = build_views(["zoom_1.25", "zoom_0.875"])
    assert all(v(x).shape == (5, 3, 32, 32) for v in fixed + zoom)
    # zoom_<s> is the center crop of five_crop at crop_scale s
    torch.testing.assert_close(zoom[0](x), by["crop_cc"](x))
    # a constant image stays constant under every view (interpolation and padding are sane)
    c = torch.full((2, 3, 32, 32), 0.7)
    for v in views + fixed + zoom:
        torch.testing.assert_close(v(c), torch.full_like(v(c), 0.7))


def test_unknown_tta_name_is_reported():
    with pytest.raises(PipelineError, match="unknown transform 'rot45'"):
        build_views(["rot45"])


def test_predict_views_stacks_the_views_of_a_batch_into_one_forward_pass(monkeypatch):
    import timm

    import pipeline.tta as tta

    model = timm.create_model("test_resnet", num_classes=4, pretrained=False).eval()
    views, _ = build_views(["identity", "hflip", "five_crop"])
    x = torch.randn(6, 3, 32, 32)
    calls = []
    model.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
    logp = predict_views(model, [(x[:4], None), (x[4:], None)], views, device=torch.device("cpu"))
    assert logp.shape == (7, 6, 4)
    assert calls == [4 * 7, 2 * 7]  # the 7 views of a batch in one pass, never one per image or per view
    with torch.no_grad():  # the same outputs as one forward pass per view
        direct = torch.stack([torch.log_softmax(model(v(x)), -1) for v in views])
    torch.testing.assert_close(logp, direct, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logp.exp().sum(-1).numpy(), 1.0, rtol=1e-5)

    # views of another shape (scale_ on a model that takes any size) get their own pass, and a stack
    # never exceeds STACK_IMAGES images
    monkeypatch.setattr(tta, "STACK_IMAGES", 12)
    views, _ = build_views(["identity", "hflip", "vflip", "scale_1.25"])
    calls.clear()
    logp = predict_views(model, [x], views, device=torch.device("cpu"))
    assert calls == [12, 6, 6]  # identity+hflip, then vflip (the cap), then the 40-px view
    with torch.no_grad():
        direct = torch.stack([torch.log_softmax(model(v(x)), -1) for v in views])
    torch.testing.assert_close(logp, direct, atol=1e-5, rtol=1e-5)
