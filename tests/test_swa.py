"""Checkpoint averaging: the averaged weights are the mean of the epochs' weights, BatchNorm recomputed."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.engine.swa import Swa, swa_start_epoch


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))


def test_swa_weights_equal_the_mean_of_the_saved_ones(tmp_path):
    model = _net()
    swa = Swa(model, start_epoch=1)
    saved = []
    for epoch in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # stands in for an epoch of training
        if swa.end_epoch(model, epoch):
            saved.append(copy.deepcopy(model.state_dict()))
    assert swa.epochs == [1, 2, 3] and swa.n_averaged == 3
    for name, _ in model.named_parameters():
        mean = torch.stack([s[name] for s in saved]).mean(0)
        assert torch.allclose(swa.module.state_dict()[name], mean, atol=1e-6), name

    # BatchNorm statistics are recomputed for the averaged weights, not averaged
    data = [(torch.randn(8, 3, 6, 6), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    swa.update_bn(data, torch.device("cpu"))
    ref = copy.deepcopy(swa.module)
    conv = ref[0]
    with torch.no_grad():
        feats = [conv(x) for x, _ in data]
    bn = swa.module[1]
    # momentum None: the plain mean over batches of each batch's statistics
    assert torch.allclose(bn.running_mean, torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([f.var((0, 2, 3)) for f in feats]).mean(0), atol=1e-4)

    # the running average survives a save and load (its own file, not last.pt)
    swa.save(tmp_path / "swa.pt")
    again = Swa(_net(), start_epoch=1)
    again.load(tmp_path / "swa.pt")
    assert again.n_averaged == 3 and again.epochs == [1, 2, 3]
    for k, v in swa.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[k], v)


class _Cfg:
    def __init__(self, start_epoch=None, last_n=None):
        self.start_epoch, self.last_n = start_epoch, last_n


@pytest.mark.parametrize("cfg,expected", [(None, None), (_Cfg(), None), (_Cfg(start_epoch=7), 6),
                                          (_Cfg(last_n=3), 7), (_Cfg(last_n=20), 0), (_Cfg(start_epoch=50), 9)])
def test_start_epoch(cfg, expected):
    assert swa_start_epoch(cfg, 10) == expected
