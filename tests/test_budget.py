"""train.time_budget: durations, epochs chosen from timed epochs (cut on a slow fake), the plan
frozen half way, a stop when the next epoch would overrun, and the run clock's fold shares."""
from __future__ import annotations

import pytest

from pipeline.engine.budget import EpochBudget, RunClock, parse_duration, retarget_scheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_parse_duration():
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration(45) == 45 and parse_duration("120") == 120
    assert parse_duration(None) is None
    for bad in ("10 minutes", "m", "-5m", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def _run(budget: EpochBudget, clock: FakeClock, epoch_s, val_s: float = 2.0, limit: int = 100) -> list[str]:
    """Train under ``budget`` as fit does: epochs of ``epoch_s(i)`` fake seconds until the plan is done."""
    budget.start()
    done, planned, messages = 0, budget.configured, []
    while done < planned and done < limit:
        clock.now += epoch_s(done)
        done += 1
        planned, msg = budget.after_epoch(done, epoch_s(done - 1), val_s)
        messages.append(msg)
    return messages


def test_slow_epochs_cut_the_configured_epochs():
    clock = FakeClock()
    budget = EpochBudget(seconds=100, configured=30, clock=clock, reserve=lambda v: 2 * v)
    msgs = _run(budget, clock, lambda i: 10.0)
    # 100 s less 4 s kept for what follows, at 10 s an epoch: 9 epochs, not the 30 asked for
    assert budget.planned == 9 and len(budget.epoch_times) == 9 and clock.now == 90
    assert "planning 9 epoch(s) (train.epochs=30, CUT)" in msgs[0]
    assert budget.notes == ["time budget cut 30 epochs to 9"]


def test_fast_epochs_fill_the_budget_and_the_first_slow_epoch_is_discounted():
    clock = FakeClock()
    budget = EpochBudget(seconds=100, configured=5, clock=clock, reserve=lambda v: 0.0)
    _run(budget, clock, lambda i: 20.0 if i == 0 else 5.0)  # the first epoch fills caches
    assert budget.planned == 17 and clock.now == 100  # 20 + 16 x 5: the budget used to the second
    assert not budget.notes


def test_plan_freezes_half_way_then_stops_rather_than_overrun():
    clock = FakeClock()
    budget = EpochBudget(seconds=100, configured=10, clock=clock, reserve=lambda v: 0.0)
    msgs = _run(budget, clock, lambda i: 10.0 if i < 5 else 30.0)  # the machine slows down late
    assert clock.now <= 100 + 1e-9 and budget.planned == len(budget.epoch_times) < 10
    assert any("stopping after epoch" in m for m in msgs)


def test_retarget_and_run_clock(tmp_path):
    import torch
    from timm.scheduler import CosineLRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = CosineLRScheduler(opt, t_initial=300, lr_min=0.0, t_in_epochs=False)
    retarget_scheduler(sched, 5, 10)
    sched.step_update(50)
    assert sched.t_initial == 50 and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-6)
    clock = RunClock(started=1000.0, seconds=600, folds=[0, 1, 2], lanes=1)
    clock.write(tmp_path)
    back = RunClock.read(tmp_path)
    # a run past its budget still owns its clock (its last folds get nothing: one epoch) until stale
    assert back == clock and back.active(now=1100) and back.active(now=1700) and not back.active(now=2300)
    assert not back.active(now=900) and back.fold_share(1, 2, now=1700) == 0
    assert back.fold_share(0, 3, now=1060) == pytest.approx(180)  # 540 s left over 3 folds
    assert RunClock(1000.0, 600, [0, 1, 2, 3], lanes=2).fold_share(0, 4, now=1000) == pytest.approx(300)



def test_detection_training_keeps_to_its_budget(tmp_path, capsys):
    """A detector whose budget (10 ms) is far smaller than one epoch on any machine runs that one epoch of the 3 asked for, says
    so, records it, and keeps the best (here: the only) validated weights."""
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.detect.config import DetectConfig
    from pipeline.detect.shapes import build_shapes
    from pipeline.detect.train import train

    root = build_shapes(tmp_path / "s", splits={"train": 8, "val": 4})
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/banana_ssd.yaml", [
        f"data.root={root}", "data.build=null", "data.test=null", "data.test_labels=null", "wandb.mode=disabled",
        f"paths.runs={tmp_path / 'runs'}", "model.img_size=64", "train.epochs=3", "train.batch_size=8",
        "predict.batch_size=8", "train.time_budget=0.01s"], schema=DetectConfig)
    result = train(cfg)
    assert result["epochs_run"] == 1 and result["best_epoch"] == 1  # counted from 1, as history.csv
    assert result["time_budget_s"] == 0.01 and result["time_budget_notes"] == ["time budget cut 3 epochs to 1"]
    assert "planning 1 epoch(s) (train.epochs=3, CUT)" in capsys.readouterr().out


def test_fit_under_a_budget_cuts_epochs_on_a_slow_fake(tmp_path):
    """engine.fit with a fake training whose epochs take 40 fake seconds: a 5-minute budget runs
    7 epochs of the 30 configured, stretches the cosine to end there, keeps the best epoch's score."""
    import torch
    from timm.scheduler import CosineLRScheduler

    from pipeline.engine.budget import retarget_scheduler
    from pipeline.engine.distributed import DistInfo
    from pipeline.engine.fit import FitSpec, FitState, Parts, Validation, fit
    from pipeline.engine.loop import TrainStats

    clock = FakeClock()
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = CosineLRScheduler(opt, t_initial=30 * 10, lr_min=0.0, t_in_epochs=False)
    parts = Parts(model, model, opt, sched, torch.amp.GradScaler("cpu", enabled=False))
    lrs: list[float] = []

    def train_epoch(epoch: int, num_updates: int) -> TrainStats:
        for _ in range(10):  # 10 updates of 3.5 fake seconds
            num_updates += 1
            sched.step_update(num_updates)
            clock.now += 3.5
        lrs.append(opt.param_groups[0]["lr"])
        return TrainStats({"loss": 1.0}, opt.param_groups[0]["lr"], 10, 35.0, num_updates)

    def evaluate(epoch: int) -> Validation:
        clock.now += 5.0
        score = [0.1, 0.5, 0.3, 0.6, 0.55, 0.4, 0.2][min(epoch, 6)]
        return Validation((score,), score, {"val": score})

    budget = EpochBudget(seconds=300, configured=30, clock=clock, reserve=lambda v: v)
    budget.start()
    spec = FitSpec(epochs=30, out_dir=tmp_path, meta={}, history_columns=["epoch", "train_loss", "val", "lr"],
                   budget=budget, on_plan=lambda n: retarget_scheduler(sched, n, 10))

    class _Run:
        def log(self, *a, **k):
            pass

    state = fit(parts, FitState(), spec, DistInfo(), train_epoch=train_epoch, evaluate=evaluate, wandb_run=_Run())
    # 300 s less one 5 s validation kept back, at 40 s an epoch: 7 epochs, finished, within the budget
    assert state.epoch == 7 and state.finished and state.planned_epochs == 7 and clock.now <= 300
    assert state.best_epoch == 3 and state.best_metric == 0.6
    assert budget.notes == ["time budget cut 30 epochs to 7"]
    assert lrs[-1] < 0.05  # the cosine was stretched to end at epoch 7, not 30
