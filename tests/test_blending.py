"""Hill climbing, merges and stacking on synthetic OOF predictions with known answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import blending
from pipeline.ensemble import choose_weights
from pipeline.metrics import log_loss


def _known_mix(f: float = 0.3, n: int = 1000):
    """Model A is sure and right on a share ``f`` of the rows and sure and wrong elsewhere, model B the
    reverse: the log loss of w*A + (1-w)*B is -(f log w + (1-f) log(1-w)), lowest at w = f. A third
    model is sure on every row but right on only a fifth of them: it belongs nowhere in the best mix."""
    rng = np.random.default_rng(0)
    y = rng.integers(2, size=n)
    a_right = np.arange(n) < int(f * n)
    one_hot = np.eye(2)[y]
    a = np.where(a_right[:, None], one_hot, 1 - one_hot)
    b = 1 - a
    noise = np.where((rng.random(n) < 0.2)[:, None], one_hot, 1 - one_hot)
    return np.stack([a, b, noise]), y


def test_hill_climb_finds_the_known_best_mix():
    probs, y = _known_mix(0.3)
    w = blending.hill_climb_weights(probs, y, step=0.01)
    assert w == pytest.approx([0.3, 0.7, 0.0], abs=1e-9)
    # and it is the optimum of the objective: neighbours on the simplex are worse
    best = log_loss(blending.merged(probs, w), y)
    for d in (-0.02, 0.02):
        assert log_loss(blending.merged(probs, w + np.array([d, -d, 0.0])), y) > best


def test_hill_climb_is_non_negative_by_default_and_negative_only_when_asked():
    # Model C is B plus a share of A's mistakes; the best mix subtracts some of C.
    rng = np.random.default_rng(1)
    n, c = 800, 4
    y = rng.integers(c, size=n)

    def model(strength: float) -> np.ndarray:
        logits = rng.normal(size=(n, c))
        logits[np.arange(n), y] += strength
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    a, b = model(2.0), model(1.0)
    probs = np.stack([a, b, 0.5 * a + 0.5 * b])
    plain = blending.hill_climb_weights(probs, y)
    assert (plain >= 0).all() and plain.sum() == pytest.approx(1.0)
    free = blending.hill_climb_weights(probs, y, allow_negative=True)
    assert free.sum() == pytest.approx(1.0)
    # allowing negatives is never worse on the OOF rows it was fit on
    assert log_loss(blending.merged(probs, free), y) <= log_loss(blending.merged(probs, plain), y) + 1e-12


def test_hill_climb_through_choose_weights_with_power_and_rank_merges():
    probs, y = _known_mix(0.3)
    for merge in ("mean", "power", "rank"):
        w = choose_weights("hill_climb", probs, y, ["a", "b", "noise"], merge=merge)
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        assert w[2] == pytest.approx(0.0)


def test_power_merge_is_the_renormalised_weighted_mean_of_powers():
    p = np.array([[[0.8, 0.2]], [[0.4, 0.6]]])  # two members, one row, two classes
    out = blending.merged(p, np.array([0.5, 0.5]), merge="power", power=2.0)
    raw = np.array([0.5 * 0.64 + 0.5 * 0.16, 0.5 * 0.04 + 0.5 * 0.36])
    assert out[0] == pytest.approx(raw / raw.sum())


def test_rank_merge_ranks_each_class_column_over_rows():
    p = np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]])  # one member, three rows
    t = blending.transform(p, "rank")
    assert t[0, :, 0].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert t[0, :, 1].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_stacking_inner_cv_never_sees_its_own_validation_rows(monkeypatch):
    """Features are noise unique to each row and labels random: a level-2 model that saw a row's label
    would memorise it (C huge); the inner CV must predict each fold with a model fit without it."""
    rng = np.random.default_rng(2)
    n, c, m = 100, 2, 60  # more features (m * c) than rows: a linear model can memorise its fit rows
    y = rng.integers(c, size=n)
    probs = rng.dirichlet(np.ones(c), size=(m, n))
    folds = np.arange(n) % 5
    fitted, predicted = [], []
    real_fit, real_predict = blending._fit, blending._predict

    def spy_fit(x, yy, cc, seed):
        fitted.append({tuple(r) for r in np.round(x, 9)})
        return real_fit(x, yy, cc, seed)

    def spy_predict(model, x, n_classes):
        predicted.append({tuple(r) for r in np.round(x, 9)})
        return real_predict(model, x, n_classes)

    monkeypatch.setattr(blending, "_fit", spy_fit)
    monkeypatch.setattr(blending, "_predict", spy_predict)
    res = blending.stack_predictions(probs, probs[:, :10], y, folds, c=1e4)
    assert len(fitted) == 6 and len(predicted) == 6  # 5 inner folds + the final fit for the test rows
    for seen, held in zip(fitted[:5], predicted[:5]):
        assert held and not seen & held
    # honest: on random labels the stacked OOF accuracy stays near chance, while a fit that saw its rows
    # memorises them
    assert (res.oof.argmax(1) == y).mean() < 0.7
    leaked = real_predict(real_fit(blending.stack_features(probs), y, 1e4, 0), blending.stack_features(probs), c)
    assert (leaked.argmax(1) == y).mean() > 0.9
    assert [s["n_predicted"] for s in res.splits] == [20] * 5


def test_stacking_never_fits_on_the_rows_left_out():
    """Rows outside ``fit_rows`` (a label audit's exclusions) are predicted but never fit on: any
    labels there give the same stack, while without the mask the same change moves it."""
    rng = np.random.default_rng(4)
    n, c = 200, 3
    y = rng.integers(c, size=n)
    probs = np.stack([np.eye(c)[y] * 0.6 + 0.4 / c, rng.dirichlet(np.ones(c), size=n)])
    folds = np.arange(n) % 4
    keep = np.arange(n) >= 50
    other = y.copy()
    other[~keep] = (y[~keep] + 1) % c  # the excluded rows' labels changed
    a = blending.stack_predictions(probs, probs, y, folds, fit_rows=keep)
    b = blending.stack_predictions(probs, probs, other, folds, fit_rows=keep)
    assert np.allclose(a.oof, b.oof) and np.allclose(a.test, b.test)
    assert a.oof.shape == (n, c) and [s["n_fit"] for s in a.splits] == [int((keep & (folds != k)).sum()) for k in range(4)]
    unmasked = blending.stack_predictions(probs, probs, other, folds)
    assert not np.allclose(unmasked.test, a.test)


def test_stacking_beats_members_when_they_complement_each_other():
    # member 0 knows classes 0/1 apart, member 1 knows class 2 apart; neither alone is good
    rng = np.random.default_rng(3)
    n = 600
    y = rng.integers(3, size=n)
    m0 = np.full((n, 3), 0.2)
    m0[np.arange(n), np.where(y == 2, rng.integers(2, size=n), y)] = 0.6
    m1 = np.where((y == 2)[:, None], [0.1, 0.1, 0.8], [0.45, 0.45, 0.1])
    probs = np.stack([m0, m1])
    res = blending.stack_predictions(probs, probs, y, np.arange(n) % 4, c=10.0)
    assert (res.oof.argmax(1) == y).mean() > 0.95
    assert max((p.argmax(1) == y).mean() for p in probs) < 0.75
    assert res.member_share.sum() == pytest.approx(1.0)


def _write_experiment(cfg, name: str, quality: float, seed: int):
    """An experiment in the form train + predict leave it (config, classes, per-fold oof.csv / test.csv),
    with synthetic probabilities: right with probability ``quality`` per row."""
    from pipeline import paths
    from pipeline.config import save_config
    from pipeline.data import load_competition
    from pipeline.data.competition import save_classes
    from pipeline.io import atomic_write_csv

    comp = load_competition(cfg.competition)
    classes = list(comp.classes)
    rng = np.random.default_rng(seed)
    exp = cfg.model_copy(update={"experiment": name})
    save_config(exp, paths.run_dir(cfg, name) / "config.yaml")
    save_classes(classes, paths.run_dir(cfg, name) / "classes.json")
    folds = pd.read_csv(paths.folds_csv(cfg), dtype={"image": str, "label": str}, keep_default_na=False)

    def probs(labels: np.ndarray) -> np.ndarray:
        logits = rng.normal(size=(len(labels), len(classes)))
        right = rng.random(len(labels)) < quality
        logits[np.arange(len(labels)), np.where(right, labels, rng.integers(len(classes), size=len(labels)))] += 3
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    index = {c: i for i, c in enumerate(classes)}
    for k in range(cfg.folds.k):
        rows = folds[folds["fold"] == k]
        oof = pd.DataFrame(probs(rows["label"].map(index).to_numpy()), columns=classes)
        oof.insert(0, "label", rows["label"].to_numpy())
        oof.insert(0, "image", rows["image"].to_numpy())
        atomic_write_csv(paths.fold_dir(cfg, k, name) / "oof.csv", oof)
        truth = np.zeros(len(comp.test), int)
        test = pd.DataFrame(probs(truth), columns=classes)
        test.insert(0, "image", comp.test["image"].to_numpy())
        atomic_write_csv(paths.fold_dir(cfg, k, name) / "test.csv", test)


@pytest.mark.parametrize("method,merge", [("stack", "mean"), ("hill_climb", "power"), ("optimize", "rank")])
def test_ensemble_stage_with_second_round_methods(make_cfg, method, merge):
    import json

    from pipeline import paths
    from pipeline.data import load_competition
    from pipeline.ensemble import run_ensemble
    from pipeline.io import atomic_write_csv

    cfg = make_cfg(f"ensemble.method={method}", f"ensemble.merge={merge}", "folds.k=3")
    rows = load_competition(cfg.competition).train.iloc[:150]  # folds.csv for 150 images: no dedup needed
    atomic_write_csv(paths.folds_csv(cfg), pd.DataFrame({"image": rows["image"], "label": rows["label"],
                                                         "group": range(150), "fold": np.arange(150) % 3}))
    _write_experiment(cfg, "exp_a", 0.8, 0)
    _write_experiment(cfg, "exp_b", 0.6, 1)
    res = run_ensemble(cfg, ["exp_a", "exp_b"], quiet=True)
    meta = json.loads(res.submission.with_suffix(".json").read_text())
    assert meta["method"] == method
    table = res.table.set_index("experiment")
    assert table.loc["blend", "acc"] >= table.loc["exp_b", "acc"]
    if method == "stack":
        assert meta["stack"]["inner_folds"] == [0, 1, 2]
        assert sum(meta["stack"]["member_share"].values()) == pytest.approx(1.0)
        assert [s["n_predicted"] for s in meta["stack"]["splits"]] == [50, 50, 50]
    else:
        assert meta["merge"] == merge and min(res.weights.values()) >= 0
        assert sum(res.weights.values()) == pytest.approx(1.0)

