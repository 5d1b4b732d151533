"""The submission writer: the sample's exact form, validation, the Dog-breed form, no overwrites."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config import CompetitionConfig
from pipeline.submission import (
    SubmissionError,
    build_submission,
    score_submission,
    validate_submission,
    write_submission,
)

CLASSES = ["cat", "dog", "fox"]


def _label_case():
    cfg = CompetitionConfig(id_column="id", label_column="label")
    sample = pd.DataFrame({"id": ["a", "b", "c", "d"], "label": ["cat"] * 4})
    # predictions arrive in another order than the sample's
    ids = ["d", "c", "b", "a"]
    probs = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.5, 0.3, 0.2]])
    return cfg, sample, ids, probs


def test_label_form_follows_the_sample_order():
    cfg, sample, ids, probs = _label_case()
    sub = build_submission(sample, cfg, ids, probs, CLASSES)
    assert list(sub.columns) == ["id", "label"]
    assert sub["id"].tolist() == ["a", "b", "c", "d"]
    assert sub["label"].tolist() == ["cat", "dog", "cat", "fox"]
    validate_submission(sub, sample, cfg, CLASSES)


def test_validation_catches_wrong_row_count():
    cfg, sample, ids, probs = _label_case()
    sub = build_submission(sample, cfg, ids, probs, CLASSES)
    with pytest.raises(SubmissionError, match="3 rows but sample_submission.csv has 4"):
        validate_submission(sub.iloc[:3], sample, cfg, CLASSES)


def test_validation_catches_unknown_class_naming_row_and_id():
    cfg, sample, ids, probs = _label_case()
    sub = build_submission(sample, cfg, ids, probs, CLASSES)
    sub.loc[2, "label"] = "wolf"
    with pytest.raises(SubmissionError, match=r"row 4 \(id 'c'\) has label 'wolf'"):
        validate_submission(sub, sample, cfg, CLASSES)


def test_validation_catches_missing_id_and_wrong_order():
    cfg, sample, ids, probs = _label_case()
    sub = build_submission(sample, cfg, ids, probs, CLASSES)
    bad = sub.copy()
    bad.loc[1, "id"] = "zz"
    with pytest.raises(SubmissionError, match=r"missing id\(s\) 'b'; unknown id\(s\) 'zz'"):
        validate_submission(bad, sample, cfg, CLASSES)
    swapped = sub.iloc[[1, 0, 2, 3]].reset_index(drop=True)
    with pytest.raises(SubmissionError, match="row 2 has id 'b' where sample_submission.csv has 'a'"):
        validate_submission(swapped, sample, cfg, CLASSES)
    # a prediction set lacking an id of the sample is refused when building, naming the id
    with pytest.raises(SubmissionError, match="no prediction for 1 id.*'a'"):
        build_submission(sample, cfg, ids[:3], probs[:3], CLASSES)


def _dog_breed():
    cfg = CompetitionConfig(id_column="id", label_column="breed", submission_form="probabilities")
    # the sample lists the classes in its own order; the submission must follow it
    sample = pd.DataFrame({"id": ["x1", "x2"], "fox": ["0.33"] * 2, "cat": ["0.33"] * 2, "dog": ["0.33"] * 2})
    probs = np.array([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])  # columns in CLASSES order
    sub = build_submission(sample, cfg, ["x2", "x1"], probs, CLASSES)
    assert list(sub.columns) == ["id", "fox", "cat", "dog"]
    np.testing.assert_allclose(sub.loc[0, ["fox", "cat", "dog"]].to_numpy(float), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(sub.loc[1, ["fox", "cat", "dog"]].to_numpy(float), [0.1, 0.7, 0.2])
    validate_submission(sub, sample, cfg, CLASSES)
    return cfg, sample, sub


def test_dog_breed_probability_form():
    cfg, sample, sub = _dog_breed()
    bad = sub.copy()
    bad.loc[1, "dog"] = 0.9
    with pytest.raises(SubmissionError, match=r"row 3 \(id 'x2'\) has probabilities summing to 1.7"):
        validate_submission(bad, sample, cfg, CLASSES)


def test_dog_breed_score_is_log_loss(tmp_path):
    _, _, sub = _dog_breed()
    solution = pd.DataFrame({"id": ["x1", "x2"], "breed": ["dog", "cat"]})
    solution.to_csv(tmp_path / "solution.csv", index=False)
    cfg = CompetitionConfig(id_column="id", submission_form="probabilities")
    score = score_submission(sub, tmp_path / "solution.csv", cfg)
    assert score == pytest.approx(-(np.log(0.7) + np.log(0.5)) / 2)


def test_label_form_refuses_a_probability_sample():
    cfg = CompetitionConfig(id_column="id")
    sample = pd.DataFrame({"id": ["a"], "cat": ["1"], "dog": ["0"], "fox": ["0"]})
    with pytest.raises(SubmissionError, match="submission_form=probabilities"):
        build_submission(sample, cfg, ["a"], np.array([[1.0, 0, 0]]), CLASSES)


def test_existing_files_are_never_overwritten(tmp_path):
    cfg, sample, ids, probs = _label_case()
    sub = build_submission(sample, cfg, ids, probs, CLASSES)
    first = write_submission(sub, tmp_path, "blend", {"weights": {"a": 1.0}}, timestamp="20260101-000000")
    assert first.name == "blend_20260101-000000.csv"
    assert json.loads(first.with_suffix(".json").read_text())["weights"] == {"a": 1.0}
    before = first.read_bytes()
    other = sub.assign(label="dog")
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_submission(other, tmp_path, "blend", {}, timestamp="20260101-000000")
    assert first.read_bytes() == before
    # automatic timestamps never collide: two writes in the same second get distinct files
    a = write_submission(sub, tmp_path, "blend", {})
    b = write_submission(sub, tmp_path, "blend", {})
    assert a != b and a.is_file() and b.is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left
    pd.testing.assert_frame_equal(pd.read_csv(a, dtype=str), sub.astype(str))


def test_label_score_is_accuracy(tmp_path):
    cfg, sample, ids, probs = _label_case()
    sub = build_submission(sample, cfg, ids, probs, CLASSES)
    pd.DataFrame({"id": ["a", "b", "c", "d"], "label": ["cat", "dog", "fox", "fox"]}).to_csv(
        tmp_path / "sol.csv", index=False)
    assert score_submission(sub, tmp_path / "sol.csv", cfg) == 0.75
