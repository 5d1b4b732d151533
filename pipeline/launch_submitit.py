"""The ``submitit`` launcher: the folds as one Slurm job array (``pip install .[slurm]``).

``pipeline.run --launcher submitit`` submits one array task per fold that is not current, with the
resources of ``launcher.slurm`` (partition, GPUs, CPUs, memory, time limit, how many run at once, extra
sbatch options), then shows which folds are pending, running, done or failed until all have ended;
``pipeline.run`` goes on to predict and blend. A fold preempted or out of time is requeued by
submitit's checkpointing hook (up to ``launcher.slurm.max_requeues`` times) and resumes from its
``last.pt``. With ``--no-wait`` it returns after submitting; a later ``pipeline.run`` finds the finished
folds current, waits for (never resubmits) those still queued or running, and blends.

``launcher.slurm.cluster: local`` runs the same jobs with submitit's local executor (real
subprocesses on this machine), which is how the tests run it.

Writes ``runs/<experiment>/launch/submitit/`` (submitit's pickles and logs, one folder per job) and
``jobs.json`` there (fold -> job id, for a later run's pickup).
"""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import Config, build_config
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, read_json
from pipeline.launch import LOG_TAIL_LINES, FoldBoard, LaunchResult, Say

POLL_S = 2.0
# Slurm states of a job that has not ended (sacct's names; submitit's local executor says RUNNING).
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "UNKNOWN", "READY"}


try:  # the optional extra .[slurm]; without it only this launcher is unavailable
    import submitit
except ImportError:  # pragma: no cover
    submitit = None


def _submitit():
    if submitit is None:
        raise PipelineError("launcher.kind=submitit needs the submitit package: pip install '.[slurm]' "
                            "(or use launcher.kind=local)")
    return submitit


class FoldJob(submitit.helpers.Checkpointable if submitit is not None else object):
    """One fold in one Slurm array task; requeued with ``resume=True`` when preempted or out of time."""

    def __call__(self, cfg_dict: dict[str, Any], fold: int, threads: int, resume: bool = False) -> str:
        import torch

        from pipeline.fold_job import run_fold

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one task per GPU: torch.distributed's env:// variables from Slurm's
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        torch.set_num_threads(threads)
        cfg = build_config(cfg_dict, Config, source="the config of pipeline.run (submitit job)")
        print(f"fold_job: fold {fold} of {cfg.experiment} in job {env.job_id} on {env.hostname}"
              f"{' (requeued: resuming from last.pt)' if resume else ''}", flush=True)
        outcome = run_fold(cfg, fold, resume=resume, force=True)  # pipeline.run set aside what was stale
        print(f"fold_job: fold {fold} {outcome}", flush=True)
        return outcome

    def checkpoint(self, cfg_dict: dict[str, Any], fold: int, threads: int, resume: bool = False):
        # The fold's own last.pt is the checkpoint: the requeued task resumes from it.
        return submitit.helpers.DelayedSubmission(FoldJob(), cfg_dict, fold, threads, True)


def _cluster(cfg: Config) -> str:
    c = cfg.launcher.slurm.cluster
    return _submitit().AutoExecutor.which() if c == "auto" else c


def make_executor(cfg: Config):
    """submitit's executor with ``launcher.slurm``'s resources (a job's folder under launch/submitit/)."""
    submitit = _submitit()
    s, lc = cfg.launcher.slurm, cfg.launcher
    cluster = _cluster(cfg)
    gpus = lc.gpus_per_fold if s.gpus_per_node is None else s.gpus_per_node
    if cluster == "local" and gpus:
        import torch

        gpus = min(gpus, torch.cuda.device_count()) if cfg.device != "cpu" else 0
    folder = paths.launch_dir(cfg) / "submitit" / "%j"
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=s.max_requeues,
                               local_max_num_timeout=s.max_requeues)
    ex.update_parameters(
        name=s.job_name or cfg.experiment, timeout_min=s.timeout_min, gpus_per_node=gpus,
        tasks_per_node=max(1, gpus), cpus_per_task=s.cpus_per_task, mem_gb=s.mem_gb,
        slurm_partition=s.partition, slurm_array_parallelism=s.array_parallelism,
        slurm_additional_parameters=dict(s.additional) or None, slurm_setup=list(s.setup) or None,
        local_setup=list(s.setup) or None,
    )
    return ex


def _threads(cfg: Config, n_folds: int) -> int:
    lc, s = cfg.launcher, cfg.launcher.slurm
    if lc.threads_per_fold:
        return lc.threads_per_fold
    if _cluster(cfg) == "slurm":
        return s.cpus_per_task
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, min(n_folds, s.array_parallelism)))


