"""Statistics over seeds: what an evaluation repeated with several seeds reports for each score.

- :func:`summarize`: mean, sample standard deviation (ddof 1) and the two-sided 95 % confidence
  interval of the mean from Student's t with ``n - 1`` degrees of freedom (scipy), as computed, not
  clipped to the score's range.
- :func:`aggregate`: one results row from per-seed metric rows, each score as ``<score>`` (the mean),
  ``<score>_std`` and ``<score>_ci95``, with the per-seed values kept beside them.

A None value (e.g. AUROC of a test set that misses a class) is left out rather than counted as zero.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from ssl_path.evaluation.metrics import SCORES

__all__ = ["CONFIDENCE", "summarize", "aggregate"]

CONFIDENCE = 0.95  # the "95" of every ``<score>_ci95`` key


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "ci95", "n"}`` of per-seed values; ``n`` counts the values that are not None.

    The mean needs one value, std and CI two; what cannot be computed is None.
    """
    kept = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = len(kept)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(kept.mean())
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": 1}
    std = float(kept.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def aggregate(per_seed: Sequence[Mapping[str, Any]], scores: Sequence[str] = SCORES) -> dict[str, Any]:
    """One row from per-seed metric rows: ``<score>``, ``<score>_std`` and ``<score>_ci95`` for each of
    ``scores`` (default: the classification scores), the per-seed values under ``per_seed`` and ``n_seeds``."""
    row: dict[str, Any] = {"n_seeds": len(per_seed)}
    for score in scores:
        summary = summarize([r.get(score) for r in per_seed])
        row[score] = summary["mean"]
        row[f"{score}_std"] = summary["std"]
        row[f"{score}_ci95"] = summary["ci95"]
    row["per_seed"] = {score: [r.get(score) for r in per_seed] for score in scores}
    return row
