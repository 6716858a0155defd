"""Command-line helpers shared by the frozen-feature probes (:mod:`probes.knn`, :mod:`probes.linear`).

They check the sets before an encoder is built, match test labels to the training classes by name,
count train/test group overlap, print the metrics table, and hold the arguments, feature extraction
and results.json writing that every probe command shares; ``probe`` only names the caller in messages.

Scoring (:func:`score_rows`): every row of kNN and linear gets the metrics of
:func:`ssl_path.evaluation.metrics.classification_metrics` and, for each score, ``<score>_ci95``: the
95 % percentile bootstrap interval over redraws of the test set, whole groups (slides, patients)
where the test images have them (:mod:`ssl_path.evaluation.bootstrap`; ``--bootstrap N`` redraws,
seeded by ``--seed``). Every row of one test set is scored on the same redraws. With ``--compare REF``
the features of a second encoder are extracted for the same images and put through the same probe;
each row then holds ``<score>_diff`` (this encoder minus REF) and ``<score>_diff_ci95``, the paired
interval on the same redraws, and the table marks a difference whose interval excludes 0. A row whose
test predictions are all one class says so on stderr and in ``predicts_one_class``.

The command line ends at :func:`probe_request` (and :func:`feature_options`): past it, everything
takes a :class:`ProbeRequest` of plain values, never the parsed ``Namespace``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from probes.features import DEFAULT_CACHE, POOLS, FeatureSet, extract_features
from ssl_path.core.cli import add_device, add_out, add_overwrite, add_progress, add_seed, out_file, resolve_device
from ssl_path.core.errors import UserError
from ssl_path.core.io import check_out_file
from ssl_path.data.readers import LabelledSet, parse_spec, read_spec
from ssl_path.encoder.refs import resolve as resolve_ref
from ssl_path.evaluation.bootstrap import DEFAULT_RESAMPLES, bootstrap_ci, paired_difference, resamples
from ssl_path.evaluation.metrics import CLASSIFICATION_SCORES, SCORES, classification_metrics
from ssl_path.evaluation.results import make_results, write_results
from ssl_path.evaluation.splits import DEFAULT_TEST_FRACTION, domain_folds, group_split
from ssl_path.evaluation.stats import CONFIDENCE

__all__ = [
    "align_labels",
    "check_sets",
    "shared_groups",
    "ci_cell",
    "difference_header",
    "excludes_zero",
    "format_table",
    "Prediction",
    "score_rows",
    "single_class",
    "check_reference",
    "add_feature_arguments",
    "add_probe_arguments",
    "add_compare_argument",
    "FeatureOptions",
    "ProbeRequest",
    "feature_options",
    "probe_request",
    "ProbeInputs",
    "probe_inputs",
    "probe_splits",
    "prefixed",
    "report",
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
    # Unlabelled rows first: they may be why a set has a class too few.
    for flag, spec, data in (("--train", train_spec, train), ("--test", test_spec, test)):
        unlabeled = sum(label is None for label in data.labels())
        if unlabeled:
            raise UserError(f"{flag} {spec}: {unlabeled} images have no label; {probe} needs a label on each")
    if len(train.classes) < 2:
        names = ", ".join(train.classes)
        raise UserError(f"--train {train_spec}: {len(train.classes)} class ({names}); {probe} needs at least 2")
    empty = [name for name, n in train.class_counts().items() if n == 0]
    if empty:
        raise UserError(
            f"--train {train_spec}: no images of class {', '.join(map(repr, empty))}; "
            "every training class needs at least one"
        )
    unknown = sorted(set(test.labels()) - set(train.classes))
    if unknown:
        raise UserError(
            f"--test {test_spec}: classes {unknown} are not among the training classes {list(train.classes)}"
        )


def shared_groups(train: FeatureSet, test: FeatureSet) -> int:
    """How many groups (slides, patients) have images on both sides: a leak the SPECs may not intend."""
    return len({g for g in train.groups if g is not None} & {g for g in test.groups if g is not None})


def excludes_zero(ci: Sequence[float] | None) -> bool:
    """Whether a difference's interval lies wholly on one side of 0."""
    return ci is not None and (ci[0] > 0 or ci[1] < 0)


def difference_header(reference: str) -> str:
    """The line above a table's block of paired differences."""
    return f"paired difference, this encoder minus {reference} (* the 95 % CI excludes 0):"


