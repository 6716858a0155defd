"""Command-line helpers shared by the frozen-feature probes (:mod:`probes.knn`, :mod:`probes.linear`).

They check the sets before an encoder is built, match test labels to the training classes by name,
count train/test group overlap, print the metrics table, and hold the arguments, feature extraction
and results.json writing that every probe command shares; ``probe`` only names the caller in messages.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from probes.features import DEFAULT_CACHE, POOLS, FeatureSet, extract_features
from probes.results import make_results, write_results
from ssl_path.data.readers import LabelledSet, read_spec
from ssl_path.errors import UserError

__all__ = [
    "align_labels", "check_sets", "shared_groups", "format_table",
    "add_probe_arguments", "ProbeInputs", "probe_inputs", "report",
]


def align_labels(test: FeatureSet, classes: Sequence[str], probe: str = "kNN") -> np.ndarray:
    """The test labels as ids into ``classes`` (the training set's), matched by class name."""
    index = {name: i for i, name in enumerate(classes)}
    names = [test.classes[i] if i >= 0 else None for i in test.labels.tolist()]
    unlabeled = sum(name is None for name in names)
    if unlabeled:
        raise UserError(f"the test set has {unlabeled} unlabeled images; {probe} evaluation needs a label on each")
    unknown = sorted({name for name in names if name not in index})
    if unknown:
        raise UserError(f"test classes {unknown} are not among the training classes {list(classes)}")
    return np.asarray([index[name] for name in names], dtype=np.int64)


def check_sets(train: LabelledSet, test: LabelledSet, train_spec: str, test_spec: str, probe: str = "kNN") -> None:
    """Refuse sets a probe cannot use, before any encoder is built: fewer than two classes, an
    empty training class, unlabeled images, or test labels the training set does not have."""
    if len(train.classes) < 2:
        names = ", ".join(train.classes)
        raise UserError(f"--train {train_spec}: {len(train.classes)} class ({names}); {probe} needs at least 2")
    for flag, spec, data in (("--train", train_spec, train), ("--test", test_spec, test)):
        unlabeled = sum(label is None for label in data.labels())
        if unlabeled:
            raise UserError(f"{flag} {spec}: {unlabeled} images have no label; {probe} needs a label on each")
    empty = [name for name, n in train.class_counts().items() if n == 0]
    if empty:
        raise UserError(f"--train {train_spec}: no images of class {', '.join(map(repr, empty))}; "
                        "every training class needs at least one")
    unknown = sorted(set(test.labels()) - set(train.classes))
    if unknown:
        raise UserError(
            f"--test {test_spec}: classes {unknown} are not among the training classes {list(train.classes)}"
        )


def shared_groups(train: FeatureSet, test: FeatureSet) -> int:
    """How many groups (slides, patients) have images on both sides: a leak the SPECs may not intend."""
    return len({g for g in train.groups if g is not None} & {g for g in test.groups if g is not None})


def format_table(
    rows: dict[str, dict[str, Any]], param: tuple[str, str, str] = ("k", "k_used", "")
) -> str:
    """A small fixed-width table of the rows' main metrics.

    ``param`` is the per-row setting shown after the name: (header, row key, format spec), e.g.
    ``("k", "k_used", "")`` for kNN or ``("C", "c", ".0e")`` for the linear probe.
    """
    header_name, key, spec = param
    cells_param = [format(row[key], spec) for row in rows.values()]
    width = max([4, len(header_name), *(len(c) for c in cells_param)])
    columns = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "cohen_kappa")
    header = f"{'probe':<10}{header_name:>{width}}  " + "  ".join(f"{c:>17}" for c in columns)
    lines = [header]
    for (name, row), value in zip(rows.items(), cells_param):
        cells = "  ".join(f"{'-' if row[c] is None else format(row[c], '.4f'):>17}" for c in columns)
        lines.append(f"{name:<10}{value:>{width}}  {cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the shared command line


def add_probe_arguments(parser: argparse.ArgumentParser, seed_help: str) -> argparse.ArgumentParser:
    """The arguments every frozen-feature probe takes: encoder, sets, features, output."""
    p = parser
    p.add_argument("--ckpt", required=True, metavar="REF",
                   help="encoder: timm:ARCH, hf-hub:ORG/NAME, a checkpoint, a run directory or an exported folder")
    p.add_argument("--train", required=True, metavar="SPEC", help="training set, e.g. amibr:DATA?domain=hamamatsu_xr")
    p.add_argument("--test", required=True, metavar="SPEC", help="test set, e.g. amibr:DATA?domain=hamamatsu_s360")
    p.add_argument("--pool", choices=POOLS, default="cls", help="token pooling (default %(default)s)")
    p.add_argument("--tta", action="store_true", help="average the features of the 8 flips and rotations")
    p.add_argument("--input-size", type=int, default=None, help="image side in pixels (default: the encoder's)")
    p.add_argument("--batch-size", type=int, default=64, help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature cache folder (default $SSL_PATH_CACHE or ~/.cache/ssl_path/features)")
    p.add_argument("--out", type=Path, default=None, help="write results.json here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclass(frozen=True)
class ProbeInputs:
    """The two labelled sets a probe command named, their features, and how many groups they share."""

    train_data: LabelledSet
    test_data: LabelledSet
    train: FeatureSet
    test: FeatureSet
    shared: int


def probe_inputs(args: argparse.Namespace, probe: str) -> ProbeInputs:
    """Check ``--out`` and the sets, then extract (or reuse cached) features of both."""
    # Refuse an existing --out before spending minutes on features.
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise UserError(f"--out {args.out} already exists; pass --overwrite to replace it")
    train_data, test_data = read_spec(args.train), read_spec(args.test)
    check_sets(train_data, test_data, args.train, args.test, probe=probe)

    def features(data: LabelledSet) -> FeatureSet:
        return extract_features(
            args.ckpt, data, pool=args.pool, tta=args.tta, batch_size=args.batch_size, num_workers=args.workers,
            device=args.device, input_size=args.input_size,
            cache_dir=DEFAULT_CACHE if args.cache_dir is None else args.cache_dir, progress=not args.no_progress,
        )

    train, test = features(train_data), features(test_data)
    shared = shared_groups(train, test)
    if shared:
        print(f"warning: {shared} groups (slides/patients) have images in both train and test", file=sys.stderr)
    return ProbeInputs(train_data, test_data, train, test, shared)


def report(
    args: argparse.Namespace, probe: str, inputs: ProbeInputs, rows: dict[str, dict[str, Any]],
    table: str, split: dict[str, Any], config: dict[str, Any],
) -> None:
    """Print the table and, with ``--out``, write the probe's results.json."""
    train, test = inputs.train, inputs.test
    print(f"{args.ckpt} | train {len(train)} | test {len(test)} | classes {', '.join(train.classes)}")
    print(table)
    if args.out is None:
        return
    results = make_results(
        probe=probe,
        encoder={"ref": args.ckpt, "hash": train.encoder_hash},
        dataset={
            "train": inputs.train_data.source, "test": inputs.test_data.source, "n_train": len(train),
            "n_test": len(test), "classes": list(train.classes), "train_data_hash": train.data_hash,
            "test_data_hash": test.data_hash,
        },
        split={"method": "given", "train": args.train, "test": args.test, "shared_groups": inputs.shared, **split},
        seeds=[args.seed],
        metrics=rows,
        config={**config, "pool": args.pool, "tta": args.tta, "input_size": train.input_size,
                "batch_size": args.batch_size, "device": args.device},
    )
    write_results(args.out, results, overwrite=args.overwrite)
    print(f"wrote {args.out}")
