"""Code competitions: a package of known members predicts exactly what the ensemble blended.

Two tiny experiments (untrained test_resnet at 16 px, 2 folds each, written in the train stage's
form) are predicted, blended with fixed weights, packaged and inferred from the package alone.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import package_files as pf
from pipeline.config import load_config
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
MEMBERS = {"tiny_a": 0.3, "tiny_b": 0.7}


def tiny_cfg(tmp: Path, root: Path, *overrides: str):
    base = [f"paths.work={tmp / 'work'}", f"paths.runs={tmp / 'runs'}", f"paths.submissions={tmp / 'submissions'}",
            f"paths.packages={tmp / 'packages'}", f"competition.root={root}",
            f"competition.solution={root.parent / 'digits_private' / 'solution.csv'}", "wandb.mode=disabled",
            "train.num_workers=0", "model.backbone=test_resnet", "folds.k=2", "train.img_size=16",
            "tta=[identity, zoom_1.125]", "predict.batch_size=64"]
    return load_config(REPO / "configs" / "default.yaml", base + list(overrides))


@pytest.fixture(scope="module")
def blended(tmp_path_factory, digits_root):
    """(cfg, ensemble result, package folder) for two known members with fixed weights 0.3 / 0.7."""
    import torch
    from test_predict import fake_fold

    from pipeline.ensemble import run_ensemble
    from pipeline.package import make_package
    from pipeline.predict import predict_fold

    tmp = tmp_path_factory.mktemp("pkg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, exp in enumerate(MEMBERS):
            cfg = tiny_cfg(tmp, digits_root, f"experiment={exp}")
            for k in range(2):
                fake_fold(cfg, k, seed=10 * i + k)
                predict_fold(cfg, k, quiet=True)
        cfg = tiny_cfg(tmp, digits_root, "ensemble.method=fixed",
                       f"ensemble.weights={json.dumps(MEMBERS)}")
        result = run_ensemble(cfg, list(MEMBERS), name="tiny", quiet=True)
        pkg = make_package(cfg, name="tiny", quiet=True)
    finally:
        torch.set_num_threads(threads)
    return cfg, result, pkg


def ensemble_probs(cfg, names: list[str], weights: dict[str, float]) -> pd.DataFrame:
    """The blended test probabilities exactly as pipeline.ensemble computed them (from the fold files)."""
    from pipeline.ensemble import blend, load_experiment

    exps = [load_experiment(cfg, n) for n in names]
    images = exps[0].test["image"]
    p = blend(np.stack([e.test.set_index("image").loc[images, e.classes].to_numpy(np.float64) for e in exps]),
              np.array([weights[n] for n in names]))
    return pd.DataFrame(p, index=images.to_numpy(), columns=exps[0].classes)


def test_package_holds_weights_hashes_and_the_blend(blended):
    cfg, result, pkg = blended
    manifest = pf.verify_package(pkg)
    spec = json.loads((pkg / pf.ENSEMBLE).read_text())
    assert [m["name"] for m in spec["members"]] == list(MEMBERS)
    assert {m["name"]: m["weight"] for m in spec["members"]} == pytest.approx(MEMBERS)
    assert all(m["tta"] == ["identity", "zoom_1.125"] and m["folds"] == [0, 1] for m in spec["members"])
    files = manifest["files"]
    for m in MEMBERS:
        for k in (0, 1):
            assert pf.weights_file(m, k) in files
    wheels = [f for f in files if f.startswith("wheels/")]
    assert len(wheels) == 1 and wheels[0].startswith("wheels/pipeline-") and wheels[0].endswith(".whl")
    assert not any("torch" in w for w in wheels)
    assert spec["submission_columns"] == ["image", "label"]
    assert (pkg / pf.NOTEBOOK).is_file() and "kaggle datasets create" in (pkg / pf.README).read_text()
    # Inference weights only: a plain state dict, no optimizer or training state.
    import torch

    state = torch.load(pkg / pf.weights_file("tiny_a", 0), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and "optimizer" not in state


def test_infer_equals_ensemble(blended, tmp_path):
    from pipeline.infer import run_infer

    cfg, result, pkg = blended
    root = Path(cfg.competition.root)
    res = run_infer(pkg, test_csv=str(root / "test.csv"), sample_submission=str(root / "sample_submission.csv"),
                    out=tmp_path / "submission.csv", probs_out=tmp_path / "probs.csv", num_workers=0, quiet=True)
    ours = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    theirs = pd.read_csv(result.submission, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(ours, theirs)
    assert res.n_images == len(theirs) and res.report["validated"]
    want = ensemble_probs(cfg, list(MEMBERS), result.weights)
    got = pd.read_csv(tmp_path / "probs.csv", dtype={"image": str}).set_index("image").loc[want.index]
    assert np.abs(got.to_numpy() - want.to_numpy()).max() < 1e-6
    # Not a trivial blend: the members disagree, so the weights matter.
    assert not np.allclose(ensemble_probs(cfg, ["tiny_a"], {"tiny_a": 1}).to_numpy(), want.to_numpy(), atol=1e-3)
    with pytest.raises(FileExistsError, match="never overwritten"):
        run_infer(pkg, test_csv=str(root / "test.csv"), out=tmp_path / "submission.csv", quiet=True)


def test_a_seeds_experiment_is_packaged_as_its_seed_runs(blended, tmp_path):
    """``seeds: [0, 1]`` leaves no weights in the experiment's own folder (it holds the runs' average):
    the package takes each seed run with half the experiment's weight and predicts what was blended."""
    from test_predict import fake_fold

    from pipeline.ensemble import run_ensemble
    from pipeline.infer import run_infer
    from pipeline.package import make_package
    from pipeline.predict import predict_fold
    from pipeline.seeds import average_members, mark_member, member_configs

    cfg, _, _ = blended
    root = Path(cfg.competition.root)
    work = Path(cfg.paths.runs).parent
    seeded = tiny_cfg(work, root, "experiment=tiny_s", "seeds=[0, 1]")
    runs = member_configs(seeded)
    for m in runs:
        for k in range(2):
            fake_fold(m, k, seed=100 + 10 * m.seed + k)
            predict_fold(m, k, quiet=True)
        mark_member(seeded, m)
    average_members(seeded, runs, [0, 1])
    weights = {"tiny_a": 0.4, "tiny_s": 0.6}
    blend_cfg = tiny_cfg(work, root, "ensemble.method=fixed", f"ensemble.weights={json.dumps(weights)}")
    result = run_ensemble(blend_cfg, list(weights), name="tiny_seeds", quiet=True)
    pkg = make_package(blend_cfg, submission=str(result.submission), name="tiny_seeds", quiet=True)
    spec = json.loads((pkg / pf.ENSEMBLE).read_text())
    assert {m["name"]: m["weight"] for m in spec["members"]} == pytest.approx(
        {"tiny_a": 0.4, "tiny_s-seed0": 0.3, "tiny_s-seed1": 0.3})
    run_infer(pkg, test_csv=str(root / "test.csv"), out=tmp_path / "s.csv", probs_out=tmp_path / "p.csv",
              num_workers=0, quiet=True)
    want = ensemble_probs(blend_cfg, list(weights), result.weights)
    got = pd.read_csv(tmp_path / "p.csv", dtype={"image": str}).set_index("image").loc[want.index]
    assert np.abs(got.to_numpy() - want.to_numpy()).max() < 1e-6
    # The seed runs differ, so packaging one of them alone would not have matched.
    one = ensemble_probs(blend_cfg, ["tiny_a", "tiny_s-seed0"], {"tiny_a": 0.4, "tiny_s-seed0": 0.6})
    assert np.abs(one.to_numpy() - want.to_numpy()).max() > 1e-3


