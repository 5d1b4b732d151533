"""Stage ``infer``: a submission from an inference package alone (no train.csv, folds, runs/ or network).

``python -m pipeline.infer --package DIR (--test-dir DIR | --test-csv CSV) [--sample-submission CSV]
--out submission.csv`` reads the package written by ``pipeline.package`` (its ``manifest.json`` is
checked first: a missing or altered file is refused by name before any work), decodes the raw test
images, applies the preprocessing each member was trained with (its own config in the package, and
the resize of a training image cache where one was used), and predicts exactly as
``pipeline.predict`` + ``pipeline.ensemble`` do, with their own functions: TTA views and merge
(:mod:`pipeline.tta`), fold averaging and weighted member averaging (:mod:`pipeline.ensemble`).
Each batch is decoded once for every fold model of the members that share its preprocessing.

Writes ``--out`` (the sample submission's form, validated against it when given; never
overwritten), optionally ``--probs`` (the blended probabilities) and ``--report`` (a JSON of images,
seconds, images/s and peak RAM: the figures the rehearsal projects from). ``--check`` only loads
every weight file into this machine's torch and timm and runs one batch (the notebook's first step).
"""
from __future__ import annotations

import argparse
import functools
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from pipeline import package_files as pf
from pipeline.config import CompetitionConfig, Config, ConfigError, build_config
from pipeline.errors import PipelineError, cli_entry
from pipeline.io import atomic_write_csv, atomic_write_json, read_json


@dataclass
class FoldModel:
    member: str
    fold: int
    model: torch.nn.Module
    train_cfg: Config
    views: list
    merge: str


@dataclass
class InferResult:
    submission: Path
    ids: list[str]
    probs: np.ndarray
    classes: list[str]
    n_images: int
    seconds: float
    predict_seconds: float
    peak_rss_mb: float
    report: dict[str, Any]


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def read_spec(root: Path) -> dict[str, Any]:
    spec = read_json(root / pf.ENSEMBLE)
    if not spec.get("members"):
        raise pf.PackageError(f"{root / pf.ENSEMBLE} lists no members; rebuild the package")
    return spec


def member_config(root: Path, member: str) -> Config:
    path = root / pf.experiment_config(member)
    try:
        return build_config(yaml.safe_load(path.read_text()), source=str(path))
    except ConfigError as exc:
        raise pf.PackageError(f"{path} is not a config this pipeline version reads ({exc}); rebuild the package "
                              "with the version installed here, or install the version it was built with") from None


def preprocess_key(train_cfg: Config) -> tuple:
    """What decides the decoded uint8 batch; members equal in it share one (each normalises it on the
    device with its own mean and std)."""
    aug = train_cfg.train.augment
    return (train_cfg.train.img_size, aug.eval_crop_pct, cache_size(train_cfg))


def cache_size(train_cfg: Config) -> int | None:
    """The short side a training image cache resized to (``cache.size``), None without a cache."""
    from pipeline.data.cache import resolve_size

    cache = getattr(train_cfg, "cache", None)
    return resolve_size(cache, train_cfg.train) if cache is not None else None


def member_transform(train_cfg: Config):
    """The eval transform training validated with, after the cache's resize when one was used."""
    import albumentations as A

    from pipeline.data.transforms import eval_transform

    tf = eval_transform(train_cfg.train.img_size, train_cfg.train.augment)
    if cache_size(train_cfg):
        # Training read the images the cache held (short side shrunk, re-encoded for a jpeg cache): the
        # raw hidden test images go through the cache's own preprocess() first, so the pixels match.
        step = A.Lambda(image=functools.partial(_as_cached, cache=train_cfg.cache, train=train_cfg.train))
        tf = A.Compose([step, *tf.transforms])
    return tf


def _as_cached(image: np.ndarray, cache, train, **_) -> np.ndarray:
    from pipeline.data.cache import preprocess

    return preprocess(image, cache, train)


