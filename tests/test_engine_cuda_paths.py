"""What would break on CUDA, shown on the CPU: AMP rule, fp32 head under autocast, cuDNN autotune
kept through seeding, resume that loads to the CPU, restores this rank's RNG and skips an empty
scaler state, the process-group timeout."""
from __future__ import annotations

import copy
import datetime

import pytest
import timm
import torch
from timm.utils import ModelEmaV3

from pipeline.config import ModelConfig, TrainConfig
from pipeline.engine import amp as amp_mod
from pipeline.engine import distributed
from pipeline.engine.amp import resolve_amp
from pipeline.engine.checkpoint import rng_state, set_rng_state
from pipeline.engine.distributed import DistInfo
from pipeline.engine.fit import FitState, Parts, restore
from pipeline.engine.optim import create_optimizer
from pipeline.engine.seed import cudnn_autotune, seed_everything
from pipeline.errors import PipelineError
from pipeline.models import create_classifier


@pytest.mark.parametrize("capability,expected", [((7, 5), torch.float16), ((6, 0), torch.float16),
                                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_auto_is_bf16_from_compute_capability_8_else_fp16_with_a_scaler(monkeypatch, capability, expected):
    monkeypatch.setattr(amp_mod.torch.cuda, "get_device_capability", lambda device=None: capability)
    amp = resolve_amp("auto", torch.device("cuda", 0))
    assert amp.dtype is expected
    assert amp.needs_scaler == (expected is torch.float16)
    if capability < (8, 0):
        with pytest.raises(PipelineError, match="bf16"):
            resolve_amp("bf16", torch.device("cuda", 0))
    assert not resolve_amp("auto", torch.device("cpu")).enabled  # off on the CPU, both tracks


def test_classifier_head_runs_in_fp32_under_autocast_and_the_ema_copy_uses_its_own_head():
    torch.manual_seed(0)
    model = create_classifier(ModelConfig(backbone="test_resnet"), 5).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert logits.dtype == torch.float32
    head = model.get_classifier()
    expected = torch.nn.functional.linear(features.float(), head.weight, head.bias)
    torch.testing.assert_close(logits, expected)  # not bf16-rounded: the matmul ran in fp32
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(1.0)
        ema_out = ema.module(x)
    assert not torch.allclose(ema_out, torch.ones_like(ema_out))  # the copy did not call the original head
    assert torch.allclose(model(x), torch.ones(3, 5))


def test_seeding_keeps_cudnn_autotune(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seed_everything(3)
    assert torch.backends.cudnn.benchmark is True
    cudnn_autotune(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False


def _parts(scaler_enabled: bool):
    model = timm.create_model("test_resnet", num_classes=3)
    cfg = TrainConfig(scheduler="none")
    optimizer = create_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
    return Parts(model, model, optimizer, None, scaler, None)


def test_resume_skips_an_empty_scaler_state_and_old_gpu_rng_lists():
    """A last.pt made on the CPU (or with bf16) has no scaler state; an enabled fp16 scaler would
    reject it. An older checkpoint kept every GPU's RNG state as a list."""
    made = _parts(scaler_enabled=False)
    state = rng_state()
    ckpt = {"model": made.bare.state_dict(), "ema": None, "optimizer": made.optimizer.state_dict(),
            "scheduler": None, "scaler": made.scaler.state_dict(), "rng": {**state, "cuda": [torch.zeros(8)]},
            **FitState(epoch=1, num_updates=4, best_score=[0.5], best_epoch=0, best_metric=0.5).to_checkpoint(),
            "epoch": 0}
    assert ckpt["scaler"] == {}
    resumed = restore(_parts(scaler_enabled=True), copy.deepcopy(ckpt), DistInfo())
    assert resumed.epoch == 1 and resumed.num_updates == 4
    set_rng_state(ckpt["rng"], torch.device("cpu"))  # no CUDA here: the GPU list is left alone


def test_each_rank_restores_its_own_rng_state():
    parts = _parts(False)
    torch.manual_seed(1)
    rank0 = rng_state()
    torch.manual_seed(2)
    rank1 = rng_state()
    ckpt = {"model": parts.bare.state_dict(), "optimizer": parts.optimizer.state_dict(), "scaler": {},
            "rng": rank0, "rng_ranks": [rank0, rank1], "epoch": 0, **FitState().to_checkpoint()}
    restore(parts, ckpt, DistInfo(rank=1, world_size=2))
    a = torch.rand(3)
    torch.manual_seed(2)
    assert torch.equal(a, torch.rand(3))
    restore(parts, ckpt, DistInfo(rank=0, world_size=3))  # another world size: the saved rank-0 state
    b = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(b, torch.rand(3))


def test_process_group_timeout_outlasts_rank0_only_work(monkeypatch):
    """Rank 0 alone runs dedup/folds first and predict/ensemble last while the others wait; the
    default 10-minute NCCL watchdog would kill them on a large competition."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    info = distributed.init_distributed("cpu")
    assert info.rank == 1 and seen["backend"] == "gloo"
    assert seen["timeout"] >= datetime.timedelta(hours=1)
    monkeypatch.setenv("PIPELINE_DIST_TIMEOUT_MIN", "5")
    distributed.init_distributed("cpu")
    assert seen["timeout"] == datetime.timedelta(minutes=5)
