"""ssl_path.evaluation.metrics: the anchors' metric variants (positive-class F1, weighted F1,
quadratic kappa) beside ours, each equal to scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score

from ssl_path.evaluation.metrics import CLASSIFICATION_SCORES, VARIANT_SCORES, classification_metrics


def test_binary_variants_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random(80) < 0.25).astype(int)  # the second class, "atypical", is the minority
    pred = np.where(rng.random(80) < 0.8, y, 1 - y)
    m = classification_metrics(y, pred, classes=("normal", "atypical"))
    assert m["positive_f1"] == pytest.approx(f1_score(y, pred, pos_label=1))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert set(CLASSIFICATION_SCORES) <= set(m) and set(VARIANT_SCORES) == {
        "positive_f1",
        "weighted_f1",
        "quadratic_kappa",
    }


def test_multiclass_variants_and_positive_f1_only_for_two_classes():
    y = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    pred = np.array([0, 2, 2, 1, 1, 0, 0, 1])
    m = classification_metrics(y, pred, classes=("G1", "G2", "G3"))
    assert m["positive_f1"] is None
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    # quadratic whatever ``ordinal`` does to cohen_kappa
    assert m["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["cohen_kappa"] == pytest.approx(cohen_kappa_score(y, pred)) != m["quadratic_kappa"]


def test_positive_f1_scores_the_rarer_class_whatever_the_readers_order():
    """amibr: lists (normal, atypical); csv: and folder: sort by name, (atypical, normal): the same F1."""
    rng = np.random.default_rng(1)
    atypical = rng.random(90) < 0.25
    called = np.where(rng.random(90) < 0.8, atypical, ~atypical)
    truth_f1 = f1_score(atypical, called)
    by_amibr = classification_metrics(atypical.astype(int), called.astype(int), classes=("normal", "atypical"))
    by_csv = classification_metrics((~atypical).astype(int), (~called).astype(int), classes=("atypical", "normal"))
    for m in (by_amibr, by_csv):
        assert m["positive_class"] == "atypical" and m["positive_f1"] == pytest.approx(truth_f1)
    # a test set of one class: that class is scored (an absent one would have no F1)
    only = classification_metrics(np.ones(5, int), np.ones(5, int), classes=("normal", "atypical"))
    assert only["positive_class"] == "atypical" and only["positive_f1"] == 1.0
    only = classification_metrics(np.zeros(5, int), np.zeros(5, int), classes=("atypical", "normal"))
    assert only["positive_class"] == "atypical" and only["positive_f1"] == 1.0


def test_macro_f1_averages_the_classes_tested_or_predicted():
    """A trained class absent from the test set and never predicted has no F1; counted as 0 it would
    pull a perfect score down to 2/3."""
    y = np.array([0, 0, 1, 1, 1, 0])
    pred = np.array([0, 1, 1, 1, 0, 0])
    m = classification_metrics(y, pred, classes=("a", "b", "c"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    perfect = classification_metrics(y, y, classes=("a", "b", "c"))
    assert perfect["macro_f1"] == 1.0
    predicted_only = classification_metrics(y, np.where(pred == 1, 2, pred), classes=("a", "b", "c"))
    assert predicted_only["macro_f1"] == pytest.approx(f1_score(y, np.where(pred == 1, 2, pred), average="macro"))
