"""The training techniques one by one, on tiny models and tensors (no competition needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import TrainConfig
from pipeline.engine.amp import resolve_amp
from pipeline.engine.distributed import DistInfo
from pipeline.engine.loop import (
    NonFiniteLossError,
    classification_loss,
    create_mixup,
    create_train_loss,
    train_one_epoch,
    validate,
)
from pipeline.engine.optim import create_optimizer, create_scheduler, current_lr, updates_per_epoch
from pipeline.errors import PipelineError

CPU = DistInfo()




def tiny_model(num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=num_classes)


def tiny_loader(n: int = 16, batch: int = 4, num_classes: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def run_epoch(model, loader, cfg: TrainConfig, **kwargs):
    optimizer = create_optimizer(model, cfg)
    amp = resolve_amp(cfg.amp, torch.device("cpu"))
    mixup = create_mixup(cfg, 4)
    loss_fn = classification_loss(create_train_loss(cfg, mixup), amp=amp, device=CPU.device, mixup=mixup,
                                  channels_last=cfg.channels_last)
    defaults = dict(epoch=0, info=CPU, scaler=amp.grad_scaler(), accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad)
    defaults.update(kwargs)
    return train_one_epoch(model, loader, optimizer, loss_fn, **defaults), optimizer


def test_mixup_gives_soft_targets_and_soft_target_loss():
    cfg = TrainConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    mixup = create_mixup(cfg, num_classes=4)
    np.random.seed(0)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed_x, soft = mixup(x.clone(), y)
    assert soft.shape == (6, 4) and torch.allclose(soft.sum(1), torch.ones(6))
    assert (soft.max(1).values < 1.0).all()  # no row is a hard one-hot target
    assert not torch.equal(mixed_x, x)
    assert isinstance(create_train_loss(cfg, mixup), SoftTargetCrossEntropy)
    mixup.mixup_enabled = False  # what train does after train.mixup_off_epoch
    same_x, smoothed = mixup(x.clone(), y)
    assert torch.equal(same_x, x) and torch.allclose(smoothed.max(1).values, torch.full((6,), 0.925))


def test_no_mixup_means_plain_or_label_smoothing_loss():
    assert create_mixup(TrainConfig(), 4) is None
    assert isinstance(create_train_loss(TrainConfig(), None), torch.nn.CrossEntropyLoss)
    smooth = create_train_loss(TrainConfig(label_smoothing=0.2), None)
    assert isinstance(smooth, LabelSmoothingCrossEntropy) and smooth.smoothing == 0.2


def test_warmup_rises_then_cosine_falls_per_update():
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5)
    model = torch.nn.Linear(3, 2)
    optimizer = create_optimizer(model, cfg)
    scheduler = create_scheduler(optimizer, cfg, n_updates_per_epoch=5)
    lrs = [current_lr(optimizer)]
    for update in range(1, 21):
        scheduler.step_update(num_updates=update)
        lrs.append(current_lr(optimizer))
    assert lrs[0] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:6]))  # warmup: rises every update
    assert lrs[5] == pytest.approx(0.1)  # peak when warmup ends
    assert all(a > b for a, b in zip(lrs[5:20], lrs[6:21]))  # cosine: falls every update
    assert lrs[20] == pytest.approx(1e-5, rel=1e-3)


def test_head_gets_its_own_learning_rate_and_no_decay_on_biases():
    model = tiny_model()
    cfg = TrainConfig(lr=0.01, weight_decay=0.05, scheduler="none")
    optimizer = create_optimizer(model, cfg, head_lr_mult=10.0)
    head = {id(p) for p in model.get_classifier().parameters()}
    for group in optimizer.param_groups:
        is_head = {id(p) in head for p in group["params"]}
        assert len(is_head) == 1
        assert group["lr"] == pytest.approx(0.1 if is_head.pop() else 0.01)
        assert group["weight_decay"] in (0.0, 0.05)
        if group["weight_decay"]:
            assert all(p.ndim > 1 for p in group["params"])
    with_schedule = create_optimizer(model, TrainConfig(lr=0.01, warmup_epochs=0), head_lr_mult=10.0)
    create_scheduler(with_schedule, TrainConfig(lr=0.01, warmup_epochs=0), 5).step_update(1)
    assert max(g["lr"] for g in with_schedule.param_groups) / current_lr(with_schedule) == pytest.approx(10.0)


@pytest.mark.parametrize("name,expected", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                           ("adamw", torch.optim.AdamW)])
def test_optimizers(name, expected):
    optimizer = create_optimizer(torch.nn.Linear(3, 2), TrainConfig(optimizer=name))
    assert isinstance(optimizer, expected)
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.9 and not optimizer.param_groups[0]["nesterov"]


def test_train_epoch_learns_and_counts_updates_with_accumulation():
    model, loader = tiny_model(), tiny_loader(n=20, batch=4)  # 5 batches
    before = [p.detach().clone() for p in model.parameters()]
    stats, _ = run_epoch(model, loader, TrainConfig(accum_steps=2, scheduler="none"))
    assert stats.num_updates == updates_per_epoch(5, 2) == 3  # 2 + 2 + a short last group of 1
    assert stats.images == 20 and math.isfinite(stats.loss) and stats.images_per_s > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gradient_clipping_bounds_the_step():
    model, loader = tiny_model(), tiny_loader(n=4, batch=4)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cfg = TrainConfig(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, clip_grad=1e-3, scheduler="none")
    run_epoch(model, loader, cfg)
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert 0 < step.norm() <= 1e-3 * 1.0001  # one SGD step of lr 1 on a gradient clipped to norm 1e-3


def test_ema_weights_differ_from_model_and_are_validated():
    model, loader = tiny_model(), tiny_loader()
    ema = ModelEmaV3(model, decay=0.9, use_warmup=True)
    run_epoch(model, loader, TrainConfig(scheduler="none", lr=0.01), ema=ema)
    model_w, ema_w = model.state_dict(), ema.module.state_dict()
    differs = [k for k in model_w if model_w[k].is_floating_point() and not torch.equal(model_w[k], ema_w[k])]
    assert differs
    res = validate(ema.module, tiny_loader(n=8), 8, np.arange(8), info=CPU, amp=resolve_amp("off", CPU.device))
    own = validate(model, tiny_loader(n=8), 8, np.arange(8), info=CPU, amp=resolve_amp("off", CPU.device))
    assert res.probs.shape == (8, 4) and not np.allclose(res.probs, own.probs)
    assert np.allclose(res.probs.sum(1), 1.0, atol=1e-5)


def test_validate_places_shards_by_index():
    model = tiny_model().eval()
    loader = tiny_loader(n=8, batch=3)
    full = validate(model, loader, 8, np.arange(8), info=CPU, amp=resolve_amp("off", CPU.device))
    x, y = loader.dataset.tensors
    odd = DataLoader(TensorDataset(x[1::2], y[1::2]), batch_size=3)
    part = validate(model, odd, 4, np.array([3, 2, 1, 0]), info=CPU, amp=resolve_amp("off", CPU.device))
    np.testing.assert_allclose(part.probs[::-1], full.probs[1::2], atol=1e-6)
    assert full.accuracy == (full.probs.argmax(1) == y.numpy()).mean()


def test_channels_last_and_bf16_autocast_train_on_cpu():
    model, loader = tiny_model(), tiny_loader(n=8)
    model = model.to(memory_format=torch.channels_last)
    stats, _ = run_epoch(model, loader, TrainConfig(channels_last=True, amp="bf16", scheduler="none"))
    assert math.isfinite(stats.loss)


def test_amp_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not resolve_amp("auto", cpu).enabled and resolve_amp("auto", cpu).name == "off"
    assert resolve_amp("bf16", cpu).dtype is torch.bfloat16
    assert not resolve_amp("off", cuda).enabled
    with pytest.raises(PipelineError, match="fp16 needs a CUDA GPU"):
        resolve_amp("fp16", cpu)
    assert not resolve_amp("bf16", cpu).grad_scaler().is_enabled()


def test_named_losses_are_averaged_per_image_beside_the_minimised_one():
    """A detector-style loss function (several named losses) trains through the same loop."""
    model, loader = tiny_model(), tiny_loader(n=12, batch=4)

    def loss_fn(model, batch):
        images, target = batch
        ce = torch.nn.functional.cross_entropy(model(images), target)
        return {"loss": ce + 1.0, "cls_loss": ce, "box_loss": torch.ones(())}, len(images)

    cfg = TrainConfig(scheduler="none")
    optimizer = create_optimizer(model, cfg)
    stats = train_one_epoch(model, loader, optimizer, loss_fn, epoch=0, info=CPU,
                            scaler=resolve_amp("off", CPU.device).grad_scaler())
    assert set(stats.losses) == {"loss", "cls_loss", "box_loss"} and stats.losses["box_loss"] == 1.0
    assert stats.loss == pytest.approx(stats.losses["cls_loss"] + 1.0)


def test_mixup_with_odd_batch_drops_one_image():
    model, loader = tiny_model(), tiny_loader(n=10, batch=5)
    stats, _ = run_epoch(model, loader, TrainConfig(mixup_alpha=0.4, scheduler="none"))
    assert stats.images == 8


def test_non_finite_loss_names_epoch_step_and_lr():
    model, loader = tiny_model(), tiny_loader(n=12, batch=4)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        images, target = batch
        loss = torch.nn.functional.cross_entropy(model(images), target)
        return {"loss": loss * float("nan") if calls["n"] == 2 else loss}, len(images)

    cfg = TrainConfig(scheduler="none", lr=0.003)
    optimizer = create_optimizer(model, cfg)
    amp = resolve_amp("off", CPU.device)
    with pytest.raises(NonFiniteLossError) as err:
        train_one_epoch(model, loader, optimizer, loss_fn, epoch=4, info=CPU, scaler=amp.grad_scaler())
    assert "epoch 5, step 2" in str(err.value) and "learning rate 0.003" in str(err.value)
