"""The train stage end to end on a small copy of the digits competition."""
from __future__ import annotations

import glob
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pipeline.train as train_mod
from pipeline.engine.loop import EvalResult
from pipeline.errors import PipelineError, cli_entry
from pipeline.train import HISTORY_COLUMNS, main, train_fold

REPO = Path(__file__).resolve().parents[1]
FAST = ["model.backbone=test_resnet", "train.img_size=16", "train.batch_size=16", "train.epochs=2",
        "folds.k=3", "train.warmup_epochs=0.5"]
# Every technique at once, so that resume is checked against all the state they carry; Mixup/CutMix
# stay on in the resumed epoch (mixup_off_epoch 2 of 2 epochs), so their random draws must resume too.
TECHNIQUES = ["train.ema=true", "train.ema_decay=0.9", "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0",
              "train.mixup_off_epoch=2", "train.label_smoothing=0.1", "train.accum_steps=2",
              "train.clip_grad=5.0", "model.head_lr_mult=3.0", "model.drop_rate=0.1"]




@pytest.fixture(scope="module")
def small_root(tmp_path_factory, digits_root):
    """The digits competition cut to 150 training images (dedup and folds then take a second)."""
    root = tmp_path_factory.mktemp("small") / "digits"
    shutil.copytree(digits_root, root)
    shutil.copytree(digits_root.parent / "digits_private", root.parent / "digits_private")
    train = pd.read_csv(root / "train.csv")
    train.head(150).to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory):
    return tmp_path_factory.mktemp("work")  # dedup and folds made once for the whole module


@pytest.fixture
def cfg_for(make_cfg, small_root, shared_work, tmp_path):
    def make(*overrides: str, runs: str = "runs"):
        return make_cfg(*FAST, f"paths.work={shared_work}", f"paths.runs={tmp_path / runs}", *overrides,
                        root=small_root)

    return make


