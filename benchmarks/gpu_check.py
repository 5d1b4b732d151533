"""Run every CUDA path of the pipeline once and print a table; then resnet50d's training speed.

    python benchmarks/gpu_check.py                 # on a machine with one GPU: under 5 minutes
    python benchmarks/gpu_check.py --skip-speed    # only the table of paths (about a minute)

Without CUDA it says so in one line and exits 0 having run nothing. On a GPU, each check runs a
few real steps and verifies something (exit code 1 if any fails):

- bf16 and fp16 autocast with ``pipeline.engine.amp`` (fp16 with an enabled GradScaler, which must
  skip a step whose gradients overflow and halve its scale), TF32 matmuls;
- channels_last (same outputs as contiguous), ``torch.compile`` (same outputs as eager), timm EMA;
- a one-process NCCL process group: all-reduce, then a DDP training step;
- TTA (``pipeline.tta``, every d4 view and a zoom in one call) and the SSD detection train step;
- speed: resnet50d at 224 px, batch 128, the training path of ``pipeline.train`` (loader from a
  generated Leaves-shaped set of 500-px photos, raw and through the memmap image cache, timm
  Mixup/CutMix, AMP auto, channels_last) for two epochs each: train images/s, the share of step
  time spent waiting for the loader, peak GPU memory; beside it a bare timm loop on one tensor
  batch (the ceiling).

``--device cpu --quick`` runs the same code on the CPU with tiny sizes (gloo instead of NCCL, fp16
skipped): a way to check the script itself on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def _model(name: str, device: torch.device, num_classes: int = 10) -> torch.nn.Module:
    import timm

    return timm.create_model(name, num_classes=num_classes).to(device)


def _batch(n: int, size: int, device: torch.device, num_classes: int = 10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (n,), generator=g).to(device)
    return x, y


def _steps(model, amp, x, y, steps: int = 3) -> tuple[list[float], torch.amp.GradScaler]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = amp.grad_scaler()
    losses = []
    model.train()
    for _ in range(steps):
        with amp.autocast():
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, scaler


def check_bf16(device, a) -> str:
    from pipeline.engine.amp import resolve_amp

    amp = resolve_amp("bf16", device)
    model = _model(a.small, device)
    x, y = _batch(a.batch, a.size, device)
    with amp.autocast():
        dtype = model(x).dtype
    losses, scaler = _steps(model, amp, x, y)
    assert dtype == torch.bfloat16, f"logits under bf16 autocast are {dtype}"
    assert all(map(torch.isfinite, map(torch.tensor, losses))), losses
    assert not scaler.is_enabled(), "bf16 needs no loss scaling"
    auto = resolve_amp("auto", device)
    return f"logits {dtype}, loss {losses[0]:.3f} -> {losses[-1]:.3f}; amp auto -> {auto.name}"


def check_fp16(device, a) -> str:
    from pipeline.engine.amp import resolve_amp

    if device.type != "cuda":
        return "skipped: fp16 autocast with a GradScaler is for CUDA"
    amp = resolve_amp("fp16", device)
    model = _model(a.small, device)
    x, y = _batch(a.batch, a.size, device)
    losses, scaler = _steps(model, amp, x, y)
    assert scaler.is_enabled() and all(map(torch.isfinite, map(torch.tensor, losses))), losses
    # An overflowing step must be skipped (weights unchanged) and the scale halved.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    with amp.autocast():
        loss = torch.nn.functional.cross_entropy(model(x).float(), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    unchanged = all(torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    assert unchanged and scaler.get_scale() == scale / 2, (unchanged, scale, scaler.get_scale())
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, overflow step skipped, scale {scale:.0f} -> {scaler.get_scale():.0f}"


def check_tf32(device, a) -> str:
    if device.type != "cuda":
        return "skipped: TF32 is a CUDA setting"
    x = torch.randn(2048, 2048, device=device)
    exact = (x.double() @ x.double()).float()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        err = ((x @ x) - exact).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return f"TF32 matmul max error {err:.3g} on 2048x2048 (float32 unchanged elsewhere: {old})"


def check_channels_last(device, a) -> str:
    model = _model(a.small, device).eval()
    x, _ = _batch(a.batch, a.size, device)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    err = (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    assert err < 1e-2, f"channels_last differs by {err:.3g} (relative)"
    return f"same logits as contiguous (relative difference {err:.2g})"


def check_compile(device, a) -> str:
    model = _model(a.small, device)
    x, y = _batch(a.batch, a.size, device)
    compiled = torch.compile(model)
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    first = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        err = (compiled(x) - model(x)).abs().max().item()
    assert err < 1e-2, f"compiled output differs from eager by {err:.3g}"
    return f"first step (compiling) {first:.0f}s; eval output = eager within {err:.2g}"


def check_ema(device, a) -> str:
    from timm.utils import ModelEmaV3

    from pipeline.engine.amp import resolve_amp

    model = _model(a.small, device)
    ema = ModelEmaV3(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(a.batch, a.size, device)
    _steps(model, resolve_amp("auto", device), x, y, steps=2)
    ema.update(model, step=100)
    devices = {p.device.type for p in ema.module.parameters()}
    # decay 0.9: the EMA sits between the starting and the trained weights, equal to neither
    between = all(torch.allclose(e, 0.9 * s + 0.1 * p, atol=1e-5) for e, s, p in
                  zip(ema.module.parameters(), start, model.parameters()))
    assert devices == {device.type} and between, (devices, between)
    return f"EMA weights on {device.type}, 0.9 x start + 0.1 x trained after one update"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_nccl(device, a) -> str:
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.engine.amp import resolve_amp

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=2))
    try:
        t = torch.full((4,), 2.0, device=device)
        dist.all_reduce(t)
        assert t.tolist() == [2.0] * 4, t
        model = DistributedDataParallel(_model(a.small, device),
                                        device_ids=[device.index or 0] if device.type == "cuda" else None)
        x, y = _batch(a.batch, a.size, device)
        losses, _ = _steps(model, resolve_amp("auto", device), x, y, steps=2)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return f"{backend}: all_reduce ok, DDP steps loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def check_tta(device, a) -> str:
    from pipeline.tta import build_views, predict_views

    model = _model(a.small, device).eval()
    x, _ = _batch(a.batch, a.size, device)
    views, _ = build_views(["d4", "zoom_1.125"], flips=True)
    logp = predict_views(model, [x], views, device=device, amp="auto", channels_last=True)
    with torch.no_grad():
        from pipeline.engine.amp import resolve_amp

        with resolve_amp("auto", device).autocast():
            direct = torch.log_softmax(model(x).float(), -1).cpu()
    err = (logp[0] - direct).abs().max().item()
    assert logp.shape[:2] == (len(views), len(x)) and err < 5e-2, (tuple(logp.shape), err)
    return f"{len(views)} views x {len(x)} images in one call; identity view = model within {err:.2g}"


def check_detect(device, a) -> str:
    from pipeline.detect.boxes import targets_for
    from pipeline.detect.config import DetectConfig
    from pipeline.detect.loss import MultiBoxLoss
    from pipeline.detect.models import create_detector
    from pipeline.engine.amp import resolve_amp

    cfg = DetectConfig()
    model = create_detector(cfg.model, num_classes=3).to(device).train()
    amp = resolve_amp("auto", device)
    scaler = amp.grad_scaler()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    n = max(2, a.batch // 2)
    images = torch.randn(n, 3, cfg.model.img_size, cfg.model.img_size, generator=g).to(device)
    corner = torch.rand(n, 2, 2, generator=g) * 0.5  # two boxes per image, normalised xyxy
    size = 0.2 + torch.rand(n, 2, 2, generator=g) * 0.3
    boxes = torch.cat([corner, (corner + size).clamp(max=1.0)], -1).to(device)
    labels = torch.randint(0, 3, (n, 2), generator=g).to(device)
    criterion = MultiBoxLoss()
    losses = []
    for _ in range(2):
        with amp.autocast():
            out = model(images)
        # matching and loss must not wait for the GPU: any host sync in them raises here
        sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else None
        if sync_mode is not None:
            torch.cuda.set_sync_debug_mode("error")
        try:
            cls_t, box_t = targets_for(out["anchors"], boxes, labels, cfg.train.iou_threshold,
                                       grid=out["anchor_grid"], sync_free=True)
            loss = criterion(out["cls_logits"], out["box_offsets"], cls_t, box_t)
        finally:
            if sync_mode is not None:
                torch.cuda.set_sync_debug_mode(sync_mode)
        # the same targets as the CPU's matching
        cpu_cls, cpu_box = targets_for(out["anchors"].cpu(), boxes.cpu(), labels.cpu(), cfg.train.iou_threshold)
        assert torch.equal(cls_t.cpu(), cpu_cls), "GPU matching differs from the CPU's"
        assert torch.allclose(box_t.cpu(), cpu_box, atol=1e-5), "GPU box targets differ from the CPU's"
        scaler.scale(loss["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss["loss"].detach()))
    assert all(map(torch.isfinite, map(torch.tensor, losses))), losses
    return f"TinySSD {cfg.model.img_size} px, {out['anchors'].shape[0]} anchors on {out['anchors'].device.type}: " \
           f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; matching + loss without host syncs, targets = CPU's"


CHECKS = [("bf16 autocast", check_bf16), ("fp16 + GradScaler", check_fp16), ("TF32", check_tf32),
          ("channels_last", check_channels_last), ("torch.compile", check_compile), ("EMA", check_ema),
          ("NCCL process group + DDP", check_nccl), ("TTA", check_tta), ("detection train step", check_detect)]


# ------------------------------------------------------------------------------------------- speed
class TimedLoader:
    """Wraps a DataLoader and adds up the time spent waiting for its next batch."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device, self.wait = loader, device, 0.0
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - start
            yield batch