def load_models(root: Path, spec: dict[str, Any], device: torch.device) -> list[FoldModel]:
    """Every (member, fold) model of the package on ``device``, rebuilt as pipeline.predict does."""
    from pipeline.engine.amp import set_tf32
    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.models import load_classifier
    from pipeline.predict import model_views

    n_classes = len(spec["classes"])
    models = []
    for m in spec["members"]:
        train_cfg = member_config(root, m["name"])
        for k in m["folds"]:
            path = root / pf.weights_file(m["name"], k)
            state = load_checkpoint(path)
            try:
                model = load_classifier(train_cfg.model, n_classes, state, str(path))
            except Exception as exc:  # the image's timm may lack the backbone or name its layers otherwise
                import timm

                raise PipelineError(
                    f"{path}: this machine's torch {torch.__version__} / timm {timm.__version__} cannot load the "
                    f"weights of {train_cfg.model.backbone} ({str(exc).splitlines()[0][:300]}); the package was "
                    f"made with {spec.get('trained_with', {})}: add a matching timm wheel with "
                    "package.extra_wheels and rebuild the package with --with-deps") from None
            model.to(device).eval()
            if train_cfg.train.channels_last:
                model.to(memory_format=torch.channels_last)
            set_tf32(device, train_cfg.train.tf32)
            views, _ = model_views(model, m["tta"], m["flips"], m["crop_scale"])
            models.append(FoldModel(m["name"], k, model, train_cfg, views, m["merge"]))
    return models


def read_test(spec: dict[str, Any], test_dir: str | None, test_csv: str | None,
              sample: pd.DataFrame | None) -> pd.DataFrame:
    """The hidden test table, read with the competition's id column and image template."""
    from pipeline.data.competition import read_test_table

    comp = CompetitionConfig.model_validate(spec["competition"])
    if test_dir:
        folder = Path(test_dir)
        comp = comp.model_copy(update={"root": str(folder.parent), "test_dir": folder.name, "test_csv": None})
    elif test_csv:
        csv = Path(test_csv)
        comp = comp.model_copy(update={"root": str(csv.parent), "test_csv": csv.name, "test_dir": None})
    else:
        raise PipelineError("give the test images: --test-dir DIR (ids are the file names) or --test-csv CSV "
                            f"(column {comp.id_column!r}; images at {comp.test_image!r} beside the CSV)")
    return read_test_table(comp, Path(comp.root), sample)


class _TestImages(torch.utils.data.Dataset):
    """Test images through a transform; an undecodable one gives a blank tensor and target -2, so
    every bad file is found in the one decoding pass and listed together."""

    def __init__(self, paths: list[str], transform, blank: torch.Tensor):
        from pipeline.data import ImageDataset

        self.inner = ImageDataset(paths, transform=transform)
        self.blank = blank

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        from pipeline.data import ImageReadError

        try:
            return self.inner[i]
        except ImageReadError:
            return self.blank, -2


def predict_group(models: list[FoldModel], paths: list[str], batch_size: int, num_workers: int,
                  device: torch.device, progress: bool, desc: str) -> tuple[dict[tuple[str, int], np.ndarray], list[int]]:
    """Merged TTA probabilities ``(N, C)`` of each model in ``models`` (same preprocessing), and the
    indices of the images that could not be decoded."""
    from tqdm.auto import tqdm

    from pipeline.tta import merge_log_probs, predict_views

    train_cfg = models[0].train_cfg
    tf = member_transform(train_cfg)
    size = train_cfg.train.img_size
    blank = tf(image=np.zeros((size, size, 3), np.uint8))["image"]
    ds = _TestImages(paths, tf, blank)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    # Merged probabilities stay on the device until the end: one transfer per model, not a sync per batch.
    out: dict[tuple[str, int], list[torch.Tensor]] = {(m.member, m.fold): [] for m in models}
    bad: list[int] = []
    seen = 0
    for x, flag in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        bad += (np.flatnonzero(flag.numpy() == -2) + seen).tolist()
        seen += len(x)
        x = x.to(device, non_blocking=True)  # once for every model of the group (uint8: a quarter of the bytes)
        for m in models:
            t = m.train_cfg.train
            logp = predict_views(m.model, [x], m.views, device=device, amp=t.amp, channels_last=t.channels_last,
                                 mean=t.augment.mean, std=t.augment.std, to_cpu=False)
            out[(m.member, m.fold)].append(merge_log_probs(logp, m.merge))
    return {k: torch.cat(v).double().cpu().numpy() if v else np.zeros((0, 0)) for k, v in out.items()}, bad


