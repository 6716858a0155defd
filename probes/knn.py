"""kNN probe of a frozen encoder, in the two protocols pathology papers report.

- DINO (Caron et al. 2021): L2-normalised features, the k nearest training images by cosine
  similarity, each voting for its class with weight ``exp(sim / T)`` (T = 0.07); the per-class sums,
  normalised, are the class probabilities. Reported for several k (default 10, 20, 50).
- UNI (Chen et al. 2024): features centred on the training mean, then L2-normalised; a plain
  majority vote of the 20 nearest, as UNI's scikit-learn ``KNeighborsClassifier(n_neighbors=20)``
  (uniform weights) votes: a tie goes to the tied class listed first (the lowest class id), however
  similar its voters; probabilities are the vote fractions.

Search is exact inner product with faiss (``IndexFlatIP``), on every GPU faiss sees, else on the CPU;
``--index hnsw`` or ``ivf`` trade exactness for speed on memories of millions of tiles (recall in
``benchmarks/RESULTS.md``).

    python -m probes.knn --ckpt REF --train SPEC --test SPEC [--k 10 20 50] [--compare REF2]
        [--bootstrap 1000] [--out results.json]

Train and test are data SPECs (see :mod:`ssl_path.data.readers.spec`); keeping the slides of one
split out of the other is up to them (e.g. ``?group=...`` or ``?domain=...``). The number of groups
the two share is reported, never corrected. Every row carries 95 % bootstrap CIs over the test
slides, and with ``--compare`` the paired difference to a second encoder (:mod:`probes.common`).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import faiss
import numpy as np

from probes.common import (
    Prediction,
    add_compare_argument,
    add_probe_arguments,
    align_labels,
    check_reference,
    check_sets,
    format_table,
    prefixed,
    probe_request,
    probe_splits,
    report,
    score_rows,
    shared_groups,
)
from probes.features import FeatureSet
from ssl_path.core.cli import Parser, make_parser
from ssl_path.core.errors import UserError, run_cli
from ssl_path.evaluation.bootstrap import DEFAULT_RESAMPLES
from ssl_path.evaluation.features import l2_normalize

__all__ = [
    "TITLE",
    "DEFAULT_KS",
    "DEFAULT_TEMPERATURE",
    "UNI_K",
    "search",
    "build_index",
    "knn_predict",
    "dino_vote",
    "uni_knn_predict",
    "run_knn",
    "align_labels",
    "clamp_ks",
    "check_sets",
    "shared_groups",
    "format_table",
    "build_parser",
    "main",
]

TITLE = "kNN probe (frozen encoder)"
DEFAULT_KS = (10, 20, 50)
DEFAULT_TEMPERATURE = 0.07
UNI_K = 20
INDEXES = ("flat", "hnsw", "ivf")
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
IVF_NPROBE = 16


def build_index(train: np.ndarray, kind: str = "flat") -> faiss.Index:
    """A faiss inner-product index over ``train`` rows.

    ``flat``: exact, on every GPU faiss sees. For memories of millions of tiles, where exact search
    is too slow, two approximate ones: ``hnsw`` (graph search, M=32) and ``ivf`` (k-means cells,
    4 sqrt(N) of them, 16 probed per query). Their recall is measured by ``benchmarks/bench_knn.py``.
    """
    train = np.ascontiguousarray(train, dtype=np.float32)
    if kind == "flat":
        index = faiss.IndexFlatIP(train.shape[1])
        if faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(train.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    elif kind == "ivf":
        n_cells = max(1, min(int(4 * np.sqrt(len(train))), len(train) // 39))  # faiss wants >= 39 rows per cell
        cells = faiss.IndexFlatIP(train.shape[1])
        index = faiss.IndexIVFFlat(cells, train.shape[1], n_cells, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        index.nprobe = min(IVF_NPROBE, n_cells)
    else:
        raise ValueError(f"index must be one of {INDEXES}, not {kind!r}")
    index.add(train)
    return index


def search(train: np.ndarray, queries: np.ndarray, k: int, index: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products: (similarities [M, k] descending, train indices [M, k]); exact with ``flat``."""
    if not 1 <= k <= len(train):
        raise ValueError(f"k must lie in [1, {len(train)}] (the training set size), got {k}")
    built = build_index(train, index)
    if index == "hnsw":
        built.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    sims, idx = built.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return sims.astype(np.float64), idx


