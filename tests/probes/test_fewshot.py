"""Few-shot probe: stratified seeded sampling, the three probes on synthetic features, and the command
line on a few real AMi-Br patches (the seed statistics are in test_evaluation.py)."""

from __future__ import annotations

import numpy as np
import pytest
from probe_helpers import assert_one_line_error, blobs, feature_set
from probe_helpers import probe_args as common

from probes import fewshot
from ssl_path import encoder
from ssl_path.core.errors import UserError, run_cli
from ssl_path.evaluation.metrics import CLASSIFICATION_SCORES
from ssl_path.evaluation.results import read_results
from ssl_path.publish.card import evaluation_tables

CLASSES = ("a", "b", "c")


def unbalanced_labels() -> np.ndarray:
    # 50 / 30 / 7 rows, interleaved, plus unlabelled rows that must never be drawn
    labels = np.concatenate([np.zeros(50), np.ones(30), np.full(7, 2), np.full(5, -1)]).astype(np.int64)
    return np.random.default_rng(0).permutation(labels)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.33, 0.5, 1.0])
def test_fraction_sampling_is_stratified_and_seeded(fraction):
    labels = unbalanced_labels()
    idx = fewshot.sample_subset(labels, fraction=fraction, seed=0)
    assert len(set(idx.tolist())) == len(idx) and (labels[idx] >= 0).all()
    counts = np.bincount(labels[idx], minlength=3)
    full = np.bincount(labels[labels >= 0])
    assert (counts >= 1).all()
    assert (np.abs(counts - np.maximum(1, fraction * full)) <= 1).all()
    np.testing.assert_array_equal(idx, fewshot.sample_subset(labels, fraction=fraction, seed=0))
    if fraction < 1:
        assert not np.array_equal(idx, fewshot.sample_subset(labels, fraction=fraction, seed=1))


def test_only_train_indices_are_returned():
    train_x, train_y = blobs(10, seed=0)
    train = feature_set(train_x, train_y, CLASSES)
    for seed in range(5):
        for draw in ({"fraction": 0.5}, {"shots": 3}, {"shots": 100}):
            idx = fewshot.sample_subset(train.labels, seed=seed, **draw)
            assert idx.min() >= 0 and idx.max() < len(train)


def test_shots_are_exact_or_all_the_class_has():
    labels = unbalanced_labels()
    for k in (1, 4, 7, 16):
        idx = fewshot.sample_subset(labels, shots=k, seed=3)
        assert np.bincount(labels[idx], minlength=3).tolist() == [k, k, min(k, 7)]
    assert fewshot._shortfall(labels, 16, CLASSES) == {"c": 7}