@pytest.mark.slow
def test_float16_package_keeps_the_labels(blended, tmp_path):
    from pipeline.infer import run_infer
    from pipeline.package import make_package, package_size

    cfg, result, pkg = blended
    half = make_package(cfg, submission=str(result.submission), name="tiny_fp16", dtype="float16", quiet=True)
    assert package_size(half)["weights"] < 0.6 * package_size(pkg)["weights"]
    root = Path(cfg.competition.root)
    run_infer(half, test_csv=str(root / "test.csv"), out=tmp_path / "s.csv", probs_out=tmp_path / "p.csv",
              quiet=True)
    want = ensemble_probs(cfg, list(MEMBERS), result.weights)
    got = pd.read_csv(tmp_path / "p.csv", dtype={"image": str}).set_index("image").loc[want.index]
    assert np.abs(got.to_numpy() - want.to_numpy()).max() < 1e-2


def test_a_tampered_or_missing_file_is_refused_by_name(blended, tmp_path):
    from pipeline.infer import run_infer

    cfg, _, pkg = blended
    bad = tmp_path / "bad"
    shutil.copytree(pkg, bad)
    w = bad / pf.weights_file("tiny_b", 1)
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    (bad / pf.weights_file("tiny_a", 0)).unlink()
    with pytest.raises(pf.PackageError) as err:
        run_infer(bad, test_csv=str(Path(cfg.competition.root) / "test.csv"), out=tmp_path / "s.csv", quiet=True)
    msg = str(err.value)
    assert "weights/tiny_b/fold1.pt: sha256 differs" in msg and "weights/tiny_a/fold0.pt: missing" in msg
    assert not (tmp_path / "s.csv").exists()


