"""kNN probe: both protocols on synthetic features, metrics against scikit-learn, the results schema,
and the command line on a few real AMi-Br patches."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from probe_helpers import assert_one_line_error, blobs, feature_set
from probe_helpers import probe_args as common
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from probes import knn
from ssl_path import encoder
from ssl_path.core.errors import UserError, run_cli
from ssl_path.evaluation.features import l2_normalize
from ssl_path.evaluation.metrics import classification_metrics
from ssl_path.evaluation.results import (
    SCHEMA,
    make_results,
    read_results,
    write_results,
)

# ----------------------------------------------------------------------------- synthetic features


def test_separable_clusters_are_classified_perfectly_by_both_protocols():
    train_x, train_y = blobs(100, seed=0)
    test_x, test_y = blobs(200, seed=1)
    pred, probs = knn.knn_predict(train_x, train_y, test_x, k=20, temperature=0.07, n_classes=3)
    assert (pred == test_y).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    pred, probs = knn.uni_knn_predict(train_x, train_y, test_x)
    assert (pred == test_y).all() and (probs[np.arange(600), test_y] == 1.0).all()


def test_approximate_indexes_find_the_exact_neighbours_of_clustered_features():
    train_x, train_y = blobs(300, seed=0)
    test_x, _ = blobs(50, seed=1)
    exact_sims, exact_idx = knn.search(l2_normalize(train_x), l2_normalize(test_x), 10)
    for kind in ("hnsw", "ivf"):
        sims, idx = knn.search(l2_normalize(train_x), l2_normalize(test_x), 10, index=kind)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx.tolist(), exact_idx.tolist())])
        assert recall > 0.95, kind
        assert (sims[:, :-1] >= sims[:, 1:] - 1e-6).all()  # descending, like the exact search
    flat = knn.knn_predict(train_x, train_y, test_x, k=20, temperature=0.07, n_classes=3)[0]
    approx = knn.knn_predict(train_x, train_y, test_x, k=20, temperature=0.07, n_classes=3, index="hnsw")[0]
    assert (flat == approx).all()
    with pytest.raises(ValueError, match="index must be one of"):
        knn.search(train_x, test_x, 5, index="annoy")


def test_ordinal_grades_get_quadratic_weighted_kappa():
    train_x, train_y = blobs(60, seed=0)
    test_x, test_y = blobs(40, seed=1)
    noisy = np.where(np.random.default_rng(3).random(len(train_y)) < 0.4, (train_y + 1) % 3, train_y)
    train, test = feature_set(train_x, noisy, ("G1", "G2", "G3")), feature_set(test_x, test_y, ("G1", "G2", "G3"))
    plain, graded = knn.run_knn(train, test, [20]), knn.run_knn(train, test, [20], ordinal=True)
    pred = np.asarray(graded["k20"]["confusion_matrix"])
    y_pred = knn.knn_predict(train_x, noisy, test_x, 20, 0.07, 3)[0]
    assert graded["k20"]["cohen_kappa"] == pytest.approx(cohen_kappa_score(test_y, y_pred, weights="quadratic"))
    assert plain["k20"]["cohen_kappa"] == pytest.approx(cohen_kappa_score(test_y, y_pred))
    assert plain["k20"]["cohen_kappa"] != pytest.approx(graded["k20"]["cohen_kappa"]) and pred.sum() == 120


def test_shuffled_labels_give_chance_accuracy():
    train_x, train_y = blobs(100, seed=0)
    test_x, test_y = blobs(200, seed=1)
    shuffled = np.random.default_rng(2).permutation(train_y)
    for pred, _ in (
        knn.knn_predict(train_x, shuffled, test_x, k=20, temperature=0.07, n_classes=3),
        knn.uni_knn_predict(train_x, shuffled, test_x, n_classes=3),
    ):
        assert abs((pred == test_y).mean() - 1 / 3) < 0.15


# Six training points, mean zero (so UNI's centring leaves them), unit query along x:
# similarities A 1.0 (class 0), B and C 0.8 (class 1), D -1.0, E and F -0.8 (class 0).
HAND_TRAIN = np.array([[1, 0], [0.8, 0.6], [0.8, -0.6], [-1, 0], [-0.8, 0.6], [-0.8, -0.6]], dtype=np.float32)
HAND_LABELS = np.array([0, 1, 1, 0, 0, 0])
HAND_QUERY = np.array([[1.0, 0.0]], dtype=np.float32)


def test_dino_votes_are_weighted_by_exp_similarity_over_temperature():
    pred, probs = knn.knn_predict(HAND_TRAIN, HAND_LABELS, HAND_QUERY, k=3, temperature=0.5, n_classes=2)
    w_a, w_bc = math.exp(1.0 / 0.5), math.exp(0.8 / 0.5)
    np.testing.assert_allclose(probs[0], [w_a / (w_a + 2 * w_bc), 2 * w_bc / (w_a + 2 * w_bc)], rtol=1e-5)
    assert pred[0] == 1  # two votes of 4.95 beat one of 7.39
    # a sharper temperature lets the single closest neighbour win; scaling features changes nothing
    pred, probs = knn.knn_predict(HAND_TRAIN * 7, HAND_LABELS, HAND_QUERY * 3, k=3, temperature=0.07, n_classes=2)
    w_bc = math.exp(-0.2 / 0.07)
    np.testing.assert_allclose(probs[0], [1 / (1 + 2 * w_bc), 2 * w_bc / (1 + 2 * w_bc)], rtol=1e-5)
    assert pred[0] == 0


def test_uni_is_a_majority_vote_with_ties_to_the_lowest_class_id():
    pred, probs = knn.uni_knn_predict(HAND_TRAIN, HAND_LABELS, HAND_QUERY, k=3)
    assert pred[0] == 1 and probs[0].tolist() == pytest.approx([1 / 3, 2 / 3])
    # A (1.0) against B or C (0.8), one vote each: class 0, however similar the voters
    pred, probs = knn.uni_knn_predict(HAND_TRAIN, 1 - HAND_LABELS, HAND_QUERY, k=2)
    assert pred[0] == 0 and probs[0].tolist() == pytest.approx([0.5, 0.5])
    # centring on the train mean makes a shared offset irrelevant (without it, all would point along it)
    offset = np.array([[50.0, 50.0]], dtype=np.float32)
    pred, _ = knn.uni_knn_predict(HAND_TRAIN + offset, HAND_LABELS, HAND_QUERY + offset, k=3)
    assert pred[0] == 1


@pytest.mark.parametrize("n_classes, k", [(2, 20), (3, 6)])
def test_uni_matches_scikit_learns_kneighbors_classifier_on_tied_votes(n_classes, k):
    """UNI's eval_knn: centre on the train mean, L2-normalise, KNeighborsClassifier(n_neighbors=20)."""
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(200, 8)), rng.normal(size=(300, 8))  # no two distances alike
    train_y = rng.integers(0, n_classes, 200)  # labels unrelated to features: many tied votes
    centre = train_x.mean(axis=0)
    train_unit, test_unit = l2_normalize(train_x - centre), l2_normalize(test_x - centre)
    reference = KNeighborsClassifier(n_neighbors=k).fit(train_unit, train_y)
    theirs = reference.predict(test_unit)
    pred, probs = knn.uni_knn_predict(train_x, train_y, test_x, k=k, n_classes=n_classes)
    np.testing.assert_array_equal(pred, theirs)
    np.testing.assert_allclose(probs, reference.predict_proba(test_unit))
    # The features do test the tie rule: many votes tie, and in some the voters' summed similarity
    # favours another class than the lowest id.
    sims = test_unit @ train_unit.T
    nearest = np.argsort(-sims, axis=1)[:, :k]
    sim_sums = np.zeros((len(test_x), n_classes))
    np.add.at(sim_sums, (np.arange(len(test_x))[:, None], train_y[nearest]), np.take_along_axis(sims, nearest, 1))
    tied_classes = probs == probs.max(axis=1, keepdims=True)
    tied = tied_classes.sum(axis=1) > 1
    most_similar = np.where(tied_classes, sim_sums, -np.inf).argmax(axis=1)
    assert tied.sum() > 20 and (most_similar[tied] != theirs[tied]).any()