def ci_cell(value: float | None, ci: Sequence[float] | None, signed: bool = False) -> str:
    """A score and its 95 % CI for a table; a signed one (a difference) gets * where the CI excludes 0."""
    if value is None:
        return "-"
    spec = "+.3f" if signed else ".3f"
    text = format(value, spec)
    if ci is not None:
        text += f" [{ci[0]:{spec}}, {ci[1]:{spec}}]"
        if signed:
            text += "*" if excludes_zero(ci) else " "
    return text


def format_table(
    rows: dict[str, dict[str, Any]], param: tuple[str, str, str] = ("k", "k_used", ""), reference: str | None = None
) -> str:
    """A fixed-width table of the rows' main metrics, each with its 95 % CI where the row has one.

    ``param`` is the per-row setting shown after the name: (header, row key, format spec), e.g.
    ``("k", "k_used", "")`` for kNN or ``("C", "c", ".0e")`` for the linear probe. Rows compared with
    an encoder ``reference`` (``<score>_diff`` keys) get a second block: the paired differences, a
    ``*`` marking those whose interval excludes 0.
    """
    header_name, key, spec = param
    cells_param = [format(row[key], spec) for row in rows.values()]
    width = max([4, len(header_name), *(len(c) for c in cells_param)])
    name_width = max([10, *(len(name) + 2 for name in rows)])

    def block(suffix: str, signed: bool) -> list[str]:
        cells = [
            [ci_cell(row.get(s + suffix), row.get(f"{s}{suffix}_ci95"), signed) for s in SCORES]
            for row in rows.values()
        ]
        widths = [max(len(score), *(len(c[i]) for c in cells)) for i, score in enumerate(SCORES)]
        lines = [
            f"{'probe':<{name_width}}{header_name:>{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(SCORES, widths))
        ]
        for name, value, row_cells in zip(rows, cells_param, cells):
            lines.append(
                f"{name:<{name_width}}{value:>{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row_cells, widths))
            )
        return lines

    lines = block("", signed=False)
    note = _bootstrap_note(rows)
    if note:
        lines.append(note)
    if reference is not None and any(f"{s}_diff" in row for row in rows.values() for s in SCORES):
        lines += ["", difference_header(reference)]
        lines += block("_diff", signed=True)
    return "\n".join(lines)


def _bootstrap_note(rows: dict[str, dict[str, Any]]) -> str | None:
    """The table's footnote on its CIs: how many redraws of how many test units. Rows of several test
    sets (``"<split>/<row>"``, e.g. a left-out domain each) may differ in units: then each set's count."""
    per_split: dict[str, dict[str, Any]] = {}
    for name, row in rows.items():
        if row.get("bootstrap"):
            per_split.setdefault(name.rpartition("/")[0], row["bootstrap"])
    if not per_split:
        return None

    def units(described: dict[str, Any]) -> str:
        kind = "groups (slides/patients)" if described["unit"] == "group" else "images"
        return f"the {described['n_units']} test {kind}"

    first = next(iter(per_split.values()))
    if len({units(d) for d in per_split.values()}) == 1:
        return f"[95 % CI: bootstrap, {first['resamples']} redraws of {units(first)}]"
    each = "; ".join(f"{split}: {units(d)}" for split, d in per_split.items())
    return f"[95 % CI: bootstrap, {first['resamples']} redraws of each test set's units, {each}]"


@dataclass(frozen=True)
class Prediction:
    """One probe row's output on the test images: the settings that made it (protocol, k, C, ...),
    the predicted class ids [M] and the class probabilities [M, C]."""

    settings: dict[str, Any]
    pred: np.ndarray
    probs: np.ndarray


def check_reference(train: FeatureSet, test: FeatureSet, reference: tuple[FeatureSet, FeatureSet]) -> None:
    """Refuse a comparison encoder's features that are not of the same images, in the same order."""
    if reference[0].paths != train.paths or reference[1].paths != test.paths:
        raise ValueError("the reference features must be of the same train and test images, in the same order")
    if tuple(reference[0].classes) != tuple(train.classes):
        raise ValueError(f"reference classes {reference[0].classes} differ from {train.classes}")


def single_class(pred: np.ndarray) -> int | None:
    """The class id every prediction is, or None when they are not all one class."""
    values = np.unique(pred)
    return int(values[0]) if len(values) == 1 else None


