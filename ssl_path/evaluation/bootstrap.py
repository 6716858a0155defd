"""Bootstrap confidence intervals over test tiles, and paired differences between two encoders.

A probe's score is measured on one set of test slides; another set would give another score. The
bootstrap redraws the test set many times and reads the spread of the score off the redraws:

- :func:`resamples`: ``B`` redraws of a test set. When the tiles have groups (slides, patients), whole
  groups are drawn with replacement (the cluster bootstrap: tiles of one slide are not independent,
  and drawing them one by one would make the interval too narrow); otherwise single tiles. A tile
  without a group is a group of its own (:func:`ssl_path.evaluation.splits.group_ids`). Seeded: the
  same seed gives the same redraws, whichever predictions are scored on them.
- :func:`resampled_scores` (:func:`resampled_scores_of` for several predictions in one pass): every
  score of :data:`~ssl_path.evaluation.metrics.CLASSIFICATION_SCORES` on every redraw.
- :func:`bootstrap_ci`: the 95 % percentile interval of each score (Efron & Tibshirani 1993, ch. 13).
- :func:`paired_difference`: two encoders' predictions on the same tiles, scored on the same redraws;
  the interval of the difference (A minus B). Pairing removes the variance both share (the same hard
  slides are hard for both), so a real gain shows even where the two unpaired intervals overlap; an
  interval that excludes 0 says the gain is not an accident of which slides were tested.
- :func:`combined_interval`: a test-redraw interval and a spread over training draws (seeds) put
  together, for figures that average several training draws (few-label regimes).

A redraw is a count per tile of how often it was drawn, i.e. a sample weight. The scores here are
computed from weighted confusion matrices and a weighted Mann-Whitney AUROC, a batch of redraws per
matrix product, rather than by scikit-learn with ``sample_weight``: that costs 20-30 ms per redraw
and score set, minutes for 1000 redraws of a few probe rows on 2 cores. The formulas are
scikit-learn's (tests/evaluation/test_bootstrap.py checks each against it). A score undefined on a
redraw (AUROC when a class was not drawn, kappa of a constant labelling) is NaN there; its interval
is taken over the redraws where it is defined, and is None if that is fewer than half of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from scipy import sparse

from ssl_path.evaluation.metrics import CLASSIFICATION_SCORES, positive_class
from ssl_path.evaluation.splits import group_ids
from ssl_path.evaluation.stats import CONFIDENCE

__all__ = [
    "DEFAULT_RESAMPLES",
    "UNIT_WORDS",
    "Resamples",
    "resamples",
    "resampled_scores",
    "resampled_scores_of",
    "plain_scores",
    "percentile_interval",
    "bootstrap_ci",
    "paired_difference",
    "combined_interval",
]

DEFAULT_RESAMPLES = 1000
# What a redraw draws (:meth:`Resamples.describe`'s unit), as prose names it.
UNIT_WORDS = {"group": "groups", "tile": "images"}
# Redraw-by-tile weights held in memory at once (float64): 32 MB, whatever the test set's size.
_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class Resamples:
    """``n_resamples`` seeded redraws of ``len(unit_ids)`` test tiles, in units (groups or tiles).

    The redraws are not stored: :meth:`weights` draws them again, chunk by chunk, from ``seed``, so
    every pass (every probe row, both encoders of a comparison) sees the same ones.
    """

    unit_ids: np.ndarray  # int64 [n]: the unit (group, or the tile itself) of each tile
    n_resamples: int
    seed: int
    grouped: bool  # units are groups (slides, patients), not tiles

    @property
    def n_units(self) -> int:
        return int(self.unit_ids.max()) + 1 if len(self.unit_ids) else 0

    def describe(self) -> dict[str, Any]:
        """What a results row says of its interval: how many redraws of how many units of which kind."""
        return {"unit": "group" if self.grouped else "tile", "n_units": self.n_units, "resamples": self.n_resamples}

    def weights(self) -> Iterator[np.ndarray]:
        """The redraws as tile weights, float64 [b, n] chunks that together make ``n_resamples`` rows."""
        n, units = len(self.unit_ids), self.n_units
        rows = max(1, _CHUNK_CELLS // max(n, units, 1))
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.n_resamples, rows):
            b = min(rows, self.n_resamples - start)
            drawn = rng.integers(0, units, size=(b, units))  # each redraw: as many units as there are
            counts = np.bincount((drawn + units * np.arange(b)[:, None]).ravel(), minlength=b * units)
            yield counts.reshape(b, units)[:, self.unit_ids].astype(np.float64)


def resamples(
    n_tiles: int, groups: Sequence[str | None] | None = None, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> Resamples:
    """Redraws of ``n_tiles`` test tiles: of whole groups when any tile has one, else of tiles."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if groups is not None and len(groups) != n_tiles:
        raise ValueError(f"{n_tiles} tiles but {len(groups)} groups")
    grouped = groups is not None and any(g is not None for g in groups)
    ids = group_ids(groups) if grouped else np.arange(n_tiles, dtype=np.int64)
    return Resamples(unit_ids=ids, n_resamples=int(n_resamples), seed=int(seed), grouped=grouped)


