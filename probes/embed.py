"""2-D maps (t-SNE, UMAP) of a frozen encoder's features, coloured by label and by domain.

A quick look at what an encoder separates: classes that form their own islands, or scanners
(domains) that do, the batch effect a pathology encoder should not have.

    python -m probes.embed --ckpt REF --data SPEC --out DIR [--methods tsne umap] [--max-points 5000]

Pipeline: features (cached, see :mod:`probes.features`) -> at most ``--max-points`` rows, sub-sampled
per label so that rare classes stay -> L2-normalised (cosine geometry, as the kNN probe uses) ->
PCA to 50 dimensions when there are more -> each method's 2-D map.

Writes into DIR: ``<method>.png`` (panels coloured by label and by domain), ``coordinates.csv``
(path, label, domain, group and ``<method>_x``/``<method>_y`` for every kept point) and ``embed.json``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from probes.common import add_feature_arguments, feature_options
from probes.features import FeatureSet
from ssl_path.core.cli import Parser, add_out, add_overwrite, add_seed, make_parser
from ssl_path.core.errors import UserError, run_cli
from ssl_path.core.io import atomic_dir, atomic_path, check_out_dir, write_json
from ssl_path.data.readers import parse_spec, read_spec
from ssl_path.evaluation.features import l2_normalize

__all__ = [
    "METHODS",
    "PCA_DIMS",
    "MIN_MAX_POINTS",
    "MIN_IMAGES",
    "subsample",
    "reduce_dims",
    "clamp_perplexity",
    "clamp_neighbors",
    "tsne_map",
    "umap_map",
    "category_names",
    "plot_map",
    "write_coordinates",
    "build_parser",
    "main",
]

METHODS = ("tsne", "umap")
# PCA first is the usual practice for t-SNE (van der Maaten's own code, scikit-learn's and openTSNE's
# advice): its pairwise distances cost O(N * D), and the trailing components are mostly noise.
PCA_DIMS = 50
MIN_MAX_POINTS = 10
MIN_IMAGES = 5
UNLABELED = "unlabeled"
NO_DOMAIN = "no domain"


# ----------------------------------------------------------------------------- sampling and features


def subsample(labels: Sequence[int] | np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` rows, drawn per label (every label keeps at least one).

    Each label (``-1``, unlabeled, counts as one) keeps one row, and the rest of the budget is shared
    in proportion to its remaining rows, rounded by largest remainder; ties go to the smaller label.
    All rows when there are no more than ``max_points``. Raises ValueError when ``max_points`` is
    smaller than the number of labels, which could not all be kept.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    values, counts = np.unique(labels, return_counts=True)
    if max_points < len(values):
        raise ValueError(f"max_points={max_points} cannot keep all {len(values)} labels")
    # Integer arithmetic: the quotas are exact, so the same input gives the same split everywhere.
    spare, pool = max_points - len(values), n - len(values)
    shares = spare * (counts - 1)
    quotas = 1 + shares // pool
    leftover = max_points - int(quotas.sum())
    order = np.lexsort((values, -(shares % pool)))  # largest remainder first, then smaller label
    quotas[order[:leftover]] += 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(np.flatnonzero(labels == value), size=int(q), replace=False) for value, q in zip(values, quotas)
    ]
    return np.sort(np.concatenate(picked))


def reduce_dims(x: np.ndarray, dims: int = PCA_DIMS, seed: int = 0) -> np.ndarray:
    """PCA to at most ``dims`` components when the rows have more; else ``x`` unchanged.

    PCA cannot give more components than rows, so a small set gets ``n`` components.
    """
    if x.shape[1] <= dims:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components=min(dims, *x.shape), random_state=seed).fit_transform(x)


def clamp_perplexity(perplexity: float, n: int) -> float:
    """At most ``(n - 1) / 3``: t-SNE looks at about 3 x perplexity neighbours, and n - 1 exist."""
    return float(min(perplexity, max((n - 1) / 3.0, 1.0)))


def clamp_neighbors(neighbors: int, n: int) -> int:
    """At most ``n - 1`` (the other points), at least 2 (UMAP's minimum)."""
    return int(max(2, min(neighbors, n - 1)))


# ----------------------------------------------------------------------------- the maps


def tsne_map(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """scikit-learn t-SNE, PCA-initialised (global layout kept, run to run stable): [N, 2]."""
    from sklearn.manifold import TSNE

    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(np.ascontiguousarray(x, dtype=np.float32)).astype(np.float64)


def umap_map(x: np.ndarray, neighbors: int, seed: int) -> np.ndarray:
    """umap-learn's UMAP, euclidean on the normalised (PCA'd) rows: [N, 2].

    Imported here: numba compiles UMAP on first use, tens of seconds a t-SNE-only run need not pay.
    """
    with warnings.catch_warnings():
        # A seed makes umap run single-threaded and say so; that is the price of a reproducible map.
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=neighbors, metric="euclidean", random_state=seed)
        return np.asarray(reducer.fit_transform(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float64)


# ----------------------------------------------------------------------------- outputs


def category_names(feats: FeatureSet) -> tuple[list[str], list[str]]:
    """Per row: the class name (``unlabeled`` for -1) and the domain (``no domain`` for None)."""
    labels = [feats.classes[i] if i >= 0 else UNLABELED for i in feats.labels.tolist()]
    domains = [d if d is not None else NO_DOMAIN for d in feats.domains]
    return labels, domains


def _scatter(ax: Any, coords: np.ndarray, names: Sequence[str], title: str) -> None:
    """One panel, one colour per category; names sorted, so a name keeps its colour across maps."""
    import matplotlib.pyplot as plt

    kinds = sorted(set(names))
    cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    names_arr = np.asarray(names, dtype=object)
    # Small sets get bigger markers; many points need small, translucent ones to show density.
    size = float(np.clip(3000.0 / max(len(coords), 1), 2.0, 30.0))
    for i, kind in enumerate(kinds):
        mask = names_arr == kind
        ax.scatter(
            coords[mask, 0],
            coords[mask, 1],
            s=size,
            alpha=0.7,
            color=cmap(i % cmap.N),
            label=f"{kind} ({int(mask.sum())})",
            linewidths=0,
        )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize="small", markerscale=max(1.0, 20.0 / size), frameon=True)


def plot_map(coords: np.ndarray, labels: Sequence[str], domains: Sequence[str], title: str, path: Path) -> None:
    """A PNG at ``path``: coloured by label, and beside it by domain unless no row has one."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never a window, and no display needed
    import matplotlib.pyplot as plt

    panels = [("label", labels)]
    if any(d != NO_DOMAIN for d in domains):
        panels.append(("domain", domains))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False)
    try:
        for ax, (what, names) in zip(axes[0], panels):
            _scatter(ax, coords, names, f"by {what}")
        fig.suptitle(title)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)  # the temporary name has no .png to infer from
    finally:
        plt.close(fig)


def write_coordinates(path: Path, feats: FeatureSet, maps: dict[str, np.ndarray]) -> None:
    """``coordinates.csv``: path, label, domain, group, then x and y of each method, one row per point."""
    labels, _ = category_names(feats)
    header = ["path", "label", "domain", "group"] + [f"{m}_{axis}" for m in maps for axis in ("x", "y")]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, file in enumerate(feats.paths):
            label = "" if feats.labels[i] < 0 else labels[i]
            row = [file, label, feats.domains[i] or "", feats.groups[i] or ""]
            for coords in maps.values():
                row += [f"{coords[i, 0]:.6g}", f"{coords[i, 1]:.6g}"]
            writer.writerow(row)


# ----------------------------------------------------------------------------- command line


def build_parser() -> Parser:
    p = make_parser(
        "python -m probes.embed",
        "t-SNE / UMAP maps of a frozen encoder's features, coloured by label and by domain.",
    )
    p.add_argument("--data", required=True, metavar="SPEC", help="the set to map, e.g. amibr:DATA")
    add_out(p, help="output folder", metavar="DIR")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        metavar="METHOD",
        help=f"any of {', '.join(METHODS)} (default: both)",
    )
    p.add_argument(
        "--max-points",
        type=int,
        default=5000,
        help=f"sub-sample per label to at most this many points, >= {MIN_MAX_POINTS} (default %(default)s)",
    )
    add_seed(p, help="sub-sampling, PCA, t-SNE and UMAP seed (default %(default)s)")
    p.add_argument(
        "--perplexity",
        type=float,
        default=30.0,
        help="t-SNE perplexity, lowered to (n-1)/3 for small sets (default %(default)s)",
    )
    p.add_argument(
        "--neighbors",
        type=int,
        default=15,
        help="UMAP n_neighbors, lowered to n-1 for small sets (default %(default)s)",
    )
    add_overwrite(p)
    return add_feature_arguments(p)


def _check_args(args: argparse.Namespace) -> list[str]:
    """The methods, de-duplicated in the given order, after refusing values no run could use."""
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} in --methods; choose from {', '.join(METHODS)}")
    if args.max_points < MIN_MAX_POINTS:
        raise UserError(f"--max-points must be >= {MIN_MAX_POINTS}, got {args.max_points}")
    if not args.perplexity > 0:
        raise UserError(f"--perplexity must be > 0, got {args.perplexity}")
    if args.neighbors < 2:
        raise UserError(f"--neighbors must be >= 2, got {args.neighbors}")
    return list(dict.fromkeys(args.methods))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = _check_args(args)
    options = feature_options(args)
    # Everything that can be refused is refused before minutes go into features.
    data = read_spec(args.data)
    if len(data) < MIN_IMAGES:
        raise UserError(f"--data {args.data}: {len(data)} images; a map needs at least {MIN_IMAGES}")
    n_labels = len({label for label in data.labels()})
    if n_labels > args.max_points:
        raise UserError(f"--max-points {args.max_points} is fewer than the {n_labels} labels, which are all kept")
    inputs = [Path(parse_spec(args.data).path), *options.inputs()]
    check_out_dir(args.out, args.overwrite, inputs)

    feats = options.extract(data)
    kept = feats.select(subsample(feats.labels, args.max_points, args.seed))
    n = len(kept)
    x = reduce_dims(l2_normalize(kept.features), PCA_DIMS, args.seed)

    perplexity, neighbors = clamp_perplexity(args.perplexity, n), clamp_neighbors(args.neighbors, n)
    for method, flag, asked, used in (
        ("tsne", "--perplexity", args.perplexity, perplexity),
        ("umap", "--neighbors", args.neighbors, neighbors),
    ):
        if method in methods and used != asked:
            print(f"warning: {flag} {asked:g} is too large for {n} points; using {used:g}", file=sys.stderr)
    maps: dict[str, np.ndarray] = {}
    for method in methods:
        maps[method] = tsne_map(x, perplexity, args.seed) if method == "tsne" else umap_map(x, neighbors, args.seed)

    with atomic_dir(args.out, args.overwrite, inputs) as out:
        labels, domains = category_names(kept)
        for method, coords in maps.items():
            title = f"{method} of {args.ckpt} on {data.name} (n={n})"
            plot_map(coords, labels, domains, title, out / f"{method}.png")
        write_coordinates(out / "coordinates.csv", kept, maps)
        write_json(
            out / "embed.json",
            {
                "encoder": {"ref": args.ckpt, "hash": kept.encoder_hash},
                "data": {
                    "spec": args.data,
                    "source": data.source,
                    "hash": kept.data_hash,
                    "classes": list(kept.classes),
                },
                "n": n,
                "n_total": len(feats),
                "methods": methods,
                "seed": args.seed,
                "config": {
                    "max_points": args.max_points,
                    "perplexity": perplexity if "tsne" in methods else None,
                    "neighbors": neighbors if "umap" in methods else None,
                    "pca_dims": int(x.shape[1]),
                    "feature_dim": feats.dim,
                    "pool": args.pool,
                    "tta": args.tta,
                    "input_size": kept.input_size,
                },
            },
        )
    print(f"{args.ckpt} | {data.name} | {n} of {len(feats)} points | {', '.join(methods)} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
