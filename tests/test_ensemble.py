"""Ensemble weights on synthetic OOF probabilities with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.ensemble import blend, caruana_weights, choose_weights, fixed_weights, optimize_weights
from pipeline.errors import PipelineError
from pipeline.metrics import log_loss


def _models(seed: int = 0, n: int = 600, c: int = 5):
    """Two informative, differently-wrong models and one that is pure noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(c, size=n)

    def informative(strength: float) -> np.ndarray:
        logits = rng.normal(size=(n, c))
        logits[np.arange(n), y] += strength
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)

    noise = rng.dirichlet(np.full(c, 0.3), size=n)
    return np.stack([informative(2.0), informative(1.5), noise]), y


@pytest.mark.parametrize("method", ["optimize", "caruana", "mean"])
def test_weights_are_non_negative_and_sum_to_one(method):
    probs, y = _models()
    w = choose_weights(method, probs, y, ["a", "b", "noise"])
    assert w.shape == (3,) and (w >= 0).all()
    assert w.sum() == pytest.approx(1.0)


def test_optimised_weights_beat_uniform_when_one_model_is_noise():
    probs, y = _models()
    w = optimize_weights(probs, y)
    uniform = log_loss(blend(probs, np.full(3, 1 / 3)), y)
    best_single = min(log_loss(p, y) for p in probs)
    optimised = log_loss(blend(probs, w), y)
    assert w[2] < 0.05  # the noise model is (almost) switched off
    assert optimised < uniform - 0.05
    assert optimised <= best_single  # two different informative models blend better than either
    # and it is a true optimum: no nearby feasible point is better
    for i in range(3):
        for j in range(3):
            if i != j and w[i] > 0.01:
                d = np.zeros(3)
                d[i], d[j] = -0.01, 0.01
                assert log_loss(blend(probs, w + d), y) >= optimised - 1e-6


def test_caruana_drops_the_noise_model_and_beats_uniform():
    probs, y = _models(seed=1)
    w = caruana_weights(probs, y, iterations=40)
    assert w[2] <= 0.05
    assert log_loss(blend(probs, w), y) < log_loss(blend(probs, np.full(3, 1 / 3)), y)
    # counts of a bag of at most 40 picks with replacement
    assert any(np.allclose(w * n, np.round(w * n)) for n in range(1, 41))
    assert log_loss(blend(probs, w), y) <= min(log_loss(p, y) for p in probs)


def test_single_experiment_gets_weight_one():
    probs, y = _models()
    assert optimize_weights(probs[:1], y).tolist() == [1.0]


def test_fixed_weights_are_normalised_and_checked():
    assert fixed_weights(["a", "b"], {"a": 3, "b": 1}).tolist() == [0.75, 0.25]
    assert fixed_weights(["a", "b"], {"a": 2}).tolist() == [1.0, 0.0]
    with pytest.raises(PipelineError, match=r"ensemble.weights names \['c'\]"):
        fixed_weights(["a", "b"], {"c": 1})
    with pytest.raises(PipelineError, match="non-negative"):
        fixed_weights(["a", "b"], {"a": -1, "b": 1})


