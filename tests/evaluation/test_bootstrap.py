"""ssl_path.evaluation.bootstrap: every resampled score equals scikit-learn's with the redraw as
sample weights, the 95 % intervals cover a known value at about the nominal rate (tiles, and whole
slides where slides differ), and paired differences are exactly 0 for one encoder against itself and
exclude 0 for a clearly better one; a test interval and a spread over seeds combine side by side."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import binom, norm
from sklearn import metrics as skm

from ssl_path.evaluation import bootstrap as bs
from ssl_path.evaluation.metrics import CLASSIFICATION_SCORES, classification_metrics

REPETITIONS = 200


def predictions(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, predictions and probabilities with some signal, rounded so that scores tie."""
    y = rng.integers(0, k, n)
    logits = np.round(rng.normal(size=(n, k)) + np.eye(k)[y], 1)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs.argmax(axis=1), probs


@pytest.mark.parametrize("k", [2, 3])
def test_resampled_scores_are_sklearns_with_the_redraw_as_sample_weight(k):
    rng = np.random.default_rng(k)
    y, pred, probs = predictions(rng, 120, k)
    redraws = bs.resamples(120, [f"s{i % 9}" for i in range(120)], n_resamples=6, seed=1)
    weights = next(redraws.weights())
    scores = bs.resampled_scores(redraws, y, pred, probs, k)
    labels = np.arange(k)
    positive = 0 if (y == 0).sum() < (y == 1).sum() else 1  # the rarer class of the whole test set
    for b, w in enumerate(weights):
        drawn_y, drawn_pred = np.repeat(y, w.astype(int)), np.repeat(pred, w.astype(int))  # the redrawn set itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a class not drawn: sklearn warns and returns what we test
            expected = {
                "accuracy": skm.accuracy_score(y, pred, sample_weight=w),
                "balanced_accuracy": skm.balanced_accuracy_score(y, pred, sample_weight=w),
                # over the classes drawn or predicted: one in neither has no F1 (sklearn's default labels)
                "macro_f1": skm.f1_score(drawn_y, drawn_pred, average="macro", zero_division=0),
                "weighted_f1": skm.f1_score(
                    y, pred, labels=labels, average="weighted", sample_weight=w, zero_division=0
                ),
                "cohen_kappa": skm.cohen_kappa_score(y, pred, labels=labels, sample_weight=w),
                "quadratic_kappa": skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic", sample_weight=w),
                "auroc": skm.roc_auc_score(y, probs[:, 1], sample_weight=w)
                if k == 2
                else skm.roc_auc_score(y, probs, multi_class="ovr", labels=labels, sample_weight=w),
            }
            if k == 2:
                expected["positive_f1"] = skm.f1_score(y, pred, pos_label=positive, sample_weight=w, zero_division=0)
        for score, value in expected.items():
            assert scores[score][b] == pytest.approx(value, abs=1e-12), score
    assert set(scores) == set(CLASSIFICATION_SCORES) and all(len(v) == 6 for v in scores.values())
    if k == 3:
        assert np.isnan(scores["positive_f1"]).all()  # binary only


@pytest.mark.parametrize("k", [2, 3])
def test_plain_scores_equal_classification_metrics(k):
    rng = np.random.default_rng(10 + k)
    y, pred, probs = predictions(rng, 90, k)
    missing = y != k - 1  # also a test set without the last class: AUROC undefined
    for keep in (np.ones(90, bool), missing):
        (plain,) = bs.plain_scores(y[keep], [(pred[keep], probs[keep])], k)
        expected = classification_metrics(y[keep], pred[keep], probs[keep], classes=[str(c) for c in range(k)])
        for score in CLASSIFICATION_SCORES:
            assert plain[score] == pytest.approx(expected[score], abs=1e-12), score


def test_redraws_take_whole_groups_and_are_seeded():
    groups = [f"slide{i // 5}" for i in range(40)]  # 8 slides of 5 tiles
    redraws = bs.resamples(40, groups, n_resamples=50, seed=3)
    weights = np.concatenate(list(redraws.weights()))
    assert weights.shape == (50, 40) and (weights.sum(axis=1) == 40).all()
    # every tile of a slide is drawn as often as its slide
    assert (weights.reshape(50, 8, 5) == weights.reshape(50, 8, 5)[:, :, :1]).all()
    assert redraws.describe() == {"unit": "group", "n_units": 8, "resamples": 50}
    again = np.concatenate(list(bs.resamples(40, groups, n_resamples=50, seed=3).weights()))
    assert (again == weights).all()
    tiles = bs.resamples(40, [None] * 40, n_resamples=50, seed=3)
    assert tiles.describe()["unit"] == "tile" and tiles.n_units == 40


def simulate(rng: np.random.Generator, n_slides: int, per_slide: int, slide_spread: float):
    """Labels, predictions and probabilities whose accuracy (0.7) and AUROC are known in the population.

    Each slide has its own accuracy (0.7 +- slide_spread) and score offset, so tiles of a slide are
    alike: only a bootstrap of whole slides sees that spread."""
    n = n_slides * per_slide
    slide = np.repeat(np.arange(n_slides), per_slide)
    y = rng.integers(0, 2, n)
    correct = rng.random(n) < 0.7 + rng.uniform(-slide_spread, slide_spread, n_slides)[slide]
    pred = np.where(correct, y, 1 - y)
    shift = rng.normal(0, 0.7, n_slides)[slide]
    p1 = 1 / (1 + np.exp(-(rng.normal(size=n) + y + shift)))
    return y, pred, np.stack([1 - p1, p1], axis=1), [f"slide{s}" for s in slide]