def score_rows(
    predictions: Mapping[str, Prediction],
    y_true: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[str | None],
    probe: str,
    ordinal: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    reference: Mapping[str, Prediction] | None = None,
    where: str = "",
) -> dict[str, dict[str, Any]]:
    """Metrics rows of the predictions on one test set (labels ``y_true``, groups ``groups``), with
    bootstrap CIs on shared redraws (none when ``n_resamples`` is 0) and, given the ``reference``
    encoder's predictions of the same rows, the paired differences; see the module docstring.
    ``probe`` (and ``where``, the split) name the rows in the one-class warning."""
    n_classes = len(classes)
    redraws = resamples(len(y_true), groups, n_resamples, seed) if n_resamples else None
    rows: dict[str, dict[str, Any]] = {}
    for name, prediction in predictions.items():
        row = {
            **prediction.settings,
            **classification_metrics(y_true, prediction.pred, prediction.probs, classes, ordinal),
        }
        only = single_class(prediction.pred)
        row["predicts_one_class"] = None if only is None else classes[only]
        if only is not None:
            print(
                f"warning: {probe} row {name}{where} predicts one class, {classes[only]!r}, "
                f"for all {len(y_true)} test images",
                file=sys.stderr,
            )
        if redraws is not None:
            intervals = bootstrap_ci(redraws, y_true, prediction.pred, prediction.probs, n_classes, ordinal)
            row.update({f"{score}_ci95": intervals[score] for score in CLASSIFICATION_SCORES})
            row["bootstrap"] = redraws.describe()
        if reference is not None:
            other = reference[name]
            theirs = classification_metrics(y_true, other.pred, other.probs, classes, ordinal)
            row["reference"] = {score: theirs[score] for score in CLASSIFICATION_SCORES}
            for score in CLASSIFICATION_SCORES:
                ours = row[score]
                row[f"{score}_diff"] = None if ours is None or theirs[score] is None else ours - theirs[score]
            if redraws is not None:
                a, b = (prediction.pred, prediction.probs), (other.pred, other.probs)
                diffs = paired_difference(redraws, y_true, a, b, n_classes, ordinal)
                row.update({f"{score}_diff_ci95": diffs[score] for score in CLASSIFICATION_SCORES})
        rows[name] = row
    return rows


# ----------------------------------------------------------------------------- the shared command line


def add_feature_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """How features are made: the encoder, pooling, test-time averaging, size, batching, device, cache."""
    p = parser
    p.add_argument(
        "--ckpt",
        required=True,
        metavar="REF",
        help="encoder: timm:ARCH, hf-hub:ORG/NAME, a checkpoint, a run directory or an exported folder",
    )
    p.add_argument("--pool", choices=POOLS, default="cls", help="token pooling (default %(default)s)")
    p.add_argument("--tta", action="store_true", help="average the features of the 8 flips and rotations")
    p.add_argument("--input-size", type=int, default=None, help="image side in pixels (default: the encoder's)")
    p.add_argument("--batch-size", type=int, default=64, help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes (default %(default)s)")
    add_device(p, default="cpu")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="feature cache folder (default $SSL_PATH_CACHE or ~/.cache/ssl_path/features)",
    )
    add_progress(p)
    return p


def add_probe_arguments(parser: argparse.ArgumentParser, seed_help: str) -> argparse.ArgumentParser:
    """The arguments every frozen-feature probe takes: features, sets and splits, output."""
    p = add_feature_arguments(parser)
    p.add_argument("--train", required=True, metavar="SPEC", help="training set, e.g. amibr:DATA?domain=hamamatsu_xr")
    p.add_argument(
        "--test",
        metavar="SPEC",
        help="test set, e.g. amibr:DATA?domain=hamamatsu_s360 (or carve it from --train, below)",
    )
    p.add_argument(
        "--leave-one-domain-out",
        action="store_true",
        help="no --test: for every domain of --train, train on the others and test on it",
    )
    p.add_argument(
        "--split-by",
        choices=("group",),
        default=None,
        help="no --test: hold out whole groups (patients/slides) of --train as the test set",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=DEFAULT_TEST_FRACTION,
        help="with --split-by group: share of the images held out (default %(default)s)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_RESAMPLES,
        metavar="N",
        help="redraws of the test set (whole slides/patients where it has them) for the 95 %% CIs; "
        "0: none (default %(default)s)",
    )
    add_out(p, help="write results.json here", required=False, type=out_file)
    add_overwrite(p)
    add_seed(p, help=seed_help)
    return p