def test_ensemble_stage_blends_two_experiments_into_a_valid_submission(make_cfg, capsys):
    """Two tiny experiments written in the train stage's form, predicted, blended and submitted."""
    import json

    import pandas as pd
    from test_predict import fake_fold

    from pipeline.data import load_competition
    from pipeline.ensemble import discover_experiments, main
    from pipeline.predict import predict_fold

    cfgs = []
    for i, exp in enumerate(["tiny_a", "tiny_b"]):
        cfg = make_cfg(f"experiment={exp}", "model.backbone=test_resnet", "folds.k=2", "tta=[identity]",
                       "train.img_size=16")
        for k in range(2):
            fake_fold(cfg, k, seed=10 * i + k)
            predict_fold(cfg, k, quiet=True)
        cfgs.append(cfg)
    cfg = cfgs[0]
    incomplete = make_cfg("experiment=tiny_c", "model.backbone=test_resnet", "folds.k=2")
    fake_fold(incomplete, 0)  # fold 1 missing: not blended, and said so
    assert discover_experiments(cfg) == ["tiny_a", "tiny_b"]
    assert "skipping tiny_c" in capsys.readouterr().out

    args = ["--name", "demo"]
    for k, v in {"paths.runs": cfg.paths.runs, "paths.submissions": cfg.paths.submissions,
                 "paths.work": cfg.paths.work, "competition.root": cfg.competition.root,
                 "competition.solution": cfg.competition.solution, "wandb.mode": "disabled"}.items():
        args += ["--set", f"{k}={v}"]
    result = main(args)
    out = capsys.readouterr().out
    assert "blend" in out and "score against the hidden solution" in out
    assert set(result.weights) == {"tiny_a", "tiny_b"}
    assert sum(result.weights.values()) == pytest.approx(1.0) and min(result.weights.values()) >= 0
    lls = result.table.set_index("experiment")["logloss_tta"]
    assert lls["blend"] <= min(lls["tiny_a"], lls["tiny_b"]) + 1e-9
    comp = load_competition(cfg.competition)
    sub = pd.read_csv(result.submission, dtype=str, keep_default_na=False)
    assert result.submission.name.startswith("demo_")
    assert list(sub.columns) == list(comp.sample_submission.columns)
    assert sub["image"].tolist() == comp.sample_submission["image"].tolist()
    assert set(sub["label"]) <= set(comp.classes)
    meta = json.loads(result.submission.with_suffix(".json").read_text())
    assert meta["experiments"] == ["tiny_a", "tiny_b"] and meta["folds"]["tiny_a"] == [0, 1]
    assert meta["weights"] == result.weights and meta["tta"]["tiny_b"] == ["identity"]
    assert 0.0 <= meta["solution_score"]["value"] <= 1.0
    # a second blend never replaces the first
    again = main(args)
    assert again.submission != result.submission and result.submission.is_file()


def _peaked(labels, classes: list[str], strength: float):
    """Probabilities with ``strength`` on each row's label (a class name) and the rest spread evenly."""
    import pandas as pd

    p = np.full((len(labels), len(classes)), (1 - strength) / (len(classes) - 1))
    p[np.arange(len(labels)), [classes.index(lab) for lab in labels]] = strength
    return pd.DataFrame(p, columns=classes)


def _write_member(cfg, exp: str, classes: list[str], folds) -> None:
    """runs/<exp>/ as train and predict leave it: config, classes and per fold the ``(oof, test)`` frames."""
    from pipeline import paths
    from pipeline.config import save_config
    from pipeline.data.competition import save_classes

    member = cfg.model_copy(update={"experiment": exp})
    save_config(member, paths.run_dir(member) / paths.CONFIG)
    save_classes(classes, paths.run_dir(member) / paths.CLASSES)
    for k, (oof, test) in enumerate(folds):
        d = paths.fold_dir(member, k)
        d.mkdir(parents=True)
        oof.to_csv(d / paths.OOF, index=False)
        test.to_csv(d / paths.TEST, index=False)


