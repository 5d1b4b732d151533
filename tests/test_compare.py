"""pipeline.compare: the table, --where/--sort/--diff, formats, plots, incomplete folds, W&B records.

Run folders are written here in the exact form of the run-folder contract (config.yaml,
classes.json, fold<K>/history.csv, metrics.json, oof.csv, predict.json), with numbers derived
from the oof files so every expected value can be recomputed from the files themselves.
"""
from __future__ import annotations

import json
import math
import time
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.compare import compare, config_diff, load_runs, main, summarize
from pipeline.compare_wandb import find_wandb_runs
from pipeline.config import save_config
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json

CLASSES = ["eight", "five", "four", "nine", "one", "seven", "six", "three", "two", "zero"]


def write_fake_run(cfg, folds_done: int | None = None, *, rng_seed: int = 0, quality: float = 0.8,
                   epochs_done_incomplete: int = 2, half_written: int | None = None,
                   images_per_fold: int = 40) -> Path:
    """Write ``runs/<cfg.experiment>/`` as train + predict would; folds >= ``folds_done`` are left
    incomplete (history only), and fold ``half_written`` gets a truncated metrics.json."""
    rng = np.random.default_rng(rng_seed)
    run = Path(cfg.paths.runs) / cfg.experiment
    save_config(cfg, run / "config.yaml")
    atomic_write_json(run / "classes.json", {"classes": CLASSES})
    k = cfg.folds.k
    folds_done = k if folds_done is None else folds_done
    epochs = cfg.train.epochs
    for fold in range(k):
        d = run / f"fold{fold}"
        n_ep = epochs if fold < folds_done else epochs_done_incomplete
        if fold >= folds_done and half_written != fold and fold > folds_done:
            continue  # not started yet: no folder at all
        ep = np.arange(n_ep)
        noise = rng.normal(0, 0.03, (3, n_ep))
        hist = pd.DataFrame({
            "epoch": ep + 1, "train_loss": 2.3 * np.exp(-ep / 3) + 0.1 + noise[0],
            "val_loss": 2.2 * np.exp(-ep / 3) + 0.2 + noise[1],
            "val_acc": quality * (1 - np.exp(-(ep + 1) / 2)) + noise[2], "ema_val_loss": np.nan, "ema_val_acc": np.nan,
            "lr": 1e-3 * np.cos(ep / max(1, n_ep) * np.pi / 2), "images_per_s": 500.0 + 10 * fold,
            "epoch_time_s": 1.5,
        })
        atomic_write_csv(d / "history.csv", hist)
        if fold >= folds_done and half_written != fold:
            continue  # running or killed: history only
        labels = rng.integers(0, len(CLASSES), images_per_fold)
        logits = rng.normal(size=(images_per_fold, len(CLASSES)))
        logits[np.arange(images_per_fold), labels] += 4 * quality + rng.normal(0, 1.5, images_per_fold)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        oof = pd.DataFrame(probs, columns=CLASSES)
        oof.insert(0, "label", [CLASSES[i] for i in labels])
        oof.insert(0, "image", [f"images/{fold}_{i}.png" for i in range(images_per_fold)])
        atomic_write_csv(d / "oof.csv", oof)
        acc = float((probs.argmax(1) == labels).mean())
        metrics = {"experiment": cfg.experiment, "fold": fold, "backbone": cfg.model.backbone,
                   "img_size": cfg.train.img_size, "epochs_run": n_ep, "best_epoch": n_ep,
                   "val_acc": acc, "val_loss": float(hist["val_loss"].iloc[-1]), "used_ema": False,
                   "n_train": images_per_fold * (k - 1), "n_val": images_per_fold,
                   "train_time_s": 10.0 + fold, "images_per_s": 500.0 + 10 * fold, "complete": True}
        text = json.dumps(metrics, indent=2)
        if half_written == fold:
            (d / "metrics.json").write_text(text[: len(text) // 2])  # as a non-atomic writer killed midway
            continue
        atomic_write_json(d / "metrics.json", metrics)
        atomic_write_json(d / "predict.json", {"tta": list(cfg.tta), "merge": "mean", "oof_acc": acc,
                                               "oof_logloss": 0.5, "oof_acc_tta": acc + 0.01 * (fold + 1),
                                               "oof_logloss_tta": 0.45, "n_test": 100})
    return run


def _oof_acc(path: Path) -> float:
    df = pd.read_csv(path)
    return float((df[CLASSES].to_numpy().argmax(1) == df["label"].map(CLASSES.index).to_numpy()).mean())


@pytest.fixture
def two_runs(make_cfg):
    a = make_cfg("experiment=exp_a", "model.backbone=resnet10t", "folds.k=3", "train.epochs=3")
    b = make_cfg("experiment=exp_b", "model.backbone=test_resnet", "folds.k=3", "train.epochs=3",
                 "train.lr=0.01", "train.mixup_alpha=0.2", "train.ema=true")
    write_fake_run(a, rng_seed=1, quality=0.6)
    write_fake_run(b, rng_seed=2, quality=0.9)
    return a, b


def test_table_numbers_match_the_run_files(two_runs, capsys):
    a, _ = two_runs
    rows = json.loads(compare(a, fmt="json"))
    by = {r["experiment"]: r for r in rows}
    assert set(by) == {"exp_a", "exp_b"}
    for name, row in by.items():
        run = Path(a.paths.runs) / name
        accs = [_oof_acc(run / f"fold{k}" / "oof.csv") for k in range(3)]
        metrics = [json.loads((run / f"fold{k}" / "metrics.json").read_text()) for k in range(3)]
        preds = [json.loads((run / f"fold{k}" / "predict.json").read_text()) for k in range(3)]
        assert [f["val_acc"] for f in row["folds"]] == pytest.approx(accs)
        assert row["cv_mean"] == pytest.approx(np.mean(accs))
        assert row["cv_std"] == pytest.approx(np.std(accs, ddof=1))
        assert row["cv_loss"] == pytest.approx(np.mean([m["val_loss"] for m in metrics]))
        assert row["tta_gain"] == pytest.approx(np.mean([p["oof_acc_tta"] - p["oof_acc"] for p in preds]))
        assert row["train_time_s"] == pytest.approx(sum(m["train_time_s"] for m in metrics))
        assert row["images_per_s"] == pytest.approx(np.mean([m["images_per_s"] for m in metrics]))
        assert (row["folds_complete"], row["folds_total"], row["status"]) == (3, 3, "complete")
    assert by["exp_a"]["backbone"] == "resnet10t" and by["exp_b"]["backbone"] == "test_resnet"
    assert by["exp_a"]["augment"] == "none" and by["exp_b"]["augment"] == "mixup0.2 ema"
    # default order: best CV first
    assert [r["experiment"] for r in rows] == sorted(by, key=lambda n: -by[n]["cv_mean"])

    text = main(["--set", f"paths.runs={a.paths.runs}"])
    header = text.splitlines()[0].split()
    for col in ("experiment", "backbone", "img", "epochs", "augment", "cv_acc", "cv_loss", "f0", "f1", "f2",
                "tta_gain", "time", "img/s", "folds", "wandb"):
        assert col in header
    assert f"{by['exp_b']['cv_mean']:.4f}±{by['exp_b']['cv_std']:.4f}" in text
    assert "3/3" in text


def test_diff_shows_exactly_the_keys_that_differ(two_runs):
    a, _ = two_runs
    runs = load_runs(a.paths.runs)
    d = config_diff(runs)
    assert set(d.index) == {"model.backbone", "train.lr", "train.mixup_alpha", "train.ema"}
    assert d.loc["model.backbone", "exp_a"] == "resnet10t" and d.loc["train.lr", "exp_b"] == 0.01
    text = main(["--diff", "--format", "json", "--set", f"paths.runs={a.paths.runs}"])
    assert set(json.loads(text)) == set(d.index)


def test_where_sort_and_formats(two_runs):
    a, _ = two_runs
    base = ["--set", f"paths.runs={a.paths.runs}"]
    rows = json.loads(main(["--where", "model.backbone=resnet10t", "--format", "json", *base]))
    assert [r["experiment"] for r in rows] == ["exp_a"]
    rows = json.loads(main(["--where", "train.lr!=0.01", "--where", "train.ema=false", "--format", "json", *base]))
    assert [r["experiment"] for r in rows] == ["exp_a"]
    rows = json.loads(main(["--sort", "train.lr", "--ascending", "--format", "json", *base]))
    assert [r["experiment"] for r in rows] == ["exp_a", "exp_b"]
    rows = json.loads(main(["--sort", "experiment", "--format", "json", *base]))
    assert [r["experiment"] for r in rows] == ["exp_b", "exp_a"]
    rows = json.loads(main(["--where", "train.lr=1e-2", "--format", "json", *base]))
    assert [r["experiment"] for r in rows] == ["exp_b"]  # YAML reads "1e-2" as a string; it still equals 0.01
    with pytest.raises(PipelineError, match="no run matches"):
        main(["--where", "train.ema=0", *base])  # False == 0 in Python, not here
    csv = pd.read_csv(StringIO(main(["--format", "csv", *base])))
    assert {"cv_mean", "cv_std", "fold0", "fold2", "tta_gain", "folds_complete"} <= set(csv.columns)
    assert len(csv) == 2
    md = main(["--format", "markdown", "exp_*", *base]).splitlines()
    assert md[0].startswith("| experiment |") and md[1].startswith("|---") and len(md) == 4


def test_user_errors_are_one_clear_message(two_runs, tmp_path, capsys):
    a, _ = two_runs
    base = ["--set", f"paths.runs={a.paths.runs}"]
    assert cli_entry(main, ["--where", "model.backbon=resnet10t", *base]) == 2
    assert "Did you mean model.backbone" in capsys.readouterr().err
    assert cli_entry(main, ["--sort", "cv_meen", *base]) == 2
    assert "Did you mean cv_mean" in capsys.readouterr().err
    assert cli_entry(main, ["exp_c", *base]) == 2
    assert "Runs there: exp_a, exp_b" in capsys.readouterr().err
    assert cli_entry(main, ["--set", f"paths.runs={tmp_path / 'nothing'}"]) == 2
    assert "no runs found" in capsys.readouterr().err
    assert cli_entry(main, ["--plot", str(tmp_path / "curves.pgn"), *base]) == 2
    assert "unknown image type '.pgn'" in capsys.readouterr().err
    assert cli_entry(main, ["--diff", "exp_a", *base]) == 2
    assert "--diff needs at least two runs" in capsys.readouterr().err


def test_incomplete_and_half_written_folds_are_shown_not_raised(make_cfg, capsys):
    cfg = make_cfg("experiment=partial", "folds.k=5", "train.epochs=4")
    # folds 0-1 complete, fold 2 running (history only), fold 3 metrics.json cut in half, fold 4 not started
    run = write_fake_run(cfg, folds_done=2, half_written=3, epochs_done_incomplete=2)
    assert not (run / "fold4").exists() and (run / "fold2" / "history.csv").is_file()
    assert cli_entry(main, ["--set", f"paths.runs={cfg.paths.runs}"]) == 0
    out = capsys.readouterr()
    line = next(li for li in out.out.splitlines() if li.startswith("partial "))
    assert "2/5" in line and "…ep2/4" in line
    assert "fold3/metrics.json is half-written" in out.err
    rows = json.loads(compare(cfg, fmt="json", notes_to=StringIO()))
    (row,) = rows
    assert row["status"] == "incomplete" and row["folds_complete"] == 2
    assert [f["status"] for f in row["folds"]] == ["complete", "complete", "incomplete", "incomplete", "missing"]
    accs = [_oof_acc(run / f"fold{k}" / "oof.csv") for k in range(2)]
    assert row["cv_mean"] == pytest.approx(np.mean(accs))


def test_run_folder_without_config_or_folds_yet(make_cfg):
    cfg = make_cfg("experiment=starting")
    (Path(cfg.paths.runs) / "starting" / "fold0").mkdir(parents=True)
    (table,) = [summarize(load_runs(cfg.paths.runs))]
    assert table.loc[0, "status"] == "incomplete" and math.isnan(table.loc[0, "cv_mean"])


def test_plot_writes_a_readable_png(two_runs, make_cfg, tmp_path):
    a, _ = two_runs
    write_fake_run(make_cfg("experiment=exp_partial", "folds.k=3", "train.epochs=3"), folds_done=1)
    out = tmp_path / "compare.png"
    main(["--plot", str(out), "--set", f"paths.runs={a.paths.runs}"])
    from matplotlib.image import imread

    img = imread(out)
    assert img.shape[0] > 800 and img.shape[1] > 1000 and img[..., :3].std() > 0.05


def test_wandb_offline_runs_are_read_without_network(make_cfg):
    pytest.importorskip("wandb")
    cfg = make_cfg("experiment=wb", "folds.k=2", "train.epochs=2", "wandb.mode=offline")
    run_root = write_fake_run(cfg)
    from pipeline.engine.wandb_run import start_run

    for fold in range(2):
        r = start_run(cfg.wandb, run_root, name=f"wb-fold{fold}", group="wb", job_type="train",
                      config={**cfg.to_dict(), "fold": fold})
        r.log({"epoch": 0, "val_acc": 0.5 + fold / 10})
        r.summary["best_val_acc"] = 0.6 + fold / 10
        r.finish()
    # finish() can return before wandb-core has flushed the log (measured: up to 0.1 s); a process
    # exit always flushes, so only a reader in the same process needs to wait
    deadline = time.monotonic() + 30
    runs = find_wandb_runs(run_root)
    while not all(w.finished for w in runs) and time.monotonic() < deadline:
        time.sleep(0.1)
        runs = find_wandb_runs(run_root)
    assert [w.name for w in runs] == ["wb-fold0", "wb-fold1"]
    w0 = runs[0]
    assert (w0.group, w0.job_type, w0.config["fold"], w0.config["model"]["backbone"]) == ("wb", "train", 0, cfg.model.backbone)
    assert w0.summary["best_val_acc"] == pytest.approx(0.6) and w0.summary["val_acc"] == pytest.approx(0.5)
    assert w0.finished and w0.offline and not w0.synced

    # a writer killed mid-record: the records before the cut are still read
    log = next(runs[1].path.glob("run-*.wandb"))
    log.write_bytes(log.read_bytes()[:-5])
    (w1,) = [w for w in find_wandb_runs(run_root) if w.name == "wb-fold1"]
    assert w1.config["fold"] == 1 and w1.group == "wb"
    # a run still in progress: wandb-core may not have flushed more than the file header yet
    log.write_bytes(log.read_bytes()[:7])
    w1 = find_wandb_runs(run_root)[1]
    assert w1.name is None and not w1.finished and w1.problem is None

    text = main(["--wandb", "--set", f"paths.runs={cfg.paths.runs}"])
    assert "wb-fold0" in text and "running/killed, offline" in text
    (row,) = json.loads(compare(cfg, fmt="json"))
    assert row["wandb_runs"] == 2 and row["wandb_unsynced"] == 2


@pytest.mark.slow
def test_two_real_experiments_on_the_embedded_default(make_cfg, seed_dedup, tmp_path):
    """Two tiny real trainings (one fold each of 2): the table and --diff agree with what train wrote."""
    from pipeline.train import train_fold

    common = ["folds.k=2", "train.epochs=1", "train.img_size=16", "train.batch_size=128", "tta=[identity]"]
    a = make_cfg("experiment=real_a", "model.backbone=test_resnet", *common)
    b = make_cfg("experiment=real_b", "model.backbone=resnet10t", "train.lr=0.004", *common)
    for cfg in (a, b):
        train_fold(seed_dedup(cfg), 0)
    rows = {r["experiment"]: r for r in json.loads(compare(a, fmt="json", notes_to=StringIO()))}
    for name, cfg in (("real_a", a), ("real_b", b)):
        metrics = json.loads((Path(cfg.paths.runs) / name / "fold0" / "metrics.json").read_text())
        row = rows[name]
        assert row["fold0"] == pytest.approx(metrics["val_acc"])
        assert row["fold0"] == pytest.approx(_oof_acc_any(Path(cfg.paths.runs) / name / "fold0" / "oof.csv",
                                                          Path(cfg.paths.runs) / name / "classes.json"))
        assert row["cv_mean"] == pytest.approx(metrics["val_acc"])
        assert (row["folds_complete"], row["folds_total"], row["status"]) == (1, 2, "incomplete")
        assert row["backbone"] == cfg.model.backbone and row["img_size"] == 16
        assert [f["status"] for f in row["folds"]] == ["complete", "missing"]
    d = config_diff(load_runs(a.paths.runs))
    assert set(d.index) == {"model.backbone", "train.lr"}
    out = tmp_path / "real.png"
    main(["--plot", str(out), "--set", f"paths.runs={a.paths.runs}"])
    assert out.stat().st_size > 20_000


def _oof_acc_any(oof: Path, classes_json: Path) -> float:
    classes = json.loads(classes_json.read_text())["classes"]
    df = pd.read_csv(oof)
    return float((df[classes].to_numpy().argmax(1) == df["label"].map(classes.index).to_numpy()).mean())


def test_wandb_files_folder_and_synced_marker(tmp_path):
    """Older wandb versions and online runs keep files/config.yaml and files/wandb-summary.json."""
    import yaml

    online = tmp_path / "exp" / "wandb" / "run-20260101_000000-abc123" / "files"
    online.mkdir(parents=True)
    (online / "config.yaml").write_text(yaml.safe_dump({"_wandb": {"value": {"cli_version": "0.17"}},
                                                        "fold": {"desc": None, "value": 3},
                                                        "model": {"value": {"backbone": "convnext_tiny"}}}))
    (online / "wandb-summary.json").write_text(json.dumps({"val_acc": 0.91, "_runtime": 12}))
    offline = tmp_path / "exp" / "wandb" / "offline-run-20260101_000100-def456"
    offline.mkdir()
    (offline / "run-def456.wandb").write_bytes(b":W&B\xe1\xbe\x00")  # header only: nothing flushed yet
    (offline / "run-def456.wandb.synced").touch()
    first, second = find_wandb_runs(tmp_path / "exp")
    assert first.config == {"fold": 3, "model": {"backbone": "convnext_tiny"}} and first.summary["val_acc"] == 0.91
    assert not first.offline and first.run_id == "abc123"
    assert second.offline and second.synced and second.run_id == "def456" and second.name is None
