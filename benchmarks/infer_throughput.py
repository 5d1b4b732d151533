"""images/s of ``pipeline.infer`` over a package's members against a bare loop over the same models and views.

    python benchmarks/infer_throughput.py [--package DIR] [--rounds 5]

Without ``--package`` it packages the newest submission of the configured competition (after
``make demo``: the blend of the demo's two experiments) into a temporary folder. Both sides decode
every test image once, run every fold model of every member over every TTA view in batches of
the same size, and merge views, folds and members; the bare loop is plain torch/timm/albumentations
with nothing of the pipeline but the view functions. Printed: images/s of each and the ratio
(aim >= 0.9), as median and spread over the rounds, with the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def bare_loop(package: Path, image_paths: list[str], batch_size: int) -> float:
    """Seconds for the plain loop: decode, eval transform, every model x view, softmax, average."""
    import albumentations as A
    import cv2
    import timm
    import yaml
    from albumentations.pytorch import ToTensorV2

    from pipeline.tta import build_views

    spec = json.loads((package / "ensemble.json").read_text())
    models = []
    for m in spec["members"]:
        cfg = yaml.safe_load((package / f"experiments/{m['name']}/config.yaml").read_text())
        aug, size = cfg["train"]["augment"], cfg["train"]["img_size"]
        tf = A.Compose([A.SmallestMaxSize(max_size=int(round(size / aug["eval_crop_pct"]))),
                        A.CenterCrop(height=size, width=size), A.Normalize(mean=aug["mean"], std=aug["std"]),
                        ToTensorV2()])
        views, _ = build_views(m["tta"], flips=m["flips"], crop_scale=m["crop_scale"])
        for k in m["folds"]:
            net = timm.create_model(cfg["model"]["backbone"], num_classes=len(spec["classes"]))
            net.load_state_dict(torch.load(package / f"weights/{m['name']}/fold{k}.pt", weights_only=True))
            models.append((net.eval(), views, m["weight"] / len(m["folds"])))
    t = time.perf_counter()
    out = []
    with torch.inference_mode():
        for i in range(0, len(image_paths), batch_size):
            imgs = [cv2.cvtColor(cv2.imread(p, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                    for p in image_paths[i:i + batch_size]]
            x = torch.stack([tf(image=im)["image"] for im in imgs])
            p = 0
            for net, views, w in models:
                p = p + w * torch.stack([net(v(x)).softmax(-1) for v in views]).mean(0)
            out.append(p)
    torch.cat(out).numpy()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", help="package folder (default: package the newest submission)")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from pipeline.config import load_config
    from pipeline.data import load_competition
    from pipeline.infer import run_infer

    cfg = load_config(args.config)
    tmp = Path(tempfile.mkdtemp(prefix="infer-bench-"))
    package = Path(args.package) if args.package else None
    if package is None:
        from pipeline.package import make_package

        cfg.paths.packages = str(tmp / "packages")
        package = make_package(cfg, name="bench", quiet=True)
    test = load_competition(cfg.competition).test
    spec = json.loads((package / "ensemble.json").read_text())
    batch = int(spec.get("batch_size", 256))
    print(f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min load), "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"package {package}: {len(spec['members'])} members, "
          f"{sum(len(m['folds']) for m in spec['members'])} fold models, {len(test)} test images, batch {batch}")
    ratios, ours, bare = [], [], []
    for r in range(args.rounds):
        # Alternate which side runs first: on a shared machine the load drifts within a round.
        if r % 2:
            b = bare_loop(package, test["path"].tolist(), batch)
        res = run_infer(package, test_csv=str(Path(cfg.competition.root) / cfg.competition.test_csv),
                        out=tmp / f"sub{r}.csv", num_workers=0, quiet=True)
        if not r % 2:
            b = bare_loop(package, test["path"].tolist(), batch)
        ours.append(len(test) / res.predict_seconds)
        bare.append(len(test) / b)
        ratios.append(ours[-1] / bare[-1])
        print(f"round {r + 1}: infer {ours[-1]:.1f} images/s, bare loop {bare[-1]:.1f} images/s, "
              f"ratio {ratios[-1]:.3f} (load {os.getloadavg()[0]:.2f})")
    spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
    print(f"infer / bare: median {statistics.median(ratios):.3f} (spread {spread}) over {args.rounds} rounds; "
          f"infer {statistics.median(ours):.1f} images/s, bare {statistics.median(bare):.1f} images/s (median)")
    print(f"uptime after: load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