def _check_inputs(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray, n_classes: int) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {train_feats.shape} and {test_feats.shape}")
    if train_labels.shape != (len(train_feats),):
        raise ValueError(f"{len(train_feats)} training rows but labels of shape {train_labels.shape}")
    if len(train_labels) and (train_labels.min() < 0 or train_labels.max() >= n_classes):
        raise ValueError(f"training labels must lie in [0, {n_classes}) (drop unlabeled rows first)")


def knn_predict(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    k: int,
    temperature: float,
    n_classes: int,
    index: str = "flat",
) -> tuple[np.ndarray, np.ndarray]:
    """DINO weighted kNN: (predicted class [M], class probabilities [M, n_classes])."""
    train_feats, test_feats = np.asarray(train_feats), np.asarray(test_feats)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    _check_inputs(train_feats, train_labels, test_feats, n_classes)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sims, idx = search(l2_normalize(train_feats), l2_normalize(test_feats), k, index)
    return dino_vote(sims, train_labels[idx], temperature, n_classes)


def dino_vote(
    sims: np.ndarray, neighbour_labels: np.ndarray, temperature: float, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """DINO's vote of each query's neighbours (similarities and labels [M, k], most similar first)."""
    # Shifting by each row's best similarity leaves the vote ratios unchanged and exp() bounded.
    weights = np.exp((sims - sims[:, :1]) / temperature)  # [M, k]
    votes = np.zeros((len(sims), n_classes))
    np.add.at(votes, (np.arange(len(sims))[:, None], neighbour_labels), weights)
    probs = votes / votes.sum(axis=1, keepdims=True)
    return probs.argmax(axis=1), probs


def uni_knn_predict(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    k: int = UNI_K,
    n_classes: int | None = None,
    index: str = "flat",
) -> tuple[np.ndarray, np.ndarray]:
    """UNI majority-vote kNN: (predicted class [M], vote fractions [M, n_classes]); a tied vote goes to
    the lowest class id, as in scikit-learn's ``KNeighborsClassifier``."""
    train_feats = np.asarray(train_feats, dtype=np.float64)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    n_classes = int(train_labels.max()) + 1 if n_classes is None else n_classes
    _check_inputs(train_feats, train_labels, np.asarray(test_feats), n_classes)
    centre = train_feats.mean(axis=0, keepdims=True)
    _, idx = search(l2_normalize(train_feats - centre), l2_normalize(np.asarray(test_feats) - centre), k, index)
    counts = np.zeros((len(idx), n_classes))
    np.add.at(counts, (np.arange(len(idx))[:, None], train_labels[idx]), 1.0)
    # argmax takes the first of tied maxima: the lowest class id, scikit-learn's (hence UNI's) rule.
    return counts.argmax(axis=1), counts / k


def clamp_ks(ks: Sequence[int], n_train: int, what: str = "kNN") -> list[int]:
    """Each k, at most the training set size (with a warning on stderr), in the given order."""
    used = []
    for k in ks:
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        if k > n_train:
            print(
                f"warning: {what} k={k} is more than the {n_train} training images; using k={n_train}", file=sys.stderr
            )
        used.append(min(k, n_train))
    return used


def _knn_runs(ks: Sequence[int], n_train: int) -> list[tuple[str, int, int, str]]:
    """(row name, k asked, k used, protocol) of every row: the DINO kNN at each k, then UNI's."""
    runs = [(f"k{k}", k, used, "dino") for k, used in zip(ks, clamp_ks(ks, n_train, "DINO kNN"))]
    runs.append((f"uni_k{UNI_K}", UNI_K, clamp_ks([UNI_K], n_train, "UNI kNN")[0], "uni"))
    return runs


def _knn_predictions(
    train_set: FeatureSet,
    test_set: FeatureSet,
    runs: Sequence[tuple[str, int, int, str]],
    temperature: float,
    index: str,
) -> dict[str, Prediction]:
    """Every row's predictions, from the labelled training rows (``train_set`` holds only those)."""
    train_feats, train_labels = train_set.features, train_set.labels
    n_classes = len(train_set.classes)
    _check_inputs(train_feats, train_labels, test_set.features, n_classes)
    # One search at the largest k serves every DINO k: each smaller k's neighbours are its prefix.
    max_k = max((used for _, _, used, protocol in runs if protocol == "dino"), default=0)
    if max_k:
        sims, idx = search(l2_normalize(train_feats), l2_normalize(test_set.features), max_k, index)
    out: dict[str, Prediction] = {}
    for name, k, used, protocol in runs:
        settings: dict[str, Any] = {"protocol": protocol, "k": k, "k_used": used}
        if protocol == "dino":
            pred, probs = dino_vote(sims[:, :used], train_labels[idx[:, :used]], temperature, n_classes)
            settings["temperature"] = temperature
        else:
            pred, probs = uni_knn_predict(train_feats, train_labels, test_set.features, used, n_classes, index)
        out[name] = Prediction(settings, pred, probs)
    return out


def run_knn(
    train_set: FeatureSet,
    test_set: FeatureSet,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    index: str = "flat",
    ordinal: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    reference: tuple[FeatureSet, FeatureSet] | None = None,
    where: str = "",
) -> dict[str, dict[str, Any]]:
    """Metrics rows ``{"k10": ..., "k20": ..., "uni_k20": ...}`` for the DINO kNN at each k and the UNI kNN.

    Every row holds its protocol, the k asked for and the k used (clamped to the training set size),
    the :func:`ssl_path.evaluation.metrics.classification_metrics` of the test set and their bootstrap
    CIs (:func:`probes.common.score_rows`: ``n_resamples`` redraws of the test groups, seeded by
    ``seed``). ``reference``: another encoder's (train, test) features of the same rows, for paired
    differences; ``where`` names the split in warnings. Unlabeled training rows are left out; test labels are matched to the training
    classes by name.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labelled = np.flatnonzero(train_set.labels >= 0)
    if len(labelled) == 0:
        raise UserError("the training set has no labelled images")
    classes = train_set.classes
    y_true = align_labels(test_set, classes)
    runs = _knn_runs(ks, len(labelled))
    predictions = _knn_predictions(train_set.select(labelled), test_set, runs, temperature, index)
    theirs = None
    if reference is not None:
        check_reference(train_set, test_set, reference)
        theirs = _knn_predictions(reference[0].select(labelled), reference[1], runs, temperature, index)
    return score_rows(
        predictions, y_true, classes, test_set.groups, "kNN", ordinal, n_resamples, seed, theirs, where=where
    )


# ----------------------------------------------------------------------------- command line


def build_parser() -> Parser:
    p = make_parser(
        "python -m probes.knn",
        "kNN probe of a frozen encoder (DINO weighted vote at each k, and UNI's 20-NN majority vote).",
    )
    p.add_argument(
        "--k", type=int, nargs="+", default=list(DEFAULT_KS), help="neighbours for the DINO kNN (default 10 20 50)"
    )
    p.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="DINO vote temperature (default %(default)s)"
    )
    p.add_argument(
        "--index",
        choices=INDEXES,
        default="flat",
        help="flat: exact search; hnsw or ivf: approximate, for millions of training tiles (default %(default)s)",
    )
    p.add_argument(
        "--ordinal",
        action="store_true",
        help="the classes are ordered grades, in class order: Cohen's kappa is quadratic-weighted",
    )
    add_compare_argument(p)
    return add_probe_arguments(p, seed_help="seed of the bootstrap redraws; kNN itself is deterministic")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if any(k < 1 for k in args.k):
        raise UserError(f"--k values must be >= 1, got {args.k}")
    request = probe_request(args)
    splits, split_info = probe_splits(request, probe="kNN")
    rows: dict[str, dict[str, Any]] = {}
    for inputs in splits:
        split_rows = run_knn(
            inputs.train,
            inputs.test,
            args.k,
            args.temperature,
            args.index,
            args.ordinal,
            request.bootstrap,
            request.seed,
            inputs.reference,
            f" ({inputs.name})" if inputs.name else "",
        )
        rows.update(prefixed(inputs.name, split_rows))
    report(
        request,
        "knn",
        "image-classification",
        TITLE,
        splits[0],
        rows,
        format_table(rows, reference=request.compare),
        split=split_info,
        config={
            "ks": args.k,
            "temperature": args.temperature,
            "uni_k": UNI_K,
            "index": args.index,
            "ordinal": args.ordinal,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
