"""The inference budget: which members of a blend fit the hidden test's time limit.

``python -m pipeline.package --budget 2h --hidden-size N [--target cpu]`` measures each member's
cost here (seconds per image of one forward pass of its fold-0 model on real test images, times
its folds and TTA views), scales it to the target (:func:`pipeline.rehearse.target_factor`), and
while the projected total exceeds the budget drops the member whose removal loses the least OOF
log loss per second saved, re-choosing the remaining members' weights with the ensemble's own
``ensemble.method`` / ``ensemble.merge``. The chosen set, its weights and OOF score are printed and
kept in ``ensemble.json`` (``budget``). Decoding is shared by all members and not counted.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.errors import PipelineError


def seconds_per_forward(cfg: Config, member, n_images: int | None = None, rounds: int = 3) -> tuple[float, int]:
    """Median seconds per image of one view of the member's fold-0 model here, and its view count.

    Timed on one batch of ``predict.batch_size`` test images, the batch infer uses: on the CPU a
    batch of 64 small images cost 2.4-3.5x per image what a batch of 256 did (measured on the demo).
    """
    n_images = n_images or cfg.predict.batch_size
    from pipeline.data import load_competition, read_image
    from pipeline.engine.distributed import resolve_device
    from pipeline.infer import member_transform
    from pipeline.predict import load_fold_model, model_views
    from pipeline.tta import predict_views

    device = resolve_device(cfg.device)
    model, train_cfg, _, _ = load_fold_model(cfg.model_copy(update={"experiment": member.name}), member.folds[0],
                                             device)
    views, _ = model_views(model, member.tta, member.flips, member.crop_scale)
    test = load_competition(cfg.competition).test
    tf = member_transform(train_cfg)
    x = torch.stack([tf(image=read_image(p))["image"] for p in test["path"].head(n_images)])
    tc = train_cfg.train
    run = dict(device=device, amp=tc.amp, channels_last=tc.channels_last, mean=tc.augment.mean, std=tc.augment.std)
    predict_views(model, [x], views[:1], **run)  # warm-up: first-call allocations, lazy inits
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        predict_views(model, [x], views[:1], **run)
        times.append((time.perf_counter() - t) / len(x))
    return float(np.median(times)), len(views)


def _oof_log_loss(ens, names: list[str], oofs: dict[str, np.ndarray], plain: dict[str, np.ndarray],
                  y: np.ndarray) -> tuple[float, np.ndarray]:
    """OOF log loss of the blend of ``names`` with weights chosen as pipeline.ensemble chooses them."""
    from pipeline.ensemble import blend_members
    from pipeline.metrics import log_loss

    if ens.method == "fixed":
        ens = ens.model_copy(update={"weights": {n: w for n, w in ens.weights.items() if n in names}})
    oof = np.stack([oofs[n] for n in names])
    b = blend_members(ens, oof, np.stack([plain[n] for n in names]), oof, y, names)
    return log_loss(b.oof, y), np.asarray(b.weights, dtype=np.float64)


def fit_budget(cfg: Config, members: list, meta: dict[str, Any], budget_s: float, hidden_size: int,
               target: str, quiet: bool = False) -> tuple[list, dict[str, Any]]:
    """Drop members greedily until the projected inference time fits ``budget_s`` (see the module doc)."""
    from pipeline.ensemble import load_experiment
    from pipeline.rehearse import target_factor

    say = (lambda *a: None) if quiet else print
    if meta.get("method") == "stack":
        raise PipelineError("--budget: ensemble.method=stack blends with a fitted level-2 model that a package "
                            "does not carry; blend with optimize, caruana or hill_climb to package")
    factor, source = target_factor(target)
    # The blend's own rule (the submission's), not whatever the config says today.
    ens = cfg.ensemble.model_copy(update={"method": meta.get("method", cfg.ensemble.method),
                                          "merge": meta.get("merge", cfg.ensemble.merge),
                                          "power": float(meta.get("power", cfg.ensemble.power)),
                                          "weights": dict(meta.get("weights", {}))})
    exps = {m.name: load_experiment(cfg, m.name) for m in members}
    first = exps[members[0].name]
    classes = first.classes
    y = first.oof["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    use_tta = meta.get("used_tta_oof", True) and all(e.oof_tta is not None for e in exps.values())
    oofs = {n: (e.oof_tta if use_tta else e.oof)[classes].to_numpy(np.float64) for n, e in exps.items()}
    plain = {n: e.oof[classes].to_numpy(np.float64) for n, e in exps.items()}

    cost: dict[str, float] = {}
    rows = []
    for m in members:
        sec, n_views = seconds_per_forward(cfg, m)
        cost[m.name] = hidden_size * len(m.folds) * n_views * sec * factor
        rows.append((m.name, len(m.folds), n_views, sec))
    names = [m.name for m in members]
    ll, w = _oof_log_loss(ens, names, oofs, plain, y)
    say(f"budget: {budget_s / 3600:.2f}h for {hidden_size} images on {target} (x{factor:g}, {source})")
    say(f"{'member':<28} {'folds':>5} {'views':>5} {'ms/img/view':>11} {'cost':>9} {'weight':>7}")
    for (n, k, v, sec), wi in zip(rows, w):
        say(f"{n:<28} {k:>5} {v:>5} {sec * 1000:>11.3f} {cost[n] / 3600:>8.2f}h {wi:>7.3f}")
    dropped = []
    while sum(cost[n] for n in names) > budget_s and len(names) > 1:
        options = []
        for n in names:
            rest = [r for r in names if r != n]
            ll_rest, w_rest = _oof_log_loss(ens, rest, oofs, plain, y)
            options.append(((ll_rest - ll) / max(cost[n], 1e-9), n, ll_rest, w_rest))
        _, n, ll_new, w = min(options)
        say(f"budget: drop {n}: saves {cost[n] / 3600:.2f}h, OOF log loss {ll:.4f} -> {ll_new:.4f}")
        dropped.append({"member": n, "saves_s": cost[n], "oof_logloss_after": ll_new})
        names = [r for r in names if r != n]
        ll = ll_new
    total = sum(cost[n] for n in names)
    if total > budget_s:
        raise PipelineError(f"--budget {budget_s / 3600:.2f}h: even {names[0]} alone needs {total / 3600:.2f}h for "
                            f"{hidden_size} images on {target}; train fewer folds or use fewer TTA views")
    weights = dict(zip(names, map(float, w)))
    chosen = [replace(m, weight=weights[m.name]) for m in members if m.name in weights]
    say(f"budget: {len(chosen)} member(s) {names}, projected {total / 3600:.2f}h of {budget_s / 3600:.2f}h, "
        f"OOF log loss {ll:.4f}")
    info = {"budget_s": budget_s, "hidden_size": hidden_size, "target": target, "factor": factor,
            "cost_s": cost, "projected_s": total, "dropped": dropped, "members": names, "weights": weights,
            "oof_logloss": ll, "measured": {n: {"folds": k, "views": v, "s_per_image_view": s}
                                             for n, k, v, s in rows}}
    return chosen, info