def test_run_knn_rows_and_clamped_k(capsys):
    train_x, train_y = blobs(5, n_classes=2, seed=0)
    test_x, test_y = blobs(10, n_classes=2, seed=1)
    classes = ("a", "b")
    # the test set lists its classes in another order: labels are matched by name
    test = feature_set(test_x, 1 - test_y, ("b", "a"))
    rows = knn.run_knn(feature_set(train_x, train_y, classes), test, ks=[3, 50], temperature=0.07)
    assert list(rows) == ["k3", "k50", "uni_k20"]
    assert rows["k50"]["k_used"] == 10 and rows["uni_k20"]["k_used"] == 10 and rows["k3"]["k_used"] == 3
    assert all(row["n"] == 20 for row in rows.values())
    assert rows["k3"]["accuracy"] == rows["k50"]["accuracy"] == 1.0
    # UNI's k clamped to all 10 training images: every vote is 5 to 5, a tie to the lowest class id
    assert rows["uni_k20"]["predicts_one_class"] == "a" and rows["uni_k20"]["accuracy"] == 0.5
    assert rows["k3"]["protocol"] == "dino" and rows["uni_k20"]["protocol"] == "uni"
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: ") for w in warnings)  # 2 clamped k, 1 one-class row
    with pytest.raises(UserError, match="not among the training classes"):
        knn.run_knn(feature_set(train_x, train_y, classes), feature_set(test_x, test_y, ("a", "c")), ks=[3])