def wandb_records(path: str):
    """Records of an offline ``.wandb`` file (wandb has no public reader for it offline)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = open(path, "rb").read(), 7, b"", 32768  # 7: file header ":W&B" magic version
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            buf = chunk
        elif kind in (2, 3):
            buf = (b"" if kind == 2 else buf) + chunk
            continue
        elif kind == 4:
            buf += chunk
        else:
            continue
        record = pb.Record()
        record.ParseFromString(buf)
        yield record


def test_fold_outputs_wandb_and_resume_equals_uninterrupted(cfg_for, monkeypatch, tmp_path):
    cfg = cfg_for(*TECHNIQUES, "wandb.mode=offline", runs="straight")
    metrics = train_fold(cfg, fold=1)

    run = tmp_path / "straight" / cfg.experiment
    fold = run / "fold1"
    folds = pd.read_csv(Path(cfg.paths.work) / "digits" / "folds.csv")
    expected = folds[folds["fold"] == 1]
    for name in ["best.pt", "last.pt", "history.csv", "oof.csv", "metrics.json"]:
        assert (fold / name).is_file(), name
    assert (run / "config.yaml").is_file()
    classes = pd.read_json(run / "classes.json")["classes"].tolist()
    assert classes == sorted(classes) and len(classes) == 10

    oof = pd.read_csv(fold / "oof.csv")
    assert list(oof.columns) == ["image", "label", *classes]
    assert sorted(oof["image"]) == sorted(expected["image"]) and oof["image"].is_unique
    np.testing.assert_allclose(oof[classes].sum(axis=1), 1.0, atol=1e-4)

    history = pd.read_csv(fold / "history.csv")
    assert list(history.columns) == HISTORY_COLUMNS and len(history) == 2
    assert history["ema_val_acc"].notna().all() and (history["images_per_s"] > 0).all()
    assert metrics["used_ema"] is True and metrics["complete"] is True and metrics["n_val"] == len(expected)
    assert set(metrics) >= {"experiment", "fold", "backbone", "img_size", "epochs_run", "best_epoch", "val_acc",
                            "val_loss", "used_ema", "n_train", "n_val", "train_time_s", "images_per_s", "complete"}

    best = torch.load(fold / "best.pt", weights_only=True)
    last = torch.load(fold / "last.pt", weights_only=True)
    assert set(best) >= {"model", "ema", "config", "classes", "epoch", "best_metric"}
    assert set(last) >= {"optimizer", "scheduler", "scaler", "rng", "history"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in best["model"])
    # best.pt is weights only: the validated copy (the EMA's here), no second copy, no optimizer.
    assert best["ema"] is None and best["weights"] == "ema" and "optimizer" not in best
    assert any(not torch.equal(last["model"][k], last["ema"][k]) for k in last["model"]
               if last["model"][k].is_floating_point())
    if metrics["best_epoch"] == 2:  # the last epoch was the best: best.pt holds its EMA weights
        assert all(torch.equal(best["model"][k], last["ema"][k]) for k in best["model"])
    assert history["epoch"].tolist() == [1, 2]  # counted from 1, as on the console
    assert last["epoch"] == 1 and best["classes"] == classes

    # W&B: the offline run folder under runs/<experiment>/wandb/ holds the config and the summary.
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    records = list(wandb_records(files[0]))
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].display_name == f"{cfg.experiment}-fold1" and runs[0].run_group == cfg.experiment
    assert runs[0].job_type == "train"
    config_keys = {item.key for item in runs[0].config.update}
    assert {"model", "train", "fold"} <= config_keys
    summary = {i.key: i.value_json for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert summary["complete"] == "true" and float(summary["val_acc"]) == pytest.approx(metrics["val_acc"])

    # Provenance: code version, library versions, data fingerprint, device
    prov = metrics["provenance"]
    assert set(prov) == {"code", "versions", "data_fingerprint", "device"} and prov["data_fingerprint"]
    assert torch.__version__.startswith(prov["versions"]["torch"]) and prov["versions"]["timm"]
    assert prov["device"]["type"] == "cpu" and "dirty" in prov["code"]

    # predict loads the EMA weights training chose: identity TTA reproduces the (EMA) oof.csv
    from pipeline.predict import predict_fold

    predict_fold(cfg.model_copy(update={"tta": ["identity"]}), 1, quiet=True)
    tta = pd.read_csv(fold / "oof_tta.csv").set_index("image").loc[oof["image"]]
    np.testing.assert_allclose(tta[classes].to_numpy(), oof[classes].to_numpy(), atol=1e-5)
    # (best.pt holds the validated weights only, here the EMA's: the raw weights give other probabilities)
    raw_model = {k: v for k, v in last["model"].items()}
    assert any(not torch.equal(raw_model[k], best["model"][k]) for k in raw_model if raw_model[k].is_floating_point())

    # The same run killed after its first epoch and resumed reaches the very same result.
    cfg2 = cfg_for(*TECHNIQUES, "wandb.mode=offline", runs="resumed")
    real_epoch = train_mod.train_one_epoch

    def killed_at_epoch_1(*args, **kwargs):
        if kwargs["epoch"] == 1:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", killed_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg2, fold=1)
    fold2 = tmp_path / "resumed" / cfg.experiment / "fold1"
    assert torch.load(fold2 / "last.pt", weights_only=True)["epoch"] == 0 and not (fold2 / "oof.csv").exists()
    monkeypatch.setattr(train_mod, "train_one_epoch", real_epoch)
    train_fold(cfg2, fold=1, resume=True)
    resumed = pd.read_csv(fold2 / "oof.csv")
    pd.testing.assert_frame_equal(resumed, oof)
    # the resumed fold logs to the W&B run it started (same id), not to a new run
    # offline-run-<date>_<time>-<run id>[-n]: a second folder in the same second gets a -n suffix
    ids = {Path(p).name.split("-")[3] for p in glob.glob(str(fold2.parent / "wandb" / "offline-run-*"))}
    assert len(glob.glob(str(fold2.parent / "wandb" / "offline-run-*"))) == 2 and len(ids) == 1
    h2 = pd.read_csv(fold2 / "history.csv")
    cols = ["train_loss", "val_loss", "val_acc", "ema_val_loss", "ema_val_acc", "lr"]
    pd.testing.assert_frame_equal(h2[cols], history[cols])


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_epoch(cfg_for, monkeypatch, capsys, tmp_path):
    real_epoch = train_mod.train_one_epoch

    def nan_in_epoch_1(model, loader, optimizer, loss_fn, **kwargs):
        if kwargs["epoch"] == 1:
            def nan_loss(model, batch):
                losses, n = loss_fn(model, batch)
                return {"loss": losses["loss"] * float("nan")}, n
            return real_epoch(model, loader, optimizer, nan_loss, **kwargs)
        return real_epoch(model, loader, optimizer, loss_fn, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", nan_in_epoch_1)
    cfg = cfg_for()
    argv = ["--fold", "0", "--config", "configs/default.yaml"]
    for item in [f"paths.work={cfg.paths.work}", f"paths.runs={cfg.paths.runs}", f"competition.root={cfg.competition.root}",
                 "wandb.mode=disabled", "train.num_workers=0", *FAST]:
        argv += ["--set", item]
    assert cli_entry(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the progress bars print before it
    assert err.startswith("error: fold 0: the training loss became nan at epoch 2, step 1")
    assert "learning rate" in err and "last.pt keeps the last good epoch" in err
    fold = tmp_path / "runs" / cfg.experiment / "fold0"
    assert torch.load(fold / "last.pt", weights_only=True)["epoch"] == 0
    assert not (fold / "metrics.json").exists()
    with pytest.raises(PipelineError, match="other settings .*train.lr"):
        train_fold(cfg_for("train.lr=0.5"), fold=0, resume=True)


def test_early_stopping_stops_when_the_metric_stalls_and_wandb_absent(cfg_for, monkeypatch):
    real_validate = train_mod.validate

    def stalled(*args, **kwargs):
        res = real_validate(*args, **kwargs)
        flat = np.full_like(res.probs, 1.0 / res.probs.shape[1])
        return EvalResult(flat, np.full_like(res.losses, 2.3), res.targets)

    monkeypatch.setattr(train_mod, "validate", stalled)
    monkeypatch.setitem(sys.modules, "wandb", None)  # wandb.mode=disabled needs no wandb at all
    metrics = train_fold(cfg_for("train.epochs=5", "train.early_stopping_patience=1"), fold=2)
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] == 1


def test_user_errors_are_one_clear_message(cfg_for, capsys):
    cfg = cfg_for()
    argv = []
    for item in [f"paths.work={cfg.paths.work}", f"paths.runs={cfg.paths.runs}",
                 f"competition.root={cfg.competition.root}", "wandb.mode=disabled", *FAST]:
        argv += ["--set", item]
    assert cli_entry(main, ["--fold", "7", *argv]) == 2
    assert "--fold 7" in capsys.readouterr().err
    assert cli_entry(main, ["--fold", "0", "--resume", *argv]) == 2
    assert "does not exist; train fold 0 without --resume first" in capsys.readouterr().err
    assert cli_entry(main, ["--fold", "0", *argv, "--set", "model.backbone=resnet_18"]) == 2
    assert "Close timm names" in capsys.readouterr().err
    # A setting that cannot work leaves the outputs of an earlier training of the fold alone.
    earlier = Path(cfg.paths.runs) / cfg.experiment / "fold0" / "metrics.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    assert cli_entry(main, ["--fold", "0", *argv, "--set", "train.amp=fp16"]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err and earlier.is_file()


@pytest.mark.processes
def test_ddp_two_processes_gloo_every_oof_row_once(cfg_for, tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 alone writes; validation is gathered unpadded."""
    cfg = cfg_for("train.batch_size=8", "train.ema=true")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "pipeline.train", "--fold", "2"]
    for item in [f"paths.work={cfg.paths.work}", f"paths.runs={cfg.paths.runs}", f"competition.root={cfg.competition.root}",
                 "wandb.mode=disabled", "device=cpu", "train.sync_bn=true", "train.batch_size=8", "train.ema=true", *FAST]:
        argv += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("train: fold 2 done") == 1  # only rank 0 reports
    assert "sync_bn is for GPUs" in proc.stdout

    fold = Path(cfg.paths.runs) / cfg.experiment / "fold2"
    folds = pd.read_csv(Path(cfg.paths.work) / "digits" / "folds.csv")
    expected = folds.loc[folds["fold"] == 2, "image"]
    oof = pd.read_csv(fold / "oof.csv")
    assert len(expected) % 2 == 1  # an odd count: a padding sampler would have repeated one image
    assert sorted(oof["image"]) == sorted(expected) and oof["image"].is_unique
    for name in ["best.pt", "last.pt"]:
        state = torch.load(fold / name, weights_only=True)
        # best.pt holds the validated (EMA) weights as "model"; last.pt both copies
        assert not any(k.startswith("module.") for k in state["model"])
        assert (state["ema"] is not None) == (name == "last.pt")
    last = torch.load(fold / "last.pt", weights_only=True)
    assert last["world_size"] == 2 and len(last["rng_ranks"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="torch.compile's inductor needs a C++ compiler on the CPU")
def test_torch_compile_trains_and_saves_plain_state_dict(cfg_for):
    """torch.compile (inductor needs a C++ compiler on the CPU; compiling takes minutes here)."""
    metrics = train_fold(cfg_for("train.compile=true", "train.epochs=1"), fold=0)
    cfg = cfg_for()
    best = torch.load(Path(cfg.paths.runs) / cfg.experiment / "fold0" / "best.pt", weights_only=True)
    assert metrics["complete"] and not any("_orig_mod" in k for k in best["model"])


def test_augmentation_depends_on_seed_epoch_and_image_only(make_cfg, digits_root):
    """The same batches with 0 or 2 (persistent) workers; another epoch augments differently."""
    from pipeline.data import load_competition
    from pipeline.engine.distributed import DistInfo
    from pipeline.train import build_loaders, seed_epoch

    comp = load_competition(make_cfg().competition)
    folds = comp.train.head(40)[["image", "label"]].assign(group=0, fold=[0] * 8 + [1] * 32)

    def batches(workers: int, epoch: int) -> list[torch.Tensor]:
        cfg = make_cfg("train.batch_size=8", "train.img_size=16", f"train.num_workers={workers}")
        loader, *_ = build_loaders(cfg, folds, 0, comp.root, comp.classes, DistInfo())
        seed_epoch(loader, epoch)
        return [x for x, _ in loader]

    in_process = batches(0, epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(in_process, batches(2, epoch=3)))
    assert not torch.equal(in_process[0], batches(0, epoch=4)[0])
