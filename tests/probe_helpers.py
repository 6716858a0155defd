"""Shared by the probe tests: synthetic feature sets with a known answer, and command-line checks."""

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
        features=feats,
        labels=labels,
        classes=classes,
        groups=list(groups) if groups is not None else [None] * n,
        domains=[None] * n,
        paths=[f"{i}.png" for i in range(n)],
        encoder_ref="synthetic",
        encoder_hash="0",
        data_hash="0",
        pool="cls",
    )


def probe_args(train: str, test: str, tmp_path) -> list[str]:
    """A probe command line on real images with a tiny random ViT at 64 px and a private feature cache."""
    return [
        "--ckpt",
        "timm:vit_tiny_patch16_224",
        "--train",
        train,
        "--test",
        test,
        "--input-size",
        "64",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]


def assert_one_line_error(capsys, *fragments: str) -> None:
    """The command failed as a user error should: one ``error:`` line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