def blend_members(spec: dict[str, Any], fold_probs: dict[tuple[str, int], np.ndarray]) -> np.ndarray:
    """Fold averaging then the weighted member merge (mean | power | rank), with the ensemble's own functions."""
    from pipeline.blending import merged
    from pipeline.ensemble import average_folds

    members = [average_folds([fold_probs[(m["name"], k)] for k in m["folds"]]) for m in spec["members"]]
    rule = spec.get("member_merge", {"merge": "mean"})
    return merged(np.stack(members), np.array([float(m["weight"]) for m in spec["members"]]),
                  merge=rule["merge"], power=float(rule.get("power", 2.0)))


def _sample_form(spec: dict[str, Any], ids: list[str]) -> pd.DataFrame:
    """Without a sample submission: an empty one in the recorded form (columns) for these ids."""
    cols = spec["submission_columns"]
    return pd.DataFrame({c: (ids if c == spec["competition"]["id_column"] else [""] * len(ids)) for c in cols})


def run_infer(package: str | Path, test_dir: str | None = None, test_csv: str | None = None,
              sample_submission: str | None = None, out: str | Path = "submission.csv",
              probs_out: str | Path | None = None, report_out: str | Path | None = None,
              device: str = "auto", batch_size: int | None = None, num_workers: int = 0,
              quiet: bool = False) -> InferResult:
    """Predict the test images with the package's blend and write the submission (see the module doc)."""
    from pipeline.engine.distributed import resolve_device
    from pipeline.submission import build_submission, validate_submission

    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else print
    root = Path(package)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists and is never overwritten; remove it or choose another --out")
    pf.verify_package(root)
    spec = read_spec(root)
    classes = list(spec["classes"])
    comp_cfg = CompetitionConfig.model_validate(spec["competition"])
    sample = None
    if sample_submission:
        from pipeline.data.competition import _read_csv

        sample = _read_csv(Path(sample_submission), "sample submission", [comp_cfg.id_column],
                           "--sample-submission")
    test = read_test(spec, test_dir, test_csv, sample)
    dev = resolve_device(device)
    models = load_models(root, spec, dev)
    batch = batch_size or int(spec.get("batch_size", 256))

    groups: dict[tuple, list[FoldModel]] = {}
    for m in models:
        groups.setdefault(preprocess_key(m.train_cfg), []).append(m)
    t_pred = time.perf_counter()
    fold_probs: dict[tuple[str, int], np.ndarray] = {}
    paths = test["path"].tolist()
    for gi, group in enumerate(groups.values()):
        probs, bad = predict_group(group, paths, batch, num_workers, dev, progress=not quiet,
                                   desc=f"infer {gi + 1}/{len(groups)}")
        if bad:
            from pipeline.data import ImageReadError, read_image

            reasons = []
            for i in bad:
                try:
                    read_image(paths[i])
                    reasons.append(f"{test['image'].iat[i]}: could not be read")
                except ImageReadError as exc:
                    reasons.append(f"{test['image'].iat[i]}: {str(exc).split(': ', 1)[-1]}")
            raise PipelineError(f"{len(bad)} test image(s) could not be decoded:\n  " + "\n  ".join(reasons)
                                + "\nReplace or remove these files (and their rows) and run again.")
        fold_probs.update(probs)
    predict_seconds = time.perf_counter() - t_pred
    p = blend_members(spec, fold_probs)

    ids = test["id"].tolist()
    form = sample if sample is not None else _sample_form(spec, ids)
    sub = build_submission(form, comp_cfg, ids, p, classes)
    if sample is not None:
        validate_submission(sub, sample, comp_cfg, classes, source=str(sample_submission))
    atomic_write_csv(out, sub, overwrite=False)
    if probs_out:
        frame = pd.DataFrame(p, columns=classes)
        frame.insert(0, "image", test["image"].to_numpy())
        atomic_write_csv(probs_out, frame)
    seconds = time.perf_counter() - t0
    import timm

    report = {
        "images": len(test), "seconds": seconds, "predict_seconds": predict_seconds,
        "images_per_s": len(test) / predict_seconds if predict_seconds > 0 else None,
        "models": len(models), "views": sum(len(m.views) for m in models), "peak_rss_mb": peak_rss_mb(),
        "device": str(dev), "torch": torch.__version__, "timm": timm.__version__,
        "submission": str(out), "validated": sample is not None,
    }
    if report_out:
        atomic_write_json(report_out, report)
    say(f"infer: {len(test)} images in {predict_seconds:.1f}s ({report['images_per_s'] or 0:.1f} images/s; "
        f"{len(models)} models, {report['views']} forward passes per image), total {seconds:.1f}s, "
        f"peak RAM {report['peak_rss_mb']:.0f} MB -> {out}")
    return InferResult(out, ids, p, classes, len(test), seconds, predict_seconds, report["peak_rss_mb"], report)