def test_run_knn_searches_once_and_each_k_matches_its_own_search():
    """Every DINO k is read off one search at the largest k; it must equal a search at that k."""
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    train_y = rng.integers(0, 3, 60)
    classes = ("a", "b", "c")
    test = feature_set(test_x.astype(np.float32), rng.integers(0, 3, 25), classes)
    rows = knn.run_knn(feature_set(train_x.astype(np.float32), train_y, classes), test, ks=[1, 5, 17], temperature=0.1)
    for k in (1, 5, 17):
        _, probs = knn.knn_predict(train_x.astype(np.float32), train_y, test_x.astype(np.float32), k, 0.1, 3)
        pred = probs.argmax(axis=1)
        assert rows[f"k{k}"]["accuracy"] == float(np.mean(pred == test.labels))
        assert rows[f"k{k}"]["auroc"] == pytest.approx(roc_auc_score(test.labels, probs, multi_class="ovr"))


def test_rows_carry_bootstrap_cis_and_paired_differences_to_a_reference():
    train_x, train_y = blobs(30, n_classes=2, seed=0)
    test_x, test_y = blobs(40, n_classes=2, seed=1)
    rng = np.random.default_rng(4)
    groups = [f"slide{i % 8}" for i in range(80)]
    train, test = feature_set(train_x, train_y, ("a", "b")), feature_set(test_x, test_y, ("a", "b"), groups)

    # a much worse encoder of the same images: the class signal drowned in noise
    def noisy(x: np.ndarray) -> np.ndarray:
        return x + rng.normal(scale=8, size=x.shape).astype(np.float32)

    reference = (
        feature_set(noisy(train_x), train_y, ("a", "b")),
        feature_set(noisy(test_x), test_y, ("a", "b"), groups),
    )
    rows = knn.run_knn(train, test, ks=[10], n_resamples=300, reference=reference)
    row = rows["k10"]
    assert row["bootstrap"] == {"unit": "group", "n_units": 8, "resamples": 300}
    assert row["accuracy_ci95"] == [1.0, 1.0] and row["reference"]["accuracy"] < 0.9
    assert row["balanced_accuracy_diff"] == pytest.approx(1.0 - row["reference"]["balanced_accuracy"])
    low, high = row["balanced_accuracy_diff_ci95"]
    assert 0 < low <= row["balanced_accuracy_diff"] <= high
    same = knn.run_knn(train, test, ks=[10], n_resamples=300, reference=(train, test))["k10"]
    assert same["auroc_diff"] == 0.0 and same["auroc_diff_ci95"] == [0.0, 0.0]
    assert "paired difference" in knn.format_table(rows, reference="noisy")


