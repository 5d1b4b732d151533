"""Shared fixtures: the embedded digits competition built once per session in a temp folder,
and configs whose every output path points into the test's own temp folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker for every thread pool (torch is set per test below), and for the processes
    # tests start: under ``make test`` the workers already fill the cores, and oversubscribed BLAS/OpenMP
    # threads spin-wait (a stacking test took 25x longer beside another worker).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)

REPO = Path(__file__).resolve().parents[1]


def _shared_dir(tmp_path_factory, name: str, build) -> Path:
    """A folder made once for the whole test session: by this process alone, or under pytest-xdist
    (``make test``) by the first worker that gets there, the others waiting on a file lock and
    then reusing it. ``build(folder)`` fills it; a marker file says it finished."""
    from filelock import FileLock

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    base = base.parent if worker else base  # the workers' temp folders share this parent
    folder, done = base / f"shared_{name}", base / f"shared_{name}.done"
    with FileLock(str(base / f"shared_{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The embedded default competition, built once (read-only for tests: copy before changing)."""
    from pipeline.data.digits import build_digits

    return _shared_dir(tmp_path_factory, "data", lambda d: build_digits(d / "digits")) / "digits"


@pytest.fixture(scope="session")
def digits_dedup(digits_root, tmp_path_factory):
    """Dedup of the embedded default, run once per session (the full dedup is among the slowest
    steps of the suite); returns (cfg, dedup table, report). Read-only: copy with ``seed_dedup``."""
    import json

    import pandas as pd

    from pipeline import paths
    from pipeline.config import load_config
    from pipeline.dedup import run_dedup

    def config(work: Path):
        return load_config(REPO / "configs" / "default.yaml", [f"paths.work={work}", f"competition.root={digits_root}",
                                                               "wandb.mode=disabled"])

    work = _shared_dir(tmp_path_factory, "dedup_work", lambda d: run_dedup(config(d), quiet=True))
    cfg = config(work)
    out = pd.read_csv(paths.dedup_csv(cfg))
    return cfg, out, json.loads(paths.dedup_report(cfg).read_text())


@pytest.fixture
def seed_dedup(digits_dedup):
    """``seed_dedup(cfg)``: put the session's dedup outputs of the embedded default into ``cfg``'s
    work folder, so that folds (and training) do not run dedup of the same images again."""
    from pipeline import paths

    def _seed(cfg):
        src, dst = paths.work_dir(digits_dedup[0]), paths.work_dir(cfg)
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name.startswith("dedup"):
                shutil.copy2(f, dst / f.name)
        return cfg

    return _seed


@pytest.fixture
def digits_copy(digits_root, tmp_path) -> Path:
    """A private, writable copy of the digits competition (with its private folder beside it)."""
    dst = tmp_path / "data" / "digits"
    shutil.copytree(digits_root, dst)
    shutil.copytree(digits_root.parent / "digits_private", dst.parent / "digits_private")
    return dst


@pytest.fixture
def make_cfg(tmp_path, digits_root):
    """``make_cfg(*overrides, root=None)``: the default config, outputs under ``tmp_path``."""
    from pipeline.config import load_config

    def _make(*overrides: str, root: Path | None = None, config: str | Path | None = None):
        root = Path(root or digits_root)
        base = [
            f"paths.work={tmp_path / 'work'}",
            f"paths.runs={tmp_path / 'runs'}",
            f"paths.submissions={tmp_path / 'submissions'}",
            f"competition.root={root}",
            f"competition.solution={root.parent / (root.name + '_private') / 'solution.csv'}",
            "wandb.mode=disabled",
            "train.num_workers=0",
        ]
        return load_config(config or REPO / "configs" / "default.yaml", base + list(overrides))

    return _make


@pytest.fixture(autouse=True)
def _grad_mode_is_not_leaked():
    """A stage that switches autograd off globally breaks every later training in the process."""
    import torch

    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left torch autograd disabled globally (use a no_grad/inference_mode context)")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread per test process: on 2 cores shared with DataLoader workers, DDP ranks or
    other jobs, OpenMP threads spin-wait badly (measured up to 20x slower), and results stay stable."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The longest modules (measured with --durations on 2 cores; the notebook, DDP and launcher modules
# first for make test-processes), handed out first under ``make test``'s ``--dist loadscope``: a long module picked up last would leave the other workers
# idle at the end. Modules not listed keep their order after these.
LONGEST_MODULES = ["test_package.py", "test_notebooks.py", "test_detect_engine.py", "test_train.py", "test_dedup.py",
                   "test_analyze.py", "test_prepare.py", "test_launch.py", "test_compare.py", "test_run.py",
                   "test_label_fixes.py", "test_own_folder.py", "test_digits.py", "test_ensemble.py",
                   "test_blending.py", "test_stale_blend.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept
