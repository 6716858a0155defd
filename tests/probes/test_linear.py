"""Linear probe: synthetic features (separable, shuffled, grouped validation split, train-only scaling),
each protocol's choice of C against an explicit re-implementation of its anchor, and the command line
on a few real AMi-Br patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from probe_helpers import assert_one_line_error, blobs, feature_set
from probe_helpers import probe_args as common
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

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
    assert row["accuracy"] == 1.0 and row["protocol"] == "ssl-path" and row["n"] == 150
    assert row["c"] in SMALL_GRID and set(row["val_scores"]) == {repr(c) for c in SMALL_GRID}
    assert row["val_criterion"] == "balanced_log_loss" and row["class_weight"] == "balanced"
    assert row["n_fit"] + row["n_val"] == 180 and not row["val_grouped"]
    assert row["accuracy_ci95"] == [1.0, 1.0] and row["bootstrap"]["unit"] == "tile"


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
    with pytest.raises(UserError, match="--c-grid values must be finite and > 0"):
        linear.run_linear(train, train, c_grid=(1.0, 0.0))
    with pytest.raises(UserError, match="--protocol uni fixes how C is chosen"):
        linear.run_linear(train, train, c_grid=(1.0,), protocol="uni")
    with pytest.raises(UserError, match="not among the training classes"):
        linear.run_linear(train, feature_set(train_x, train_y, ("a", "b", "z")), c_grid=(1.0,))
    # 30 ungrouped images, 0.99 of them held out: all 30 (rounded up), said in one line, not in scikit-learn's words
    with pytest.raises(UserError, match="left 0 training images .0 classes. to fit on and 30 to validate"):
        linear.run_linear(train, train, c_grid=(1.0,), val_fraction=0.99)


# ----------------------------------------------------------------------------- the protocols' C


def weak_imbalanced(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weak signal in 20 dimensions, 78 % of one class: the setting where a probe drifts to the majority."""
    x, y = make_classification(
        n_samples=n,
        n_features=20,
        n_informative=3,
        n_redundant=0,
        weights=[0.78],
        class_sep=0.5,
        flip_y=0.05,
        random_state=seed,
    )
    return x.astype(np.float32), y


def test_uni_protocol_is_a_fixed_cost_on_raw_features():
    x, y = make_classification(n_samples=150, n_features=12, n_informative=6, n_classes=3, random_state=1)
    train, test = feature_set(x[:100], y[:100], CLASSES), feature_set(x[100:], y[100:], CLASSES)
    row = linear.run_linear(train, test, protocol="uni", n_resamples=0)
    assert row["c"] == pytest.approx(12 * 3 / 100) and row["c_selection"].startswith("fixed")
    assert row["n_val"] == 0 and not row["standardize"] and row["class_weight"] is None
    # UNI's use_sklearn path: sklearn's logistic regression at that C on the raw features
    anchor = LogisticRegression(C=12 * 3 / 100, max_iter=1000).fit(x[:100].astype(np.float64), y[:100])
    assert row["accuracy"] == pytest.approx(accuracy_score(y[100:], anchor.predict(x[100:].astype(np.float64))))


def test_dinov2_protocol_picks_the_c_of_its_grid_search():
    x, y = make_classification(n_samples=200, n_features=8, n_informative=3, flip_y=0.2, random_state=2)
    x = x.astype(np.float32)
    train, test = feature_set(x[:150], y[:150], ("a", "b")), feature_set(x[150:], y[150:], ("a", "b"))
    row = linear.run_linear(train, test, protocol="dinov2", n_resamples=0)
    # dinov2/eval/log_regression.py, re-done: torch seed 0, a permutation, its first tenth validates,
    # 10 ** linspace(-6, 5, 45) on raw float64 features, the first best accuracy wins.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        order = torch.randperm(150).numpy()
    val, fit = order[:15], order[15:]
    grid = (10 ** torch.linspace(-6, 5, 45)).tolist()
    features = x[:150].astype(np.float64)
    scores = [
        accuracy_score(y[val], LogisticRegression(C=c, max_iter=1000).fit(features[fit], y[fit]).predict(features[val]))
        for c in grid
    ]
    assert row["c"] == pytest.approx(grid[int(np.argmax(scores))], rel=1e-6)
    assert np.allclose(linear.DINOV2_C_GRID, grid, rtol=1e-6) and row["n_val"] == 15 and not row["standardize"]


