"""Pseudo-labels and distillation targets come from the right teacher models (fold safety)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline import paths
from pipeline.data import load_competition
from pipeline.distill import distill_targets
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_csv, atomic_write_json
from pipeline.pseudo import LEAK_WARNING, pseudo_labels

K = 3


@pytest.fixture
def setup(make_cfg):
    """folds.csv over 90 train images (3 folds), and a helper writing teacher experiments whose fold-k
    test predictions are sure of class k on a known set of test images (and unsure elsewhere)."""
    cfg = make_cfg("folds.k=3", "experiment=student")
    comp = load_competition(cfg.competition)
    classes = list(comp.classes)
    rows = comp.train.iloc[:90]
    folds = pd.DataFrame({"image": rows["image"].to_numpy(), "label": rows["label"].to_numpy(),
                          "group": range(90), "fold": np.arange(90) % K})
    atomic_write_csv(paths.folds_csv(cfg), folds)
    test_images = comp.test["image"].tolist()

    def teacher(name: str, sure_of: int = 0, fold_of=None):
        run = paths.run_dir(cfg, name)
        atomic_write_json(run / "classes.json", {"classes": classes})
        f_of = fold_of if fold_of is not None else folds["fold"].to_numpy()
        for k in range(K):
            d = paths.fold_dir(cfg, k, name)
            val = folds[f_of == k]
            oof = np.full((len(val), len(classes)), 0.02)
            oof[np.arange(len(val)), [classes.index(lab) for lab in val["label"]]] = 0.82  # right, via OOF
            oof_df = pd.DataFrame(oof, columns=classes)
            oof_df.insert(0, "label", val["label"].to_numpy())
            oof_df.insert(0, "image", val["image"].to_numpy())
            atomic_write_csv(d / "oof.csv", oof_df)
            test = np.full((len(test_images), len(classes)), 0.1)
            sure = np.arange(len(test_images)) % K == k  # fold k is sure on its own third of the images
            test[sure] = 0.005
            test[sure, (k + sure_of) % len(classes)] = 1 - 0.005 * (len(classes) - 1)
            test_df = pd.DataFrame(test, columns=classes)
            test_df.insert(0, "image", test_images)
            atomic_write_csv(d / "test.csv", test_df)
            (d / "best.pt").write_bytes(f"{name}{k}".encode())
            st = (d / "best.pt").stat()
            atomic_write_json(d / "predict.json", {"settings": {"checkpoint": [st.st_size, st.st_mtime_ns]}})

    return cfg, classes, folds, test_images, teacher


def test_fold_k_pseudo_labels_come_only_from_teacher_fold_k(setup, make_cfg):
    cfg, classes, folds, test_images, teacher = setup
    teacher("t1")
    teacher("t2", sure_of=0)
    cfg = make_cfg("folds.k=3", "experiment=student", "pseudo.from=[t1, t2]", "pseudo.threshold=0.9")
    for k in range(K):
        ps = pseudo_labels(cfg, k, classes, folds)
        expected = [img for i, img in enumerate(test_images) if i % K == k]
        assert ps.images == expected                       # only what fold k's teachers were sure of
        assert set(ps.targets.argmax(1)) == {k}            # with fold k's labels
        used = {(m["teacher"], m["model"]) for m in ps.record["models"]}
        assert used == {(t, str(paths.fold_dir(cfg, k, t) / "best.pt")) for t in ("t1", "t2")}
        assert ps.record["fold_safe"] and not set(ps.images) & set(folds["image"])


def test_soft_pseudo_labels_and_threshold(setup, make_cfg):
    cfg, classes, folds, test_images, teacher = setup
    teacher("t1")
    soft = pseudo_labels(make_cfg("folds.k=3", "experiment=student", "pseudo.from=t1", "pseudo.soft=true",
                                  "pseudo.threshold=0.05"), 1, classes, folds)
    assert len(soft.images) == len(test_images)            # everything passes a low threshold
    assert soft.targets.sum(1) == pytest.approx(np.ones(len(test_images)))
    assert soft.targets.max() < 1.0 and soft.record["n_pseudo"] == len(test_images)


def test_teacher_trained_on_other_folds_is_refused(setup, make_cfg):
    cfg, classes, folds, _, teacher = setup
    teacher("shifted", fold_of=(folds["fold"].to_numpy() + 1) % K)
    with pytest.raises(PipelineError, match="validated other images"):
        pseudo_labels(make_cfg("folds.k=3", "experiment=student", "pseudo.from=[shifted]"), 0, classes, folds)


def test_stale_teacher_predictions_are_refused(setup, make_cfg):
    cfg, classes, folds, _, teacher = setup
    teacher("t1")
    (paths.fold_dir(cfg, 2, "t1") / "best.pt").write_bytes(b"retrained since")
    with pytest.raises(PipelineError, match="older best.pt"):
        pseudo_labels(make_cfg("folds.k=3", "experiment=student", "pseudo.from=t1"), 2, classes, folds)


def test_a_submission_source_is_accepted_with_a_recorded_warning(setup, make_cfg, tmp_path, capsys):
    cfg, classes, folds, test_images, teacher = setup
    teacher("t1")
    sub = tmp_path / "submissions" / "blend_x.json"
    sub.parent.mkdir(parents=True, exist_ok=True)
    sub.write_text(json.dumps({"weights": {"t1": 1.0}}))
    ps = pseudo_labels(make_cfg("folds.k=3", "experiment=student", f"pseudo.from={sub}",
                                "pseudo.threshold=0.3"), 0, classes, folds)
    assert "CV is optimistic" in capsys.readouterr().out
    assert ps.record["fold_safe"] is False and ps.record["warning"] == LEAK_WARNING
    assert len(ps.images) == len(test_images)  # every image: some fold was sure of it (mixed folds)


def test_distill_targets_are_the_teachers_out_of_fold_probabilities(setup, make_cfg):
    cfg, classes, folds, _, teacher = setup
    teacher("t1")
    cfg = make_cfg("folds.k=3", "experiment=student", "distill.teacher=[t1]")
    train = folds[folds["fold"] != 0]
    probs, has, record = distill_targets(cfg, 0, classes, folds, train["image"].tolist())
    assert has.all() and record["n_with_teacher"] == len(train)
    assert [classes[i] for i in probs.argmax(1)] == train["label"].tolist()
    assert probs.max(1) == pytest.approx(np.full(len(train), 0.82))
