"""Linear probe of a frozen encoder: multinomial logistic regression on standardised features.

Protocol (as in the UNI / DINOv2 linear evaluations, on CPU with scikit-learn):

- a ``StandardScaler`` then ``LogisticRegression`` (lbfgs, L2, multinomial), in one ``Pipeline`` so the
  scaler only ever sees the rows the classifier is fitted on;
- the inverse regularisation strength C is chosen from ``--c-grid`` by balanced accuracy on a
  validation part carved out of TRAIN only: whole groups (slides/patients) are held out when the
  training set has them (``StratifiedGroupKFold``, first fold, so about ``--val-fraction`` of the
  images with classes kept in proportion where the groups allow), else a stratified random split;
- the chosen C is refitted on all of TRAIN and evaluated once on TEST.

    python -m probes.linear --ckpt REF --train SPEC --test SPEC [--c-grid 1e-4 ... 1e2] [--out results.json]

Train and test are data SPECs, as for :mod:`probes.knn`; the groups the two share are reported, not corrected.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from probes.common import (
    add_probe_arguments,
    align_labels,
    format_table,
    prefixed,
    probe_request,
    probe_splits,
    report,
)
from probes.features import FeatureSet
from ssl_path.core.cli import Parser, make_parser
from ssl_path.core.errors import UserError, run_cli
from ssl_path.evaluation.metrics import classification_metrics
from ssl_path.evaluation.splits import group_ids, n_folds

__all__ = [
    "TITLE",
    "DEFAULT_C_GRID",
    "DEFAULT_VAL_FRACTION",
    "MAX_ITER",
    "validation_split",
    "fit_probe",
    "class_probabilities",
    "run_linear",
    "build_parser",
    "main",
]

TITLE = "linear probe (frozen encoder)"
DEFAULT_C_GRID = tuple(10.0**e for e in range(-4, 3))  # 1e-4 ... 1e2, as exact decimals
DEFAULT_VAL_FRACTION = 0.2
MAX_ITER = 1000


def validation_split(
    labels: np.ndarray, groups: Sequence[str | None], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(fit indices, validation indices, grouped) partitioning ``labels``' rows.

    Grouped when any row has a group and there are at least two groups: no group then appears on both
    sides. Otherwise a stratified random split (plain random if a class is too small to stratify).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    ids = group_ids(groups)
    n_groups = len(np.unique(ids))
    if any(g is not None for g in groups) and n_groups >= 2:
        # The first fold is the validation part.
        splitter = StratifiedGroupKFold(n_splits=n_folds(val_fraction, n_groups), shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # "The least populated class has only N members": expected on small sets, the split stays grouped.
            warnings.simplefilter("ignore", UserWarning)
            fit, val = next(splitter.split(rows, labels, ids))
        return fit, val, True
    counts = np.bincount(labels)[np.unique(labels)]
    stratify = labels if len(counts) > 1 and counts.min() >= 2 else None
    try:
        fit, val = train_test_split(rows, test_size=val_fraction, random_state=seed, stratify=stratify)
    except ValueError:  # a validation part smaller than the number of classes cannot be stratified
        fit, val = train_test_split(rows, test_size=val_fraction, random_state=seed)
    return np.sort(fit), np.sort(val), False


def fit_probe(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int = MAX_ITER) -> Pipeline:
    """Standardise-then-logistic-regression, fitted on these rows only."""
    if c <= 0:
        raise ValueError(f"C must be > 0, got {c}")
    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            ("logreg", LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)),
        ]
    )
    with warnings.catch_warnings():
        # Convergence is reported per row instead (``converged``), not as a warning per C.
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(np.asarray(features, dtype=np.float64), np.asarray(labels))
    return pipe


def _converged(pipe: Pipeline, max_iter: int = MAX_ITER) -> bool:
    return bool(np.max(pipe.named_steps["logreg"].n_iter_) < max_iter)


def class_probabilities(pipe: Pipeline, features: np.ndarray, n_classes: int) -> np.ndarray:
    """``pipe.predict_proba`` widened to all ``n_classes`` columns: a class absent from the rows it was
    fitted on (a small few-label subset) gets probability 0, so the columns stay the class ids."""
    probs = np.zeros((len(features), n_classes))
    probs[:, pipe.classes_] = pipe.predict_proba(np.asarray(features, dtype=np.float64))
    return probs


def run_linear(
    train: FeatureSet,
    test: FeatureSet,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    ordinal: bool = False,
) -> dict[str, Any]:
    """The metrics row of the linear probe: protocol, chosen C, the validation balanced accuracy for
    each C, split sizes, and the :func:`ssl_path.evaluation.metrics.classification_metrics` of the test set.

    Ties in validation balanced accuracy go to the smaller C (the stronger regularisation).
    Unlabeled training rows are left out; test labels are matched to the training classes by name.
    """
    if not c_grid or any(not c > 0 for c in c_grid):
        raise UserError(f"every C must be > 0, got {list(c_grid)}")
    labelled = np.flatnonzero(train.labels >= 0)
    if len(labelled) == 0:
        raise UserError("the training set has no labelled images")
    train = train.select(labelled)
    classes = train.classes
    y_true = align_labels(test, classes, probe="linear probe")
    fit, val, grouped = validation_split(train.labels, train.groups, val_fraction, seed)
    if len(np.unique(train.labels[fit])) < 2:
        raise UserError(
            f"the validation split left {len(fit)} training images of one class to fit on; "
            "the training set needs more images or groups per class, or a smaller --val-fraction"
        )
    grid = sorted(float(c) for c in c_grid)
    val_scores: dict[str, float] = {}
    for c in grid:
        pipe = fit_probe(train.features[fit], train.labels[fit], c)
        with warnings.catch_warnings():
            # A small grouped validation part may lack a class; balanced accuracy then averages the present ones.
            warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
            score = balanced_accuracy_score(train.labels[val], pipe.predict(train.features[val]))
        val_scores[repr(c)] = float(score)
    # max() keeps the first best, i.e. the smallest C among ties (grid is ascending).
    best = max(grid, key=lambda c: val_scores[repr(c)])
    final = fit_probe(train.features, train.labels, best)
    probs = class_probabilities(final, test.features, len(classes))
    row: dict[str, Any] = {
        "protocol": "linear",
        "c": best,
        "val_balanced_accuracy": val_scores,
        "val_grouped": grouped,
        "n_fit": len(fit),
        "n_val": len(val),
        "converged": _converged(final),
    }
    row.update(classification_metrics(y_true, probs.argmax(axis=1), probs, classes=classes, ordinal=ordinal))
    return row


# ----------------------------------------------------------------------------- command line


def add_linear_arguments(parser: Parser, where: str = "") -> None:
    """``--c-grid`` and ``--val-fraction``, for every command that fits this probe; ``where`` says on what."""
    parser.add_argument(
        "--c-grid",
        type=float,
        nargs="+",
        default=list(DEFAULT_C_GRID),
        metavar="C",
        help=f"inverse regularisation strengths to choose C among{where} (default 1e-4 ... 1e2, 7 log-spaced)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of the training images (whole groups) held out to choose C{where} (default %(default)s)",
    )


def build_parser() -> Parser:
    p = make_parser(
        "python -m probes.linear",
        "Linear probe of a frozen encoder (logistic regression, C chosen on a grouped validation split).",
    )
    add_linear_arguments(p)
    p.add_argument(
        "--ordinal",
        action="store_true",
        help="the classes are ordered grades, in class order: Cohen's kappa is quadratic-weighted",
    )
    return add_probe_arguments(p, seed_help="seed of the validation split (default %(default)s)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [c for c in args.c_grid if not c > 0]  # also catches nan
    if bad:
        raise UserError(f"--c-grid values must be > 0, got {bad}")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must lie strictly between 0 and 1, got {args.val_fraction}")
    request = probe_request(args)
    splits, split = probe_splits(request, probe="linear probe")
    rows: dict[str, dict[str, Any]] = {}
    for inputs in splits:
        row = run_linear(inputs.train, inputs.test, args.c_grid, args.val_fraction, args.seed, args.ordinal)
        if not row["converged"]:
            print(
                f"warning: logistic regression did not converge in {MAX_ITER} iterations at C={row['c']:g}"
                f"{' (' + inputs.name + ')' if inputs.name else ''}",
                file=sys.stderr,
            )
        rows.update(prefixed(inputs.name, {"linear": row}))
    split = {
        **split,
        "validation": "grouped" if row["val_grouped"] else "stratified",
        "val_fraction": args.val_fraction,
    }
    config = {
        "c_grid": sorted(args.c_grid),
        "val_fraction": args.val_fraction,
        "selection": "balanced_accuracy",
        "solver": "lbfgs",
        "max_iter": MAX_ITER,
        "standardize": True,
        "ordinal": args.ordinal,
    }
    report(
        request,
        "linear",
        "image-classification",
        TITLE,
        inputs,
        rows,
        format_table(rows, ("C", "c", ".0e")),
        split,
        config,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
