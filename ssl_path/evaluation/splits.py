"""Train/test splits a probe can carve from one labelled set, with no leakage between slides.

- :func:`group_split`: a held-out share of whole groups (patients, slides), stratified by label as
  far as whole groups allow (scikit-learn's ``StratifiedGroupKFold``, first fold).
- :func:`domain_folds`: leave one domain out, for every domain (e.g. each MIDOG scanner): train on
  all the others, test on it.

Both work on plain label/group/domain sequences and return index arrays; records without a group
count as groups of their own (:func:`group_ids`), so they can never link train and test.
:func:`sample_subset` draws the stratified label fractions and k-shot sets of few-label regimes.
:func:`n_folds` is the fold count of any held-out share in whole groups, the linear probe's
validation part included.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ssl_path.core.errors import UserError

DEFAULT_TEST_FRACTION = 0.2  # the share of a set held out as its test split when none is given


def group_ids(groups: Sequence[str | None]) -> np.ndarray:
    """An integer per group; a record without a group is a group of its own."""
    ids: dict[str, int] = {}
    out = np.empty(len(groups), dtype=np.int64)
    for i, group in enumerate(groups):
        key = f"\0row{i}" if group is None else str(group)
        out[i] = ids.setdefault(key, len(ids))
    return out


def n_folds(held_out_fraction: float, n_groups: int) -> int:
    """How many group folds hold out about ``held_out_fraction`` each: ~1/fraction, at least 2, at most
    one per group (``StratifiedGroupKFold`` refuses more folds than groups)."""
    return min(n_groups, max(2, round(1 / held_out_fraction)))


def group_split(
    labels: Sequence[int], groups: Sequence[str | None], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): about ``test_fraction`` of the records, in whole groups."""
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must lie strictly between 0 and 1, got {test_fraction}")
    ids = group_ids(groups)
    n_groups = len(np.unique(ids))
    if n_groups < 2:
        raise UserError(f"a group split needs at least 2 groups (slides/patients); the set has {n_groups}")
    n_splits = n_folds(test_fraction, n_groups)
    labels = np.asarray(labels)
    if np.all(np.unique(labels, return_counts=True)[1] < n_splits):
        labels = np.zeros_like(labels)  # no class fills a fold: a plain group split (sklearn refuses to stratify)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns that a class is smaller than a fold: it is stratified as far as it can be.
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn.model_selection._split")
        train, test = next(folds.split(np.zeros(len(ids)), labels, ids))
    return np.sort(train), np.sort(test)


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
