"""Detection trains through the shared engine: exact resume, EMA, and a NaN on one DDP rank stops both."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.config import load_config
from pipeline.detect.config import DetectConfig
from pipeline.detect.data import class_names, load_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from pipeline.detect.shapes import build_shapes

    return build_shapes(tmp_path_factory.mktemp("det") / "shapes", splits={"train": 12, "val": 4, "test": 2})


def _cfg(shapes_root, runs: Path, *extra: str) -> DetectConfig:
    return load_config(REPO / "configs" / "banana_ssd.yaml", [
        f"competition.root={shapes_root}", f"paths.runs={runs}", f"paths.submissions={runs / 'subs'}",
        "wandb.mode=disabled", "model.img_size=64",
        "train.batch_size=4", "train.epochs=2", "predict.batch_size=8", "train.warmup_epochs=0.5",
        "data.test_labels=null", *extra], schema=DetectConfig)


def test_detection_resume_equals_uninterrupted_and_uses_ema(shapes_root, tmp_path, monkeypatch):
    import pipeline.detect.train as det

    straight = det.train(_cfg(shapes_root, tmp_path / "a", "train.ema=true", "train.ema_decay=0.5"))
    assert straight["used_ema"] is True

    real = det.train_one_epoch

    def killed_in_epoch_1(*args, **kwargs):
        if kwargs["epoch"] == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    cfg = _cfg(shapes_root, tmp_path / "b", "train.ema=true", "train.ema_decay=0.5")
    monkeypatch.setattr(det, "train_one_epoch", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        det.train(cfg)
    monkeypatch.setattr(det, "train_one_epoch", real)
    resumed = det.train(cfg)

    a = torch.load(tmp_path / "a" / cfg.experiment / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / cfg.experiment / "last.pt", weights_only=True)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    assert any(not torch.equal(a["model"][k], a["ema"][k]) for k in a["model"] if a["model"][k].is_floating_point())
    cols = ["train_loss", "cls_loss", "box_loss", "val_map_50", "val_map_50_95", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / cfg.experiment / "history.csv")[cols],
                                  pd.read_csv(tmp_path / "b" / cfg.experiment / "history.csv")[cols])
    assert resumed["map_50_95"] == straight["map_50_95"]

    # predict and evaluate load the weights training judged: the EMA
    from pipeline.detect.inference import load_trained

    model, _, _ = load_trained(cfg, "best")
    best = torch.load(tmp_path / "b" / cfg.experiment / "best.pt", weights_only=True)
    assert best["used_ema"] is True and best["weights"] == "ema"
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k])
    if best["epoch"] == b["epoch"]:  # the last epoch was the best: its EMA weights are best.pt's
        assert all(torch.equal(best["model"][k], b["ema"][k]) for k in best["model"])

    # two predictions in the same second: the second gets its own file, nothing raises
    import pipeline.submission as submission
    from pipeline.detect.predict import predict

    monkeypatch.setattr(submission.time, "strftime", lambda fmt, t=None: "20260101-000000")
    first, second = predict(cfg, split="val"), predict(cfg, split="val")
    assert first != second and first.is_file() and second.is_file()
    assert first.name == f"{cfg.experiment}_20260101-000000.csv" and second.name.endswith("-2.csv")


def test_old_data_root_key_is_read_as_competition_root(shapes_root, tmp_path, capsys):
    cfg = load_config(REPO / "configs" / "banana_ssd.yaml", [f"data.root={shapes_root}"], schema=DetectConfig)
    assert Path(cfg.competition.root) == Path(shapes_root)
    assert "data.root is deprecated" in capsys.readouterr().err
    # the readers take the folder from competition.root alone: data.root is not kept
    assert cfg.data.root is None
    split = load_split(cfg, cfg.data.val, class_names(cfg))
    assert split.labelled and all(p.is_relative_to(Path(shapes_root)) for p in split.paths)



def test_competition_format_picks_the_reader_and_data_format_is_its_old_name():
    # design.md's key is competition.format; the readers read data.format, kept equal to it.
    cfg = load_config(REPO / "configs" / "coco_ssd.yaml", schema=DetectConfig)
    assert cfg.competition.format == "coco" and cfg.data.format == "coco"
    old = load_config(REPO / "configs" / "banana_ssd.yaml", ["data.format=yolo"], schema=DetectConfig)
    assert old.competition.format == "yolo" and old.data.format == "yolo"
    new = load_config(REPO / "configs" / "banana_ssd.yaml", ["competition.format=voc"], schema=DetectConfig)
    assert new.data.format == "voc"
    with pytest.raises(Exception, match="competition.format"):
        load_config(REPO / "configs" / "banana_ssd.yaml", ["competition.format=voc", "data.format=coco"],
                    schema=DetectConfig)

@pytest.mark.processes
def test_nan_on_one_ddp_rank_stops_both_ranks_with_the_message(shapes_root, tmp_path):
    """2 gloo processes; rank 1's loss turns NaN at its first step: both stop with the message
    (the NaN check is agreed across ranks), neither hangs in the next all-reduce."""
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import torch
        import pipeline.detect.train as det
        from pipeline.errors import cli_entry

        real = det.detection_loss

        def poisoned(*args, **kwargs):
            fn = real(*args, **kwargs)
            def loss_fn(model, batch):
                losses, n = fn(model, batch)
                if os.environ["RANK"] == "1":
                    losses = dict(losses, loss=losses["loss"] * float("nan"))
                return losses, n
            return loss_fn

        det.detection_loss = poisoned
        sys.exit(cli_entry(det.main, sys.argv[1:]))
    """))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
            "--config", str(REPO / "configs" / "banana_ssd.yaml")]
    for item in (f"competition.root={shapes_root}", f"paths.runs={tmp_path / 'runs'}", "wandb.mode=disabled",
                 "model.img_size=64", "train.batch_size=4", "train.epochs=1", "data.test_labels=null", "device=cpu"):
        argv += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    err = proc.stderr
    assert proc.returncode != 0, err[-3000:]
    assert err.count("error: the training loss became nan at epoch 1, step 1") == 2, err[-3000:]
    assert "training stopped on every rank" in err
