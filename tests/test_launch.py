"""Launchers and fold locks: parallel local fold processes, submitit's local executor (real
subprocesses), a failing fold, and two processes that want the same fold."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from digits_helpers import cut_digits, tiny_run_config

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.locks import FoldLock, lock_holder

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 200, 60


@pytest.fixture(scope="module")
def small_root(digits_root, tmp_path_factory):
    """The digits competition cut to N_TRAIN training and N_TEST test images, solution cut to match."""
    return cut_digits(digits_root, tmp_path_factory.mktemp("launch") / "digits", N_TRAIN, N_TEST)


def _cfg(root: Path, out: Path, *extra: str):
    # dedup and folds shared by every test of the module (beside the data), runs per test
    return tiny_run_config(root, out, f"paths.work={root.parent / 'work'}", "launcher.threads_per_fold=1", *extra)


def _run(cfg, **kw):
    from pipeline.run import run_all

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            summary = run_all(cfg, **kw)
        except PipelineError as exc:
            return exc, buf.getvalue()
    return summary, buf.getvalue()


# --------------------------------------------------------------------------- locks
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.config import load_config
    from pipeline.locks import FoldLock
    cfg = load_config(sys.argv[1], [f"paths.runs={sys.argv[2]}", "experiment=" + sys.argv[3]])
    lock = FoldLock(cfg, int(sys.argv[4]))
    lock.acquire()
    print("held", flush=True)
    until = Path(sys.argv[5])
    while not until.exists():
        time.sleep(0.05)
    lock.release()
""")


