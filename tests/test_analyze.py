"""pipeline.analyze on OOF predictions whose every number is known: per-class scores against
scikit-learn, planted label errors found by cleanlab and joined with dedup groups, a 176-class
picture that stays readable, adversarial validation that sees a planted shift."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from pipeline import paths
from pipeline.analysis import scores
from pipeline.analyze import analyze, main
from pipeline.config import save_config
from pipeline.data.digits import CLASS_NAMES
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_csv, atomic_write_json

CLASSES = sorted(CLASS_NAMES)


def write_oof_run(cfg, images: list[str], labels: list[str], probs: np.ndarray, classes: list[str],
                  k: int = 2, tta: bool = False) -> None:
    """runs/<experiment>/ as train (+ predict when ``tta``) write it, with the given OOF rows."""
    run = paths.run_dir(cfg)
    save_config(cfg.model_copy(update={"folds": cfg.folds.model_copy(update={"k": k})}), run / "config.yaml")
    atomic_write_json(run / "classes.json", {"classes": classes})
    fold = np.arange(len(images)) % k
    for f in range(k):
        m = fold == f
        df = pd.DataFrame(probs[m], columns=classes)
        df.insert(0, "label", np.asarray(labels)[m])
        df.insert(0, "image", np.asarray(images)[m])
        atomic_write_csv(paths.fold_dir(cfg, f) / ("oof_tta.csv" if tta else "oof.csv"), df)
        if tta:  # predict never runs without a finished oof.csv
            atomic_write_csv(paths.fold_dir(cfg, f) / "oof.csv", df.assign(**{c: 1.0 / len(classes) for c in classes}))


@pytest.fixture
def known_oof(digits_root):
    """Digits train images with probabilities of a fair model, 'one' often taken for 'eight', and
    12 planted label errors: the given label is wrong and the model is sure of the true one."""
    rng = np.random.default_rng(0)
    train = pd.read_csv(digits_root / "train.csv", dtype=str).iloc[:400]
    true = train["label"].map(CLASSES.index).to_numpy()
    logits = rng.normal(0, 1, (len(train), len(CLASSES)))
    logits[np.arange(len(train)), true] += 5.0
    one, eight = CLASSES.index("one"), CLASSES.index("eight")
    ones = np.flatnonzero(true == one)[:12]
    logits[ones, eight] += 4.0  # a real confusion, not label errors: their given label is right
    given = true.copy()
    planted = rng.choice(np.flatnonzero(true != one), 12, replace=False)
    given[planted] = (true[planted] + 1 + rng.integers(0, 9, 12)) % 10
    logits[planted, true[planted]] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return train["image"].tolist(), [CLASSES[i] for i in given], given, probs, set(train["image"].iloc[planted])


def test_per_class_numbers_agree_with_scikit_learn(known_oof):
    images, _, given, probs, _ = known_oof
    table = scores.per_class(given, probs, CLASSES).set_index("class")
    p, r, f1, support = precision_recall_fscore_support(given, probs.argmax(1), labels=range(10), zero_division=0)
    for i, c in enumerate(CLASSES):
        assert table.loc[c, "support"] == support[i]
        assert table.loc[c, ["precision", "recall", "f1"]].tolist() == pytest.approx([p[i], r[i], f1[i]])
        pred_c = probs.argmax(1) == i
        assert table.loc[c, "mean_confidence"] == pytest.approx(probs[pred_c].max(1).mean())
    assert table["f1"].is_monotonic_increasing  # worst first
    # ECE by hand: 15 equal bins of the top probability.
    conf, hit = probs.max(1), probs.argmax(1) == given
    b = np.minimum((conf * 15 - 1e-12).astype(int), 14)
    ece = sum(abs(conf[b == i].mean() - hit[b == i].mean()) * (b == i).sum() for i in range(15) if (b == i).any())
    assert scores.expected_calibration_error(given, probs) == pytest.approx(ece / len(given))


def test_analyze_writes_every_view_and_finds_planted_label_errors(make_cfg, known_oof, digits_root, capsys):
    images, labels, _, probs, planted = known_oof
    cfg = make_cfg("experiment=known", "folds.k=2")
    write_oof_run(cfg, images, labels, probs, CLASSES, tta=True)
    # dedup.csv as the dedup stage writes it: two images of one group whose labels disagree.
    dup = [images[0], images[1]]
    atomic_write_csv(paths.dedup_csv(cfg), pd.DataFrame({
        "image": images, "split": "train", "group": ["g0" if i in dup else f"g{n + 1}" for n, i in enumerate(images)],
        "conflict": [i in dup for i in images], "label": labels}))
    assert labels[0] != labels[1]
    result = main(["--experiment", "known", "--no-adversarial", "--write-fixes", "--min-confidence", "0.8",
                   "--top", "6",
                   *[a for o in _overrides(cfg) for a in ("--set", o)]])
    out = paths.analysis_dir(cfg, "known")
    for f in ("per_class.csv", "confused_pairs.csv", "confusion.png", "top_losses.png", "calibration.png",
              "label_issues.csv", "label_issues.png", "report.md", "summary.json", "exclude.csv", "relabel.csv"):
        assert (out / f).is_file(), f
    assert "after TTA" in result.summary["source"]  # oof_tta.csv preferred over oof.csv
    issues = pd.read_csv(out / "label_issues.csv", dtype={"image": str}, keep_default_na=False)
    cleanlab = issues[issues["found_by"].str.startswith("cleanlab")]
    assert planted <= set(cleanlab["image"])  # every planted error found...
    assert len(cleanlab) <= 2 * len(planted)   # ...and little else
    # Both images of the conflicting group are listed with their group, found by cleanlab or not.
    conflict = issues[issues["in_conflicting_group"]].set_index("image")
    assert set(conflict.index) == set(dup) and (conflict["group"] == "g0").all()
    assert conflict["group_labels"].iloc[0] == "|".join(sorted({labels[0], labels[1]}))
    pairs = pd.read_csv(out / "confused_pairs.csv")
    assert (pairs.iloc[0]["given"], pairs.iloc[0]["predicted"]) == ("one", "eight")
    exclude = pd.read_csv(out / "exclude.csv", dtype=str)
    assert set(exclude["image"]) <= set(cleanlab["image"]) and len(exclude) >= len(planted) - 2
    # relabel.csv: the same images, each with the label the model backs (the true one for the planted errors).
    relabel = pd.read_csv(out / "relabel.csv", dtype=str)
    assert relabel["image"].tolist() == exclude["image"].tolist()
    assert relabel["label"].tolist() == exclude["suggested"].tolist()
    true_of = dict(pd.read_csv(digits_root / "train.csv", dtype=str)[["image", "label"]].to_numpy())
    hits = relabel[relabel["image"].isin(planted)]
    assert len(hits) >= len(planted) - 2 and (hits["label"] == hits["image"].map(true_of)).all()
    text = capsys.readouterr().out
    assert "worst classes" in text and "one -> eight" in text and "label issues: " in text
    report = (out / "report.md").read_text()
    assert "](confusion.png)" in report and "](label_issues.png)" in report
    with pytest.raises(FileExistsError):  # a draft the user may have edited is never overwritten
        analyze(cfg, experiment="known", adversarial=False, write_fixes=True, quiet=True)


def _overrides(cfg) -> list[str]:
    return [f"paths.work={cfg.paths.work}", f"paths.runs={cfg.paths.runs}",
            f"paths.submissions={cfg.paths.submissions}", f"competition.root={cfg.competition.root}",
            "wandb.mode=disabled"]


def test_176_classes_stay_readable(make_cfg, digits_root, tmp_path):
    """Leaves-sized: 176 classes. The PNG must not turn into a dark block of overlapping labels."""
    import cv2

    rng = np.random.default_rng(1)
    classes = [f"species_{i:03d}_{'abcdefgh'[i % 8] * 6}" for i in range(176)]
    n = 176 * 6
    images = pd.read_csv(digits_root / "train.csv", dtype=str)["image"].tolist()[:n]
    true = np.arange(n) % 176
    logits = rng.normal(0, 1, (n, 176))
    logits[np.arange(n), true] += 4.0
    partner = true ^ 1  # pairs of sister species the model mixes up
    logits[np.arange(n), partner] += rng.uniform(2, 5, n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cfg = make_cfg("experiment=leaves176", "folds.k=2")
    write_oof_run(cfg, images, [classes[i] for i in true], probs, classes)
    result = analyze(cfg, adversarial=False, quiet=True, top=4)
    png = cv2.imread(str(result.out_dir / "confusion.png"), cv2.IMREAD_GRAYSCALE)
    assert png.shape[0] > 1000 and png.shape[1] > png.shape[0]  # a matrix plus the list of marked pairs
    assert (png < 60).mean() < 0.05  # mostly light: no block of black text or cells
    order = scores.confusion_order(true, probs, 176)
    pos = np.argsort(order)
    assert np.median(np.abs(pos[0::2] - pos[1::2])) == 1  # sister species sit side by side
    assert len(result.confused_pairs) > 100


def test_blend_and_bad_requests(make_cfg, known_oof):
    images, labels, _, probs, _ = known_oof
    cfg = make_cfg("experiment=a", "folds.k=2")
    with pytest.raises(PipelineError, match="classes.json does not exist"):
        analyze(cfg, adversarial=False, quiet=True)
    with pytest.raises(PipelineError, match="no submission"):
        analyze(cfg, blend=True, adversarial=False, quiet=True)
    write_oof_run(cfg, images, labels, probs, CLASSES)
    flat = np.full_like(probs, 0.1)
    write_oof_run(cfg.model_copy(update={"experiment": "b"}), images, labels, flat, CLASSES)
    atomic_write_json(paths.submissions_dir(cfg) / "blend_1.json", {
        "competition": cfg.competition.slug, "weights": {"a": 0.75, "b": 0.25}, "used_tta_oof": True,
        "created": "2026-01-01T00:00:00Z"})
    result = analyze(cfg, blend=True, adversarial=False, quiet=True, top=4)
    assert result.out_dir == paths.work_dir(cfg) / "analysis"
    expected = np.mean((0.75 * probs + 0.25 * flat).argmax(1) == np.asarray([CLASSES.index(x) for x in labels]))
    assert result.summary["accuracy"] == pytest.approx(expected)


@pytest.mark.slow  # four passes of a CNN over the test set: seconds that the fast suite cannot spare
def test_adversarial_validation_sees_a_planted_shift(make_cfg, digits_copy):
    """Test images inverted (white ink on black) are told from train; the untouched competition is not."""
    import cv2

    from pipeline.analysis.adversarial import adversarial_validation
    from pipeline.models import create_classifier

    aucs = {}
    for shifted in (False, True):
        if shifted:
            for img in pd.read_csv(digits_copy / "test.csv", dtype=str)["image"]:
                cv2.imwrite(str(digits_copy / img), 255 - cv2.imread(str(digits_copy / img)))
        cfg = make_cfg(f"experiment=adv{int(shifted)}", "folds.k=2", "model.backbone=resnet10t", root=digits_copy)
        train = pd.read_csv(digits_copy / "train.csv", dtype=str).iloc[:300]
        torch.manual_seed(0)
        model = create_classifier(cfg.model, 10)
        for k in range(2):  # an untrained network's features are enough to see inverted colours
            paths.fold_dir(cfg, k).mkdir(parents=True)
            torch.save({"model": model.state_dict(), "ema": None, "classes": CLASSES, "config": cfg.to_dict()},
                       paths.fold_dir(cfg, k) / "best.pt")
        result = adversarial_validation(cfg, train["image"].tolist(), np.arange(300) % 2, progress=False)
        aucs[shifted] = result.auc
        assert len(result.scores) == 300 and result.scores["test_likeness"].is_monotonic_decreasing
    assert aucs[True] > 0.95 and aucs[False] < 0.75, aucs
