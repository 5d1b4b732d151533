"""Second-round levers through ``pipeline.run`` on a trimmed digits competition with tiny models."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from digits_helpers import cut_digits, tiny_run_config

from pipeline import paths
from pipeline.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # several tiny pipeline.run calls: minutes on 2 shared cores

N_TRAIN, N_TEST = 200, 60


@pytest.fixture(scope="module")
def small_root(digits_root, tmp_path_factory):
    return cut_digits(digits_root, tmp_path_factory.mktemp("second") / "digits", N_TRAIN, N_TEST)


def _cfg(root, *extra):
    return tiny_run_config(root, root.parent / "out", "train.epochs=2", "tta=[identity]", *extra)


def _run(cfg):
    from pipeline.run import run_all

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = run_all(cfg)
    return summary, buf.getvalue()


@pytest.fixture(scope="module")
def teacher(small_root):
    cfg = _cfg(small_root, "experiment=teacher")
    _run(cfg)
    return cfg


def test_swa_fold_model_is_the_mean_of_its_epochs_with_bn_recomputed(small_root, monkeypatch):
    """A real fold with train.swa: swa.pt's weights equal the mean of the weights at the end of each
    averaged epoch (captured as training saves them), and best.pt / oof.csv come from the average."""
    import pipeline.engine.swa as swa_mod
    from pipeline.train import train_fold

    seen: list[dict[str, torch.Tensor]] = []
    real = swa_mod.Swa.end_epoch

    def spy(self, model, epoch):
        added = real(self, model, epoch)
        if added:
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return added

    monkeypatch.setattr(swa_mod.Swa, "end_epoch", spy)
    cfg = _cfg(small_root, "experiment=swa", "train.epochs=3", "train.swa.start_epoch=2", "train.ema=true")
    metrics = train_fold(cfg, 0)
    d = paths.fold_dir(cfg, 0)
    avg = load_checkpoint(d / paths.SWA)
    assert avg["epochs"] == [1, 2] and avg["n_averaged"] == 2 and len(seen) == 2
    model_keys = [k for k in avg["model"] if "running_" not in k and "num_batches" not in k]
    for k in model_keys:
        assert torch.allclose(avg["model"][k], (seen[0][k] + seen[1][k]) / 2, atol=1e-6), k
    # BatchNorm statistics were recomputed for the average, not taken from either epoch
    bn = next(k for k in avg["model"] if k.endswith("running_mean"))
    assert not torch.allclose(avg["model"][bn], seen[-1][bn])
    best = load_checkpoint(d / paths.BEST)
    assert best["used_swa"] and all(torch.equal(best["model"][k], avg["model"][k]) for k in avg["model"])
    assert metrics["used_swa"] and metrics["swa_epochs"] == [2, 3] and metrics["best_epoch_used_ema"]
    oof = pd.read_csv(d / paths.OOF)
    assert np.allclose(oof.iloc[:, 2:].to_numpy(), avg["final"]["probs"].numpy(), atol=1e-6)


def test_student_with_pseudo_labels_and_distillation_through_run(small_root, teacher):
    cfg = _cfg(small_root, "experiment=student", "pseudo.from=[teacher]", "pseudo.threshold=0.0",
               "distill.teacher=[teacher]", "distill.alpha=0.5")
    summary, out = _run(cfg)
    assert summary.submission is not None and summary.trained == [0, 1]
    for k in (0, 1):
        rec = json.loads((paths.fold_dir(cfg, k) / paths.SECOND_ROUND).read_text())
        assert rec["pseudo"]["fold_safe"] and rec["pseudo"]["n_pseudo"] == N_TEST  # threshold 0: every image
        assert [m["model"] for m in rec["pseudo"]["models"]] == [str(paths.fold_dir(cfg, k, "teacher") / "best.pt")]
        assert rec["distill"]["n_with_teacher"] == rec["distill"]["n_rows"] > 0
        assert json.loads((paths.fold_dir(cfg, k) / paths.METRICS).read_text())["complete"]
    meta = json.loads(summary.submission.with_suffix(".json").read_text())
    assert meta["second_round"]["student"]["pseudo"]["source"] == ["teacher"]
    assert meta["second_round"]["student"]["distill"]["teacher"] == ["teacher"]
    # nothing changed: a second run trains nothing
    again, _ = _run(cfg)
    assert again.trained == []


def test_seeds_are_members_averaged_before_blending(small_root, teacher):
    cfg = _cfg(small_root, "experiment=seeded", "seeds=[1, 2]", "train.epochs=1")
    summary, out = _run(cfg)
    from pipeline.ensemble import discover_experiments

    names = discover_experiments(cfg, verbose=False)
    assert "seeded" in names and not any(n.startswith("seeded-seed") for n in names)
    for k in (0, 1):
        frames = [pd.read_csv(paths.fold_dir(cfg, k, f"seeded-seed{s}") / paths.TEST) for s in (1, 2)]
        mean = pd.read_csv(paths.fold_dir(cfg, k) / paths.TEST)
        assert np.allclose(mean.iloc[:, 1:].to_numpy(), (frames[0].iloc[:, 1:] + frames[1].iloc[:, 1:]).to_numpy() / 2)
        assert not np.allclose(frames[0].iloc[:, 1:].to_numpy(), frames[1].iloc[:, 1:].to_numpy())  # seeds differ
    assert "average of 2 seeds" in out


def test_finetune_continues_from_the_teachers_fold_weights_at_a_larger_size(small_root, teacher):
    from pipeline.train import train_fold

    cfg = _cfg(small_root, "experiment=finetuned", "finetune.from=teacher", "finetune.img_size=24",
               "finetune.epochs=1", "finetune.lr=0.0001")
    metrics = train_fold(cfg, 1)
    assert metrics["img_size"] == 24 and metrics["epochs_run"] == 1
    saved = load_checkpoint(paths.fold_dir(cfg, 1) / paths.BEST)["config"]
    assert saved["train"]["img_size"] == 24 and saved["finetune"]["source"] == "teacher"
    teacher_acc = json.loads((paths.fold_dir(cfg, 1, "teacher") / paths.METRICS).read_text())["val_acc"]
    assert metrics["val_acc"] >= teacher_acc - 0.2  # starts from trained weights, not from scratch
