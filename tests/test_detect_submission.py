"""PredictionString submissions: the template, pixels or normalised, ids and order from the sample
submission, and one clear error when they disagree."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, build_config
from pipeline.detect.config import DetectConfig, DetectSubmissionConfig
from pipeline.detect.data import Split
from pipeline.detect.metrics import ImageBoxes
from pipeline.detect.submission import prediction_string_table
from pipeline.errors import PipelineError


def _split():
    names = ["b.jpg", "a.jpg", "c.jpg"]
    return Split("test", names, [], [np.zeros((0, 4), np.float32)] * 3, [np.zeros(0, np.int64)] * 3,
                 [(200, 100), (100, 100), (50, 50)], False)


DETS = {
    0: ImageBoxes(np.array([[10, 20, 50, 60], [0, 0, 20, 10]], np.float32), np.array([1, 0]), np.array([0.91234, 0.5])),
    1: ImageBoxes(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0)),
    2: ImageBoxes(np.array([[5, 5, 25, 15]], np.float32), np.array([0]), np.array([0.7])),
}


def test_global_wheat_form_in_pixels():
    sub = DetectSubmissionConfig(form="prediction_string")
    table = prediction_string_table(_split(), DETS, ["wheat", "weed"], sub, ".")
    assert list(table.columns) == ["image_id", "PredictionString"]
    assert table.to_dict("list") == {"image_id": ["b", "a", "c"],
                                     "PredictionString": ["0.9123 10.0 20.0 40.0 40.0 0.5 0.0 0.0 20.0 10.0", "",
                                                          "0.7 5.0 5.0 20.0 10.0"]}


def test_template_normalised_and_sample_order(tmp_path):
    pd.DataFrame({"id": ["c", "a", "b"], "pred": ["", "", ""]}).to_csv(tmp_path / "sample.csv", index=False)
    sub = DetectSubmissionConfig(form="prediction_string", prediction_string="{label} {score:.2f} {xmin:.3f} {ymax:.3f}",
                                 coordinates="normalized", id_column="id", prediction_column="pred",
                                 sample_submission="sample.csv")
    table = prediction_string_table(_split(), DETS, ["wheat", "weed"], sub, tmp_path)
    assert table["id"].tolist() == ["c", "a", "b"]  # the sample's order
    assert table["pred"].tolist() == ["wheat 0.70 0.100 0.300", "", "weed 0.91 0.050 0.600 wheat 0.50 0.000 0.100"]
    # the written file reads back as the sample does
    table.to_csv(tmp_path / "sub.csv", index=False)
    assert pd.read_csv(tmp_path / "sub.csv", keep_default_na=False)["id"].tolist() == ["c", "a", "b"]


def test_sample_mismatch_and_bad_template(tmp_path):
    pd.DataFrame({"image_id": ["a", "b", "zz"], "PredictionString": ["", "", ""]}).to_csv(tmp_path / "s.csv", index=False)
    sub = DetectSubmissionConfig(form="prediction_string", sample_submission="s.csv")
    with pytest.raises(PipelineError) as err:
        prediction_string_table(_split(), DETS, ["wheat", "weed"], sub, tmp_path)
    assert "1 id(s) of the sample have no image in the split, e.g. ['zz']" in str(err.value)
    assert "1 image(s) are not in the sample, e.g. ['c']" in str(err.value)
    pd.DataFrame({"id": ["a"], "x": [""]}).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(PipelineError, match=r"columns \['id', 'x'\]"):
        prediction_string_table(_split(), DETS, ["wheat", "weed"], sub, tmp_path)
    with pytest.raises(ConfigError, match="unknown field"):
        build_config({"submission": {"prediction_string": "{score} {left}"}}, DetectConfig)
    with pytest.raises(ConfigError, match="format specs"):
        build_config({"submission": {"prediction_string": "{label:.2f}"}}, DetectConfig)
