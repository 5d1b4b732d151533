"""Stage ``package``: an offline inference package for a code competition, from the current blend.

``python -m pipeline.package`` takes the blend of the newest submission of the competition (its
``.json``: experiments, folds, weights; or ``--submission PATH``, or ``--experiments a,b`` to blend
those first with ``pipeline.ensemble``) and writes ``packages/<name>/`` (see
:mod:`pipeline.package_files`), a folder to upload as a Kaggle dataset: the project as a wheel
(never torch: the notebook uses the target image's own), with ``--with-deps`` wheels of
``package.extra_wheels`` for the target's Python and platform; per member and fold the weights
predict used (EMA where training chose them) in ``package.dtype``; each member's resolved config,
``classes.json``, ``ensemble.json``, ``inference.ipynb`` and a README, every file hashed in
``manifest.json``. Nothing is downloaded at inference time.

``--budget 2h --hidden-size N`` drops members greedily until the projected inference time fits
(:mod:`pipeline.budget`); ``--rehearse`` installs the package into a fresh venv without an index and
runs its notebook (:mod:`pipeline.rehearse`); ``--scores`` plots public leaderboard scores against
CV (:mod:`pipeline.scores`).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import package_files as pf
from pipeline import paths
from pipeline.config import Config, add_config_args, config_from_args
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_json, atomic_write_text, read_json

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Member:
    """One experiment of the blend as the package records it."""

    name: str
    weight: float
    folds: list[int]
    tta: list[str]
    merge: str
    flips: bool
    crop_scale: float
    weights_kind: str  # "ema" | "model"
    cv: dict[str, Any]


# ----------------------------------------------------------------------------- which blend


def newest_submission(cfg: Config) -> Path:
    """The newest submission JSON of the configured competition."""
    found = []
    for js in paths.submissions_dir(cfg).glob("*.json"):
        try:
            meta = read_json(js)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("competition") == cfg.competition.slug and meta.get("experiments"):
            found.append((meta.get("created", ""), js.stat().st_mtime, js))
    if not found:
        raise PipelineError(f"no submission of competition {cfg.competition.slug!r} in {paths.submissions_dir(cfg)}/; "
                            "run python -m pipeline.ensemble (or pipeline.run) first, or give --experiments")
    return max(found)[2]


def blend_meta(cfg: Config, submission: str | None = None, experiments: list[str] | None = None,
               quiet: bool = False) -> tuple[dict[str, Any], Path]:
    """The recorded blend (experiments, folds, weights) to package, and its submission JSON."""
    from pipeline.ensemble import run_ensemble

    if experiments:
        result = run_ensemble(cfg, experiments, quiet=quiet)
        js = result.submission.with_suffix(".json")
    else:
        js = Path(submission).with_suffix(".json") if submission else newest_submission(cfg)
    if not js.is_file():
        raise PipelineError(f"{js} does not exist; a submission's .json (written by pipeline.ensemble) is needed")
    meta = read_json(js)
    for key in ("experiments", "weights", "folds"):
        if key not in meta:
            raise PipelineError(f"{js} has no {key!r}; it was not written by pipeline.ensemble: blend again")
    if meta.get("method") == "stack" or "stack" in meta:
        raise PipelineError(f"{js} is a stacked blend (ensemble.method=stack): its level-2 model is fitted in the "
                            "ensemble stage and not saved, so a package cannot reproduce it; blend with optimize, "
                            "caruana or hill_climb (any ensemble.merge) to package")
    made = js.stat().st_mtime
    for name in meta["experiments"]:
        for k in meta["folds"][name]:
            test = paths.fold_dir(cfg, int(k), name) / paths.TEST
            if not test.is_file() or test.stat().st_mtime > made:
                raise PipelineError(f"{js}: {test} is {'missing' if not test.is_file() else 'newer'}: the predictions "
                                    "changed since this submission was made, so a package would not reproduce it; "
                                    "run python -m pipeline.ensemble again")
    return meta, js


def _fold_settings(cfg: Config, name: str, fold: int) -> dict[str, Any]:
    p = paths.fold_dir(cfg, fold, name) / paths.PREDICT
    if not p.is_file():
        raise PipelineError(f"{p} does not exist; run python -m pipeline.predict --all-folds --set experiment={name}")
    info = read_json(p)
    s = info.get("settings", {})
    return {"tta": list(s.get("tta", info.get("tta", ["identity"]))), "merge": s.get("merge", info.get("merge")),
            "flips": bool(s.get("flips", False)), "crop_scale": float(s.get("crop_scale", 1.125)),
            "weights_kind": info.get("weights", "model")}


def _seed_runs(cfg: Config, name: str, meta: dict[str, Any]) -> list[str]:
    """The member runs of a ``seeds`` experiment (its own folder holds only their average), else [name]."""
    seeds = paths.run_dir(cfg, name) / paths.SEEDS
    if not seeds.is_file():
        return [name]
    if meta.get("merge", "mean") != "mean":
        # A weighted mean of the seed runs is the blend of their average only when members merge linearly.
        raise PipelineError(f"experiment {name!r} averages seed runs and the blend merges members by "
                            f"{meta.get('merge')!r}: a package reproduces that only with ensemble.merge=mean; "
                            "blend again with it (or blend the seed runs as experiments of their own)")
    return list(read_json(seeds)["members"])


def members_of(cfg: Config, meta: dict[str, Any]) -> list[Member]:
    """The blend's members with the TTA settings their predictions were made with (predict.json).

    A ``seeds`` experiment becomes its seed runs, each with an equal share of its weight: the
    experiment's predictions are their mean, so the package predicts the same with the runs' weights.
    """
    members = []
    for name in meta["experiments"]:
        folds = [int(k) for k in meta["folds"][name]]
        runs = _seed_runs(cfg, name, meta)
        for run in runs:
            settings = [_fold_settings(cfg, run, k) for k in folds]
            if any(s != settings[0] for s in settings[1:]):
                raise PipelineError(f"experiment {run!r}: its folds were predicted with different TTA settings; "
                                    f"run python -m pipeline.predict --all-folds --force --set experiment={run}")
            members.append(Member(run, float(meta["weights"][name]) / len(runs), folds,
                                  cv=meta.get("cv", {}).get(name, {}), **settings[0]))
    return members


# ----------------------------------------------------------------------------- files


def fold_weights(cfg: Config, member: Member, fold: int, dtype: str) -> dict[str, torch.Tensor]:
    """The inference weights predict used for this fold, loaded by predict's own function."""
    from pipeline.predict import load_fold_model

    exp_cfg = cfg.model_copy(update={"experiment": member.name})
    model, _, _, kind = load_fold_model(exp_cfg, fold, torch.device("cpu"))
    if kind != member.weights_kind:
        raise PipelineError(f"{paths.fold_dir(cfg, fold, member.name)}: predict used the {member.weights_kind} weights "
                            f"but these settings give the {kind} weights (predict.use_ema differs?); package with the "
                            "settings the fold was predicted with, or predict it again")
    half = dtype == "float16"
    return {k: (v.half() if half and v.is_floating_point() else v).contiguous()
            for k, v in model.state_dict().items()}