def add_compare_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--compare REF``: a second encoder put through the same probe on the same images, for paired differences."""
    parser.add_argument(
        "--compare",
        metavar="REF",
        default=None,
        help="a second encoder (any --ckpt ref), put through the same probe on the same images: "
        "report this one minus it, with a paired 95 %% CI",
    )
    return parser


@dataclass(frozen=True)
class FeatureOptions:
    """How features are made: the encoder ref and the settings of :func:`probes.features.extract_features`.

    ``cache_dir`` is a folder, ``DEFAULT_CACHE`` for the default one, or None for no cache.
    """

    ckpt: str
    pool: str = "cls"
    tta: bool = False
    input_size: int | None = None
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    cache_dir: Any = DEFAULT_CACHE
    progress: bool = True

    def extract(self, data: LabelledSet) -> FeatureSet:
        return extract_features(
            self.ckpt,
            data,
            pool=self.pool,
            tta=self.tta,
            batch_size=self.batch_size,
            num_workers=self.workers,
            device=self.device,
            input_size=self.input_size,
            cache_dir=self.cache_dir,
            progress=self.progress,
        )

    def inputs(self) -> list[Path]:
        """The checkpoint, run directory or exported folder the ref names, if any (an output must spare it)."""
        if resolve_ref(self.ckpt).kind in ("timm", "hf-hub"):
            return []
        return [Path(self.ckpt).expanduser()]


@dataclass(frozen=True)
class ProbeRequest:
    """What a probe command asked for: the sets (SPECs), how to split them, the features, the output."""

    train: str
    features: FeatureOptions
    test: str | None = None
    leave_one_domain_out: bool = False
    split_by: str | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0
    out: Path | None = None
    overwrite: bool = False
    bootstrap: int = DEFAULT_RESAMPLES
    compare: str | None = None

    def reference(self) -> FeatureOptions | None:
        """How the ``--compare`` encoder's features are made: as this encoder's, from another ref."""
        return None if self.compare is None else dataclasses.replace(self.features, ckpt=self.compare)

    def inputs(self) -> list[Path]:
        """Every file or folder the probe reads, which no output may replace or lie inside."""
        specs = [s for s in (self.train, self.test) if s is not None]
        reference = self.reference()
        encoders = [*self.features.inputs(), *(reference.inputs() if reference is not None else [])]
        return [*(Path(parse_spec(s).path) for s in specs), *encoders]


def feature_options(args: argparse.Namespace) -> FeatureOptions:
    """The parsed :func:`add_feature_arguments`, as plain values; a bad device or ref fails here, before any work."""
    resolve_device(args.device)
    resolve_ref(args.ckpt)
    return FeatureOptions(
        ckpt=args.ckpt,
        pool=args.pool,
        tta=args.tta,
        input_size=args.input_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        cache_dir=DEFAULT_CACHE if args.cache_dir is None else args.cache_dir,
        progress=not args.no_progress,
    )


def probe_request(args: argparse.Namespace) -> ProbeRequest:
    """The parsed :func:`add_probe_arguments` (and :func:`add_compare_argument`), as the plain values
    the probe functions take."""
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0 (0: no CIs), got {args.bootstrap}")
    compare = getattr(args, "compare", None)
    if compare is not None:
        resolve_ref(compare)
    return ProbeRequest(
        train=args.train,
        features=feature_options(args),
        test=args.test,
        leave_one_domain_out=args.leave_one_domain_out,
        split_by=args.split_by,
        test_fraction=args.test_fraction,
        seed=args.seed,
        out=args.out,
        overwrite=args.overwrite,
        bootstrap=args.bootstrap,
        compare=compare,
    )


@dataclass(frozen=True)
class ProbeInputs:
    """The two labelled sets a probe command named, their features, and how many groups they share.

    ``name`` names the split when one command runs several (a left-out domain); "" otherwise.
    ``reference``: the ``--compare`` encoder's features of the same train and test rows, or None.
    """

    train_data: LabelledSet
    test_data: LabelledSet
    train: FeatureSet
    test: FeatureSet
    shared: int
    name: str = ""
    reference: tuple[FeatureSet, FeatureSet] | None = None


def _extract(request: ProbeRequest, data: LabelledSet) -> tuple[FeatureSet, FeatureSet | None]:
    """This encoder's features of ``data`` and, with ``--compare``, the other's of the same rows."""
    features = request.features.extract(data)
    options = request.reference()
    if options is None:
        return features, None
    reference = options.extract(data)
    if reference.paths != features.paths:  # unreadable images are skipped for both alike; guard the pairing
        raise UserError(f"--compare {request.compare}: its features are not of the same images as --ckpt's")
    return features, reference


def _split(
    features: FeatureSet, reference: FeatureSet | None, train_idx: np.ndarray, test_idx: np.ndarray
) -> tuple[FeatureSet, FeatureSet, tuple[FeatureSet, FeatureSet] | None]:
    # The indices are of records; an unreadable one has no row.
    train, test = features.select(features.rows_of(train_idx)), features.select(features.rows_of(test_idx))
    if reference is None:
        return train, test, None
    pair = reference.select(reference.rows_of(train_idx)), reference.select(reference.rows_of(test_idx))
    return train, test, pair


def probe_inputs(
    request: ProbeRequest, probe: str, also_writes: Callable[[Sequence[str]], Sequence[Path]] | None = None
) -> ProbeInputs:
    """Check the outputs and the sets, then extract (or reuse cached) features of both."""
    _check_outputs(request, [""], also_writes)
    if request.test is None:
        raise UserError("--test SPEC is required (or --leave-one-domain-out, or --split-by group)")
    train_data, test_data = read_spec(request.train), read_spec(request.test)
    check_sets(train_data, test_data, request.train, request.test, probe=probe)
    (train, ref_train), (test, ref_test) = _extract(request, train_data), _extract(request, test_data)
    shared = shared_groups(train, test)
    if shared:
        print(f"warning: {shared} groups (slides/patients) have images in both train and test", file=sys.stderr)
    reference = None if ref_train is None or ref_test is None else (ref_train, ref_test)
    return ProbeInputs(train_data, test_data, train, test, shared, reference=reference)


def probe_splits(
    request: ProbeRequest, probe: str, also_writes: Callable[[Sequence[str]], Sequence[Path]] | None = None
) -> tuple[list[ProbeInputs], dict[str, Any]]:
    """The train/test pairs a probe command asked for, and the ``split`` entry of its results.json.

    ``--test SPEC``: one given pair. ``--split-by group``: one pair carved from ``--train`` in whole
    groups. ``--leave-one-domain-out``: one pair per domain of ``--train``. Features of ``--train`` are
    extracted once and split, never re-extracted. ``also_writes(names)``: the files the caller will
    write besides ``--out`` for splits of these names; they are checked with it, before any features.
    """
    carved = request.leave_one_domain_out or request.split_by is not None
    if request.leave_one_domain_out and request.split_by is not None:
        raise UserError("--leave-one-domain-out and --split-by are two ways to make a test set; give one")
    if carved and request.test is not None:
        raise UserError("--test is given, so there is nothing to carve: drop --leave-one-domain-out / --split-by")
    if not carved:
        return [probe_inputs(request, probe, also_writes)], {}
    _check_outputs(request, [], None)
    data = read_spec(request.train)
    check_sets(data, data, request.train, request.train, probe=probe)
    if request.leave_one_domain_out:
        folds = domain_folds([r.domain for r in data.records])  # before the encoder is built
        _check_outputs(request, [domain for domain, _, _ in folds], also_writes)
        features, reference = _extract(request, data)
        splits = []
        for domain, train_idx, test_idx in folds:
            train, test, pair = _split(features, reference, train_idx, test_idx)
            if len(set(train.labels.tolist())) < 2:
                raise UserError(f"--leave-one-domain-out: without domain {domain!r} the training set has one class")
            splits.append(ProbeInputs(data, data, train, test, shared_groups(train, test), domain, pair))
        folds_info = [
            {"domain": s.name, "n_train": len(s.train), "n_test": len(s.test), "shared_groups": s.shared}
            for s in splits
        ]
        return splits, {"method": "leave-one-domain-out", "folds": folds_info}
    _check_outputs(request, [""], also_writes)
    groups = [r.group for r in data.records]
    train_idx, test_idx = group_split(data.targets(), groups, request.test_fraction, request.seed)
    features, reference = _extract(request, data)
    train, test, pair = _split(features, reference, train_idx, test_idx)
    split = {
        "method": "group",
        "test_fraction": request.test_fraction,
        # Whole groups hold out only about the share asked for (splits.held_out_folds): the share got.
        "test_share": len(test) / (len(train) + len(test)),
        "seed": request.seed,
        "train_groups": len(set(train.groups)),
        "test_groups": len(set(test.groups)),
    }
    return [ProbeInputs(data, data, train, test, shared_groups(train, test), reference=pair)], split


def prefixed(name: str, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows of one split of several, keyed ``"<split>/<row>"``."""
    return {f"{name}/{key}" if name else key: row for key, row in rows.items()}