def test_a_knn_that_predicts_one_class_says_so(capsys):
    # 78 % normal, and features that carry nothing: every neighbourhood votes normal
    rng = np.random.default_rng(0)
    train_y = (rng.random(200) > 0.78).astype(np.int64)
    train = feature_set(rng.normal(size=(200, 8)).astype(np.float32) + 5, train_y, ("normal", "atypical"))
    test = feature_set(rng.normal(size=(30, 8)).astype(np.float32) + 5, np.repeat([0, 1], 15), ("normal", "atypical"))
    rows = knn.run_knn(train, test, ks=[50], n_resamples=0)
    err = capsys.readouterr().err.strip().splitlines()
    assert rows["k50"]["predicts_one_class"] == "normal" and rows["k50"]["balanced_accuracy"] == 0.5
    assert rows["uni_k20"]["predicts_one_class"] is None  # a plain majority of 20 still flips now and then
    assert err == ["warning: kNN row k50 predicts one class, 'normal', for all 30 test images"]


# ----------------------------------------------------------------------------- metrics


def test_auroc_matches_sklearn_binary_and_multiclass():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p1 = np.clip(0.3 * y + rng.random(50) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs.argmax(1), probs, classes=("n", "a"))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p1))
    y3 = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3)) + 1.5 * np.eye(3)[y3]
    probs3 = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y3, probs3.argmax(1), probs3, classes=("x", "y", "z"))
    assert m["auroc"] == pytest.approx(roc_auc_score(y3, probs3, multi_class="ovr", average="macro"))
    assert m["n"] == 90 and np.asarray(m["confusion_matrix"]).sum() == 90
    # a class missing from y_true: AUROC is undefined, the matrix keeps its row
    absent = classification_metrics(y3[y3 < 2], probs3[y3 < 2].argmax(1), probs3[y3 < 2], classes=("x", "y", "z"))
    assert absent["auroc"] is None and len(absent["confusion_matrix"]) == 3


def test_kappa_quadratic_when_ordinal_and_constant_labels_give_none():
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    p = np.array([0, 2, 2, 1, 1, 0, 0])
    assert classification_metrics(y, p, ordinal=True)["cohen_kappa"] == pytest.approx(
        cohen_kappa_score(y, p, weights="quadratic")
    )
    plain = classification_metrics(y, p)
    assert plain["cohen_kappa"] == pytest.approx(cohen_kappa_score(y, p))
    # recalls: class 0 2/2, class 1 1/2, class 2 1/3
    assert plain["accuracy"] == pytest.approx(4 / 7)
    assert plain["balanced_accuracy"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert classification_metrics([0, 0], [0, 0], classes=("a", "b"))["cohen_kappa"] is None


# ----------------------------------------------------------------------------- results schema


def _results(**metrics):
    return make_results(
        probe="knn",
        task="image-classification",
        title=knn.TITLE,
        encoder={"ref": "timm:x", "hash": "abc"},
        dataset={"train": "a", "test": "b", "n_train": 3, "n_test": 2, "classes": ("n", "a")},
        split={"method": "given"},
        seeds=[np.int64(0)],
        metrics=metrics or {"k10": {"accuracy": np.float32(0.5), "auroc": float("nan")}},
        config={"ks": (10,)},
    )


def test_results_round_trip_and_refuse_overwrite(tmp_path):
    path = tmp_path / "results.json"
    results = _results()
    write_results(path, results)
    back = read_results(path)
    assert back["schema"] == SCHEMA and back["metrics"]["k10"] == {"accuracy": 0.5, "auroc": None}
    assert back["seeds"] == [0] and back["dataset"]["classes"] == ["n", "a"] and back["created"] == results["created"]
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    with pytest.raises(UserError, match="already exists"):
        write_results(path, results)
    write_results(path, _results(k20={"accuracy": 1.0}), overwrite=True)
    assert read_results(path)["metrics"] == {"k20": {"accuracy": 1.0}}


def test_read_results_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(UserError, match="missing.json does not exist"):
        read_results(tmp_path / "missing.json")
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"schema": "other/v9", "accuracy": 1}))
    with pytest.raises(UserError, match="foreign.json is not an ssl-path results file"):
        read_results(foreign)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(UserError, match="broken.json"):
        read_results(broken)


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def specs(sample_data) -> tuple[str, str]:
    """Two disjoint slide sets of AMi-Br: 005 + 006 (3 atypical + 6 normal) and 036 + 088 (4 + 5)."""
    root = sample_data / "amibr"
    return f"amibr:{root}?group=005.tiff,006.tiff", f"amibr:{root}?group=036.tiff,088.tiff"