def _hold(cfg, fold: int, until: Path) -> subprocess.Popen:
    """Another process that takes the lock of ``fold`` and lets go once ``until`` exists."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO / "configs" / "default.yaml"), cfg.paths.runs,
                             cfg.experiment, str(fold), str(until)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_waits_for_the_holder_and_names_it(make_cfg, tmp_path):
    cfg = make_cfg()
    holder = _hold(cfg, 0, tmp_path / "release")
    try:
        who = lock_holder(cfg, 0)
        assert (who.host, who.pid) == (socket.gethostname(), holder.pid)
        assert lock_holder(cfg, 1) is None  # another unit of work is free
        said: list[str] = []
        lock = FoldLock(cfg, 0, say=said.append)
        assert not lock.try_acquire()
        waiter = threading.Thread(target=lock.acquire, kwargs={"poll_s": 0.05})
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not lock.held  # still waiting while the other process holds it
        assert any(f"held by {socket.gethostname()}:{holder.pid}" in s and "waiting" in s for s in said)
        (tmp_path / "release").touch()
        waiter.join(timeout=30)
        assert lock.held and lock_holder(cfg, 0).pid == os.getpid()
        assert not any("stale" in s for s in said)  # a holder that let go is no stale lock
        lock.release()
        assert lock_holder(cfg, 0) is None
    finally:
        (tmp_path / "release").touch()
        holder.wait(timeout=30)


def test_stale_lock_of_a_dead_process_is_taken_over(make_cfg, tmp_path):
    cfg = make_cfg()
    holder = _hold(cfg, 1, tmp_path / "never")
    holder.send_signal(signal.SIGKILL)  # dies holding the lock: no chance to clean up
    holder.wait(timeout=30)
    said: list[str] = []
    lock = FoldLock(cfg, 1, say=said.append)
    assert lock.try_acquire()  # the OS let go of the dead process's lock at once
    assert len(said) == 1 and "taking over the stale lock of fold 1" in said[0]
    assert f":{holder.pid}" in said[0] and "process is gone" in said[0]
    lock.release()


def test_in_process_run_moves_on_to_a_free_fold(small_root, tmp_path):
    from pipeline.folds import ensure_folds
    from pipeline.launch import run_in_process

    cfg = _cfg(small_root, tmp_path)
    ensure_folds(cfg)
    # fold 0 is busy elsewhere until fold 1 is done here
    holder = _hold(cfg, 0, paths.fold_dir(cfg, 1) / "metrics.json")
    said: list[str] = []
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = run_in_process(cfg, [0, 1], say=said.append)
    finally:
        holder.wait(timeout=60)
    assert result.trained == [1, 0]
    assert any(f"fold 0 is being worked on by {socket.gethostname()}:{holder.pid}" in s and "moving on to fold 1" in s
               for s in said)
    for k in (0, 1):
        assert (paths.fold_dir(cfg, k) / "metrics.json").is_file()


# --------------------------------------------------------------------------- local launcher
@pytest.mark.processes
def test_local_launcher_reports_a_failed_fold_and_finishes_the_other(small_root, tmp_path):
    cfg = _cfg(small_root, tmp_path, "launcher.parallel=2")
    # fold 1 cannot write its outputs: its folder is a file
    paths.fold_dir(cfg, 1).parent.mkdir(parents=True)
    paths.fold_dir(cfg, 1).write_text("in the way")
    err, out = _run(cfg)
    assert isinstance(err, PipelineError) and "fold(s) of" in str(err) and ": 1 " in str(err)
    assert "fold 1 failed (exit code" in out and "File exists" in out  # the log's last lines, shown
    assert "fold 0: done" in out
    assert '"complete": true' in (paths.fold_dir(cfg, 0) / "metrics.json").read_text()
    assert (paths.fold_dir(cfg, 0) / "test.csv").is_file()  # the fold job predicted it too
    assert not (tmp_path / "submissions").exists()


# --------------------------------------------------------------------------- Slurm, without a cluster
FAKE_SBATCH = """#!/bin/sh
cat "$1" > "$FAKE_SLURM/script.sh"
echo "$@" >> "$FAKE_SLURM/calls"
echo "Submitted batch job 4242"
"""


def test_slurm_array_from_the_launcher_settings_and_pickup(make_cfg, tmp_path, monkeypatch):
    """With sbatch/srun/sacct stand-ins on PATH, submitit writes the real sbatch script of the array;
    a second run finds the queued jobs in jobs.json and does not submit them again."""
    pytest.importorskip("submitit")
    from pipeline.launch_submitit import run_submitit

    fake = tmp_path / "slurm"
    (fake / "bin").mkdir(parents=True)
    for name, text in {"sbatch": FAKE_SBATCH, "srun": "#!/bin/sh\nexit 0\n",
                       "sacct": '#!/bin/sh\ncat "$FAKE_SLURM/sacct.txt"\n'}.items():
        (fake / "bin" / name).write_text(text)
        (fake / "bin" / name).chmod(0o755)
    (fake / "sacct.txt").write_text("JobID|State|NodeList\n4242_0|RUNNING|node1\n4242_1|PENDING|None\n")
    monkeypatch.setenv("PATH", f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(fake))
    cfg = make_cfg("folds.k=2", "launcher.kind=submitit", "launcher.slurm.cluster=slurm",
                   "launcher.slurm.partition=gpu", "launcher.gpus_per_fold=2", "launcher.slurm.array_parallelism=1",
                   "launcher.slurm.timeout_min=600", "launcher.slurm.additional={account: myproj}",
                   "launcher.slurm.setup=[source .venv/bin/activate]")
    said: list[str] = []
    with contextlib.redirect_stdout(io.StringIO()) as board:
        result = run_submitit(cfg, [0, 1], wait=False, say=said.append)
    assert result.pending == [0, 1] and not result.failed
    script = (fake / "script.sh").read_text()
    for line in ("--array=0-1%1", "--partition=gpu", "--gpus-per-node=2", "--ntasks-per-node=2", "--time=600",
                 "--account=myproj", "--signal=USR2", "--cpus-per-task=8"):
        assert line in script, line
    assert "source .venv/bin/activate" in script
    assert "fold 0: running (job 4242_0)" in board.getvalue() and "fold 1: pending (job 4242_1)" in board.getvalue()
    assert {v["job_id"] for v in read_json(paths.launch_dir(cfg) / "submitit" / "jobs.json").values()} == {
        "4242_0", "4242_1"}

    said.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        again = run_submitit(cfg, [0, 1], wait=False, say=said.append)
    assert again.pending == [0, 1]
    assert len((fake / "calls").read_text().splitlines()) == 1  # nothing submitted twice
    assert any("job 4242_1 of an earlier run is pending; not submitted again" in s for s in said)


# --------------------------------------------------------------------------- same results as one process
@pytest.fixture(scope="module")
def sequential(small_root, tmp_path_factory):
    """The reference: both folds one after another in this process, one thread (conftest)."""
    out = tmp_path_factory.mktemp("sequential")
    summary, text = _run(_cfg(small_root, out, "train.epochs=3"))
    assert summary.trained == [0, 1], text
    return out, summary


def _same_results(a: Path, b: Path, sub_a: Path, sub_b: Path) -> None:
    for k in (0, 1):
        for name in ("oof.csv", "test.csv", "oof_tta.csv"):
            pd.testing.assert_frame_equal(pd.read_csv(a / "runs" / "digits_resnet10t" / f"fold{k}" / name),
                                          pd.read_csv(b / "runs" / "digits_resnet10t" / f"fold{k}" / name))
    assert sub_a.read_text() == sub_b.read_text()


@pytest.mark.slow
def test_parallel_local_folds_equal_a_sequential_run(small_root, sequential, tmp_path):
    ref, ref_summary = sequential
    summary, out = _run(_cfg(small_root, tmp_path, "train.epochs=3", "launcher.parallel=2"))
    assert summary.trained == [0, 1], out
    assert "2 at once" in out and "fold 0: done" in out and "fold 1: done" in out
    _same_results(ref, tmp_path, ref_summary.submission, summary.submission)
    again, out = _run(_cfg(small_root, tmp_path, "train.epochs=3", "launcher.parallel=2"))
    assert again.trained == [] and again.skipped == [0, 1] and "launcher" not in out


@pytest.mark.slow
def test_submitit_local_executor_no_wait_pickup_and_requeue(small_root, sequential, tmp_path):
    """Submit with --no-wait, preempt fold 0 after its first epoch (submitit requeues it and it
    resumes from last.pt), then a second run picks the jobs up and blends: same results as one process."""
    pytest.importorskip("submitit")
    ref, ref_summary = sequential
    cfg = _cfg(small_root, tmp_path, "train.epochs=3", "launcher.kind=submitit", "launcher.slurm.cluster=local")
    first, out = _run(cfg, wait=False)
    assert first.submission is None and first.trained == [] and "submitted to local" in out, out
    assert "still queued or running" in out

    import submitit

    from pipeline.launch_submitit import _jobs_file

    rec = {int(k): v for k, v in read_json(_jobs_file(cfg)).items()}
    assert sorted(rec) == [0, 1]
    history = paths.fold_dir(cfg, 0) / "history.csv"
    deadline = time.time() + 600
    while not (history.is_file() and len(pd.read_csv(history)) >= 1) and time.time() < deadline:
        time.sleep(0.2)
    # submitit's preemption signal: the job checkpoints (our hook) and the local controller requeues it
    job = submitit.LocalJob(folder=paths.launch_dir(cfg) / "submitit" / "%j", job_id=str(rec[0]["job_id"]))
    os.kill(_task_pid(int(rec[0]["job_id"])), signal.SIGUSR2)

    second, out = _run(cfg)
    assert second.submission is not None, out
    assert "of an earlier run is running; not submitted again" in out  # picked up
    log = job.paths.stdout.read_text()
    assert "requeued: resuming from last.pt" in log and "resuming fold 0" in log, log
    _same_results(ref, tmp_path, ref_summary.submission, second.submission)


def _task_pid(controller: int) -> int:
    """The pid of the task process that submitit's local controller ``controller`` started."""
    deadline = time.time() + 60
    while time.time() < deadline:
        kids = Path(f"/proc/{controller}/task/{controller}/children")
        pids = [int(p) for p in kids.read_text().split()] if kids.exists() else []
        if pids:
            return pids[0]
        time.sleep(0.1)
    raise AssertionError(f"submitit's controller {controller} started no task")
