"""Linear probe of a frozen encoder: logistic regression on its features, in three protocols.

Every fit is scikit-learn's ``LogisticRegression`` (L-BFGS, L2 penalty on the weights, not the
intercept; multinomial beyond two classes; at most 1000 iterations), refitted with the chosen C on all of TRAIN and
evaluated once on TEST. ``--protocol`` says how features are prepared and how C is found:

- ``ssl-path`` (default): features standardised (``StandardScaler`` in one ``Pipeline`` with the
  classifier, so it only sees the rows it is fitted on); class-balanced weights
  (``class_weight="balanced"``); C from ``--c-grid`` (default 21 half-decades, 1e-6 ... 1e4), the one
  with the lowest class-balanced log-loss on a validation part of TRAIN: whole groups (slides,
  patients) held out where the training set has them (m of the k folds of one ``StratifiedGroupKFold``,
  m/k about ``--val-fraction``, 20 % by default: :func:`ssl_path.evaluation.splits.held_out_folds`;
  classes kept in proportion where the groups allow), else a stratified random split. Each row
  records the validation share it got (``val_share``, beside ``n_fit`` and ``n_val``). A chosen C
  at either end of the grid prints a warning: the best C may lie beyond it.
  Why not balanced accuracy on an unweighted fit, as before: with a majority class (78 % normal
  mitoses in AMi-Br) every strongly regularised C predicts the majority for every image, all those
  C tie at 0.5, and the choice drifts to the grid's top (C = 100 in 3 of 4 folds; on hand-crafted
  features AUROC 0.51 where small C gives 0.62-0.71). The balanced weights put the decision threshold
  where balanced accuracy wants it, and the log-loss is continuous, so it tells every C apart.
  Where it departs from both anchors: it standardises, weights the classes, scores C by log-loss
  and validates on whole slides (neither anchor knows of slides).
- ``uni``: UNI's linear probe (Chen et al. 2024, ``uni/downstream/eval_patch_features/linear_probe.py``):
  raw features, unweighted, a fixed C = embedding dim x number of training classes / 100, no search,
  no validation split. Where it differs: UNI fits its own PyTorch L-BFGS by default, whose loss is
  the mean cross-entropy plus (1/C) x 0.5 x ||W|| (the unsquared norm); this follows UNI's
  ``use_sklearn=True`` path, scikit-learn's C x (summed cross-entropy) + 0.5 x ||W||^2, which for the
  same C regularises differently. UNI fits train + its validation set; here TRAIN is all there is.
  UNI's multiclass AUROC is one-vs-one (ours one-vs-rest).
- ``dinov2``: DINOv2's log-regression evaluation (Oquab et al. 2023, ``dinov2/eval/log_regression.py``):
  raw features (no standardisation), in float64, unweighted; C over DINOv2's grid
  10 ** linspace(-6, 5, 45), the one with the best accuracy (its default metric, top-1) on a random
  10 % of TRAIN (``torch.randperm`` under torch seed ``--seed``, DINOv2's being 0: the first N // 10
  rows; not stratified, not grouped by slide), ties to the smaller C; refitted on all of TRAIN.
  Where it differs: DINOv2 fits with cuML's quasi-Newton solver at tol 1e-12 (cuML divides the
  penalty by the sample size, by default in current releases, which makes its C scikit-learn's), this
  with scikit-learn's L-BFGS at its default tolerance, so coefficients may differ in the last digits.

The test split is never used for a choice; the groups train and test share are reported, not
corrected. Rows carry bootstrap CIs and, with ``--compare``, paired differences (:mod:`probes.common`).

    python -m probes.linear --ckpt REF --train SPEC --test SPEC [--protocol ssl-path|uni|dinov2]
        [--c-grid 1e-6 ... 1e4] [--compare REF2] [--out results.json]
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

from probes.common import (
    Prediction,
    add_compare_argument,
    add_probe_arguments,
    align_labels,
    check_reference,
    format_table,
    prefixed,
    probe_request,
    probe_splits,
    report,
    score_rows,
)
from probes.features import FeatureSet
from ssl_path.core.cli import Parser, make_parser
from ssl_path.core.errors import UserError, run_cli
from ssl_path.evaluation.bootstrap import DEFAULT_RESAMPLES
from ssl_path.evaluation.splits import group_ids, grouped_holdout

__all__ = [
    "TITLE",
    "PROTOCOLS",
    "Protocol",
    "DEFAULT_PROTOCOL",
    "DEFAULT_C_GRID",
    "DINOV2_C_GRID",
    "DEFAULT_VAL_FRACTION",
    "DINOV2_VAL_SHARE",
    "MAX_ITER",
    "uni_cost",
    "validation_split",
    "dinov2_split",
    "fit_probe",
    "class_probabilities",
    "linear_settings",
    "linear_prediction",
    "run_linear",
    "build_parser",
    "main",
]

TITLE = "linear probe (frozen encoder)"
DEFAULT_C_GRID = tuple(10.0 ** (e / 2) for e in range(-12, 9))  # 1e-6 ... 1e4, half-decades
DINOV2_C_GRID = tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45))  # dinov2 C_POWER_RANGE
DEFAULT_VAL_FRACTION = 0.2
DINOV2_VAL_SHARE = 10  # DINOv2 chooses C on len(train) // 10 of the training rows
MAX_ITER = 1000


@dataclass(frozen=True)
class Protocol:
    """How a linear probe prepares features, weights classes and finds C (see the module docstring)."""

    name: str
    standardize: bool
    class_weight: str | None  # "balanced" or None (unweighted)
    selection: str  # "balanced_log_loss" or "accuracy" on a validation part; "fixed": no search


PROTOCOLS = {
    "ssl-path": Protocol("ssl-path", standardize=True, class_weight="balanced", selection="balanced_log_loss"),
    "uni": Protocol("uni", standardize=False, class_weight=None, selection="fixed"),
    "dinov2": Protocol("dinov2", standardize=False, class_weight=None, selection="accuracy"),
}
DEFAULT_PROTOCOL = "ssl-path"


def uni_cost(dim: int, n_classes: int) -> float:
    """UNI's fixed C: embedding dim x number of classes / 100 (``train_linear_probe``)."""
    return dim * n_classes / 100