def _check_outputs(
    request: ProbeRequest, names: Sequence[str], also_writes: Callable[[Sequence[str]], Sequence[Path]] | None
) -> None:
    # Before spending minutes on features: every file the run will write, none over what it reads.
    inputs = request.inputs()
    if request.out is not None:
        check_out_file(request.out, request.overwrite, inputs)
    for path in also_writes(names) if also_writes is not None else ():
        check_out_file(path, request.overwrite, inputs, flag="")


def report(
    request: ProbeRequest,
    probe: str,
    task: str,
    title: str,
    inputs: ProbeInputs,
    rows: dict[str, dict[str, Any]],
    table: str,
    split: dict[str, Any],
    config: dict[str, Any],
    seeds: Sequence[int] | None = None,
) -> None:
    """Print the table and, with ``--out``, write the probe's results.json, stating its task and title
    (see :mod:`ssl_path.evaluation.results`); ``seeds`` default to ``[--seed]``. Under leave-one-domain-out
    ``inputs`` is any one fold (for what all folds share: classes, skips, hashes); the counts of each
    fold are in ``split["folds"]``, and ``dataset`` holds the set's total (``n_images``) instead."""
    train, test = inputs.train, inputs.test
    # Carved splits share their set's skips; a given pair has a list each.
    skipped = list(dict.fromkeys([*train.skipped, *test.skipped]))
    folds = split.get("folds")
    sizes = (
        " | ".join(f"{f['domain']} left out: train {f['n_train']}, test {f['n_test']}" for f in folds)
        if folds
        else f"train {len(train)} | test {len(test)}"
    )
    # Each fold trains and tests on its own part (split.folds); the one fold passed here stands for none.
    counts = (
        {"n_train": None, "n_test": None, "n_images": len(train) + len(test)}
        if folds
        else {"n_train": len(train), "n_test": len(test)}
    )
    versus = f" vs {request.compare}" if request.compare is not None else ""
    print(f"{request.features.ckpt}{versus} | {sizes} | classes {', '.join(train.classes)}")
    print(table)
    if request.out is None:
        return
    results = make_results(
        probe=probe,
        task=task,
        title=title,
        encoder={"ref": request.features.ckpt, "hash": train.encoder_hash},
        dataset={
            "train": inputs.train_data.source,
            "test": inputs.test_data.source,
            **counts,
            "classes": list(train.classes),
            "train_data_hash": train.data_hash,
            "test_data_hash": test.data_hash,
            "n_skipped": len(skipped),
            "skipped": [{"path": path, "reason": reason} for path, reason in skipped],
        },
        split={
            "method": "given",
            "train": request.train,
            "test": request.test,
            "shared_groups": inputs.shared,
            **split,
        },
        seeds=list(seeds) if seeds is not None else [request.seed],
        metrics=rows,
        config={
            **config,
            "bootstrap": {
                "resamples": request.bootstrap,
                "confidence": CONFIDENCE,
                "interval": "percentile",
                "unit": "test groups (slides/patients) where the test images have them, else images",
                "seed": request.seed,
            },
            "compare": None
            if inputs.reference is None
            else {"ref": request.compare, "hash": inputs.reference[0].encoder_hash},
            "pool": request.features.pool,
            "tta": request.features.tta,
            "input_size": train.input_size,
            "batch_size": request.features.batch_size,
            "device": request.features.device,
        },
    )
    write_results(request.out, results, overwrite=request.overwrite)
    print(f"wrote {request.out}")