# ----------------------------------------------------------------------------- scores on weighted tiles


def _indicator(columns: np.ndarray, width: int) -> sparse.csr_matrix:
    """[n, width] with a 1 at (i, columns[i]): weights @ it sums the weights per column."""
    n = len(columns)
    return sparse.csr_matrix((np.ones(n), (np.arange(n), columns)), shape=(n, width))


def _sum_by(weights: np.ndarray, indicator: sparse.csr_matrix) -> np.ndarray:
    """[b, n] weights summed per column of the indicator: [b, width]."""
    return np.asarray((indicator.T @ weights.T).T)


def _kappa(cm: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """Cohen's kappa of confusion matrices [b, K, K] with disagreement weights [K, K] (sklearn's form)."""
    total = cm.sum(axis=(1, 2))
    expected = cm.sum(axis=2)[:, :, None] * cm.sum(axis=1)[:, None, :] / total[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - (penalty * cm).sum(axis=(1, 2)) / (penalty * expected).sum(axis=(1, 2))


def _auroc(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Weighted AUROC of ``scores`` for the ``positive`` tiles, per redraw: the weighted share of
    (positive, negative) pairs ranked right, ties counting half; NaN where a side has no weight."""
    _, rank = np.unique(scores, return_inverse=True)
    by_score = _indicator(rank.ravel(), int(rank.max()) + 1)
    pos = _sum_by(weights * positive, by_score)  # [b, distinct scores], ascending
    neg = _sum_by(weights * ~positive, by_score)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def _chunk_scores(
    weights: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray | None,
    k: int,
    ordinal: bool,
    positive: int | None,
) -> dict[str, np.ndarray]:
    cm = _sum_by(weights, _indicator(y_true * k + y_pred, k * k)).reshape(-1, k, k)  # [b, true, predicted]
    total = cm.sum(axis=(1, 2))
    hits = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = hits / support  # NaN for a class not drawn: balanced accuracy averages the drawn ones
        # NaN for a class neither drawn nor predicted: macro F1 averages the others, as sklearn does
        f1 = np.where(support + predicted > 0, 2 * hits / (support + predicted), np.nan)
    ids = np.arange(k)
    plain, quadratic = (ids[:, None] != ids[None, :]).astype(np.float64), (ids[:, None] - ids[None, :]) ** 2.0
    out = {
        "accuracy": hits.sum(axis=1) / total,
        "balanced_accuracy": _nanmean_rows(recall),
        "macro_f1": _nanmean_rows(f1),
        "cohen_kappa": _kappa(cm, quadratic if ordinal else plain),
        "positive_f1": f1[:, positive] if positive is not None else np.full(len(cm), np.nan),
        "weighted_f1": (np.nan_to_num(f1) * support).sum(axis=1) / total,
        "quadratic_kappa": _kappa(cm, quadratic),
        "auroc": np.full(len(cm), np.nan),
    }
    if probs is not None:
        if k == 2:
            out["auroc"] = _auroc(weights, y_true == 1, probs[:, 1])
        else:  # one-vs-rest, macro: NaN as soon as one class is not drawn
            out["auroc"] = np.mean([_auroc(weights, y_true == c, probs[:, c]) for c in range(k)], axis=0)
    return out


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Row means over the finite entries; NaN for a row without any (no warning)."""
    finite = np.isfinite(values)
    counts = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, values, 0.0).sum(axis=1) / np.where(counts > 0, counts, np.nan)


def _checked(
    n: int, y_true: np.ndarray, predictions: Sequence[tuple[np.ndarray, np.ndarray | None]], n_classes: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray | None]]]:
    """The labels and predictions as int64 / float64 arrays of ``n`` tiles, or a ValueError."""
    y_true = np.asarray(y_true, dtype=np.int64)
    checked = []
    for y_pred, probs in predictions:
        y_pred = np.asarray(y_pred, dtype=np.int64)
        if y_true.shape != (n,) or y_pred.shape != (n,):
            raise ValueError(f"{n} tiles, but labels {y_true.shape} and predictions {y_pred.shape}")
        if probs is not None:
            probs = np.asarray(probs, dtype=np.float64)
            if probs.shape != (n, n_classes):
                raise ValueError(f"probs must be [{n}, {n_classes}], got {list(probs.shape)}")
        checked.append((y_pred, probs))
    return y_true, checked