def coverage(grouped: bool, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    true_auroc = norm.cdf(1 / np.sqrt(2 + 2 * 0.7**2))  # score difference of a random (positive, negative) pair
    hits = {"accuracy": 0, "auroc": 0}
    for rep in range(REPETITIONS):
        y, pred, probs, slides = simulate(rng, 50, 6, 0.25)
        ci = bs.bootstrap_ci(bs.resamples(len(y), slides if grouped else None, 200, seed=rep), y, pred, probs, 2)
        hits["accuracy"] += ci["accuracy"][0] <= 0.7 <= ci["accuracy"][1]
        hits["auroc"] += ci["auroc"][0] <= true_auroc <= ci["auroc"][1]
    return {score: n / REPETITIONS for score, n in hits.items()}


def test_cluster_bootstrap_covers_the_true_value_at_the_nominal_rate():
    # 200 repetitions: the share covering a true value lies within binomial limits of 0.95
    low, high = binom.ppf([0.001, 0.999], REPETITIONS, 0.95) / REPETITIONS
    covered = coverage(grouped=True, seed=0)
    for score, share in covered.items():
        assert low <= share <= high, (score, share, low, high)
    # the same data redrawn tile by tile: the slides' spread is missed and the interval too narrow
    assert coverage(grouped=False, seed=0)["accuracy"] < low


def test_tile_bootstrap_covers_the_true_value_when_tiles_are_independent():
    rng = np.random.default_rng(1)
    low, high = binom.ppf([0.001, 0.999], REPETITIONS, 0.95) / REPETITIONS
    hits = 0
    for rep in range(REPETITIONS):
        y, pred, probs, _ = simulate(rng, 300, 1, 0.0)  # one tile per slide: independent tiles
        ci = bs.bootstrap_ci(bs.resamples(len(y), None, 200, seed=rep), y, pred, probs, 2)["accuracy"]
        hits += ci[0] <= 0.7 <= ci[1]
    assert low <= hits / REPETITIONS <= high


def test_slides_that_differ_make_the_cluster_interval_wider_than_the_tile_one():
    rng = np.random.default_rng(2)
    y, pred, probs, slides = simulate(rng, 30, 10, 0.25)
    grouped = bs.bootstrap_ci(bs.resamples(300, slides, 500), y, pred, probs, 2)["accuracy"]
    tiles = bs.bootstrap_ci(bs.resamples(300, None, 500), y, pred, probs, 2)["accuracy"]
    assert grouped[1] - grouped[0] > 1.2 * (tiles[1] - tiles[0])


def test_paired_difference_is_zero_for_one_encoder_and_excludes_zero_for_a_better_one():
    rng = np.random.default_rng(3)
    y, weak_pred, weak_probs, slides = simulate(rng, 20, 10, 0.1)
    redraws = bs.resamples(len(y), slides, 500, seed=0)
    same = bs.paired_difference(redraws, y, (weak_pred, weak_probs), (weak_pred, weak_probs), 2)
    assert all(same[s] == [0.0, 0.0] for s in ("accuracy", "balanced_accuracy", "auroc", "cohen_kappa"))
    # the better encoder: right on 90 % of the tiles, its scores separating the classes
    strong_pred = np.where(rng.random(len(y)) < 0.9, y, 1 - y)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 3 * y)))
    strong = (strong_pred, np.stack([1 - p1, p1], axis=1))
    diff = bs.paired_difference(redraws, y, strong, (weak_pred, weak_probs), 2)
    assert diff["accuracy"][0] > 0 and diff["auroc"][0] > 0 and diff["balanced_accuracy"][0] > 0
    # pairing: the interval of the difference is narrower than the unpaired intervals would suggest
    a, b = (
        bs.bootstrap_ci(redraws, y, *strong, 2)["auroc"],
        bs.bootstrap_ci(redraws, y, weak_pred, weak_probs, 2)["auroc"],
    )
    assert diff["auroc"][1] - diff["auroc"][0] < (a[1] - a[0]) + (b[1] - b[0])


def test_undefined_scores_and_combined_intervals():
    assert bs.percentile_interval(np.array([np.nan] * 6 + [0.5] * 4)) is None  # most redraws undefined
    assert bs.percentile_interval(np.array([np.nan] + [0.5] * 9)) == [0.5, 0.5]
    # seeds that agree leave the test interval; a test set without spread leaves the seeds' t-interval
    assert bs.combined_interval(0.7, [0.6, 0.75], 0.0) == pytest.approx([0.6, 0.75])
    assert bs.combined_interval(0.7, [0.7, 0.7], 0.05) == pytest.approx([0.65, 0.75])
    # both: each side the root sum of squares, the bootstrap's asymmetry kept
    assert bs.combined_interval(0.7, [0.64, 0.78], 0.06) == pytest.approx([0.7 - 0.06 * 2**0.5, 0.8])
    assert bs.combined_interval(0.7, None, None) is None and bs.combined_interval(None, [0, 1], 0.1) is None
    # a bootstrap interval wholly above the centre keeps its lower bound, widened downwards by the seeds
    assert bs.combined_interval(0.5, [0.52, 0.6], 0.0) == pytest.approx([0.52, 0.6])
    low, high = bs.combined_interval(0.5, [0.52, 0.6], 0.05)
    assert 0.52 - 0.05 < low < 0.52 and high == pytest.approx(0.5 + (0.1**2 + 0.05**2) ** 0.5)
