"""ssl_path.evaluation: the results schema (v2 with task and title, v1 upgraded on read), seed statistics,
and row L2 normalisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ssl_path.core.errors import UserError
from ssl_path.evaluation.features import l2_normalize
from ssl_path.evaluation.metrics import SCORES
from ssl_path.evaluation.results import SCHEMA, TASKS, make_results, read_results, write_results
from ssl_path.evaluation.stats import aggregate, summarize

# ----------------------------------------------------------------------------- results schema


def _results(task: str = "segmentation", title: str = "UNet head on frozen blocks") -> dict:
    return make_results(
        probe="segment",
        task=task,
        title=title,
        encoder={"ref": "timm:x", "hash": "abc"},
        dataset={"train": "a", "test": "b", "n_train": 3, "n_test": 2, "classes": ("background", "nucleus")},
        split={"method": "given"},
        seeds=[0],
        metrics={"val": {"dice": np.float32(0.75)}},
        config={"epochs": 1},
    )


def test_v2_round_trip_keeps_task_and_title(tmp_path):
    path = write_results(tmp_path / "results.json", _results())
    stored = json.loads(path.read_text())
    assert stored["schema"] == SCHEMA == "ssl-path/results/v2"
    assert stored["task"] == "segmentation" and stored["title"] == "UNet head on frozen blocks"
    back = read_results(path)
    assert back == stored and back["probe"] == "segment" and back["metrics"] == {"val": {"dice": 0.75}}


def test_a_v1_file_is_read_as_v2(tmp_path):
    v1 = {k: v for k, v in _results().items() if k not in ("task", "title")}
    v1["schema"] = "ssl-path/results/v1"
    v1["probe"] = "knn"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(v1))
    back = read_results(path)
    # v1 was written only by the frozen-feature classification probes
    assert back["schema"] == SCHEMA and back["task"] == "image-classification" and back["title"] == "knn"
    assert {k: v for k, v in back.items() if k not in ("schema", "task", "title")} == {
        k: v for k, v in v1.items() if k != "schema"
    }


def test_an_unknown_task_or_a_missing_title_is_refused_in_one_line(tmp_path):
    assert TASKS == ("image-classification", "segmentation", "detection")
    bad = {**_results(), "task": "classification"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError) as err:
        read_results(path)
    message = str(err.value)
    assert "\n" not in message and "bad.json" in message and "'classification'" in message
    assert all(task in message for task in TASKS)
    with pytest.raises(UserError, match="task"):
        write_results(tmp_path / "out.json", bad)
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(ValueError, match="task"):
        _results(task="image_classification")

    untitled = {k: v for k, v in _results().items() if k != "title"}
    path.write_text(json.dumps(untitled))
    with pytest.raises(UserError, match="missing title"):
        read_results(path)
    with pytest.raises(ValueError, match="title must be a non-empty string"):
        _results(title="")


# ----------------------------------------------------------------------------- seed statistics


def test_summarize_is_the_mean_sample_std_and_student_t_interval():
    s = summarize([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    low, high = scipy_stats.t.interval(0.95, df=2, loc=2.0, scale=1.0 / math.sqrt(3))
    assert s["ci95"] == pytest.approx([low, high]) and high - 2.0 == pytest.approx(2.4841377, rel=1e-6)
    # None (a score undefined for one seed) is left out, not counted as 0
    assert summarize([1.0, None, 3.0])["mean"] == pytest.approx(2.0)
    assert summarize([0.5, None]) == {"mean": 0.5, "std": None, "ci95": None, "n": 1}
    assert summarize([None]) == {"mean": None, "std": None, "ci95": None, "n": 0}


def test_aggregate_summarizes_every_score_and_keeps_the_seeds():
    per_seed = [{**{s: v for s in SCORES}, "auroc": None if v == 2.0 else v} for v in (1.0, 2.0, 3.0)]
    row = aggregate(per_seed)
    assert row["n_seeds"] == 3 and row["accuracy"] == pytest.approx(2.0)
    assert row["cohen_kappa_ci95"] == pytest.approx(summarize([1.0, 2.0, 3.0])["ci95"])
    assert row["auroc_std"] == pytest.approx(math.sqrt(2)) and row["per_seed"]["auroc"] == [1.0, None, 3.0]
    assert set(row["per_seed"]) == set(SCORES)
    dice = aggregate([{"dice": 0.5}, {"dice": 0.7}], scores=("dice",))
    assert dice["dice"] == pytest.approx(0.6) and "accuracy" not in dice


# ----------------------------------------------------------------------------- features and folds


def test_l2_normalize_gives_unit_rows_in_the_input_float_dtype():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -1e-3]], dtype=np.float32)
    unit = l2_normalize(x[:, ::-1])  # a strided view comes back contiguous, as faiss needs
    assert unit.dtype == np.float32 and unit.flags.c_contiguous
    np.testing.assert_allclose(unit, [[0.8, 0.6], [0.0, 0.0], [-1.0, 0.0]], rtol=1e-6)
    assert l2_normalize(x.astype(np.float64)).dtype == np.float64
    assert l2_normalize(np.array([[2, 0]])).tolist() == [[1.0, 0.0]]  # integers become float64