def resampled_scores(
    redraws: Resamples,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray | None,
    n_classes: int,
    ordinal: bool = False,
) -> dict[str, np.ndarray]:
    """Each score of :data:`CLASSIFICATION_SCORES` on each redraw, float64 [n_resamples] (NaN: undefined)."""
    return resampled_scores_of(redraws, y_true, [(y_pred, probs)], n_classes, ordinal)[0]


def resampled_scores_of(
    redraws: Resamples,
    y_true: np.ndarray,
    predictions: Sequence[tuple[np.ndarray, np.ndarray | None]],
    n_classes: int,
    ordinal: bool = False,
) -> list[dict[str, np.ndarray]]:
    """:func:`resampled_scores` of several (predictions, probabilities) of the same tiles, in one pass
    over the redraws (drawing them is shared: many few-label episodes cost little more than one)."""
    y_true, checked = _checked(len(redraws.unit_ids), y_true, predictions, n_classes)
    positive = positive_class(y_true, n_classes)  # of the test set itself: one class on every redraw
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in checked]
    for weights in redraws.weights():
        for part, (y_pred, probs) in zip(parts, checked):
            part.append(_chunk_scores(weights, y_true, y_pred, probs, n_classes, ordinal, positive))
    return [{score: np.concatenate([c[score] for c in part]) for score in CLASSIFICATION_SCORES} for part in parts]


def plain_scores(
    y_true: np.ndarray,
    predictions: Sequence[tuple[np.ndarray, np.ndarray | None]],
    n_classes: int,
    ordinal: bool = False,
) -> list[dict[str, float | None]]:
    """Each prediction's scores on the test set itself (every tile once; None where undefined), by the
    redraws' formulas: for the hundreds of few-label episodes whose mean is one figure, where
    :func:`ssl_path.evaluation.metrics.classification_metrics` (scikit-learn, 20-30 ms a call) would
    take minutes. Equal to it score by score (tests/evaluation/test_bootstrap.py)."""
    y_true, checked = _checked(len(y_true), y_true, predictions, n_classes)
    ones = np.ones((1, len(y_true)))
    positive = positive_class(y_true, n_classes)
    scored = [_chunk_scores(ones, y_true, y_pred, probs, n_classes, ordinal, positive) for y_pred, probs in checked]
    return [{s: float(v[0]) if np.isfinite(v[0]) else None for s, v in one.items()} for one in scored]


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> list[float] | None:
    """The two-sided percentile interval of bootstrap values; None where fewer than half are defined."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) == 0 or len(finite) < 0.5 * len(values):
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def bootstrap_ci(
    redraws: Resamples,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray | None,
    n_classes: int,
    ordinal: bool = False,
) -> dict[str, list[float] | None]:
    """The 95 % percentile interval of each score of one probe's predictions."""
    scores = resampled_scores(redraws, y_true, y_pred, probs, n_classes, ordinal)
    return {score: percentile_interval(values) for score, values in scores.items()}


def paired_difference(
    redraws: Resamples,
    y_true: np.ndarray,
    a: tuple[np.ndarray, np.ndarray | None],
    b: tuple[np.ndarray, np.ndarray | None],
    n_classes: int,
    ordinal: bool = False,
) -> dict[str, list[float] | None]:
    """The 95 % interval of score(A) - score(B), A and B being (predictions, probabilities) of the same
    test tiles, both scored on the same redraws."""
    first, second = resampled_scores_of(redraws, y_true, [a, b], n_classes, ordinal)
    return {score: percentile_interval(first[score] - second[score]) for score in CLASSIFICATION_SCORES}


def combined_interval(
    centre: float | None, test_interval: Sequence[float] | None, seed_half_width: float | None
) -> list[float] | None:
    """An interval around ``centre`` for two independent sources of error, each side the root sum of
    squares of ``test_interval``'s side (a bootstrap over test redraws) and ``seed_half_width`` (e.g.
    Student's t over training draws): it is the test interval when the seeds agree, and the t-interval
    when the test redraws do. None without a centre; the t side alone without a test interval.

    A percentile interval need not hold the centre (a skewed score, a mean of per-seed figures); then
    its bound on that side is kept and only widened outwards by what the seeds add, never mirrored."""
    if centre is None:
        return None
    seeds = 0.0 if seed_half_width is None else float(seed_half_width)
    if test_interval is None:
        return None if seed_half_width is None else [centre - seeds, centre + seeds]
    low, high = test_interval
    below, above = centre - low, high - centre  # negative: that bound lies beyond the centre
    return [low - float(np.hypot(below, seeds) - abs(below)), high + float(np.hypot(above, seeds) - abs(above))]