def test_blend_of_known_test_probabilities_gives_the_right_label_for_every_id(make_cfg):
    """Two members whose test probabilities peak at a known label per image, their rows in a
    different order in every fold file: the submission must name that label for every id (a blend
    that lined rows up by position instead of by image would not)."""
    import pandas as pd

    from pipeline.data import load_competition
    from pipeline.ensemble import run_ensemble

    cfg = make_cfg("folds.k=2", "ensemble.method=optimize", "ensemble.use_tta=false")
    comp = load_competition(cfg.competition)
    classes = list(comp.classes)
    rng = np.random.default_rng(0)
    truth = dict(zip(comp.test["image"], rng.choice(classes, len(comp.test))))
    train = comp.train.iloc[:60]

    def fold_files(k: int, strength: float):
        rows = train.iloc[k::2]
        oof = pd.concat([rows[["image", "label"]].reset_index(drop=True), _peaked(rows["label"], classes, strength)],
                        axis=1)
        images = comp.test["image"].to_numpy()[rng.permutation(len(comp.test))]
        test = pd.concat([pd.DataFrame({"image": images}), _peaked([truth[i] for i in images], classes, strength)],
                         axis=1)
        return oof, test

    for exp, strength in (("sure", 0.9), ("unsure", 0.4)):
        _write_member(cfg, exp, classes, [fold_files(k, strength) for k in range(2)])

    result = run_ensemble(cfg, ["sure", "unsure"], quiet=True)
    sub = pd.read_csv(result.submission, dtype=str, keep_default_na=False)
    image_of = dict(zip(comp.test["id"], comp.test["image"]))
    idc = cfg.competition.id_column
    wrong = [i for i, label in zip(sub[idc], sub["label"]) if label != truth[image_of[i]]]
    assert len(sub) == len(comp.test) and wrong == []
    assert result.meta["provenance"]["versions"]["torch"] and "device" in result.meta["provenance"]


def test_blend_weights_leave_out_the_rows_competition_exclude_lists(make_cfg, tmp_path):
    """The audit excluded 20 of 60 images: their given labels are wrong. Member "clean" predicts their true
    label, "noisefit" learnt the given one. On every row "noisefit" has the lower log loss; on the rows
    the audit trusts, "clean" does, and the weights must follow those rows unless ensemble.fit_excluded."""
    import pandas as pd

    from pipeline import paths
    from pipeline.data import load_competition
    from pipeline.ensemble import run_ensemble

    cfg = make_cfg("folds.k=2", "ensemble.method=optimize", "ensemble.use_tta=false")
    comp = load_competition(cfg.competition)
    classes = list(comp.classes)
    train = comp.train.iloc[:60].reset_index(drop=True)
    excluded = train["image"].iloc[:20]
    (tmp_path / "exclude.csv").write_text("image\n" + "\n".join(excluded) + "\n")
    cfg = make_cfg("folds.k=2", "ensemble.method=optimize", "ensemble.use_tta=false",
                   f"competition.exclude={tmp_path / 'exclude.csv'}")
    fold = np.arange(60) % 2
    paths.folds_csv(cfg).parent.mkdir(parents=True, exist_ok=True)
    train.assign(fold=fold, excluded=train["image"].isin(excluded))[["image", "label", "fold", "excluded"]].to_csv(
        paths.folds_csv(cfg), index=False)

    true = np.where(train["image"].isin(excluded), (train["label"].map(classes.index) + 1) % len(classes),
                    train["label"].map(classes.index))
    for exp, labels, strength in (("clean", [classes[i] for i in true], 0.9), ("noisefit", train["label"], 0.6)):
        labels = np.asarray(labels)
        _write_member(cfg, exp, classes, [
            (pd.concat([train.loc[fold == k, ["image", "label"]].reset_index(drop=True),
                        _peaked(labels[fold == k], classes, strength)], axis=1),
             pd.concat([comp.test[["image"]], _peaked([classes[0]] * len(comp.test), classes, strength)], axis=1))
            for k in range(2)])

    trusted = run_ensemble(cfg, ["clean", "noisefit"], name="trusted", quiet=True)
    assert trusted.weights["clean"] > 0.9
    assert trusted.meta["weights_fit_on"] == {"rows": 40, "of": 60, "left_out": "competition.exclude"}
    every = run_ensemble(cfg.model_copy(update={"ensemble": cfg.ensemble.model_copy(update={"fit_excluded": True})}),
                         ["clean", "noisefit"], name="every", quiet=True)
    assert every.weights["clean"] < 0.5 and every.meta["weights_fit_on"]["rows"] == 60
