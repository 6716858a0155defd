"""Train/test splits a probe can carve from one labelled set, with no leakage between slides.

- :func:`group_split`: a held-out share of whole groups (patients, slides), stratified by label as
  far as whole groups allow: m of the k folds of one scikit-learn ``StratifiedGroupKFold``, with the
  fewest folds whose m/k comes within about a point of the share asked for, folds of at least
  :data:`MIN_GROUPS_PER_FOLD` groups (:func:`held_out_folds`; 0.3 is 3 of 10 folds, 0.8 is 4 of 5).
  Callers record the share obtained (``test_share`` beside ``test_fraction``): whole groups make it
  differ by up to a few points, more on a small set.
- :func:`domain_folds`: leave one domain out, for every domain (e.g. each MIDOG scanner): train on
  all the others, test on it.

Both work on plain label/group/domain sequences and return index arrays; records without a group
count as groups of their own (:func:`group_ids`), so they can never link train and test.
:func:`sample_subset` draws the stratified label fractions and k-shot sets of few-label regimes.
:func:`grouped_holdout` is that held-out share in whole groups for any caller, the linear probe's
validation part included.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ssl_path.core.errors import UserError

DEFAULT_TEST_FRACTION = 0.2  # the share of a set held out as its test split when none is given
# Folds of fewer groups are filled unevenly by StratifiedGroupKFold's greedy assignment (the first
# folds most: 12 AMi-Br slides in 10 folds held out 50 % for 0.3), which a finer m/k cannot repay.
MIN_GROUPS_PER_FOLD = 4


def group_ids(groups: Sequence[str | None]) -> np.ndarray:
    """An integer per group; a record without a group is a group of its own."""
    ids: dict[str, int] = {}
    out = np.empty(len(groups), dtype=np.int64)
    for i, group in enumerate(groups):
        key = f"\0row{i}" if group is None else str(group)
        out[i] = ids.setdefault(key, len(ids))
    return out


def held_out_folds(held_out_fraction: float, n_groups: int) -> tuple[int, int]:
    """(k, m): hold out m of k group folds, 1 <= m < k: the smallest k whose nearest m/k lies within
    :func:`share_tolerance` of ``held_out_fraction``, else the nearest m/k of all (smallest k among
    ties). k is at most ``n_groups`` // :data:`MIN_GROUPS_PER_FOLD`, or the k of one fold of about
    the share (1/k nearest it, as many as there are groups at most) where that is more.

    One fold alone could only hold out 1/2, 1/3, 1/4, ... (0.4, 0.6 and 0.8 would all be 0.5)."""
    one_fold = min(n_groups, max(2, round(1 / held_out_fraction)))
    most = max(one_fold, n_groups // MIN_GROUPS_PER_FOLD)
    candidates = [(k, min(k - 1, max(1, round(held_out_fraction * k)))) for k in range(2, most + 1)]

    def error(km: tuple[int, int]) -> float:
        return abs(km[1] / km[0] - held_out_fraction)

    tolerance = share_tolerance(held_out_fraction)
    close = [km for km in candidates if error(km) <= tolerance + 1e-12]  # 1e-12: 0.37 vs 3/8 in floats
    return close[0] if close else min(candidates, key=lambda km: (error(km), km[0]))


def share_tolerance(held_out_fraction: float) -> float:
    """How near m/k must come to a held-out share: one percentage point, or a tenth of the smaller
    side for small shares (0.05 may be 1/19 or 1/20, not 1/17).

    Why not the nearest m/k outright: a finer ratio needs more, smaller folds, which whole groups fill
    less evenly (AMi-Br, 88 slides: 9 of 30 folds held out 36 % for 0.3, 29 of 88 held out 63-69 % for
    0.33). Whole groups make the share obtained uncertain by about a point anyway; callers record it."""
    return min(0.01, min(held_out_fraction, 1 - held_out_fraction) / 10)


def grouped_holdout(
    labels: Sequence[int], ids: np.ndarray, held_out_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(kept indices, held-out indices), sorted: m of the k folds (:func:`held_out_folds`) of one
    shuffled ``StratifiedGroupKFold`` over the integer group ``ids``, so no group is on both sides and
    every fold, hence their union, keeps the class proportions as far as whole groups allow."""
    n_splits, n_held = held_out_folds(held_out_fraction, len(np.unique(ids)))
    labels = np.asarray(labels)
    if np.all(np.unique(labels, return_counts=True)[1] < n_splits):
        labels = np.zeros_like(labels)  # no class fills a fold: a plain group split (sklearn refuses to stratify)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns that a class is smaller than a fold: it is stratified as far as it can be.
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn.model_selection._split")
        # The folds come from one assignment of groups to folds, so the first m are disjoint.
        tests = [test for _, test in itertools.islice(folds.split(np.zeros(len(ids)), labels, ids), n_held)]
    held_out = np.sort(np.concatenate(tests))
    return np.setdiff1d(np.arange(len(ids)), held_out), held_out


def group_split(
    labels: Sequence[int], groups: Sequence[str | None], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): about ``test_fraction`` of the records, in whole groups
    (:func:`grouped_holdout`)."""
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must lie strictly between 0 and 1, got {test_fraction}")
    ids = group_ids(groups)
    n_groups = len(np.unique(ids))
    if n_groups < 2:
        raise UserError(f"a group split needs at least 2 groups (slides/patients); the set has {n_groups}")
    return grouped_holdout(labels, ids, test_fraction, seed)


def domain_folds(domains: Sequence[str | None]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(domain, train indices, test indices)]`` leaving each domain out once, in name order."""
    missing = sum(d is None for d in domains)
    if missing:
        raise UserError(f"--leave-one-domain-out: {missing} images have no domain (scanner, site); every one needs one")
    names = sorted(set(domains))
    if len(names) < 2:
        raise UserError(f"--leave-one-domain-out needs at least 2 domains; the set has {names}")
    values = np.asarray(domains, dtype=object)
    return [(name, np.flatnonzero(values != name), np.flatnonzero(values == name)) for name in names]


def sample_subset(
    labels: np.ndarray,
    fraction: float | None = None,
    shots: int | None = None,
    seed: int | Sequence[int] = 0,
    n_classes: int | None = None,
) -> np.ndarray:
    """Sorted row indices of a stratified random subset of the labelled rows of ``labels``.

    Exactly one of ``fraction`` (each class keeps ``round(fraction * its size)`` rows, at least one, so
    the class proportions stay within one image of the full set's) or ``shots`` (``min(shots, its size)``
    rows per class). Rows labelled -1 are never drawn. ``seed`` goes to ``np.random.default_rng`` (an int
    or a sequence of ints, e.g. ``(seed, episode)``); the same seed gives the same subset. With
    ``n_classes``, a class in ``range(n_classes)`` without any row is a UserError.
    """
    if (fraction is None) == (shots is None):
        raise ValueError("give exactly one of fraction and shots")
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f"a label fraction must lie in (0, 1], got {fraction}")
    if shots is not None and shots < 1:
        raise UserError(f"shots per class must be >= 1, got {shots}")
    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels[labels >= 0])
    if n_classes is not None:
        empty = sorted(set(range(n_classes)) - set(present.tolist()))
        if empty:
            raise UserError(f"classes {empty} have no training images; every class needs at least one")
    if len(present) == 0:
        raise UserError("the training set has no labelled images")
    rng = np.random.default_rng(seed)
    picked = []
    for c in present:  # ascending class order, so one seed always makes the same draws
        members = np.flatnonzero(labels == c)
        n = max(1, round(fraction * len(members))) if fraction is not None else min(shots, len(members))
        picked.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(picked))