def validation_split(
    labels: np.ndarray, groups: Sequence[str | None], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(fit indices, validation indices, grouped) partitioning ``labels``' rows (the ``ssl-path`` split).

    Grouped when any row has a group and there are at least two groups: no group then appears on both
    sides (:func:`ssl_path.evaluation.splits.grouped_holdout`, as the test split). Otherwise a stratified random split (plain random if a class is too small to stratify).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    ids = group_ids(groups)
    n_groups = len(np.unique(ids))
    if any(g is not None for g in groups) and n_groups >= 2:
        fit, val = grouped_holdout(labels, ids, val_fraction, seed)
        return fit, val, True
    n_val = math.ceil(val_fraction * len(rows))  # as train_test_split rounds it
    if not 0 < n_val < len(rows):  # train_test_split would refuse it in a paragraph: the caller says it in a line
        return (rows[:0], rows, False) if n_val else (rows, rows[:0], False)
    counts = np.bincount(labels)[np.unique(labels)]
    stratify = labels if len(counts) > 1 and counts.min() >= 2 else None
    try:
        fit, val = train_test_split(rows, test_size=val_fraction, random_state=seed, stratify=stratify)
    except ValueError:  # a validation part smaller than the number of classes cannot be stratified
        fit, val = train_test_split(rows, test_size=val_fraction, random_state=seed)
    return np.sort(fit), np.sort(val), False


def dinov2_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices) as DINOv2 draws them: a torch permutation under ``seed``,
    its first ``n // 10`` rows for validation (torch, so that seed 0 gives DINOv2's own split)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    cut = n // DINOV2_VAL_SHARE
    return order[cut:], order[:cut]


def fit_probe(
    features: np.ndarray, labels: np.ndarray, c: float, protocol: str = DEFAULT_PROTOCOL, max_iter: int = MAX_ITER
) -> Pipeline:
    """The protocol's logistic regression (its scaler first, when it standardises), fitted on these rows only."""
    if c <= 0:
        raise ValueError(f"C must be > 0, got {c}")
    spec = PROTOCOLS[protocol]
    logreg = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, class_weight=spec.class_weight)
    pipe = Pipeline([("scale", StandardScaler() if spec.standardize else "passthrough"), ("logreg", logreg)])
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