def test_every_undecodable_test_image_is_named(blended, tmp_path):
    from pipeline.infer import run_infer

    cfg, _, pkg = blended
    root = Path(cfg.competition.root)
    test = pd.read_csv(root / "test.csv", dtype=str).head(6)
    (tmp_path / "images").mkdir()
    for img in test["image"]:
        shutil.copy(root / img, tmp_path / img)
    broken = test["image"].iloc[[1, 4]].tolist()
    (tmp_path / broken[0]).write_bytes(b"not an image at all")
    (tmp_path / broken[1]).write_bytes((root / test["image"].iloc[0]).read_bytes()[:40])  # truncated PNG
    test.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(PipelineError) as err:
        run_infer(pkg, test_csv=str(tmp_path / "test.csv"), out=tmp_path / "s.csv", quiet=True)
    msg = str(err.value)
    assert "2 test image(s) could not be decoded" in msg and all(b in msg for b in broken)
    others = set(test["image"]) - set(broken)
    assert not any(o in msg for o in others)


def test_missing_test_image_is_named(blended, tmp_path):
    from pipeline.infer import run_infer

    _, _, pkg = blended
    pd.DataFrame({"image": ["images/nowhere.png"]}).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(PipelineError, match="images/nowhere.png"):
        run_infer(pkg, test_csv=str(tmp_path / "test.csv"), out=tmp_path / "s.csv", quiet=True)


