"""KoLeo: a regulariser that spreads a batch of features uniformly over the unit sphere.

The Kozachenko-Leonenko differential-entropy estimator, turned into a loss by Sablayrolles et al.
2019, "Spreading vectors for similarity search" (ICLR, arXiv:1806.03198) and used by DINOv2 (Oquab et
al. 2023, arXiv:2304.07193) on the student's class tokens: with features L2-normalised, minimise
``-mean_i log(d_i)`` where ``d_i`` is the distance from feature i to its nearest neighbour in the
batch. Pushing nearest neighbours apart raises the entropy of the feature distribution.

Numerical safety: with small batches two features can coincide (duplicate tiles, early training),
making ``d_i = 0`` and the loss infinite; distances are therefore computed with an ``eps`` inside the
norm and inside the log, and everything runs in float32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

__all__ = ["koleo_loss"]


def _nearest_neighbours(unit: Tensor) -> Tensor:
    """Index of each row's most similar other row (max dot product, itself excluded)."""
    with torch.no_grad():
        similarity = unit @ unit.t()
        # Cosine similarity is >= -1, so -2 on the diagonal can never be the maximum. The in-place fill
        # is safe: under no_grad this tensor is not part of any graph.
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(dim=1)


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo loss of ``features`` [B, D] as a float32 scalar; zero (still in the graph) when B < 2."""
    if features.ndim != 2:
        raise ValueError(f"features must be [B, D], got shape {tuple(features.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if features.shape[0] < 2:
        return features.float().sum() * 0.0
    # Autocast would run the matmul and distances in half precision, where near-duplicates collapse.
    with torch.autocast(device_type=features.device.type, enabled=False):
        unit = nnf.normalize(features.float(), p=2.0, dim=-1, eps=eps)
        neighbour = unit[_nearest_neighbours(unit)]
        distance = nnf.pairwise_distance(unit, neighbour, p=2.0, eps=eps)
        return -torch.log(distance + eps).mean()