def speed(device, a) -> list[dict]:
    import pandas as pd

    from benchmarks.make_large_comp import build
    from pipeline.config import load_config
    from pipeline.data import load_competition
    from pipeline.data.cache import image_reader
    from pipeline.engine.amp import resolve_amp
    from pipeline.engine.distributed import DistInfo
    from pipeline.engine.loop import classification_loss, create_mixup, create_train_loss, train_one_epoch
    from pipeline.engine.optim import create_optimizer
    from pipeline.train import build_loaders, build_model, seed_epoch

    tmp = Path(a.data or tempfile.mkdtemp(prefix="gpu_check_"))
    root = build(tmp / f"leaves_{a.images}_{a.photo_px}", a.images, a.photo_px, classes=50, aspect="mixed")
    workers = a.workers if a.workers is not None else min(16, os.cpu_count() or 1)
    rows = []
    for path in ("raw", "memmap"):
        over = [f"competition.root={root}", f"competition.name={root.name}", "competition.build=null",
                "competition.solution=null", f"paths.work={tmp / 'work'}", "wandb.mode=disabled",
                f"model.backbone={a.big}", "model.pretrained=false", f"train.img_size={a.img_size}",
                f"train.batch_size={a.big_batch}", f"train.num_workers={workers}", "train.cache_images=false",
                "train.amp=auto", "train.channels_last=true", "train.ema=false", f"device={device.type}"]
        if path != "raw":
            over += ["cache.size=auto", "cache.format=memmap"]
        cfg = load_config(REPO / "configs" / "leaves_resnet50d.yaml", over)
        comp = load_competition(cfg.competition)
        info = DistInfo(device=device)
        folds = pd.DataFrame({"image": comp.train["image"], "label": comp.train["label"], "group": 0, "fold": 0})
        folds.loc[folds.index[:8], "fold"] = 1
        start = time.perf_counter()
        reader = image_reader(cfg, comp.root)
        prep = time.perf_counter() - start
        loader, *_ = build_loaders(cfg, folds, 1, comp.root, comp.classes, info, reader=reader)
        _, model, _, _ = build_model(cfg, len(comp.classes), info)
        optimizer = create_optimizer(model, cfg.train)
        amp = resolve_amp(cfg.train.amp, device)
        mixup = create_mixup(cfg.train, len(comp.classes))
        loss_fn = classification_loss(create_train_loss(cfg.train, mixup), amp=amp, device=device, mixup=mixup,
                                      channels_last=True, mean=cfg.train.augment.mean, std=cfg.train.augment.std)
        scaler = amp.grad_scaler()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for epoch in range(a.epochs + 1):  # the first epoch warms up (cuDNN autotuning, workers)
            timed = TimedLoader(loader, device)
            seed_epoch(loader, epoch)
            stats = train_one_epoch(model, timed, optimizer, loss_fn, epoch=epoch, info=info, scaler=scaler,
                                    desc=f"{path} epoch {epoch}")
            if epoch:
                rows.append({"path": path, "epoch": epoch, "img_s": stats.images_per_s,
                             "loader_wait": timed.wait / stats.time_s, "prepare_s": prep,
                             "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                             else float("nan")})
        del loader, model, optimizer
    # the ceiling: the same model on one tensor batch, no loader, no Mixup
    cfg_model = _model(a.big, device, 50).to(memory_format=torch.channels_last)
    x, y = _batch(a.big_batch, a.img_size, device, 50)
    x = x.contiguous(memory_format=torch.channels_last)
    amp = resolve_amp("auto", device)
    opt = torch.optim.AdamW(cfg_model.parameters(), lr=1e-3)
    scaler = amp.grad_scaler()
    rates = []
    for r in range(4):
        start = time.perf_counter()
        for _ in range(a.bare_steps):
            with amp.autocast():
                loss = torch.nn.functional.cross_entropy(cfg_model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if r:
            rates.append(a.bare_steps * a.big_batch / (time.perf_counter() - start))
    rows.append({"path": "bare timm (one tensor batch)", "epoch": 0, "img_s": statistics.median(rates),
                 "loader_wait": 0.0, "prepare_s": 0.0, "peak_gb": float("nan")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks the script itself)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for --device cpu)")
    parser.add_argument("--skip-speed", action="store_true", help="only the table of CUDA paths")
    parser.add_argument("--skip", nargs="+", default=[], metavar="CHECK",
                        help="checks to leave out, by the start of their name (e.g. torch.compile)")
    parser.add_argument("--images", type=int, default=4096, help="generated training set size for the speed part")
    parser.add_argument("--photo-px", type=int, default=500, help="long side of the generated photos")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores, at most 16)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per path (after one warm-up epoch)")
    parser.add_argument("--data", default=None, help="folder for the generated set (default: a temp folder)")
    a = parser.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "nothing was run")
        return 0
    device = torch.device(a.device)
    a.small, a.batch, a.size = ("test_resnet", 4, 32) if a.quick else ("resnet18", 32, 128)
    a.big, a.big_batch, a.img_size, a.bare_steps = ("test_resnet", 8, 32, 2) if a.quick else ("resnet50d", 128, 224, 20)
    if a.quick:
        a.images, a.photo_px, a.epochs = min(a.images, 48), min(a.photo_px, 64), 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} CPU cores")
    failed = 0
    print(f"{'path':28s} {'result':6s} {'s':>5s}  detail")
    for title, fn in CHECKS:
        if any(title.startswith(name) for name in a.skip):
            print(f"{title:28s} {'-':6s} {0:5.1f}  left out (--skip)")
            continue
        start = time.perf_counter()
        try:
            detail, status = fn(device, a), "ok"
        except Exception as exc:  # every path is reported, whatever breaks
            detail, status = f"{type(exc).__name__}: {exc}".splitlines()[0][:160], "FAIL"
            traceback.print_exc(file=sys.stderr)
            failed += 1
        print(f"{title:28s} {status:6s} {time.perf_counter() - start:5.1f}  {detail}", flush=True)
    if not a.skip_speed:
        start = time.perf_counter()
        try:
            rows = speed(device, a)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            print(f"speed: FAIL {type(exc).__name__}: {exc}")
            return 1
        import pandas as pd

        table = pd.DataFrame(rows)
        print(f"\n{a.big} at {a.img_size} px, batch {a.big_batch}, AMP auto, channels_last, Mixup/CutMix, "
              f"{a.images} generated {a.photo_px}-px photos ({time.perf_counter() - start:.0f}s):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        bare = table["img_s"].iloc[-1]
        for path in ("raw", "memmap"):
            sub = table[table["path"] == path]
            print(f"  {path}: {sub['img_s'].median():.0f} img/s = {sub['img_s'].median() / bare:.2f} of the bare loop; "
                  f"waiting for the loader {100 * sub['loader_wait'].median():.0f}% of the time")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