def build_wheels(dest: Path, cfg: Config, with_deps: bool, quiet: bool = False) -> list[str]:
    """The project as a wheel (``pip wheel --no-deps``), plus ``package.extra_wheels`` with --with-deps."""
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise PipelineError(f"{PROJECT_ROOT} has no pyproject.toml: packaging needs the project's source "
                            "checkout (pip install -e .), not an installed wheel")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-src-") as tmp:
        # A clean copy: building in the checkout would leave build/ and egg-info behind, and two
        # packagings at once would share them.
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy2(PROJECT_ROOT / "README.md", src / "README.md")
        (src / "pyproject.toml").write_text(inference_pyproject((PROJECT_ROOT / "pyproject.toml").read_text()))
        shutil.copytree(PROJECT_ROOT / "pipeline", src / "pipeline",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        run_pip(["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dest), str(src)], quiet)
    if with_deps and cfg.package.extra_wheels:
        run_pip(download_args(cfg, dest), quiet)
    return sorted(p.name for p in dest.iterdir())


# What pipeline.infer imports (pip names); the wheel declares only these, so an image without the
# training-side extras (wandb, matplotlib, cleanlab, ...) installs it offline. OpenCV is left out on
# purpose: Kaggle's image has opencv-python, not -headless, and either provides cv2; the notebook's
# check step imports it.
INFER_REQUIRES = ["torch", "timm", "albumentations", "numpy", "pandas", "scipy", "scikit-learn", "pyyaml",
                  "pydantic", "tqdm"]


def inference_pyproject(text: str) -> str:
    """``pyproject.toml`` with its ``dependencies`` cut down to :data:`INFER_REQUIRES` (specifiers kept)."""
    import re

    from packaging.requirements import Requirement

    # A regex, not a TOML parser: tomllib is 3.11+ and the block is plain quoted strings.
    found = re.search(r"(?ms)^dependencies = \[(.*?)^\]", text)
    if found is None:
        raise PipelineError("pyproject.toml: no 'dependencies = [...]' block found to write the inference wheel")
    deps = re.findall(r'"([^"]+)"', found.group(1))
    keep = [d for d in deps if Requirement(d).name.lower() in INFER_REQUIRES]
    block = "dependencies = [\n" + "".join(f'    "{d}",\n' for d in keep) + "]"
    return text[:found.start()] + block + text[found.end():]


def pinned(names: list[str]) -> list[str]:
    """``name==version`` of the versions installed here (what the models were trained with)."""
    out = []
    for n in names:
        if any(c in n for c in "=<>~!@ "):
            out.append(n)  # the user pinned it already
            continue
        try:
            out.append(f"{n}=={md.version(n)}")
        except md.PackageNotFoundError:
            raise PipelineError(f"package.extra_wheels: {n!r} is not installed here, so its trained-with version is "
                                "unknown; install it or pin it as name==version") from None
    return out


def download_args(cfg: Config, dest: Path) -> list[str]:
    """``pip download`` of the extra wheels for the target's Python and platform (binary only, as pip
    requires when the platform is not this one)."""
    p = cfg.package
    return ["download", "--only-binary=:all:", "--no-deps", "--python-version", p.python_version,
            "--platform", p.platform, "-d", str(dest), *pinned(p.extra_wheels)]


def run_pip(args: list[str], quiet: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if res.returncode != 0:
        raise PipelineError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-2000:]}")
    if not quiet:
        print(f"pip {args[0]}: done")


def trained_with() -> dict[str, str]:
    out = {"python": ".".join(map(str, sys.version_info[:3]))}
    for n in ("torch", "timm", "albumentations", "numpy"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def notebook(name: str, spec: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """``inference.ipynb``: paths (first cell), install from the package's wheels, check, infer."""
    import nbformat

    comp = spec["competition"]
    base = f"{cfg.package.kaggle_input}/{comp.get('name') or 'competition'}"
    test_arg = (f"TEST_DIR = {base + '/' + comp['test_dir']!r}\nTEST_CSV = None" if comp.get("test_dir")
                else f"TEST_DIR = None\nTEST_CSV = {base + '/' + (comp.get('test_csv') or comp['sample_submission'])!r}")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            f"# Inference: {name}\n\nMade by `python -m pipeline.package`. Attach the package dataset and the "
            "competition data, turn the internet off, and run all cells. The first cell holds every path."),
        nbformat.v4.new_code_cell(
            f"PACKAGE = {cfg.package.kaggle_input + '/' + name!r}\n{test_arg}\n"
            f"SAMPLE_SUBMISSION = {base + '/' + comp['sample_submission']!r}\nOUT = 'submission.csv'\n"
            "DEVICE = 'auto'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import subprocess, sys\n\n"
            "def run(*args):\n"
            "    \"\"\"Run a command, show its output here, stop the notebook if it fails.\"\"\"\n"
            "    p = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, "
            "text=True)\n"
            "    print(p.stdout[-20000:])\n"
            "    if p.returncode:\n"
            "        raise SystemExit(f'failed (exit {p.returncode}): {\" \".join(args)}')\n\n"
            "# Offline install: only the package's own wheels; torch, timm etc. come from this image.\n"
            "run('-m', 'pip', 'install', '--no-index', '--find-links', f'{PACKAGE}/wheels', "
            f"{', '.join(repr(n) for n in [pf.PROJECT_DIST, *spec['extra_wheels']])})"),
        nbformat.v4.new_code_cell(
            "# Does this image's torch and timm load every weight file? (fails here, not after hours)\n"
            "run('-m', 'pipeline.infer', '--package', PACKAGE, '--check', '--device', DEVICE)"),
        nbformat.v4.new_code_cell(
            "test = ['--test-dir', TEST_DIR] if TEST_DIR else ['--test-csv', TEST_CSV]\n"
            "run('-m', 'pipeline.infer', '--package', PACKAGE, *test, '--sample-submission', SAMPLE_SUBMISSION,\n"
            "    '--out', OUT, '--report', 'infer_report.json', '--device', DEVICE)"),
        nbformat.v4.new_code_cell(
            "import pandas as pd\nsub = pd.read_csv(OUT)\nprint(sub.shape)\nsub.head()"),
    ]
    return nb


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def readme(name: str, root: Path, spec: dict[str, Any]) -> str:
    groups: dict[str, int] = {}
    for p in root.rglob("*"):
        if p.is_file():
            top = p.relative_to(root).parts[0]
            groups[top] = groups.get(top, 0) + p.stat().st_size
    rows = "\n".join(f"| `{k}` | {_size(v)} |" for k, v in sorted(groups.items()))
    members = "\n".join(f"- `{m['name']}`: weight {m['weight']:.3f}, folds {m['folds']}, TTA {m['tta']} "
                        f"({m['merge']} merge), {m['weights_kind']} weights" for m in spec["members"])
    return f"""# Inference package `{name}`

Made by `python -m pipeline.package` on {spec['created']} from `{spec['source_submission']}`
(CV {spec.get('cv_blend', {})}). Weights in {spec['dtype']}; nothing is downloaded at inference time.

## What it holds

| path | size |
|---|---|
{rows}

- `wheels/`: the project ({pf.PROJECT_DIST}) as a wheel{', plus ' + ', '.join(spec['extra_wheels']) if spec['extra_wheels'] else ''};
  never torch or torchvision: the notebook uses the image's own.
- `weights/<member>/fold<k>.pt`: a plain state dict per fold, `manifest.json`: sha256 of every file
  (`pipeline.infer` refuses a missing or altered file by name).
- `ensemble.json`: members, weights, TTA, merge, preprocessing, submission form; `classes.json`.

Members:
{members}

## Upload and attach

    kaggle datasets create -p {root}        # edit dataset-metadata.json's id first (your user name)
    kaggle datasets version -p {root} -m "new weights"   # later versions

In the competition's notebook: Add Input -> this dataset (it appears under
`/kaggle/input/{name}`), internet off, then upload `inference.ipynb` (File -> Import Notebook) or
copy its cells. Its first cell holds every path; it installs the wheels with
`pip install --no-index --find-links /kaggle/input/{name}/wheels {pf.PROJECT_DIST}`, checks that the
image's torch and timm load the weights, and writes `submission.csv` in `/kaggle/working`.
Rehearse it first here: `python -m pipeline.package --rehearse --package {root}`.
"""


def write_package(cfg: Config, meta: dict[str, Any], source: Path, members: list[Member], name: str,
                  dtype: str, with_deps: bool = False, force: bool = False, budget: dict[str, Any] | None = None,
                  quiet: bool = False) -> Path:
    """Write ``packages/<name>/`` (built in a temporary folder, then renamed into place)."""
    from pipeline.config import save_config
    from pipeline.data import load_competition
    from pipeline.predict import load_fold_model

    say = (lambda *a: None) if quiet else print
    out = paths.package_dir(cfg, name)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; give another --name or --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    comp = load_competition(cfg.competition)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    try:
        classes = None
        for m in members:
            exp_cfg = cfg.model_copy(update={"experiment": m.name})
            _, train_cfg, m_classes, _ = load_fold_model(exp_cfg, m.folds[0], torch.device("cpu"))
            if classes is not None and m_classes != classes:
                raise PipelineError(f"experiment {m.name!r} has other classes than {members[0].name!r}")
            classes = m_classes
            save_config(train_cfg, tmp / pf.experiment_config(m.name))
            for k in m.folds:
                from pipeline.engine.checkpoint import save_checkpoint

                save_checkpoint(tmp / pf.weights_file(m.name, k), fold_weights(cfg, m, k, dtype))
            say(f"package: {m.name}: {len(m.folds)} fold(s) of weights ({dtype})")
        from pipeline.data.competition import save_classes
        from pipeline.infer import cache_size, member_config

        save_classes(classes, tmp / pf.CLASSES)
        extra = [n.split("=")[0].split("<")[0].split(">")[0].strip() for n in cfg.package.extra_wheels] \
            if with_deps else []
        spec = {
            "format": pf.FORMAT_VERSION,
            "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source_submission": str(source),
            "members": [],
            "classes": classes,
            "competition": cfg.competition.model_dump(mode="json"),
            "submission_form": cfg.competition.submission_form,
            "submission_columns": list(comp.sample_submission.columns),
            "id_column": cfg.competition.id_column,
            "merge_rule": f"TTA views merged per fold ({members[0].merge}), folds averaged, members merged by "
                          f"{meta.get('merge', 'mean')} with {meta.get('method')} weights chosen on OOF log loss",
            "member_merge": {"merge": meta.get("merge", "mean"), "power": float(meta.get("power", 2.0))},
            "dtype": dtype,
            "batch_size": cfg.predict.batch_size,
            "cv_blend": meta.get("cv", {}).get("blend", {}),
            "trained_with": trained_with(),
            "extra_wheels": extra,
            "budget": budget,
        }
        for m in members:
            train_cfg = member_config(tmp, m.name)
            aug = train_cfg.train.augment
            spec["members"].append({
                "name": m.name, "weight": m.weight, "folds": m.folds, "backbone": train_cfg.model.backbone,
                "tta": m.tta, "merge": m.merge, "flips": m.flips, "crop_scale": m.crop_scale,
                "weights_kind": m.weights_kind, "cv": m.cv,
                # What infer applies before the model; cache_size is the training image cache's resize.
                "preprocess": {"cache_size": cache_size(train_cfg), "img_size": train_cfg.train.img_size,
                               "eval_crop_pct": aug.eval_crop_pct, "mean": aug.mean, "std": aug.std},
            })
        atomic_write_json(tmp / pf.ENSEMBLE, spec)
        wheels = build_wheels(tmp / pf.WHEELS, cfg, with_deps, quiet=True)
        say(f"package: wheels {', '.join(wheels)}")
        import nbformat

        nbformat.write(notebook(name, spec, cfg), str(tmp / pf.NOTEBOOK))
        atomic_write_text(tmp / pf.README, readme(name, out, spec))
        pf.write_manifest(tmp, {"name": name, "created": spec["created"]})
        # Kaggle's CLI needs this beside the files; it is not part of what infer checks.
        user = os.environ.get("KAGGLE_USERNAME", "your-kaggle-username")
        atomic_write_json(tmp / "dataset-metadata.json", {"title": name, "id": f"{user}/{name.replace('_', '-')}",
                                                         "licenses": [{"name": "CC0-1.0"}]})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def package_size(root: Path) -> dict[str, int]:
    total, weights = 0, 0
    for p in root.rglob("*"):
        if p.is_file():
            total += p.stat().st_size
            weights += p.stat().st_size if p.relative_to(root).parts[0] == "weights" else 0
    return {"total": total, "weights": weights}


def make_package(cfg: Config, submission: str | None = None, experiments: list[str] | None = None,
                 name: str | None = None, dtype: str | None = None, with_deps: bool = False, force: bool = False,
                 budget_s: float | None = None, hidden_size: int | None = None, target: str | None = None,
                 quiet: bool = False) -> Path:
    """Package the blend (see the module doc); returns the package folder."""
    say = (lambda *a: None) if quiet else print
    meta, source = blend_meta(cfg, submission, experiments, quiet=quiet)
    members = members_of(cfg, meta)
    budget = None
    if budget_s is not None:
        from pipeline.budget import fit_budget

        if not hidden_size:
            raise PipelineError("--budget needs --hidden-size N (the number of hidden test images)")
        members, budget = fit_budget(cfg, members, meta, budget_s, hidden_size, target or cfg.package.target,
                                     quiet=quiet)
    name = name or cfg.package.name or source.stem
    out = write_package(cfg, meta, source, members, name, dtype or cfg.package.dtype, with_deps, force, budget, quiet)
    size = package_size(out)
    say(f"package: {out} ({_size(size['total'])}, weights {_size(size['weights'])}); upload with "
        f"kaggle datasets create -p {out}; rehearse with python -m pipeline.package --rehearse --package {out}")
    return out


def parse_duration(text: str) -> float:
    """``9h``, ``90m``, ``1h30m``, ``45s`` or plain seconds -> seconds."""
    import re

    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
    if not parts or "".join(f"{a}{b}" for a, b in parts) != t.replace(" ", ""):
        raise PipelineError(f"{text!r} is not a duration; write e.g. 9h, 90m, 1h30m or 45s")
    return sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.package", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--submission", metavar="PATH", help="package the blend of this submission (.csv or .json)")
    which.add_argument("--experiments", metavar="A,B", help="blend these experiments first, then package them")
    parser.add_argument("--name", help="package folder name (default: package.name, else the submission's name)")
    parser.add_argument("--dtype", choices=["float32", "float16"], help="weights precision (default: package.dtype)")
    parser.add_argument("--with-deps", action="store_true", help="also fetch package.extra_wheels for the target")
    parser.add_argument("--python-version", help="target Python for --with-deps (default: package.python_version)")
    parser.add_argument("--platform", help="target platform for --with-deps (default: package.platform)")
    parser.add_argument("--force", action="store_true", help="replace an existing package of that name")
    parser.add_argument("--budget", help="drop members until the projection fits, e.g. 2h (needs --hidden-size)")
    parser.add_argument("--hidden-size", type=int, help="number of hidden test images to project for")
    parser.add_argument("--target", help="t4x2 | p100 | cpu | <factor> (default: package.target)")
    parser.add_argument("--rehearse", action="store_true", help="install and run a package in a fresh offline venv")
    parser.add_argument("--package", metavar="DIR", help="the package to rehearse (default: build one now)")
    parser.add_argument("--scale", type=int, default=1, help="rehearsal: replicate the test images N times")
    parser.add_argument("--limit", help="rehearsal: the competition's time limit (default: package.limit)")
    parser.add_argument("--target-log", metavar="LOG", help="rehearsal: a real Kaggle run's log (its infer line) "
                        "to recalibrate the target factor")
    parser.add_argument("--scores", action="store_true", help="public leaderboard scores against CV (Kaggle CLI)")
    parser.add_argument("--scores-csv", metavar="CSV", help="--scores from a CSV you exported instead of the CLI")
    parser.add_argument("--competition", help="--scores: the Kaggle competition slug (default: competition.name)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.python_version:
        cfg.package.python_version = args.python_version
    if args.platform:
        cfg.package.platform = args.platform
    if args.scores or args.scores_csv:
        from pipeline.scores import cv_vs_public

        return cv_vs_public(cfg, csv=args.scores_csv, competition=args.competition)
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()] if args.experiments else None
    budget_s = parse_duration(args.budget) if args.budget else None
    if args.rehearse:
        from pipeline.rehearse import rehearse

        pkg = Path(args.package) if args.package else make_package(
            cfg, args.submission, experiments, args.name, args.dtype, args.with_deps, args.force, budget_s,
            args.hidden_size, args.target)
        report = rehearse(cfg, pkg, scale=args.scale, hidden_size=args.hidden_size,
                          limit_s=parse_duration(args.limit or cfg.package.limit),
                          target=args.target or cfg.package.target, target_log=args.target_log)
        if not report["passed"]:
            raise PipelineError(f"rehearsal failed: {report['verdict']}")
        return report
    return make_package(cfg, args.submission, experiments, args.name, args.dtype, args.with_deps, args.force,
                        budget_s, args.hidden_size, args.target)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
