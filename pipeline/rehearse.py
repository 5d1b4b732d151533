"""The rehearsal of a code-competition submission: ``python -m pipeline.package --rehearse``.

It does here what Kaggle will do, and fails here instead of after hours there:

1. **A fresh venv that models the target image and reaches no index.** The venv sees exactly the
   distributions ``package.provided`` names (torch, timm, ... as the Kaggle image provides them)
   plus everything they depend on: a folder of links to those installed distributions, put on the
   venv's path by a ``.pth`` file, and their versions written as a pip constraints file. Nothing
   else of this machine is visible (no PYTHONPATH, no user site, no pip config, proxies pointing
   nowhere, ``PIP_NO_INDEX``), so a dependency the image lacks fails the install as it would there.
2. **The package's own notebook**, run with nbclient on a kernel of that venv, its paths cell
   pointed at the competition's test images replicated ``--scale`` times (links, with new ids)
   and a matching sample submission: it installs the wheels with ``pip --no-index``, checks the
   weights load, and writes ``submission.csv``.
3. **A report**: install time, images/s, peak RAM, the projected time for ``--hidden-size``
   images on ``--target`` against ``--limit``, and the CSV check (present, validated against the
   sample). ``passed`` is false when the projection exceeds the limit or the CSV is wrong.

Target factors (seconds on the target per second here) are stated estimates, not measurements:
``cpu`` 1.0 (a Kaggle CPU session, 4 vCPUs, taken as equal to a 2-core machine like ours),
``p100`` 0.12 and ``t4x2`` 0.10 (one GPU runs the blend; a small CNN about 8-10x faster than 2
CPU cores). Give a real Kaggle log with ``--target-log`` (its ``infer: ... images/s`` line) and
the factor is recalibrated as (images/s here) / (images/s there), and printed for next time.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from pipeline import package_files as pf
from pipeline import paths
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, read_json

TARGET_FACTORS = {"cpu": 1.0, "p100": 0.12, "t4x2": 0.10}
_INFER_LINE = re.compile(r"infer: (\d+) images in [\d.]+s \(([\d.]+) images/s")


# ----------------------------------------------------------------------------- the target image


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def provided_closure(names: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions ``names`` and everything they require (markers evaluated here)."""
    from packaging.requirements import Requirement

    found: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(n, "") for n in names]  # (distribution, extra): torch needs cuda-toolkit[cublas,...]
    while todo:
        name, extra = todo.pop()
        name = _canon(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = found.get(name) or md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency not installed here is not provided either
        found[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    missing = [n for n in names if _canon(n) not in found]
    if missing:
        raise PipelineError(f"package.provided names {missing}, which are not installed here, so the rehearsal "
                            "cannot model an image that has them; install them or drop them from package.provided")
    return found


def _top_level(dist: md.Distribution) -> set[str]:
    tops = set()
    for f in dist.files or []:
        parts = PurePosixPath(str(f)).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].endswith(".pth"):
            tops.add(parts[0])
    return tops


def build_image_site(dists: dict[str, md.Distribution], dest: Path) -> None:
    """Links to exactly these distributions' files (packages, modules, dist-info) in ``dest``."""
    dest.mkdir(parents=True)
    for dist in dists.values():
        site = Path(dist.locate_file(""))
        for top in _top_level(dist):
            src, link = site / top, dest / top
            if src.exists() and not link.exists():
                link.symlink_to(src)


def make_venv(where: Path, image_site: Path) -> Path:
    """A fresh, empty venv whose path holds the image's distributions (pip among them, as in the image:
    a venv's own pip and setuptools would shadow the image's versions)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, capture_output=True)
    py = where / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "_target_image.pth").write_text(str(image_site) + "\n")
    return py


def offline_env(constraints: Path) -> dict[str, str]:
    """The environment of the rehearsal's kernel: this machine's Python setup hidden, no index."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "CONDA")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    nowhere = "http://127.0.0.1:9"  # the discard port: any network attempt fails at once
    env.update({"PIP_NO_INDEX": "1", "PIP_CONSTRAINT": str(constraints), "PIP_CONFIG_FILE": os.devnull,
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1", "http_proxy": nowhere,
                "https_proxy": nowhere, "HTTP_PROXY": nowhere, "HTTPS_PROXY": nowhere,
                "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    return env


# ----------------------------------------------------------------------------- the test set


def replicate_test(cfg: Config, spec: dict[str, Any], dest: Path, scale: int) -> tuple[dict[str, str], int]:
    """The competition's test images ``scale`` times (links under new ids) and a matching sample
    submission in ``dest``; returns the notebook's path parameters and the image count."""
    from pipeline.data import load_competition

    comp = load_competition(cfg.competition)
    c = spec["competition"]
    idc = c["id_column"]
    dest.mkdir(parents=True)
    ids, rows = [], []
    sample = comp.sample_submission.set_index(comp.sample_submission[idc].astype(str).str.strip())
    for r in range(scale):
        for id_, path in zip(comp.test["id"], comp.test["path"]):
            if c.get("test_dir"):
                new = id_ if r == 0 else f"r{r}_{id_}"
                link = dest / "test" / (new + Path(path).suffix)
            else:
                p = PurePosixPath(id_)
                new = id_ if r == 0 else str(p.with_name(f"r{r}_{p.name}"))
                link = dest / c["test_image"].format(id=new)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
            ids.append(new)
            rows.append(sample.loc[id_].drop(idc).to_dict() if id_ in sample.index else {})
    sub = pd.DataFrame(rows)
    sub.insert(0, idc, ids)
    sub = sub[list(comp.sample_submission.columns)]
    sub.to_csv(dest / "sample_submission.csv", index=False)
    params = {"SAMPLE_SUBMISSION": str(dest / "sample_submission.csv"), "TEST_DIR": None, "TEST_CSV": None}
    if c.get("test_dir"):
        params["TEST_DIR"] = str(dest / "test")
    else:
        pd.DataFrame({idc: ids}).to_csv(dest / "test.csv", index=False)
        params["TEST_CSV"] = str(dest / "test.csv")
    return params, len(ids)


# ----------------------------------------------------------------------------- the notebook


def _cell_seconds(cell) -> float:
    ex = cell.metadata.get("execution", {})
    try:
        start = dt.datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00"))
        end = dt.datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return 0.0
    return (end - start).total_seconds()


def run_notebook(package: Path, python: Path, params: dict[str, Any], work: Path, env: dict[str, str],
                 timeout: int) -> tuple[Any, str | None]:
    """Execute the package's notebook with ``params`` in its first cell on a kernel of ``python``."""
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(package / pf.NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    kernels = work.parent / "kernels" / "rehearsal"
    kernels.mkdir(parents=True, exist_ok=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rehearsal (target image)", "language": "python"}))
    km = KernelManager(kernel_name="rehearsal", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels.parent)]))
    client = nbclient.NotebookClient(nb, km=km, timeout=timeout, allow_errors=False,
                                     resources={"metadata": {"path": str(work)}})
    error = None
    try:
        client.execute(env=env, cwd=str(work))
    except nbclient.exceptions.CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1][:500]
    except Exception as exc:  # a dead kernel or a timeout: the report says which
        error = f"{type(exc).__name__}: {str(exc)[:500]}"
    nbformat.write(nb, str(work.parent / "inference_rehearsed.ipynb"))
    return nb, error


def _cell_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


# ----------------------------------------------------------------------------- projection


def target_factor(target: str, local_ips: float | None = None, target_log: str | None = None) -> tuple[float, str]:
    """Seconds on the target per second here, and where the figure comes from."""
    if target_log:
        text = Path(target_log).read_text(errors="replace")
        hits = _INFER_LINE.findall(text)
        if not hits:
            raise PipelineError(f"{target_log}: no 'infer: N images in Ts (X images/s' line; give the log of a Kaggle "
                                "run of this package's notebook")
        there = float(hits[-1][1])
        if not local_ips:
            raise PipelineError("--target-log needs this machine's images/s, measured by the rehearsal")
        return local_ips / there, f"calibrated from {target_log} ({there:.1f} images/s there, {local_ips:.1f} here)"
    if target in TARGET_FACTORS:
        return TARGET_FACTORS[target], f"stated factor for {target} (uncalibrated; see --target-log)"
    try:
        f = float(target)
    except ValueError:
        raise PipelineError(f"--target {target!r}: use {' | '.join(TARGET_FACTORS)} or a number (seconds there "
                            "per second here)") from None
    if f <= 0:
        raise PipelineError(f"--target {target}: the factor must be positive")
    return f, f"given factor {f:g}"


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def rehearse(cfg: Config, package: str | Path, scale: int = 1, hidden_size: int | None = None,
             limit_s: float = 9 * 3600, target: str = "cpu", target_log: str | None = None,
             timeout: int = 3600, quiet: bool = False) -> dict[str, Any]:
    """Install and run ``package`` as Kaggle would (see the module doc); returns the report."""
    from pipeline.data.competition import _read_csv
    from pipeline.submission import SubmissionError, validate_submission

    say = (lambda *a: None) if quiet else print
    package = Path(package).resolve()
    pf.verify_package(package)
    spec = read_json(package / pf.ENSEMBLE)
    if scale < 1:
        raise PipelineError(f"--scale {scale}: give 1 or more")
    where = paths.rehearsal_dir(cfg, package.name).resolve()
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)

    t0 = time.perf_counter()
    dists = provided_closure([*cfg.package.provided, "pip"])
    build_image_site(dists, where / "image_site")
    constraints = where / "constraints.txt"
    constraints.write_text("".join(f"{d.metadata['Name']}=={d.version}\n" for d in dists.values()))
    python = make_venv(where / "venv", where / "image_site")
    venv_s = time.perf_counter() - t0
    say(f"rehearse: fresh venv {where / 'venv'} seeing {len(dists)} distributions of the target image "
        f"({venv_s:.0f}s); no index reachable")

    params, n_images = replicate_test(cfg, spec, where / "input", scale)
    work = where / "working"
    work.mkdir()
    nb, error = run_notebook(package, python, {"PACKAGE": str(package), **params, "OUT": "submission.csv",
                                               "DEVICE": "auto"}, work, offline_env(constraints), timeout)
    cells = {"install": None, "check": None, "infer": None}
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        if "'install'" in c.source:
            cells["install"] = c
        elif "'--check'" in c.source:
            cells["check"] = c
        elif "'--report'" in c.source:
            cells["infer"] = c
    secs = {k: _cell_seconds(c) if c is not None else 0.0 for k, c in cells.items()}
    report_file = work / "infer_report.json"
    infer = read_json(report_file) if report_file.is_file() else {}

    csv_ok, csv_msg = False, "submission.csv not found (Kaggle: 'Submission CSV Not Found')"
    sub_path = work / "submission.csv"
    if sub_path.is_file():
        comp_cfg = cfg.competition.model_copy(update=dict(id_column=spec["competition"]["id_column"],
                                                          submission_form=spec["competition"]["submission_form"]))
        try:
            sub = pd.read_csv(sub_path, dtype=str, keep_default_na=False)
            sample = _read_csv(Path(params["SAMPLE_SUBMISSION"]), "sample submission", [comp_cfg.id_column], "-")
            validate_submission(sub, sample, comp_cfg, spec["classes"], source="the replicated sample submission")
            csv_ok, csv_msg = True, f"submission.csv: {len(sub)} rows, valid against the sample submission"
        except (SubmissionError, ValueError) as exc:
            csv_msg = f"submission.csv is wrong: {exc}"

    local_ips = infer.get("images_per_s")
    factor, factor_src = target_factor(target, local_ips, target_log)
    hidden = hidden_size or n_images
    projected = None
    if infer:
        per_image = infer["predict_seconds"] / max(1, infer["images"])
        fixed = secs["check"] + max(0.0, secs["infer"] - infer["predict_seconds"])
        projected = secs["install"] + (fixed + hidden * per_image) * factor
    fits = projected is not None and projected <= limit_s
    passed = error is None and csv_ok and fits
    if error:
        verdict = f"the notebook failed: {error}"
    elif not csv_ok:
        verdict = csv_msg
    elif not fits:
        over = projected - limit_s
        verdict = (f"projected {_hms(projected)} for {hidden} images exceeds the limit {_hms(limit_s)} by "
                   f"{_hms(over)} ({projected / limit_s:.2f}x): drop members or TTA views "
                   "(python -m pipeline.package --budget ...)")
    else:
        verdict = f"projected {_hms(projected)} for {hidden} images fits the limit {_hms(limit_s)}"
    report = {
        "package": str(package), "scale": scale, "images": n_images, "install_s": secs["install"],
        "check_s": secs["check"], "infer_s": secs["infer"], "venv_s": venv_s,
        "images_per_s": local_ips, "peak_rss_mb": infer.get("peak_rss_mb"), "target": target,
        "factor": factor, "factor_source": factor_src, "hidden_size": hidden, "projected_s": projected,
        "limit_s": limit_s, "csv_ok": csv_ok, "csv": csv_msg, "notebook_error": error, "passed": passed,
        "verdict": verdict, "provided": sorted(dists),
    }
    atomic_write_json(where / "rehearsal.json", report)
    say(f"rehearse: install {secs['install']:.1f}s, weights check {secs['check']:.1f}s, infer {secs['infer']:.1f}s "
        f"for {n_images} images ({local_ips or 0:.1f} images/s here, peak RAM {infer.get('peak_rss_mb') or 0:.0f} MB)")
    say(f"rehearse: target {target}: x{factor:.3g} ({factor_src})")
    if target_log:
        say(f"rehearse: next time pass --target {factor:.4g}")
    say(f"rehearse: {csv_msg}")
    say(f"rehearse: {'PASS' if passed else 'FAIL'}: {verdict}  (report: {where / 'rehearsal.json'})")
    return report