def _val_score(selection: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """How good a C looks on the validation part, higher is better."""
    if selection == "accuracy":
        return float(accuracy_score(labels, probs.argmax(axis=1)))
    # Each validation class weighs the same, as in the balanced fit; a class the small grouped
    # validation part lacks simply adds nothing.
    weights = compute_sample_weight("balanced", labels)
    return -float(log_loss(labels, probs, labels=np.arange(probs.shape[1]), sample_weight=weights))


def linear_settings(
    protocol: str, c_grid: Sequence[float] | None, val_fraction: float | None
) -> tuple[tuple[float, ...], float | None]:
    """The C grid and validation fraction a protocol searches with: the given ones for ``ssl-path``
    (defaults when None); ``uni`` and ``dinov2`` fix their own and refuse others."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown linear-probe protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol != "ssl-path":
        given = [flag for flag, value in (("--c-grid", c_grid), ("--val-fraction", val_fraction)) if value is not None]
        if given:
            raise UserError(f"--protocol {protocol} fixes how C is chosen; {' and '.join(given)} apply to ssl-path")
        return (DINOV2_C_GRID, 1 / DINOV2_VAL_SHARE) if protocol == "dinov2" else ((), None)
    grid = tuple(DEFAULT_C_GRID if c_grid is None else c_grid)
    if not grid or any(not 0 < c < math.inf for c in grid):  # also catches nan
        raise UserError(f"--c-grid values must be finite and > 0, got {list(grid)}")
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction must lie strictly between 0 and 1, got {fraction}")
    return tuple(sorted(float(c) for c in grid)), fraction


def _select_c(
    train: FeatureSet, protocol: str, grid: Sequence[float], val_fraction: float | None, seed: int
) -> dict[str, Any]:
    """The chosen C and how it was chosen: the row's ``c``, ``val_*``, ``n_fit``/``n_val`` and grid edge."""
    spec = PROTOCOLS[protocol]
    if spec.selection == "fixed":
        c = uni_cost(train.dim, len(np.unique(train.labels)))
        return {"c": c, "c_selection": "fixed: dim x classes / 100", "n_fit": len(train), "n_val": 0}
    if protocol == "dinov2":
        fit, val = dinov2_split(len(train), seed)
        grouped = False
    else:
        fit, val, grouped = validation_split(train.labels, train.groups, val_fraction, seed)
    if len(val) == 0 or len(np.unique(train.labels[fit])) < 2:
        raise UserError(
            f"the validation split left {len(fit)} training images ({len(np.unique(train.labels[fit]))} classes) "
            f"to fit on and {len(val)} to validate; the training set needs more images or groups per class"
            + (", or a smaller --val-fraction" if protocol == "ssl-path" else "")
        )
    n_classes = len(train.classes)
    scores: dict[str, float] = {}
    for c in grid:
        pipe = fit_probe(train.features[fit], train.labels[fit], c, protocol)
        scores[repr(c)] = _val_score(
            spec.selection, train.labels[val], class_probabilities(pipe, train.features[val], n_classes)
        )
    # max() keeps the first best, i.e. the smallest C among ties (the grid is ascending), as DINOv2's
    # metric tracker (torch.max returns the first maximum) does.
    best = max(grid, key=lambda c: scores[repr(c)])
    edge = None if len(grid) < 2 else ("low" if best == grid[0] else "high" if best == grid[-1] else None)
    # Stored as measured: the log-loss itself (lower is better), the accuracy (higher is better).
    values = {k: -v for k, v in scores.items()} if spec.selection == "balanced_log_loss" else scores
    return {
        "c": best,
        "c_selection": f"validation {spec.selection}",
        "c_grid_edge": edge,
        "val_criterion": spec.selection,
        "val_scores": values,
        "val_grouped": grouped,
        "n_fit": len(fit),
        "n_val": len(val),
        "val_share": len(val) / len(train),  # of the val_fraction asked for, whole groups being what they are
    }


def linear_prediction(
    train: FeatureSet,
    test: FeatureSet,
    protocol: str = DEFAULT_PROTOCOL,
    c_grid: Sequence[float] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> Prediction:
    """The protocol's probe fitted on the labelled ``train`` rows (C chosen on TRAIN only) and applied
    to ``test``: its settings (protocol, C and how it was chosen, convergence) and predictions."""
    grid, fraction = linear_settings(protocol, c_grid, val_fraction)
    labelled = np.flatnonzero(train.labels >= 0)
    if len(labelled) == 0:
        raise UserError("the training set has no labelled images")
    train = train.select(labelled)
    spec = PROTOCOLS[protocol]
    chosen = _select_c(train, protocol, grid, fraction, seed)
    final = fit_probe(train.features, train.labels, chosen["c"], protocol)
    probs = class_probabilities(final, test.features, len(train.classes))
    settings = {
        "protocol": protocol,
        **chosen,
        "standardize": spec.standardize,
        "class_weight": spec.class_weight,
        "converged": _converged(final),
    }
    return Prediction(settings, probs.argmax(axis=1), probs)


def _warn_fit(row: dict[str, Any], grid: Sequence[float], where: str) -> None:
    """One line each for a final fit that did not converge and a C chosen at the edge of its grid."""
    if not row["converged"]:
        print(
            f"warning: logistic regression did not converge in {MAX_ITER} iterations at C={row['c']:g}{where}",
            file=sys.stderr,
        )
    if row.get("c_grid_edge"):
        print(
            f"warning: linear probe chose C={row['c']:g}, the {'lowest' if row['c_grid_edge'] == 'low' else 'highest'} "
            f"of its grid ({grid[0]:g} ... {grid[-1]:g}){where}; the best C may lie beyond it",
            file=sys.stderr,
        )


def run_linear(
    train: FeatureSet,
    test: FeatureSet,
    c_grid: Sequence[float] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    ordinal: bool = False,
    protocol: str = DEFAULT_PROTOCOL,
    n_resamples: int = DEFAULT_RESAMPLES,
    reference: tuple[FeatureSet, FeatureSet] | None = None,
    where: str = "",
) -> dict[str, Any]:
    """The metrics row of the linear probe: the settings of :func:`linear_prediction` (protocol, C,
    ``val_scores`` of each C under ``val_criterion``, ``c_grid_edge`` "low"/"high" when C is an end of
    the grid, split sizes), the test metrics with bootstrap CIs
    (:func:`probes.common.score_rows`, seeded by ``seed``) and, given another encoder's (train, test)
    features of the same rows as ``reference``, the paired differences. Warnings (no convergence, C at
    the grid's edge, one predicted class) go to stderr, ``where`` naming the split in them.
    """
    classes = train.classes
    y_true = align_labels(test, classes, probe="linear probe")
    ours = {"linear": linear_prediction(train, test, protocol, c_grid, val_fraction, seed)}
    _warn_fit(ours["linear"].settings, linear_settings(protocol, c_grid, val_fraction)[0], where)
    theirs = None
    if reference is not None:
        check_reference(train, test, reference)
        theirs = {"linear": linear_prediction(*reference, protocol, c_grid, val_fraction, seed)}
    rows = score_rows(
        ours, y_true, classes, test.groups, "linear probe", ordinal, n_resamples, seed, theirs, where=where
    )
    return rows["linear"]


# ----------------------------------------------------------------------------- command line


def add_linear_arguments(parser: Parser, where: str = "") -> None:
    """``--c-grid`` and ``--val-fraction``, for every command that fits this probe; ``where`` says on what."""
    parser.add_argument(
        "--c-grid",
        type=float,
        nargs="+",
        default=None,
        metavar="C",
        help=f"inverse regularisation strengths to choose C among{where} (default 1e-6 ... 1e4, 21 half-decades)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"share of the training images (whole groups) held out to choose C{where} "
        f"(default {DEFAULT_VAL_FRACTION})",
    )


def build_parser() -> Parser:
    p = make_parser(
        "python -m probes.linear",
        "Linear probe of a frozen encoder (logistic regression; ssl-path, UNI or DINOv2 protocol).",
    )
    p.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default=DEFAULT_PROTOCOL,
        help="ssl-path: standardised, balanced, C on validation log-loss; uni: raw, fixed C = dim x classes / 100; "
        "dinov2: raw, C on 10%% of train by accuracy (default %(default)s)",
    )
    add_linear_arguments(p, " (--protocol ssl-path)")
    p.add_argument(
        "--ordinal",
        action="store_true",
        help="the classes are ordered grades, in class order: Cohen's kappa is quadratic-weighted",
    )
    add_compare_argument(p)
    return add_probe_arguments(p, seed_help="seed of the validation split and the bootstrap (default %(default)s)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    grid, val_fraction = linear_settings(args.protocol, args.c_grid, args.val_fraction)
    request = probe_request(args)
    splits, split = probe_splits(request, probe="linear probe")
    rows: dict[str, dict[str, Any]] = {}
    shares: list[float | None] = []  # each training set's validation share, as obtained
    for inputs in splits:
        where = f" ({inputs.name})" if inputs.name else ""
        row = run_linear(
            inputs.train,
            inputs.test,
            args.c_grid,
            args.val_fraction,
            request.seed,
            args.ordinal,
            args.protocol,
            request.bootstrap,
            inputs.reference,
            where,
        )
        rows.update(prefixed(inputs.name, {"linear": row}))
        shares.append(row.get("val_share"))
    protocol = PROTOCOLS[args.protocol]
    if protocol.selection != "fixed":
        validation = "random 10 %" if args.protocol == "dinov2" else "grouped" if row["val_grouped"] else "stratified"
        split = {**split, "validation": validation}
        # The share obtained (of config.val_fraction) differs per training set: under
        # leave-one-domain-out it goes with its fold.
        if "folds" in split:
            split["folds"] = [{**fold, "val_share": share} for fold, share in zip(split["folds"], shares)]
        else:
            split["val_share"] = shares[0]
    config = {
        "protocol": args.protocol,
        "c_grid": list(grid),
        "val_fraction": val_fraction,
        "selection": protocol.selection,
        "solver": "lbfgs",
        "max_iter": MAX_ITER,
        "standardize": protocol.standardize,
        "class_weight": protocol.class_weight,
        "ordinal": args.ordinal,
    }
    report(
        request,
        "linear",
        "image-classification",
        TITLE,
        inputs,
        rows,
        format_table(rows, ("C", "c", ".0e"), reference=request.compare),
        split,
        config,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