def test_ssl_path_protocol_chooses_c_on_balanced_log_loss_without_the_majority_tie():
    x, y = weak_imbalanced(500)
    groups = slides(500)
    train = feature_set(x[:350], y[:350], ("normal", "atypical"), groups[:350])
    test = feature_set(x[350:], y[350:], ("normal", "atypical"), groups[350:])
    fit, val, grouped = linear.validation_split(train.labels, train.groups, linear.DEFAULT_VAL_FRACTION, 0)
    assert grouped
    fx, fy, vx, vy = x[fit], y[fit], x[val], y[val]
    old, new = [], []
    for c in linear.DEFAULT_C_GRID:
        unweighted = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(fx, fy)
        old.append(balanced_accuracy_score(vy, unweighted.predict(vx)))
        balanced = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, class_weight="balanced"))
        probs = balanced.fit(fx, fy).predict_proba(vx)
        new.append(log_loss(vy, probs, sample_weight=compute_sample_weight("balanced", vy)))
    # the old criterion: every strongly regularised C predicts the majority and ties at 0.5
    assert sum(score == 0.5 for score in old) >= 5
    row = linear.run_linear(train, test, n_resamples=0)
    assert row["c"] == linear.DEFAULT_C_GRID[int(np.argmin(new))]
    assert row["c_grid_edge"] is None and len(set(row["val_scores"].values())) == len(linear.DEFAULT_C_GRID)
    assert row["predicts_one_class"] is None and row["balanced_accuracy"] > 0.55


def test_a_c_at_the_edge_of_the_grid_is_a_warning(capsys):
    train_x, train_y = blobs(30, seed=0)
    test_x, test_y = blobs(10, seed=1)
    train, test = feature_set(train_x, train_y, CLASSES), feature_set(test_x, test_y, CLASSES)
    row = linear.run_linear(train, test, c_grid=(1e-6, 1e-5, 1e-4), n_resamples=0)
    assert row["c"] == 1e-4 and row["c_grid_edge"] == "high"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: linear probe chose C=0.0001, the highest of its grid")


def test_a_probe_that_predicts_one_class_says_so(capsys):
    x, y = weak_imbalanced(300)
    # UNI's fixed C on raw features depends on their scale: 100 times smaller features are, in effect,
    # regularised 10^4 times harder, and the unweighted fit predicts the majority for every image.
    x = x * 0.01
    classes = ("normal", "atypical")
    train, test = feature_set(x[:200], y[:200], classes), feature_set(x[200:], y[200:], classes)
    row = linear.run_linear(train, test, protocol="uni", n_resamples=0)
    assert row["predicts_one_class"] == "normal" and row["balanced_accuracy"] == 0.5
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: linear probe row linear predicts one class, 'normal', for all 100 test images"]


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def specs(sample_data) -> tuple[str, str]:
    """Five training slides of AMi-Br (7 atypical + 11 normal patches), two other slides (036, 088: 4 + 5) to test on."""
    root = sample_data / "amibr"
    return (f"amibr:{root}?group=005.tiff,006.tiff,025.tiff,029.tiff,031.tiff", f"amibr:{root}?group=036.tiff,088.tiff")


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
    assert row["protocol"] == "ssl-path" and row["c"] in (0.1, 1.0) and row["n"] == 9
    assert results["config"]["c_grid"] == [0.1, 1.0] and results["config"]["input_size"] == 64
    # 95 % CIs over the two test slides, and the anchors' metric variants beside ours
    assert row["bootstrap"] == {"unit": "group", "n_units": 2, "resamples": 1000}
    assert all(len(row[f"{s}_ci95"]) == 2 for s in ("balanced_accuracy", "accuracy"))
    assert {"positive_f1", "weighted_f1", "quadratic_kappa"} <= set(row)


def test_cli_protocols_and_compare(specs, tmp_path, capsys):
    out = tmp_path / "uni.json"
    ref = "timm:vit_tiny_patch16_224"
    argv = [*common(*specs, tmp_path), "--protocol", "uni", "--compare", ref, "--bootstrap", "200", "--out", str(out)]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    assert "paired difference" in captured.out and "Traceback" not in captured.err
    results = read_results(out)
    row = results["metrics"]["linear"]
    assert results["config"]["protocol"] == "uni" and results["config"]["compare"]["ref"] == ref
    assert row["c"] == pytest.approx(192 * 2 / 100)  # vit_tiny: 192 dims, 2 classes
    # the same encoder on both sides: every paired difference is exactly 0
    assert row["balanced_accuracy_diff"] == 0.0 and row["balanced_accuracy_diff_ci95"] == [0.0, 0.0]
    assert cli([*common(*specs, tmp_path), "--protocol", "dinov2", "--val-fraction", "0.3"]) == 2
    assert_one_line_error(capsys, "--protocol dinov2", "--val-fraction")


def test_cli_bad_inputs_are_one_line_errors(specs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(encoder, "load", lambda *a, **k: pytest.fail("encoder built for a bad input"))
    train, test = specs
    assert cli(common(f"amibr:{tmp_path / 'nowhere'}", test, tmp_path)) == 2
    assert_one_line_error(capsys, "nowhere", "does not exist")
    for grid in (["0"], ["1", "-0.5"], ["1", "inf"]):
        assert cli([*common(train, test, tmp_path), "--c-grid", *grid]) == 2
        assert_one_line_error(capsys, "--c-grid")
    assert cli([*common(train, test, tmp_path), "--val-fraction", "1"]) == 2
    assert_one_line_error(capsys, "--val-fraction")