def test_bad_draws_and_empty_class():
    labels = unbalanced_labels()
    for draw, match in (({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"), ({"shots": 0}, "shots")):
        with pytest.raises(UserError, match=match):
            fewshot.sample_subset(labels, seed=0, **draw)
    with pytest.raises(UserError, match=r"\[3\]"):
        fewshot.sample_subset(labels, shots=1, seed=0, n_classes=4)
    with pytest.raises(ValueError):
        fewshot.sample_subset(labels, fraction=0.5, shots=1)


def test_separable_blobs_are_perfect_at_four_shots():
    # 4 dimensions, all informative: with 16 (13 pure noise) a 12-image logistic regression overfits the noise.
    train_x, train_y = blobs(40, dim=4, seed=0)
    test_x, test_y = blobs(30, dim=4, seed=1)
    rows = fewshot.run_fewshot(
        feature_set(train_x, train_y, CLASSES),
        feature_set(test_x, test_y, CLASSES),
        fractions=(),
        shots=(4,),
        seeds=(0, 1),
        episodes=3,
        c_grid=(1.0,),
    )
    assert set(rows) == {"shots_4/knn", "shots_4/linear", "shots_4/prototype"}
    for row in rows.values():
        assert row["balanced_accuracy"] == 1.0 and row["n_train"] == [12, 12] and row["short_classes"] == {}
    # 4 per class can spare a validation split; 1 per class cannot and falls back to the fixed C
    assert rows["shots_4/linear"]["c_selection"] == ["validation", "validation"]
    one = fewshot.run_fewshot(
        feature_set(train_x, train_y, CLASSES),
        feature_set(test_x, test_y, CLASSES),
        fractions=(),
        shots=(1,),
        seeds=(0,),
        probes=("linear",),
        c_grid=(1.0,),
    )
    assert one["shots_1/linear"]["c_selection"] == ["fixed"] and one["shots_1/linear"]["n_fixed_c"] == 1


def test_validation_split_needs_enough_images_and_groups():
    labels = np.array([0, 0, 1, 1])
    assert fewshot.can_validate(labels, [None] * 4)
    assert not fewshot.can_validate(np.array([0, 1, 1]), [None] * 3)
    assert fewshot.can_validate(labels, ["s1", "s2", "s1", "s2"])
    assert not fewshot.can_validate(labels, ["s1", "s1", "s2", "s2"])  # each class on one slide only
    # three slides make three grouped folds, more than class 0's two images: scikit-learn would refuse
    assert not fewshot.can_validate(np.array([0, 0, 1, 1, 1]), ["a", "b", "a", "b", "c"])


def test_shuffled_labels_are_near_chance():
    train_x, train_y = blobs(60, seed=0)
    test_x, test_y = blobs(100, seed=1)
    shuffled = np.random.default_rng(2).permutation(train_y)
    rows = fewshot.run_fewshot(
        feature_set(train_x, shuffled, CLASSES),
        feature_set(test_x, test_y, CLASSES),
        fractions=(0.5,),
        shots=(),
        seeds=(0, 1, 2),
        c_grid=(1.0,),
    )
    for name, row in rows.items():
        assert abs(row["balanced_accuracy"] - 1 / 3) < 0.15, name


def test_intervals_see_the_test_slides_at_fraction_one_and_for_averaged_episodes():
    rng = np.random.default_rng(0)
    # overlapping classes, so that scores vary between test redraws; 12 test slides
    train_y, test_y = np.repeat(np.arange(2), 40), np.repeat(np.arange(2), 60)
    train_x = rng.normal(size=(80, 4)).astype(np.float32) + 0.8 * np.eye(4, dtype=np.float32)[train_y]
    test_x = rng.normal(size=(120, 4)).astype(np.float32) + 0.8 * np.eye(4, dtype=np.float32)[test_y]
    test = feature_set(test_x, test_y, ("a", "b"), [f"slide{i % 12}" for i in range(120)])
    rows = fewshot.run_fewshot(
        feature_set(train_x, train_y, ("a", "b")),
        test,
        fractions=(1.0,),
        shots=(4,),
        seeds=(0, 1, 2),
        probes=("knn", "prototype"),
        episodes=100,
        n_resamples=300,
    )

    def width(name: str) -> float:
        low, high = rows[name]["balanced_accuracy_ci95"]
        return high - low

    # every seed draws the whole set at fraction 1.0: the seeds agree, the test slides still vary
    knn = rows["fraction_1/knn"]
    assert knn["balanced_accuracy_std"] == pytest.approx(0, abs=1e-12) and width("fraction_1/knn") > 0.05
    assert knn["balanced_accuracy_ci95"] == pytest.approx(knn["balanced_accuracy_ci95_test"])
    # 100 episodes per seed make the prototype's seeds agree: the interval is the test slides' spread,
    # much wider than the t-interval over its seeds alone
    proto = rows["shots_4/prototype"]
    seeds_only = proto["balanced_accuracy_ci95_seeds"]
    assert width("shots_4/prototype") > 1.5 * (seeds_only[1] - seeds_only[0])
    low, high = proto["balanced_accuracy_ci95"]
    assert low <= proto["balanced_accuracy_ci95_test"][0] and high >= proto["balanced_accuracy_ci95_test"][1]
    assert proto["bootstrap"] == {"unit": "group", "n_units": 12, "resamples": 300}
    # with --bootstrap 0 the interval is the t-interval over seeds, as before
    plain = fewshot.run_fewshot(
        feature_set(train_x, train_y, ("a", "b")),
        test,
        fractions=(1.0,),
        shots=(),
        seeds=(0, 1),
        probes=("knn",),
        n_resamples=0,
    )
    assert plain["fraction_1/knn"]["balanced_accuracy_ci95"] == pytest.approx(
        [plain["fraction_1/knn"]["balanced_accuracy"]] * 2
    )


def test_a_reference_goes_through_the_same_subsets_and_redraws_and_its_difference_is_paired():
    rng = np.random.default_rng(0)
    train_y, test_y = np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 40)
    # ours: separable clusters; the reference: the same labels on overlapping ones (a weaker encoder)
    strong = feature_set(*blobs(30, dim=4, seed=0), CLASSES), feature_set(*blobs(40, dim=4, seed=1), CLASSES)
    weak_x = [
        rng.normal(size=(n, 4)).astype(np.float32) + 0.7 * np.eye(4, dtype=np.float32)[y]
        for n, y in ((90, train_y), (120, test_y))
    ]
    test_groups = [f"slide{i % 10}" for i in range(120)]
    ours = strong[0], feature_set(strong[1].features, test_y, CLASSES, test_groups)
    weak = feature_set(weak_x[0], train_y, CLASSES), feature_set(weak_x[1], test_y, CLASSES, test_groups)
    settings = dict(fractions=(0.5,), shots=(2,), seeds=(0, 1, 2), episodes=5, c_grid=(1.0,), n_resamples=200)
    rows = fewshot.run_fewshot(*ours, **settings, reference=weak)
    alone = fewshot.run_fewshot(*weak, **settings)
    for name, row in rows.items():
        # the reference's figures are those of a run of its own: the same draws, seeds and redraws
        ref = row["reference"]
        assert ref["per_seed"] == alone[name]["per_seed"], name
        assert ref["balanced_accuracy_ci95"] == pytest.approx(alone[name]["balanced_accuracy_ci95"])
        diff = row["balanced_accuracy_diff"]
        assert diff == pytest.approx(row["balanced_accuracy"] - ref["balanced_accuracy"])
        low, high = row["balanced_accuracy_diff_ci95"]
        assert low <= diff <= high and low > 0, name  # the separable encoder is better, beyond doubt
        # the interval joins the seeds' spread of the differences and the test slides'
        assert low <= row["balanced_accuracy_diff_ci95_test"][0] and high >= row["balanced_accuracy_diff_ci95_test"][1]
    # the same features on both sides: every difference is exactly 0, and so is its interval
    same = fewshot.run_fewshot(*ours, **settings, reference=ours)
    for row in same.values():
        assert row["balanced_accuracy_diff"] == 0.0 and row["balanced_accuracy_diff_ci95"] == [0.0, 0.0]
        assert row["auroc_diff"] == 0.0
    with pytest.raises(ValueError, match="same train and test images"):
        fewshot.run_fewshot(*ours, **settings, reference=(weak[0].select(np.arange(80)), weak[1]))


def test_prototype_is_cl2n_nearest_mean():
    # A shared offset that dominates raw cosine similarity disappears after centring.
    train_x, train_y = blobs(5, seed=0)
    test_x, test_y = blobs(20, seed=1)
    pred, probs = fewshot.prototype_predict(train_x + 100.0, train_y, test_x + 100.0, 4)
    assert (pred == test_y).all() and probs.shape == (60, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (probs[:, 3] == 0).all()  # no training rows of class 3


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def specs(sample_data) -> tuple[str, str]:
    """Two training slides of AMi-Br (3 atypical + 6 normal patches), two others (2 + 3) to test on."""
    root = sample_data / "amibr"
    return f"amibr:{root}?group=005.tiff,006.tiff", f"amibr:{root}?group=029.tiff,031.tiff"


def cli(argv: list[str]) -> int:
    return run_cli(fewshot.main, argv)


def test_cli_writes_results_and_curves(specs, tmp_path, capsys):
    out = tmp_path / "run" / "results.json"
    argv = [
        *common(*specs, tmp_path),
        "--seeds",
        "2",
        "--fractions",
        "0.5",
        "1.0",
        "--shots",
        "1",
        "2",
        "--episodes",
        "3",
        "--c-grid",
        "0.1",
        "1",
        "--out",
        str(out),
    ]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    assert "fraction_0.5/knn" in captured.out and "Traceback" not in captured.err
    results = read_results(out)
    assert results["probe"] == "fewshot" and results["dataset"]["n_train"] == 9
    assert results["task"] == "image-classification" and results["title"] == "few-label probes (frozen encoder)"
    config = results["config"]
    assert config["fractions"] == [0.5, 1.0] and config["shots"] == [1, 2] and config["seeds"] == [0, 1]
    assert config["episodes"] == 3 and config["probes"] == ["knn", "linear", "prototype"]
    names = {
        f"{r}/{p}" for r in ("fraction_0.5", "fraction_1", "shots_1", "shots_2") for p in ("knn", "linear", "prototype")
    }
    assert set(results["metrics"]) == names
    row = results["metrics"]["shots_2/prototype"]
    assert row["n_train"] == [4, 4] and row["episodes"] == 3 and len(row["per_seed"]["balanced_accuracy"]) == 2
    assert row["positive_class"] == "atypical"  # 2 of the 5 test patches: what positive_f1 scores
    assert all(len(row["per_seed"][score]) == 2 and f"{score}_ci95" in row for score in CLASSIFICATION_SCORES)
    assert (
        results["config"]["ci"] == fewshot.CI_BOOTSTRAP.format(units="groups") and row["bootstrap"]["unit"] == "group"
    )
    assert results["metrics"]["shots_1/linear"]["c_selection"] == ["fixed", "fixed"]
    png = fewshot.curves_path(out)
    assert png.name == "results_curves.png"
    assert png.is_file() and png.stat().st_size > 1024


def test_one_seed_labels_its_interval_the_test_bootstrap_alone(specs, tmp_path):
    out = tmp_path / "one_seed.json"
    few = ["--seeds", "1", "--fractions", "0.5", "--shots", "1", "--probes", "knn", "prototype", "--episodes", "2"]
    assert cli([*common(*specs, tmp_path), *few, "--bootstrap", "100", "--out", str(out)]) == 0
    results = read_results(out)
    for row in results["metrics"].values():
        assert row["balanced_accuracy_ci95_seeds"] is None  # one seed: no spread over draws to add
        assert row["balanced_accuracy_ci95"] == row["balanced_accuracy_ci95_test"]
    stated = [results["config"]["ci"], evaluation_tables([results])[0]["ci"]]  # results.json and the card
    assert all("bootstrap over test groups alone" in label and "t over seeds" not in label for label in stated)
    assert fewshot.interval_label(5, 100) == fewshot.CI_BOOTSTRAP.format(units="groups")
    assert fewshot.interval_label(5, 0) == fewshot.CI_SEEDS
    assert "over test images" in fewshot.interval_label(5, 100, "images")  # a set without groups
    assert fewshot.interval_label(1, 0) is None  # one seed and no redraws: no interval at all


def test_cli_compare_adds_the_reference_and_paired_differences(specs, tmp_path, capsys):
    out = tmp_path / "run" / "results.json"
    ref = "timm:vit_tiny_patch16_224"
    few = ["--seeds", "2", "--fractions", "1.0", "--shots", "2", "--probes", "knn", "prototype", "--episodes", "3"]
    assert cli([*common(*specs, tmp_path), *few, "--compare", ref, "--bootstrap", "100", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"paired difference, this encoder minus {ref}" in captured.out and "Traceback" not in captured.err
    results = read_results(out)
    assert results["config"]["compare"]["ref"] == ref
    for row in results["metrics"].values():
        # the same encoder on both sides: its figures twice, every difference exactly 0
        assert row["reference"]["per_seed"] == row["per_seed"]
        assert row["balanced_accuracy_diff"] == 0.0 and row["balanced_accuracy_diff_ci95"] == [0.0, 0.0]
    assert fewshot.curves_path(out).stat().st_size > 1024

    # another encoder: its rows are those of a run of its own, on the same draws
    other = "timm:vit_small_patch16_224"
    compared, alone = tmp_path / "compared" / "results.json", tmp_path / "alone" / "results.json"  # a PNG each
    settings = [*few, "--probes", "knn", "linear", "--c-grid", "0.1", "1", "--bootstrap", "100"]
    assert cli([*common(*specs, tmp_path), *settings, "--compare", other, "--out", str(compared)]) == 0
    argv = [*common(*specs, tmp_path), *settings, "--out", str(alone)]
    assert cli([a if a != "timm:vit_tiny_patch16_224" else other for a in argv]) == 0
    results, own = read_results(compared), read_results(alone)
    assert results["config"]["compare"]["hash"] == own["encoder"]["hash"] != results["encoder"]["hash"]
    for name, row in results["metrics"].items():
        theirs = own["metrics"][name]
        assert row["reference"]["per_seed"] == theirs["per_seed"], name
        assert row["reference"]["balanced_accuracy_ci95"] == pytest.approx(theirs["balanced_accuracy_ci95"])
        for key in ("k_used", "c", "c_selection"):
            assert row["reference"].get(key) == theirs.get(key), (name, key)


def test_cli_bad_inputs_are_one_line_errors(specs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(encoder, "load", lambda *a, **k: pytest.fail("encoder built for a bad input"))
    base = common(*specs, tmp_path)
    for extra, fragment in (
        (["--fractions", "0"], "--fractions"),
        (["--fractions", "1.5"], "--fractions"),
        (["--shots", "0"], "--shots"),
        (["--seeds", "0"], "--seeds"),
        (["--probes", "svm"], "--probes"),
        (["--episodes", "0"], "--episodes"),
    ):
        assert cli([*base, *extra]) == 2
        assert_one_line_error(capsys, fragment)
