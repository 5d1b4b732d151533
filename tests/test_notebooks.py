"""The notebooks execute (nbclient) on the embedded default, so they never rot; they are kept stripped.

The kernel is this interpreter (a kernelspec written to a temp folder), not whatever ``python3``
kernel the machine has registered: on a fresh clone ``pip install -e '.[dev]'`` is all there is.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from test_compare import write_fake_run  # noqa: E402  (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL = "pipeline-tests"


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / KERNEL).mkdir()
    (kernels / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pipeline tests", "language": "python"}))

    def make():
        return KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))

    return make


def execute(name: str, params: dict, km_factory, timeout: int = 240):
    """Run ``notebooks/<name>`` with ``params`` injected after its ``parameters`` cell (as papermill does)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    code = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(code, metadata={"tags": ["injected-parameters"]}))
    client = nbclient.NotebookClient(nb, km=km_factory(), timeout=timeout, allow_errors=False,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def _outputs(nb) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            images += "image/png" in out.get("data", {})
            text.append(out.get("text", "") + out.get("data", {}).get("text/plain", "")
                        + out.get("data", {}).get("text/html", ""))
    return "\n".join(text), images


def _overrides(tmp_path: Path, root: Path) -> list[str]:
    return [f"paths.work={tmp_path / 'work'}", f"paths.runs={tmp_path / 'runs'}",
            f"paths.submissions={tmp_path / 'submissions'}", f"competition.root={root}",
            f"competition.solution={root.parent / 'digits_private' / 'solution.csv'}", "wandb.mode=disabled"]


@pytest.mark.parametrize("name", ["eda.ipynb", "compare_runs.ipynb", "error_analysis.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"


@pytest.mark.processes
def test_eda_notebook_runs(digits_root, tmp_path, kernel_manager_factory, make_cfg, seed_dedup):
    # The session's dedup of these very images, put where the notebook's config looks: its
    # ensure_dedup() finds it current instead of running the whole stage again.
    seed_dedup(make_cfg())
    nb = execute("eda.ipynb", {"CONFIG": str(REPO / "configs" / "default.yaml"),
                               "OVERRIDES": _overrides(tmp_path, digits_root)}, kernel_manager_factory)
    text, images = _outputs(nb)
    assert "train images" in text and "classes" in text
    assert images >= 4  # class balance, sizes, sample grid, the dedup contact sheet
    assert "duplicate groups" in text and "conflict" in text
    assert "running dedup now" not in text  # the seeded outputs were current


@pytest.mark.processes
def test_compare_notebook_runs(make_cfg, digits_root, tmp_path, kernel_manager_factory):
    for name, backbone, quality in (("nb_a", "resnet10t", 0.7), ("nb_b", "test_resnet", 0.9)):
        write_fake_run(make_cfg(f"experiment={name}", f"model.backbone={backbone}", "folds.k=3",
                                "train.epochs=3"), rng_seed=len(name) + int(10 * quality), quality=quality)
    write_fake_run(make_cfg("experiment=nb_partial", "folds.k=3", "train.epochs=3"), folds_done=1)
    nb = execute("compare_runs.ipynb", {"CONFIG": str(REPO / "configs" / "default.yaml"),
                                        "OVERRIDES": _overrides(tmp_path, digits_root)}, kernel_manager_factory)
    text, images = _outputs(nb)
    for name in ("nb_a", "nb_b", "nb_partial", "model.backbone", "1/3"):
        assert name in text
    assert images == 1


@pytest.mark.processes
def test_error_analysis_notebook_runs(make_cfg, digits_root, tmp_path, kernel_manager_factory):
    import numpy as np
    import pandas as pd
    from test_analyze import CLASSES, write_oof_run

    train = pd.read_csv(digits_root / "train.csv", dtype=str).iloc[:200]
    rng = np.random.default_rng(0)
    given = train["label"].map(CLASSES.index).to_numpy()
    logits = rng.normal(0, 1, (len(train), len(CLASSES)))
    logits[np.arange(len(train)), given] += 4.0
    logits[np.arange(5), (given[:5] + 1) % 10] += 9.0  # five images the model says are mislabelled
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    write_oof_run(make_cfg("experiment=nb_err", "folds.k=2"), train["image"].tolist(), train["label"].tolist(),
                  probs, CLASSES)
    nb = execute("error_analysis.ipynb", {"CONFIG": str(REPO / "configs" / "default.yaml"),
                                          "OVERRIDES": [*_overrides(tmp_path, digits_root), "experiment=nb_err"],
                                          "ADVERSARIAL": False}, kernel_manager_factory)
    text, images = _outputs(nb)
    assert "worst classes" in text and "expected calibration error" in text and "competition.exclude" in text
    assert images >= 4  # confusion, top losses, calibration, label issues
    assert (tmp_path / "runs" / "nb_err" / "analysis" / "report.md").is_file()