def check_package(package: str | Path, device: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Load every weight file into this machine's torch/timm and run one batch (the notebook's first step)."""
    import timm

    from pipeline.data.device_input import DeviceInput
    from pipeline.engine.distributed import resolve_device

    root = Path(package)
    pf.verify_package(root)
    spec = read_spec(root)
    dev = resolve_device(device)
    models = load_models(root, spec, dev)
    for m in models:
        size = m.train_cfg.train.img_size
        # The image side too: cv2 (opencv-python or -headless) and the member's albumentations transform.
        x = member_transform(m.train_cfg)(image=np.zeros((size, size, 3), np.uint8))["image"][None]
        with torch.inference_mode():
            y = m.model(DeviceInput.for_training(m.train_cfg.train, dev)(x))
        if tuple(y.shape) != (1, len(spec["classes"])):
            raise PipelineError(f"{pf.weights_file(m.member, m.fold)}: the model gives {tuple(y.shape)} outputs, "
                                f"expected (1, {len(spec['classes'])})")
    info = {"torch": torch.__version__, "timm": timm.__version__, "device": str(dev), "models": len(models),
            "trained_with": spec.get("trained_with", {})}
    if not quiet:
        print(f"check: torch {torch.__version__}, timm {timm.__version__} on {dev} load all {len(models)} weight "
              f"files of {root} (trained with {spec.get('trained_with', {})})")
    return info


def main(argv: list[str] | None = None) -> InferResult | dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m pipeline.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True, metavar="DIR", help="the package folder (manifest.json)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--test-dir", metavar="DIR", help="folder of test images; ids are the file names")
    which.add_argument("--test-csv", metavar="CSV", help="table of test ids; images at the competition's "
                       "test_image template, relative to the CSV's folder")
    parser.add_argument("--sample-submission", metavar="CSV", help="validate the submission against it")
    parser.add_argument("--out", default="submission.csv", help="submission file (default: submission.csv)")
    parser.add_argument("--probs", metavar="CSV", help="also write the blended probabilities")
    parser.add_argument("--report", metavar="JSON", help="also write images, seconds, images/s, peak RAM")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the package's)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images")
    parser.add_argument("--check", action="store_true", help="only check that the weights load here")
    args = parser.parse_args(argv)
    if args.check:
        return check_package(args.package, args.device)
    return run_infer(args.package, args.test_dir, args.test_csv, args.sample_submission, args.out, args.probs,
                     args.report, args.device, args.batch_size, args.num_workers)


if __name__ == "__main__":
    raise SystemExit(cli_entry(main))
