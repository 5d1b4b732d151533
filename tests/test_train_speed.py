"""The train loop's speed settings: uint8 loaders normalised on the device (the same model input as the
CPU-normalised path), num_workers auto, TF32, fused AdamW."""
from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import AugmentConfig
from pipeline.data.device_input import DeviceInput
from pipeline.data.transforms import eval_transform, train_transform
from pipeline.engine.amp import resolve_amp
from pipeline.engine.distributed import DistInfo
from pipeline.engine.loop import classification_loss, validate

CPU = torch.device("cpu")
AUG = AugmentConfig(hflip=0.5, rotate=15, color_jitter=0.3, scale_min=0.5, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


def _images(n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 3 * i, 36, 3), dtype=np.uint8) for i in range(n)]


def _batch(transform, images, seed: int = 7) -> torch.Tensor:
    out = []
    for i, img in enumerate(images):  # the same per-image seeding as SeededAugment
        rng = np.random.default_rng([seed, i])
        transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        out.append(transform(image=img)["image"])
    return torch.stack(out)


@pytest.mark.parametrize("make", [train_transform, eval_transform])
def test_device_normalised_batch_equals_the_cpu_normalised_one(make):
    images = _images()
    old = _batch(make(24, AUG, normalize=True), images)
    new = _batch(make(24, AUG), images)
    assert old.dtype == torch.float32 and new.dtype == torch.uint8  # a quarter of the bytes to the device
    for channels_last in (False, True):
        x = DeviceInput(CPU, AUG.mean, AUG.std, channels_last=channels_last)(new)
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(x, old, atol=1e-5, rtol=1e-5)
    # float batches are taken as normalised; uint8 ones without a mean/std are refused
    assert DeviceInput(CPU, AUG.mean, AUG.std)(old) is old
    with pytest.raises(ValueError, match="mean and std"):
        DeviceInput(CPU)(new)


def test_mixup_gets_the_normalised_batch_already_channels_last():
    """channels_last is made once, on the uint8 batch, before Mixup; not a second copy after it."""
    seen = {}
    mixup = Mixup(mixup_alpha=0.4, cutmix_alpha=0.4, num_classes=4)

    def recording_mixup(x, y):
        seen["mixup_in"] = x.clone()
        return mixup(x, y)

    model = timm.create_model("test_resnet", num_classes=4).to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(lambda m, inp: seen.setdefault("model_in", inp[0]))
    loss_fn = classification_loss(SoftTargetCrossEntropy(), amp=resolve_amp("off", CPU), device=CPU,
                                  mixup=recording_mixup, channels_last=True, mean=AUG.mean, std=AUG.std)
    batch = _batch(train_transform(24, AUG), _images())
    loss_fn(model, (batch, torch.tensor([0, 1, 2, 3, 0, 1])))
    expected = DeviceInput(CPU, AUG.mean, AUG.std)(batch)
    assert seen["mixup_in"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(seen["mixup_in"], expected)
    assert seen["model_in"].is_contiguous(memory_format=torch.channels_last)


def test_validate_on_uint8_batches_equals_validate_on_normalised_floats():
    images = _images(10)
    tf = eval_transform(24, AUG)
    raw, old = _batch(tf, images), _batch(eval_transform(24, AUG, normalize=True), images)
    y = torch.arange(10) % 4
    model = timm.create_model("test_resnet", num_classes=4).eval()
    amp = resolve_amp("off", CPU)
    new = validate(model, DataLoader(TensorDataset(raw, y), batch_size=4), 10, np.arange(10), info=DistInfo(),
                   amp=amp, mean=AUG.mean, std=AUG.std)
    ref = validate(model, DataLoader(TensorDataset(old, y), batch_size=4), 10, np.arange(10), info=DistInfo(),
                   amp=amp)
    np.testing.assert_allclose(new.probs, ref.probs, atol=1e-5)
    np.testing.assert_allclose(new.losses, ref.losses, atol=1e-5)
    assert (new.targets == y.numpy()).all()


def test_num_workers_auto(monkeypatch):
    from pipeline.config import TrainConfig
    from pipeline.engine.sampling import loader_workers

    gpu = torch.device("cuda")  # a device object only: nothing runs on it
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers("auto", gpu) == 8           # min(cores - 1, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers("auto", gpu) == 3           # 16 cores shared by 4 GPU processes
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_workers("auto", gpu) == 1
    assert loader_workers("auto", CPU) == 0           # the CPU's cores belong to the model's threads
    assert loader_workers(3, CPU) == 3
    assert TrainConfig().num_workers == "auto" and TrainConfig(num_workers=2).num_workers == 2
    for bad in (-1, "many"):
        with pytest.raises(ValueError):
            TrainConfig(num_workers=bad)


def test_tf32_is_set_on_cuda_only():
    from pipeline.engine.amp import set_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32(torch.device("cuda"), False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        set_tf32(CPU, True)  # the CPU has no TF32: nothing changes
        assert not torch.backends.cuda.matmul.allow_tf32
        set_tf32(torch.device("cuda"), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_adamw_is_fused_on_the_cpu_and_takes_the_same_step():
    from pipeline.config import TrainConfig
    from pipeline.engine.optim import create_optimizer, param_groups

    cfg = TrainConfig(optimizer="adamw", lr=0.01, scheduler="none")
    # Seeded: where a gradient is ~0, Adam's m / sqrt(v) is +-1 up to rounding, so an unlucky random
    # init could put one weight of 165k a rounding error past the tolerance (seen once in ~10 runs).
    torch.manual_seed(0)
    models = [timm.create_model("test_resnet", num_classes=4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = {k: v.clone() for k, v in models[0].state_dict().items()}
    fused = create_optimizer(models[0], cfg)
    plain = torch.optim.AdamW(param_groups(models[1], cfg.weight_decay, 1.0), lr=0.01, foreach=False, fused=False)
    assert fused.defaults["fused"] and not create_optimizer(models[1], TrainConfig(optimizer="sgd")).defaults["fused"]
    x = torch.randn(4, 3, 32, 32)
    for model, opt in zip(models, (fused, plain)):
        for _ in range(3):
            model(x).logsumexp(1).mean().backward()
            opt.step()
            opt.zero_grad()
    # three steps of lr 0.01 move weights by up to 0.03; fused and looped agree to float rounding
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert not torch.equal(start["conv1.0.weight"], models[0].conv1[0].weight)  # the steps did move the weights


def test_validate_and_tta_read_back_once_not_per_batch(monkeypatch):
    """Per-batch .cpu() calls would each wait for the GPU; the outputs stay on the device instead."""
    from pipeline.tta import build_views, predict_views

    model = timm.create_model("test_resnet", num_classes=4).eval()
    x = torch.randint(0, 256, (12, 3, 24, 24), dtype=torch.uint8)
    y = torch.arange(12) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=3)  # four batches
    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(tuple(self.shape)) or real_cpu(self))
    validate(model, loader, 12, np.arange(12), info=DistInfo(), amp=resolve_amp("off", CPU), mean=AUG.mean, std=AUG.std)
    assert calls == [(12, 4), (12,)]  # the probabilities and the losses, once each
    calls.clear()
    views, _ = build_views(["identity", "zoom_1.125"])
    predict_views(model, loader, views, device=CPU, mean=AUG.mean, std=AUG.std)
    assert calls == [(2, 12, 4)]