def cli(argv: list[str]) -> int:
    return run_cli(knn.main, argv)


def test_cli_writes_results_and_reuses_the_cache(specs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.json"
    assert cli([*common(*specs, tmp_path), "--k", "3", "20", "--out", str(out), "--seed", "7"]) == 0
    captured = capsys.readouterr()
    assert "k3" in captured.out and "uni_k20" in captured.out and "Traceback" not in captured.err
    results = read_results(out)
    assert results["probe"] == "knn" and results["seeds"] == [7]
    assert results["task"] == "image-classification" and results["title"] == "kNN probe (frozen encoder)"
    assert results["dataset"]["n_train"] == 9 and results["dataset"]["n_test"] == 9
    assert results["dataset"]["classes"] == ["normal", "atypical"] and results["split"]["shared_groups"] == 0
    assert set(results["metrics"]) == {"k3", "k20", "uni_k20"} and results["metrics"]["k20"]["k_used"] == 9
    assert results["encoder"]["ref"] == "timm:vit_tiny_patch16_224" and results["config"]["input_size"] == 64
    first = results["metrics"]["k3"]["accuracy"]
    # the same sets again: features come from the cache, so no encoder may be built
    monkeypatch.setattr(encoder, "load", lambda *a, **k: pytest.fail("encoder built despite the cache"))
    assert cli([*common(*specs, tmp_path), "--k", "3", "--out", str(out), "--overwrite"]) == 0
    assert read_results(out)["metrics"]["k3"]["accuracy"] == first


def test_cli_bad_inputs_are_one_line_errors(specs, sample_data, tmp_path, capsys, monkeypatch):
    # none of these may get as far as building an encoder
    monkeypatch.setattr(encoder, "load", lambda *a, **k: pytest.fail("encoder built for a bad input"))
    train, test = specs
    assert cli(common(f"amibr:{tmp_path / 'nowhere'}", test, tmp_path)) == 2
    assert_one_line_error(capsys, "nowhere", "does not exist")

    only_atypical = f"amibr:{sample_data / 'amibr'}?group=081.tiff"  # the one figure of slide 081
    assert cli(common(only_atypical, test, tmp_path)) == 2
    assert_one_line_error(capsys, "081.tiff", "no images of class 'normal'")

    one_class = tmp_path / "one_class" / "normal"
    one_class.mkdir(parents=True)
    for path in sorted((sample_data / "amibr" / "patches" / "normal").glob("*.png"))[:2]:
        shutil.copy(path, one_class)
    assert cli(common(str(one_class.parent), test, tmp_path)) == 2
    assert_one_line_error(capsys, "1 class", "at least 2")
    # A CSV whose other class lost its labels: the missing labels are what is wrong, not the one class.
    images = sorted((sample_data / "amibr" / "patches" / "normal").glob("*.png"))[:4]
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{p},{'normal' if i < 2 else ''}\n" for i, p in enumerate(images)))
    assert cli(common(f"csv:{table}", test, tmp_path)) == 2
    assert_one_line_error(capsys, "2 images have no label")

    out = tmp_path / "results.json"
    out.write_text("{}")
    assert cli([*common(train, test, tmp_path), "--out", str(out)]) == 2
    assert_one_line_error(capsys, "already exists", "--overwrite")
    assert out.read_text() == "{}"

    assert cli([*common(train, test, tmp_path), "--temperature", "0"]) == 2
    assert_one_line_error(capsys, "--temperature")
