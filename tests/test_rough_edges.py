"""What a competitor trips over on their own folder (issue 17): config-relative paths, the first
line of every command, label messages, captions, the balance table and progress bars in logs."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline import progress
from pipeline.config import Config, load_config, path_keys
from pipeline.data import DataError, load_competition
from pipeline.errors import cli_entry

REPO = Path(__file__).resolve().parents[1]


def _img(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _dog_folder(root: Path, labels: list[tuple[str, str]], sample_classes: list[str]) -> Path:
    """A small Dog-breed-layout folder: labels.csv (id,breed), train/<id>.jpg, test/<id>.jpg."""
    for i, (id_, _) in enumerate(labels):
        _img(root / "train" / f"{id_}.jpg", 20 * i)
    for t in ("t1", "t2"):
        _img(root / "test" / f"{t}.jpg")
    (root / "labels.csv").write_text("id,breed\n" + "".join(f"{i},{b}\n" for i, b in labels))
    cols = ",".join(sample_classes)
    (root / "sample_submission.csv").write_text(
        f"id,{cols}\n" + "".join(f"{t}," + ",".join("0.5" for _ in sample_classes) + "\n" for t in ("t1", "t2")))
    return root


# ----------------------------------------------------------------------------- point 3: paths


def test_relative_paths_in_a_config_file_are_read_from_its_folder(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "my.yaml").write_text("competition:\n  root: comp\n  solution: private/solution.csv\n"
                                  "paths:\n  runs: out/runs\nmodel:\n  pretrained: true\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(mine / "my.yaml")
    assert Path(cfg.competition.root) == mine / "comp"
    assert Path(cfg.competition.solution) == mine / "private" / "solution.csv"
    assert Path(cfg.paths.runs) == mine / "out" / "runs"
    assert cfg.model.pretrained is True  # a boolean is not a path
    assert Path(cfg.paths.work) == elsewhere / "work"  # a default is read from the working folder
    # --set values are typed at a prompt: read from the working folder.
    cfg = load_config(mine / "my.yaml", ["competition.root=other", "model.pretrained=w.pth"])
    assert Path(cfg.competition.root) == elsewhere / "other"
    assert Path(cfg.model.pretrained) == elsewhere / "w.pth"
    # The saved config reloads to the same thing wherever it lies.
    from pipeline.config import save_config

    save_config(cfg, tmp_path / "runs" / "x" / "config.yaml")
    assert load_config(tmp_path / "runs" / "x" / "config.yaml") == cfg


def test_a_missing_root_names_the_resolved_path(tmp_path, monkeypatch):
    (tmp_path / "my.yaml").write_text("competition:\n  root: comp\n")
    monkeypatch.chdir(REPO)
    cfg = load_config(tmp_path / "my.yaml")
    with pytest.raises(DataError) as info:
        load_competition(cfg.competition)
    assert f"resolved: {tmp_path / 'comp'}" in str(info.value)
    assert "read from that file's folder" in str(info.value)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_point_into_the_checkout_from_any_folder(name, tmp_path, monkeypatch):
    """A shipped config names data/... (or a label audit's draft in runs/...) of the checkout, written
    ../data/... beside configs/."""
    from pipeline.detect.config import DetectConfig

    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    schema = DetectConfig if "data" in raw else Config
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / name, schema=schema).to_dict()
    for key in path_keys(schema):
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        written = raw
        for part in key.split("."):
            written = written.get(part) if isinstance(written, dict) else None
        if isinstance(written, str) and written.lower() not in ("true", "false"):
            assert Path(node).is_relative_to(REPO / "data") or Path(node).is_relative_to(REPO / "runs"), (key, node)


# ----------------------------------------------------------------------------- point 3: first line


@pytest.mark.parametrize("module", ["pipeline.ensemble", "pipeline.predict", "pipeline.compare"])
def test_every_command_says_which_config_and_competition_first(module, make_cfg, tmp_path, capsys):
    import importlib

    main = importlib.import_module(module).main
    argv = ["--config", str(REPO / "configs" / "default.yaml"),
            "--set", f"paths.runs={tmp_path / 'runs'}", "--set", f"paths.work={tmp_path / 'work'}"]
    cli_entry(main, argv)
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"using config {REPO / 'configs' / 'default.yaml'} with 2 --set overrides")
    assert f"competition digits ({REPO / 'data' / 'digits'})" in first


# ----------------------------------------------------------------------------- point 7: labels


def test_spaces_around_labels_are_reported_once_with_the_count(tmp_path, capsys):
    from pipeline.data import competition as reader

    root = _dog_folder(tmp_path / "dogs", [("a1", "beagle "), ("a2", "pug"), ("a3", " beagle"), ("a4", "pug")],
                       ["beagle", "pug"])
    cfg = load_config(REPO / "configs" / "dog_breed.yaml", [f"competition.root={root}"]).competition
    reader._said.clear()
    comp = load_competition(cfg)
    load_competition(cfg)
    assert comp.classes == ["beagle", "pug"]
    err = capsys.readouterr().err
    assert err.count("note: labels.csv: removed spaces around 2 label(s)") == 1
    assert "line 2: 'beagle ' -> 'beagle'" in err


def test_a_class_spelled_differently_lists_its_rows_and_the_nearest_column(tmp_path):
    root = _dog_folder(tmp_path / "dogs", [("a1", "Grace_Hopper"), ("a2", "pug"), ("a3", "Grace_Hopper")],
                       ["grace_hopper", "pug"])
    cfg = load_config(REPO / "configs" / "dog_breed.yaml", [f"competition.root={root}"]).competition
    with pytest.raises(DataError) as info:
        load_competition(cfg)
    msg = str(info.value)
    assert "labels.csv line(s) 2, 4 (2 row(s)): class 'Grace_Hopper' has no probability column" in msg
    assert "did you mean 'grace_hopper'?" in msg
    assert "Spell the labels" in msg and "remove these rows" not in msg


def test_a_missing_test_image_is_not_advised_away(tmp_path):
    root = _dog_folder(tmp_path / "dogs", [("a1", "beagle"), ("a2", "pug")], ["beagle", "pug"])
    (root / "test" / "t2.jpg").unlink()
    cfg = load_config(REPO / "configs" / "dog_breed.yaml", [f"competition.root={root}"]).competition
    with pytest.raises(DataError) as info:
        load_competition(cfg)
    msg = str(info.value)
    assert "'test/t2.jpg' not found" in msg
    assert "must list every test id" in msg and "Fix or remove" not in msg


# ----------------------------------------------------------------------------- point 8: small things


def test_balance_table_keeps_whole_class_names():
    from pipeline.folds import balance_table

    names = ["miniature_pinscher", "miniature_poodle", "miniature_schnauzer"]
    folds = pd.DataFrame({"label": [n for n in names for _ in range(4)], "fold": [0, 1, 0, 1] * 3,
                          "group": [str(i) for i in range(12)]})
    rows = balance_table(folds, 2).splitlines()
    starts = [r.split()[0] for r in rows[3:]]
    assert starts == names
    assert len({len(r) for r in rows}) == 1  # columns still line up


def test_contact_sheet_captions_of_kaggle_ids_do_not_overlap(tmp_path):
    import matplotlib.pyplot as plt

    from pipeline.dedup_sheet import draw_sheet

    ids = [f"{i:02d}0bec180eb18c7604dcecc8fe0dba07" for i in range(8)]
    for i in ids:
        _img(tmp_path / "train" / f"{i}.jpg", 30)
    group = {"group": 0, "size": 8, "kind": "exact", "conflict": False, "overlap": False,
             "images": [f"train/{i}.jpg" for i in ids], "labels": ["miniature_schnauzer"] * 8,
             "splits": ["train"] * 8}
    fig = draw_sheet([group], tmp_path)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.xaxis.label.get_window_extent(renderer) for ax in fig.axes if ax.xaxis.label.get_text()]
    plt.close(fig)
    assert len(boxes) == 8
    for a, b in zip(boxes, boxes[1:]):
        assert a.x1 <= b.x0, "neighbouring captions overlap"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal_and_not_with_quiet(monkeypatch):
    import timm
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.engine.amp import resolve_amp
    from pipeline.engine.distributed import DistInfo
    from pipeline.engine.loop import validate

    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    loader = DataLoader(TensorDataset(torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])), batch_size=2)

    def run() -> str:
        validate(model, loader, 6, np.arange(6), info=DistInfo(), amp=resolve_amp("off", torch.device("cpu")))
        return stream.getvalue()

    stream = io.StringIO()  # a log file
    monkeypatch.setattr("sys.stderr", stream)
    assert run() == ""
    stream = _Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    assert "\r" in run()
    stream = _Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    progress.set_quiet(True)
    try:
        assert run() == ""
        out = io.StringIO()
        monkeypatch.setattr("sys.stdout", out)
        progress.line("fold 0 epoch 1/1: ...")  # --quiet: no per-epoch line either
        assert out.getvalue() == ""
    finally:
        progress.set_quiet(False)
    progress.line("fold 0 epoch 1/1: ...")
    assert out.getvalue() == "fold 0 epoch 1/1: ...\n"  # off a terminal: one plain line per epoch


# ----------------------------------------------------------------------------- point 2: compare


@pytest.fixture
def three_competitions(make_cfg):
    """Two digits runs (accuracy) and two dog-breed runs (log loss) side by side under one runs/."""
    from test_compare import write_fake_run

    runs = {}
    for name, seed, quality in (("dig_a", 1, 0.6), ("dig_b", 2, 0.9)):
        runs[name] = make_cfg(f"experiment={name}", "folds.k=2", "train.epochs=2")
        write_fake_run(runs[name], rng_seed=seed, quality=quality)
    for name, seed, quality, loss in (("dog_a", 3, 0.9, 0.9), ("dog_b", 4, 0.5, 0.4)):
        # dog_b has the lower accuracy but the better (lower) log loss: the metric decides the order
        runs[name] = make_cfg(f"experiment={name}", "folds.k=2", "train.epochs=2", "competition.name=dogs",
                              "competition.metric=log_loss", "competition.submission_form=probabilities")
        run = write_fake_run(runs[name], rng_seed=seed, quality=quality)
        for k in range(2):
            m = json.loads((run / f"fold{k}" / "metrics.json").read_text())
            (run / f"fold{k}" / "metrics.json").write_text(json.dumps({**m, "val_loss": loss + 0.01 * k}))
    return runs


def test_compare_shows_the_configs_competition_sorted_by_its_metric(three_competitions):
    from pipeline.compare import compare

    digits = json.loads(compare(three_competitions["dig_a"], fmt="json"))
    assert {r["experiment"] for r in digits} == {"dig_a", "dig_b"}
    assert [r["experiment"] for r in digits] == ["dig_b", "dig_a"]  # accuracy: higher first
    dogs = json.loads(compare(three_competitions["dog_a"], fmt="json"))
    assert [r["experiment"] for r in dogs] == ["dog_b", "dog_a"]  # log loss: lower first
    assert dogs[0]["cv_mean"] < dogs[1]["cv_mean"]
    everything = json.loads(compare(three_competitions["dog_a"], fmt="json", all_competitions=True))
    assert [(r["competition"], r["experiment"]) for r in everything] == [
        ("digits", "dig_b"), ("digits", "dig_a"), ("dogs", "dog_b"), ("dogs", "dog_a")]
    text = compare(three_competitions["dog_a"], all_competitions=True)
    header = text.splitlines()[0].split()
    assert "competition" in header and "disk" in header


def test_compare_disk_column_counts_the_run_folder(three_competitions):
    from pipeline.compare import compare

    cfg = three_competitions["dig_a"]
    run = Path(cfg.paths.runs) / "dig_a"
    (run / "fold0" / "best.pt").write_bytes(b"\0" * (3 << 20))
    rows = {r["experiment"]: r for r in json.loads(compare(cfg, fmt="json"))}
    assert rows["dig_a"]["disk_bytes"] == sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    assert rows["dig_a"]["disk_bytes"] > 3 << 20 > rows["dig_b"]["disk_bytes"]


def test_compare_plot_bars_use_the_competitions_metric(three_competitions, tmp_path):
    from pipeline.compare_plots import plot_runs
    from pipeline.compare_records import load_runs, summarize

    cfg = three_competitions["dog_a"]
    runs = load_runs(cfg.paths.runs, ["dog_a", "dog_b"])
    fig = plot_runs(runs, summarize(runs))
    bars_ax = fig.axes[-1]
    assert "log loss" in bars_ax.get_ylabel()
    heights = sorted(round(p.get_height(), 3) for p in bars_ax.patches)
    assert heights == [0.405, 0.905]


def test_compare_outside_the_checkout_works_on_runs_without_a_config(three_competitions, tmp_path,
                                                                   monkeypatch, capsys):
    import shutil

    from pipeline.compare import main

    here = tmp_path / "elsewhere"
    shutil.copytree(three_competitions["dig_a"].paths.runs, here / "runs")
    monkeypatch.chdir(here)
    text = main([])
    assert {line.split()[0] for line in text.splitlines()[1:]} == {"dig_a", "dig_b", "dog_a", "dog_b"}
    assert "using no config" in capsys.readouterr().err


def test_readme_sections_and_paragraphs_appear_once():
    """An edit once pasted 900 lines of the README into the middle of another section: every ## heading
    and every long paragraph line is there once (### headings repeat across the two tracks)."""
    lines = (REPO / "README.md").read_text().splitlines()
    fenced, seen, repeated = False, set(), []
    for line in lines:
        fenced ^= line.startswith("```")
        key = line.strip()
        if fenced or not (line.startswith("## ") or len(key) > 80) or key.startswith("|"):
            continue
        if key in seen:
            repeated.append(key)
        seen.add(key)
    assert not repeated, f"README.md repeats {len(repeated)} lines, first: {repeated[:3]}"
