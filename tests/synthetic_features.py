"""Synthetic feature sets with a known answer, shared by the probe tests."""
from __future__ import annotations

import numpy as np

from probes.features import FeatureSet


def blobs(n_per_class: int, n_classes: int = 3, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well separated gaussian clusters, class c around 10 * e_c."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    feats = rng.normal(size=(len(labels), dim)) + 10.0 * np.eye(dim)[labels]
    return feats.astype(np.float32), labels


def feature_set(feats: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], groups=None) -> FeatureSet:
    n = len(feats)
    return FeatureSet(
        features=feats, labels=labels, classes=classes, groups=list(groups) if groups is not None else [None] * n,
        domains=[None] * n, paths=[f"{i}.png" for i in range(n)], encoder_ref="synthetic", encoder_hash="0",
        data_hash="0", pool="cls",
    )
