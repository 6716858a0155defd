"""Operations on rows of frozen features that more than one evaluation applies.

:func:`l2_normalize` gives the cosine geometry the kNN probe searches, the prototype probe centres and
averages in, and the 2-D maps show.
"""

from __future__ import annotations

import numpy as np

__all__ = ["l2_normalize"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows [N, D] scaled to unit length, C-contiguous, zero rows left zero.

    A float array keeps its dtype (float32 features stay float32: no float64 copy of a memory of
    millions of tiles); any other becomes float64.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))