def _jobs_file(cfg: Config) -> Path:
    return paths.launch_dir(cfg) / "submitit" / "jobs.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an ended child not yet reaped by its parent (a zombie) has ended too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _recorded_jobs(cfg: Config) -> dict[int, Any]:
    """Jobs of earlier runs, with these settings, that have not ended, by fold."""
    try:
        data = read_json(_jobs_file(cfg))
    except (OSError, ValueError):
        return {}
    cluster, folder = _cluster(cfg), paths.launch_dir(cfg) / "submitit" / "%j"
    out = {}
    for fold, rec in data.items():
        if rec.get("config") != _config_id(cfg) or rec.get("cluster") != cluster:
            continue
        if cluster == "slurm":
            job = submitit.SlurmJob(folder=folder, job_id=rec["job_id"])
            if str(job.state).upper().split(" ")[0] in ACTIVE - {"UNKNOWN"}:
                out[int(fold)] = job
        elif rec.get("host") == socket.gethostname() and _pid_alive(int(rec["job_id"])):
            # A local job's id is its controller's pid; it outlives the run that submitted it.
            out[int(fold)] = submitit.LocalJob(folder=folder, job_id=rec["job_id"])
    return out


def _config_id(cfg: Config) -> str:
    from pipeline.launch import write_job_config

    return write_job_config(cfg).stem


def _record(cfg: Config, jobs: dict[int, Any]) -> None:
    path = _jobs_file(cfg)
    try:
        data = read_json(path)
    except (OSError, ValueError):
        data = {}
    now = datetime.now().isoformat(timespec="seconds")
    for k, job in jobs.items():
        data[str(k)] = {"job_id": job.job_id, "submitted": now, "config": _config_id(cfg), "cluster": _cluster(cfg),
                        "host": socket.gethostname()}
    atomic_write_json(path, data)


def _state(job) -> str:
    """pending | running | done | failed, from submitit's view of the job."""
    if getattr(job, "_process", True) is None:  # a local job of an earlier run: only its pid and files tell
        if not job.paths.result_pickle.exists() and _pid_alive(int(job.job_id)):
            return "running"
    state = str(job.state).upper()
    if state.startswith("PENDING") or state in {"REQUEUED", "CONFIGURING", "REQUEUE_HOLD"}:
        return "pending"
    if not job.done():
        return "running"
    return "done" if job.exception() is None else "failed"


def _failure(job) -> str:
    exc = job.exception()
    log = job.stderr() or job.stdout() or str(exc)
    return "\n".join(str(log).rstrip("\n").splitlines()[-LOG_TAIL_LINES:])


def run_submitit(cfg: Config, folds: list[int], wait: bool = True, say: Say = print, stream=None) -> LaunchResult:
    """Submit ``folds`` (those without a live job already) as one job array; wait unless ``wait`` is False."""
    from pipeline.fold_job import _is_current
    from pipeline.locks import lock_holder

    result = LaunchResult()
    jobs: dict[int, Any] = {}
    earlier = _recorded_jobs(cfg)
    elsewhere = {}
    for k in folds:
        if k in earlier:
            jobs[k] = earlier[k]
            say(f"        fold {k}: job {earlier[k].job_id} of an earlier run is {_state(earlier[k])}; not submitted again")
        elif (holder := lock_holder(cfg, k)) is not None:
            elsewhere[k] = holder
            say(f"        fold {k} is being worked on by {holder}; not submitted")
    todo = [k for k in folds if k not in jobs and k not in elsewhere]
    if todo:
        ex = make_executor(cfg)
        threads = _threads(cfg, len(todo))
        cfg_dict = cfg.to_dict()
        new = ex.map_array(FoldJob(), [cfg_dict] * len(todo), todo, [threads] * len(todo))
        jobs.update(dict(zip(todo, new)))
        _record(cfg, dict(zip(todo, new)))
        array = new[0].job_id.split("_")[0] if new else ""
        say(f"        submitit: {len(todo)} fold(s) submitted to {ex.cluster} as job {array} "
            f"({threads} thread(s) each); logs in {paths.launch_dir(cfg) / 'submitit'}")
    board = FoldBoard(cfg, folds, stream)
    ended: set[int] = set()
    while True:
        for k in folds:
            if k in ended:
                continue
            if k in jobs:
                state = _state(jobs[k])
            elif lock_holder(cfg, k) is not None:  # another process's fold: ended when its lock is free
                state = "running"
            else:
                state = "done" if _is_current(cfg, k)[0] else "failed"
            board.set(k, f"{state} (job {jobs[k].job_id})" if k in jobs and state != "done" else state)
            if state in ("done", "failed"):
                ended.add(k)
                if state == "failed" and k not in jobs:
                    result.failed[k] = f"{elsewhere[k]} let go of fold {k} without finishing it"
                elif state == "failed":
                    result.failed[k] = _failure(jobs[k])
                    board.say(f"        fold {k} failed in job {jobs[k].job_id}; the last lines of its log:\n"
                              + "\n".join("          | " + line for line in result.failed[k].splitlines()))
                else:
                    (result.trained if k in jobs else result.current).append(k)
        board.refresh()
        if len(ended) == len(folds):
            return result
        if not wait:
            result.pending = [k for k in folds if k not in ended]
            return result
        time.sleep(POLL_S)
