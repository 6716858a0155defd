"""Linear probe: synthetic features (separable, shuffled, grouped validation split, train-only scaling)
and the command line on a few real AMi-Br patches."""

from __future__ import annotations

import numpy as np
import pytest
from probe_helpers import assert_one_line_error, blobs, feature_set
from probe_helpers import probe_args as common

from probes import linear
from ssl_path import encoder
from ssl_path.core.errors import UserError, run_cli
from ssl_path.evaluation.results import read_results

CLASSES = ("a", "b", "c")
SMALL_GRID = (0.01, 1.0)


def slides(n: int, per_slide: int = 10) -> list[str]:
    return [f"slide{i // per_slide}" for i in range(n)]


def test_separable_clusters_are_classified_perfectly():
    train_x, train_y = blobs(60, seed=0)
    test_x, test_y = blobs(50, seed=1)
    row = linear.run_linear(
        feature_set(train_x, train_y, CLASSES), feature_set(test_x, test_y, CLASSES), c_grid=SMALL_GRID, seed=0
    )
    assert row["accuracy"] == 1.0 and row["protocol"] == "linear" and row["n"] == 150
    assert row["c"] in SMALL_GRID and set(row["val_balanced_accuracy"]) == {repr(c) for c in SMALL_GRID}
    assert row["n_fit"] + row["n_val"] == 180 and not row["val_grouped"]


def test_shuffled_labels_give_chance_accuracy():
    train_x, train_y = blobs(100, seed=0)
    test_x, test_y = blobs(200, seed=1)
    shuffled = np.random.default_rng(2).permutation(train_y)
    row = linear.run_linear(
        feature_set(train_x, shuffled, CLASSES), feature_set(test_x, test_y, CLASSES), c_grid=SMALL_GRID, seed=0
    )
    assert abs(row["accuracy"] - 1 / 3) < 0.15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_validation_split_keeps_groups_apart(seed):
    labels = np.tile(np.arange(3), 40)  # 120 rows, 12 slides of 10, every slide holds all classes
    groups = slides(120)
    fit, val, grouped = linear.validation_split(labels, groups, 0.2, seed)
    assert grouped and len(fit) + len(val) == 120 and not set(fit) & set(val)
    assert not {groups[i] for i in fit} & {groups[i] for i in val}
    assert 0.1 <= len(val) / 120 <= 0.35
    # without groups: a stratified split of the asked size
    fit, val, grouped = linear.validation_split(labels, [None] * 120, 0.2, seed)
    assert not grouped and len(val) == 24 and np.bincount(labels[val]).tolist() == [8, 8, 8]


def test_run_linear_validates_on_whole_groups(monkeypatch):
    train_x, train_y = blobs(40, seed=0)
    groups = slides(120)
    seen = {}
    real = linear.validation_split

    def spy(*args, **kwargs):
        seen["split"] = real(*args, **kwargs)
        return seen["split"]

    monkeypatch.setattr(linear, "validation_split", spy)
    test_x, test_y = blobs(10, seed=1)
    row = linear.run_linear(
        feature_set(train_x, train_y, CLASSES, groups), feature_set(test_x, test_y, CLASSES), c_grid=SMALL_GRID
    )
    fit, val, _ = seen["split"]
    assert row["val_grouped"] and not {groups[i] for i in fit} & {groups[i] for i in val}


def test_scaler_is_fitted_on_train_only():
    train_x, train_y = blobs(30, seed=0)
    pipe = linear.fit_probe(train_x, train_y, 1.0)
    np.testing.assert_allclose(pipe.named_steps["scale"].mean_, train_x.astype(np.float64).mean(axis=0))
    test_x, test_y = blobs(20, seed=1)
    train = feature_set(train_x, train_y, CLASSES)
    assert linear.run_linear(train, feature_set(test_x, test_y, CLASSES), c_grid=(1.0,))["accuracy"] == 1.0
    # had the scaler been refitted on test, a shared offset of the test features would not matter
    shifted = linear.run_linear(train, feature_set(test_x + 1e3, test_y, CLASSES), c_grid=(1.0,))
    assert shifted["accuracy"] < 0.6


def test_class_probabilities_keep_a_column_for_a_class_the_fit_never_saw():
    train_x, train_y = blobs(10, seed=0)
    seen = train_y != 1  # a few-label subset without class 1
    pipe = linear.fit_probe(train_x[seen], train_y[seen], 1.0)
    test_x, _ = blobs(5, seed=1)
    probs = linear.class_probabilities(pipe, test_x, 3)
    assert probs.shape == (15, 3) and (probs[:, 1] == 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[:, [0, 2]], pipe.predict_proba(test_x.astype(np.float64)))


def test_bad_grid_and_unknown_test_classes():
    train_x, train_y = blobs(10, seed=0)
    train = feature_set(train_x, train_y, CLASSES)
    with pytest.raises(UserError, match="C must be > 0"):
        linear.run_linear(train, train, c_grid=(1.0, 0.0))
    with pytest.raises(UserError, match="not among the training classes"):
        linear.run_linear(train, feature_set(train_x, train_y, ("a", "b", "z")), c_grid=(1.0,))


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def specs(shared_data) -> tuple[str, str]:
    """Five training slides of AMi-Br (6 atypical + 12 normal patches), two other slides to test on."""
    root = shared_data / "amibr_midog21"
    return (f"amibr:{root}?group=005.tiff,006.tiff,025.tiff,029.tiff,031.tiff", f"amibr:{root}?group=008.tiff,011.tiff")


def cli(argv: list[str]) -> int:
    return run_cli(linear.main, argv)


def test_cli_writes_results(specs, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert cli([*common(*specs, tmp_path), "--c-grid", "0.1", "1", "--out", str(out), "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert "linear" in captured.out and "Traceback" not in captured.err
    results = read_results(out)
    assert results["probe"] == "linear" and results["seeds"] == [3]
    assert results["task"] == "image-classification" and results["title"] == "linear probe (frozen encoder)"
    assert results["dataset"]["n_train"] == 18 and results["dataset"]["n_test"] == 9
    assert results["split"]["shared_groups"] == 0 and results["split"]["validation"] == "grouped"
    row = results["metrics"]["linear"]
    assert row["protocol"] == "linear" and row["c"] in (0.1, 1.0) and row["n"] == 9
    assert results["config"]["c_grid"] == [0.1, 1.0] and results["config"]["input_size"] == 64


def test_cli_bad_inputs_are_one_line_errors(specs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(encoder, "load", lambda *a, **k: pytest.fail("encoder built for a bad input"))
    train, test = specs
    assert cli(common(f"amibr:{tmp_path / 'nowhere'}", test, tmp_path)) == 2
    assert_one_line_error(capsys, "nowhere", "does not exist")
    for grid in (["0"], ["1", "-0.5"]):
        assert cli([*common(train, test, tmp_path), "--c-grid", *grid]) == 2
        assert_one_line_error(capsys, "--c-grid")
    assert cli([*common(train, test, tmp_path), "--val-fraction", "1"]) == 2
    assert_one_line_error(capsys, "--val-fraction")