@pytest.mark.processes
def test_the_notebook_runs_under_nbclient(blended, tmp_path, monkeypatch):
    """The package's own notebook, its paths cell pointed here; pip only resolves (PIP_DRY_RUN) so the
    shared environment is not changed (the slow rehearsal test installs for real)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    cfg, result, pkg = blended
    root = Path(cfg.competition.root)
    # A slice of the test set keeps this fast: the images stay where they are (paths relative to root).
    expected = pd.read_csv(result.submission, dtype=str, keep_default_na=False).iloc[::30].reset_index(drop=True)
    test_csv = tmp_path / "test.csv"
    expected[["image"]].to_csv(test_csv, index=False)
    expected.assign(label="x").to_csv(tmp_path / "sample.csv", index=False)
    (tmp_path / "images").symlink_to(root / "images")
    nb = nbformat.read(pkg / pf.NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = (f"PACKAGE = {str(pkg)!r}\nTEST_DIR = None\nTEST_CSV = {str(test_csv)!r}\n"
                   f"SAMPLE_SUBMISSION = {str(tmp_path / 'sample.csv')!r}\nOUT = 'submission.csv'\n"
                   "DEVICE = 'cpu'")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PIP_DRY_RUN", "1")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels" / "pkg-tests"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pkg tests", "language": "python"}))
    km = KernelManager(kernel_name="pkg-tests", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels.parent)]))
    work = tmp_path / "working"
    work.mkdir()
    nbclient.NotebookClient(nb, km=km, timeout=300, allow_errors=False,
                            resources={"metadata": {"path": str(work)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    # pipeline is installed in development mode here: pip resolves it from the package's wheels folder.
    assert f"{pkg}/wheels" in text and ("Would install pipeline" in text or "already satisfied: pipeline" in text)
    assert "load all 4 weight files" in text
    sub = pd.read_csv(work / "submission.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(sub, expected)
    assert json.loads((work / "infer_report.json").read_text())["validated"] is True


@pytest.mark.slow
def test_budget_drops_the_member_that_costs_most_per_loss_saved(blended, monkeypatch, capsys):
    """tiny_a is made 10x as expensive: a budget that fits only one member keeps tiny_b, re-weighted to 1."""
    import pipeline.budget as budget
    from pipeline.package import make_package

    cfg, result, _ = blended
    real = budget.seconds_per_forward

    def costed(cfg_, member, **kw):
        sec, views = real(cfg_, member, n_images=8, rounds=1)
        return (sec * 10 if member.name == "tiny_a" else sec), views

    monkeypatch.setattr(budget, "seconds_per_forward", costed)
    costs = {m: costed(cfg, type("M", (), {"name": m, "folds": [0, 1], "tta": ["identity", "zoom_1.125"],
                                           "flips": False, "crop_scale": 1.125})())[0] * 2 * 2 for m in MEMBERS}
    hidden = 1000
    fits_b_only = hidden * costs["tiny_b"] * 1.5
    assert fits_b_only < hidden * (costs["tiny_a"] + costs["tiny_b"])
    pkg = make_package(cfg, submission=str(result.submission), name="tiny_budget", budget_s=fits_b_only,
                       hidden_size=hidden, target="1")
    out = capsys.readouterr().out
    assert "budget: drop tiny_a" in out
    spec = json.loads((pkg / "ensemble.json").read_text())
    assert [m["name"] for m in spec["members"]] == ["tiny_b"] and spec["members"][0]["weight"] == pytest.approx(1)
    assert spec["budget"]["members"] == ["tiny_b"] and spec["budget"]["projected_s"] <= fits_b_only
    assert not (pkg / "weights" / "tiny_a").exists()
    with pytest.raises(PipelineError, match="even tiny_b alone"):
        make_package(cfg, submission=str(result.submission), name="tiny_budget2", budget_s=1e-6,
                     hidden_size=hidden, target="1")


@pytest.mark.slow
def test_rehearsal_passes_in_a_fresh_offline_venv_and_fails_a_tiny_limit(blended, tmp_path):
    """The real install: a venv that sees only the target image's distributions, no index, the notebook."""
    from pipeline.rehearse import rehearse

    cfg, result, pkg = blended
    report = rehearse(cfg, pkg, scale=2, hidden_size=5000, limit_s=9 * 3600, target="cpu")
    assert report["passed"], report["verdict"]
    assert report["images"] == 2 * 359 and report["csv_ok"] and report["install_s"] > 0
    assert report["images_per_s"] > 0 and report["peak_rss_mb"] > 0 and report["projected_s"] > 0
    assert "pipeline" not in report["provided"] and "torch" in report["provided"]
    tiny = rehearse(cfg, pkg, scale=1, hidden_size=5000, limit_s=1.0, target="cpu")
    assert not tiny["passed"] and "exceeds the limit" in tiny["verdict"] and "by" in tiny["verdict"]


@pytest.mark.slow
def test_rehearsal_fails_when_the_image_lacks_a_dependency(blended):
    """An image with torch but no timm (and no wheel of it in the package): pip --no-index cannot install."""
    from pipeline.rehearse import rehearse

    cfg, _, pkg = blended
    cfg = cfg.model_copy(deep=True)
    cfg.package.provided = ["torch", "ipykernel"]
    report = rehearse(cfg, pkg, scale=1, limit_s=9 * 3600)
    assert "timm" not in report["provided"]
    assert not report["passed"] and "pip" in report["verdict"] and not report["csv_ok"]
