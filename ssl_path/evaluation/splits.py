"""Train/test splits a probe can carve from one labelled set, with no leakage between slides.

- :func:`group_split`: a held-out share of whole groups (patients, slides), stratified by label as
  far as whole groups allow (scikit-learn's ``StratifiedGroupKFold``, first fold).
- :func:`domain_folds`: leave one domain out, for every domain (e.g. each MIDOG scanner): train on
  all the others, test on it.

Both work on plain label/group/domain sequences and return index arrays; records without a group
count as groups of their own (:func:`group_ids`), so they can never link train and test.
:func:`n_folds` is the fold count of any held-out share in whole groups, the linear probe's
validation part included.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ssl_path.core.errors import UserError


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
    folds = StratifiedGroupKFold(n_splits=n_folds(test_fraction, n_groups), shuffle=True, random_state=seed)
    train, test = next(folds.split(np.zeros(len(ids)), np.asarray(labels), ids))
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
