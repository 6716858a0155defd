"""Few-shot and label-efficiency curves of a frozen encoder.

How good is an encoder when only a few labels exist? For each label budget the training set (TRAIN
only; TEST is never sampled) is cut down to a stratified subset, three cheap probes are fitted on it
and evaluated on the whole TEST set, and this is repeated over several seeds:

- regimes: a *fraction* of each class (default 1, 10, 50, 100 %, at least one image per class) and
  *k shots*, exactly k images per class (default 1, 2, 4, 8, 16, 32; a class with fewer images gives
  all it has, and the row records which classes fell short);
- probes:
  - ``knn``: the DINO weighted vote of :func:`probes.knn.knn_predict`, k = min(20, subset size), T = 0.07;
  - ``linear``: :mod:`probes.linear`'s default (``ssl-path``) protocol: standardised, class-balanced
    logistic regression. C is chosen on a validation split of the subset
    (:func:`probes.linear.linear_prediction`) when every class has at least two images (and two
    groups, when there are groups) to split; otherwise a fixed C = 1.0, and the row says how often;
  - ``prototype``: SimpleShot (Wang et al. 2019, "SimpleShot: Revisiting Nearest-Neighbor
    Classification for Few-Shot Learning") with CL2N features: subtract the subset's mean, L2-normalise,
    assign each test image to the nearest class mean (Euclidean on the normalised features). Class
    probabilities are a softmax of the negative distances (temperature 1); they only serve AUROC,
    which depends on their order, not their scale. In the k-shot regime the prototype probe is cheap
    enough to draw ``--episodes`` subsets per seed (episode 0 is the seed's shared draw) and report
    their mean as that seed's value.

Each row, keyed ``"<regime>_<value>/<probe>"`` (e.g. ``"fraction_0.1/knn"``, ``"shots_4/prototype"``),
holds for each score of :data:`ssl_path.evaluation.metrics.CLASSIFICATION_SCORES` the mean over seeds,
the sample standard deviation over seeds, the per-seed values, and a 95 % confidence interval.

The interval: a figure here varies with which training subset was drawn *and* with which test
slides were scored, and a t-interval over seeds sees only the first: at fraction 1.0 every seed draws
the same subset, and that interval has zero width; a prototype row averages 100 episodes per seed,
so its seeds barely differ and that interval looked far tighter than the kNN and linear rows beside
it, although all are scored on the same test slides. So ``<score>_ci95`` joins two independent parts, kept beside
it: ``<score>_ci95_seeds``, Student's t over the seeds (the draws' spread; :mod:`ssl_path.evaluation.stats`),
and ``<score>_ci95_test``, the percentile bootstrap of the seeds' mean figure over ``--bootstrap``
redraws of the test groups (slides/patients, else images; :mod:`ssl_path.evaluation.bootstrap`), one
set of redraws for every row. Each side of the interval is the root sum of squares of the two parts'
sides (:func:`ssl_path.evaluation.bootstrap.combined_interval`): at fraction 1.0 it is the test
bootstrap alone, where the seeds do vary it is never narrower than their t-interval (a bootstrap over
5 seeds would understate their spread). A prototype row's mean over episodes is a more precise figure
than one draw, so its interval may still be narrower than a single-draw row's, by the draws' spread
that the episodes average away; the test slides' part, which no averaging removes, is in it.
``--bootstrap 0`` keeps the t-interval over seeds only. With one seed (``--seeds 1``) there is no
t-interval: the CI is the test bootstrap alone, and ``config.ci`` in results.json says so
(:func:`interval_label`). A probe that predicts one class for every
test image in some draws says so in one warning line per row (``n_one_class`` counts those draws).

With ``--compare REF2`` a second encoder's features of the same images go through the very same
subsets (drawn once, as indices), seeds and test redraws. Each row then holds REF2's figures under
``reference`` and the paired differences: ``<score>_diff``, this encoder minus REF2, and
``<score>_diff_ci95`` built as above from the per-seed differences (t over seeds) and the seeds' mean
difference on each test redraw. Pairing removes what both share: the same unlucky subset or hard
test slide hurts both, so a gain shows even where the two rows' own intervals overlap.

A learning-curve PNG (balanced accuracy against label fraction and shots, one line per probe, the
95 % CI shaded, REF2 dashed) is written beside ``--out`` as ``<its stem>_curves.png`` (``fewshot.json``:
``fewshot_curves.png``), or as ``fewshot_curves.png`` in the current directory without ``--out``.

    python -m probes.fewshot --ckpt REF --train SPEC --test SPEC [--fractions 0.01 0.1 0.5 1.0]
        [--shots 1 2 4 8 16 32] [--seeds 5] [--probes knn linear prototype] [--episodes 100]
        [--compare REF2] [--out results.json]

The seeds are ``--seed`` .. ``--seed + --seeds - 1`` (default 0..4).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from probes.common import (
    Prediction,
    add_compare_argument,
    add_probe_arguments,
    align_labels,
    check_reference,
    difference_header,
    excludes_zero,
    prefixed,
    probe_request,
    probe_splits,
    report,
    single_class,
)
from probes.features import FeatureSet
from probes.knn import DEFAULT_TEMPERATURE, knn_predict
from probes.linear import (
    DEFAULT_VAL_FRACTION,
    PROTOCOLS,
    add_linear_arguments,
    class_probabilities,
    fit_probe,
    linear_prediction,
    linear_settings,
)
from ssl_path.core.cli import Parser, make_parser
from ssl_path.core.errors import UserError, run_cli
from ssl_path.core.io import atomic_path
from ssl_path.evaluation.bootstrap import (
    DEFAULT_RESAMPLES,
    UNIT_WORDS,
    Resamples,
    combined_interval,
    percentile_interval,
    plain_scores,
    resampled_scores_of,
    resamples,
)
from ssl_path.evaluation.features import l2_normalize
from ssl_path.evaluation.metrics import CLASSIFICATION_SCORES, SCORES, positive_class
from ssl_path.evaluation.splits import group_ids, held_out_folds, sample_subset
from ssl_path.evaluation.stats import aggregate, summarize

__all__ = [
    "TITLE",
    "DEFAULT_FRACTIONS",
    "DEFAULT_SHOTS",
    "DEFAULT_SEEDS",
    "DEFAULT_EPISODES",
    "PROBES",
    "KNN_K",
    "FIXED_C",
    "CURVES_NAME",
    "sample_subset",
    "prototype_predict",
    "can_validate",
    "subset_prediction",
    "interval_label",
    "run_fewshot",
    "format_curves",
    "plot_curves",
    "curves_path",
    "build_parser",
    "main",
]

TITLE = "few-label probes (frozen encoder)"
DEFAULT_FRACTIONS = (0.01, 0.1, 0.5, 1.0)
DEFAULT_SHOTS = (1, 2, 4, 8, 16, 32)
DEFAULT_SEEDS = 5
DEFAULT_EPISODES = 100
PROBES = ("knn", "linear", "prototype")
KNN_K = 20
FIXED_C = 1.0
CURVES_NAME = "fewshot_curves.png"
# {units}: what the test redraws drew, "groups" (slides, patients) or "images" (a set without groups).
CI_BOOTSTRAP = "95%: t over seeds (subset draws) and percentile bootstrap over test {units}, sides added in quadrature"
CI_TEST = "95%: percentile bootstrap over test {units} alone (one seed: the spread over subset draws is not in it)"
CI_SEEDS = "95% t-distribution over seeds"


# ----------------------------------------------------------------------------- sampling


def _shortfall(labels: np.ndarray, shots: int, classes: Sequence[str]) -> dict[str, int]:
    """Classes with fewer than ``shots`` labelled rows, and how many they have."""
    counts = np.bincount(labels[labels >= 0], minlength=len(classes))
    return {classes[c]: int(n) for c, n in enumerate(counts) if n < shots}


# ----------------------------------------------------------------------------- probes


def prototype_predict(
    train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """SimpleShot nearest class mean on CL2N features: (predicted class [M], probabilities [M, n_classes]).

    Centring on the training mean removes the direction all features share, which otherwise dominates
    cosine similarity of frozen features. A class without training rows gets probability 0.
    """
    train = np.asarray(train_feats, dtype=np.float64)
    labels = np.asarray(train_labels, dtype=np.int64)
    centre = train.mean(axis=0, keepdims=True)
    train = l2_normalize(train - centre)
    test = l2_normalize(np.asarray(test_feats, dtype=np.float64) - centre)
    dist = np.full((len(test), n_classes), np.inf)
    for c in np.unique(labels):
        proto = train[labels == c].mean(axis=0)
        dist[:, c] = np.linalg.norm(test - proto, axis=1)
    logits = -dist
    # Shift by the row maximum so exp() stays bounded; exp(-inf) = 0 for absent classes.
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs.argmax(axis=1), probs


def can_validate(labels: np.ndarray, groups: Sequence[str | None], val_fraction: float = DEFAULT_VAL_FRACTION) -> bool:
    """Whether a subset can spare a validation part to choose C (:func:`probes.linear.validation_split`):
    every class has two or more images and, when the rows have groups, two or more groups, so that the
    fit part keeps every class, and at least as many images as the grouped split has folds
    (scikit-learn's ``StratifiedGroupKFold`` refuses fewer)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)[np.unique(labels)]
    if len(counts) == 0 or counts.min() < 2:
        return False
    if all(g is None for g in groups):
        return True
    for c in np.unique(labels):
        if len({groups[i] for i in np.flatnonzero(labels == c)}) < 2:
            return False
    n_splits, _ = held_out_folds(val_fraction, len(np.unique(group_ids(groups))))
    return bool(counts.min() >= n_splits)


def _linear_subset(
    train: FeatureSet, test: FeatureSet, c_grid: Sequence[float] | None, val_fraction: float | None, seed: int
) -> Prediction:
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if can_validate(train.labels, train.groups, fraction):
        try:
            chosen = linear_prediction(train, test, "ssl-path", c_grid, val_fraction, seed)
            return Prediction({**chosen.settings, "c_selection": "validation"}, chosen.pred, chosen.probs)
        except (UserError, ValueError):
            # The split still left one class to fit on (UserError) or scikit-learn could not split
            # (ValueError): one small subset must not end a long run; use the fixed C below.
            pass
    pipe = fit_probe(train.features, train.labels, FIXED_C)
    probs = class_probabilities(pipe, test.features, len(train.classes))
    return Prediction({"c": FIXED_C, "c_selection": "fixed", "c_grid_edge": None}, probs.argmax(axis=1), probs)


def subset_prediction(
    probe: str,
    train: FeatureSet,
    test: FeatureSet,
    seed: int = 0,
    c_grid: Sequence[float] | None = None,
    val_fraction: float | None = None,
) -> Prediction:
    """One probe fitted on ``train`` (an already drawn subset) and applied to ``test``."""
    n_classes = len(train.classes)
    if probe == "knn":
        k = min(KNN_K, len(train))
        pred, probs = knn_predict(train.features, train.labels, test.features, k, DEFAULT_TEMPERATURE, n_classes)
        return Prediction({"k_used": k}, pred, probs)
    if probe == "prototype":
        pred, probs = prototype_predict(train.features, train.labels, test.features, n_classes)
        return Prediction({}, pred, probs)
    if probe == "linear":
        return _linear_subset(train, test, c_grid, val_fraction, seed)
    raise UserError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")


def interval_label(n_seeds: int, n_resamples: int, units: str = "groups") -> str | None:
    """What the rows' 95 % CIs are, as results.json's ``config.ci`` (and so the card) states it: one
    seed has no t-interval, so its CI is the test bootstrap alone; None when there is no CI at all.
    ``units``: what the redraws drew ("groups", "images")."""
    if n_resamples:
        return (CI_BOOTSTRAP if n_seeds > 1 else CI_TEST).format(units=units)
    return CI_SEEDS if n_seeds > 1 else None


def _redrawn_units(rows: dict[str, dict[str, Any]]) -> str:
    words = {UNIT_WORDS[r["bootstrap"]["unit"]] for r in rows.values() if r.get("bootstrap")}
    return " or ".join(sorted(words)) or UNIT_WORDS["group"]


# ----------------------------------------------------------------------------- the curves


def _regimes(fractions: Sequence[float], shots: Sequence[int]) -> list[tuple[str, float | int]]:
    return [("fraction", float(f)) for f in fractions] + [("shots", int(k)) for k in shots]


def _episode_seed(seed: int, episode: int) -> int | list[int]:
    # Episode 0 is the seed's shared draw, so the prototype's first episode sees what kNN and linear see.
    return seed if episode == 0 else [seed, episode]


def _mean_scores(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each score's mean over episodes (None left out), as one seed's value."""
    return {s: summarize([m[s] for m in metrics])["mean"] for s in CLASSIFICATION_SCORES}


@dataclass
class _Draws:
    """One encoder's scores over a row's draws: per seed on the test set itself and on each test redraw."""

    per_seed: list[dict[str, Any]] = field(default_factory=list)
    redrawn: list[dict[str, np.ndarray]] = field(default_factory=list)
    one_class: list[int] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)  # one per seed, where a seed has one draw
    n_runs: int = 0


def _score_draws(
    probe: str,
    draws: Sequence[Sequence[np.ndarray]],
    train: FeatureSet,
    test: FeatureSet,
    y_true: np.ndarray,
    seeds: Sequence[int],
    redraws: Resamples | None,
    c_grid: Sequence[float] | None,
    val_fraction: float | None,
) -> _Draws:
    """``probe`` fitted on each drawn subset (row indices of ``train``, a list per seed) and scored on ``test``."""
    n_classes = len(train.classes)
    scored = _Draws()
    for seed, indices in zip(seeds, draws):
        runs = [subset_prediction(probe, train.select(idx), test, seed, c_grid, val_fraction) for idx in indices]
        outputs = [(r.pred, r.probs) for r in runs]
        scored.per_seed.append(_mean_scores(plain_scores(y_true, outputs, n_classes)))
        if redraws is not None:
            per_redraw = resampled_scores_of(redraws, y_true, outputs, n_classes)
            scored.redrawn.append({s: np.mean([x[s] for x in per_redraw], axis=0) for s in CLASSIFICATION_SCORES})
        scored.one_class += [c for c in (single_class(r.pred) for r in runs) if c is not None]
        scored.n_runs += len(runs)
        if len(runs) == 1:
            scored.settings.append(runs[0].settings)
    return scored


def _interval_rows(
    per_seed: Sequence[dict[str, Any]], redrawn: Sequence[dict[str, np.ndarray]], suffix: str = ""
) -> dict[str, Any]:
    """``<score><suffix>`` (the mean over seeds) and its 95 % CIs from per-seed values and, where the
    test set was redrawn, the seeds' mean figure on each redraw (see the module docstring)."""
    row = aggregate(per_seed, CLASSIFICATION_SCORES)
    out: dict[str, Any] = {}
    for score in CLASSIFICATION_SCORES:
        key = f"{score}{suffix}"
        out[key], out[f"{key}_std"], out[f"{key}_ci95"] = row[score], row[f"{score}_std"], row[f"{score}_ci95"]
        if redrawn:
            over_seeds = row[f"{score}_ci95"]  # Student's t over the seeds' draws
            test_ci = percentile_interval(np.mean([r[score] for r in redrawn], axis=0))
            half = None if over_seeds is None else (over_seeds[1] - over_seeds[0]) / 2
            out[f"{key}_ci95"] = combined_interval(row[score], test_ci, half)
            out[f"{key}_ci95_seeds"] = over_seeds
            out[f"{key}_ci95_test"] = test_ci
    if not suffix:
        out["n_seeds"], out["per_seed"] = row["n_seeds"], row["per_seed"]
    return out


def _differences(ours: _Draws, theirs: _Draws) -> tuple[list[dict[str, Any]], list[dict[str, np.ndarray]]]:
    """Per seed and per test redraw, this encoder's score minus the reference's on the same subsets."""
    per_seed = [
        {s: None if a[s] is None or b[s] is None else a[s] - b[s] for s in CLASSIFICATION_SCORES}
        for a, b in zip(ours.per_seed, theirs.per_seed)
    ]
    redrawn = [{s: a[s] - b[s] for s in CLASSIFICATION_SCORES} for a, b in zip(ours.redrawn, theirs.redrawn)]
    return per_seed, redrawn


def _probe_settings(probe: str, scored: _Draws) -> dict[str, Any]:
    """What each seed's single draw chose: k for kNN; C, how it was chosen, and how often it was fixed or
    at the grid's edge for the linear probe."""
    settings = scored.settings
    if probe == "knn":
        return {"k_used": [r["k_used"] for r in settings]}
    if probe == "linear":
        return {
            "c": [r["c"] for r in settings],
            "c_selection": [r["c_selection"] for r in settings],
            "n_fixed_c": sum(r["c_selection"] == "fixed" for r in settings),
            "n_c_at_grid_edge": sum(r.get("c_grid_edge") is not None for r in settings),
        }
    return {}


def _warn_one_class(scored: _Draws, probe: str, name: str, where: str, classes: Sequence[str]) -> None:
    if scored.one_class:
        common = classes[np.bincount(scored.one_class).argmax()]
        print(
            f"warning: few-shot {probe} at {name.split('/')[0]}{where} predicts one class "
            f"({common!r}) for all test images in {len(scored.one_class)} of {scored.n_runs} draws",
            file=sys.stderr,
        )


def run_fewshot(
    train: FeatureSet,
    test: FeatureSet,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
    probes: Sequence[str] = PROBES,
    episodes: int = DEFAULT_EPISODES,
    c_grid: Sequence[float] | None = None,
    val_fraction: float | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    where: str = "",
    reference: tuple[FeatureSet, FeatureSet] | None = None,
) -> dict[str, dict[str, Any]]:
    """Rows ``{"fraction_0.1/knn": ..., "shots_4/prototype": ...}``: each probe on stratified subsets of
    ``train`` at each fraction and shot count, one draw per seed, evaluated on all of ``test``.

    The 95 % CIs join the spread over seeds and over test redraws (see the module docstring); with
    ``n_resamples`` 0 they are t-intervals over seeds. ``where`` names the split in warnings.
    ``reference``: a second encoder's features of the same train and test rows, put through the same
    subsets, seeds and redraws; each row then also holds its scores (``reference``) and the paired
    differences ``<score>_diff`` with ``<score>_diff_ci95``, from the per-seed and per-redraw differences.
    """
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise UserError(f"unknown probes {unknown}; choose from {', '.join(PROBES)}")
    if episodes < 1:
        raise UserError(f"episodes must be >= 1, got {episodes}")
    if not seeds:
        raise UserError("at least one seed is needed")
    if reference is not None:
        check_reference(train, test, reference)
    classes = train.classes
    y_true = align_labels(test, classes, probe="few-shot probe")
    # One set of test redraws for every row (and both encoders), so that intervals are comparable.
    redraws = resamples(len(test), test.groups, n_resamples, seeds[0]) if n_resamples else None
    positive = positive_class(y_true, len(classes))  # the class every row's positive_f1 scores
    rows: dict[str, dict[str, Any]] = {}
    for regime, value in _regimes(fractions, shots):
        draw = {"fraction": value} if regime == "fraction" else {"shots": value}
        for probe in probes:
            name = f"{regime}_{value:g}/{probe}"
            n_draws = episodes if probe == "prototype" and regime == "shots" else 1
            # Drawn once, as row indices, so that a reference encoder is fitted on the very same images.
            draws = [
                [
                    sample_subset(train.labels, seed=_episode_seed(seed, e), n_classes=len(classes), **draw)
                    for e in range(n_draws)
                ]
                for seed in seeds
            ]
            args = (y_true, seeds, redraws, c_grid, val_fraction)
            ours = _score_draws(probe, draws, train, test, *args)
            row: dict[str, Any] = {
                "regime": regime,
                "value": value,
                "probe": probe,
                "seeds": list(seeds),
                "n_train": [len(d[0]) for d in draws],
                "n_test": len(test),
                **({"positive_class": classes[positive]} if positive is not None else {}),
            }
            if regime == "shots":
                row["episodes"] = n_draws
                row["short_classes"] = _shortfall(train.labels, int(value), classes)
            row.update(_probe_settings(probe, ours))
            row.update(_interval_rows(ours.per_seed, ours.redrawn))
            if redraws is not None:
                row["bootstrap"] = redraws.describe()
            row["n_one_class"] = len(ours.one_class)
            _warn_one_class(ours, probe, name, where, classes)
            if reference is not None:
                theirs = _score_draws(probe, draws, reference[0], reference[1], *args)
                _warn_one_class(theirs, probe, name, f"{where} (the --compare encoder)", classes)
                row["reference"] = {
                    **_probe_settings(probe, theirs),
                    **_interval_rows(theirs.per_seed, theirs.redrawn),
                    "n_one_class": len(theirs.one_class),
                }
                row.update(_interval_rows(*_differences(ours, theirs), suffix="_diff"))
            rows[name] = row
    return rows


def format_curves(rows: dict[str, dict[str, Any]], reference: str | None = None) -> str:
    """A fixed-width table: each row's mean and 95 % CI half-width of every score; rows compared with
    an encoder ``reference`` get a second block of paired differences, * where the CI excludes 0."""
    name_width = max([4, *(len(name) for name in rows)])
    width = max(len(s) for s in SCORES) + 1

    def cell(row: dict[str, Any], score: str) -> str:
        mean, ci = row[score], row[f"{score}_ci95"]
        if mean is None:
            return f"{'-':>{width}}"
        signed = score.endswith("_diff")
        half = "" if ci is None else f"±{(ci[1] - ci[0]) / 2:.3f}"
        mark = ("*" if excludes_zero(ci) else " ") if signed else ""
        return (format(mean, "+.3f" if signed else ".3f") + f"{half:>7}" + mark).rjust(width)

    def block(suffix: str) -> list[str]:
        lines = [f"{'row':<{name_width}}  {'n_train':>8}  " + "  ".join(f"{s:>{width}}" for s in SCORES)]
        for name, row in rows.items():
            n = f"{np.mean(row['n_train']):.0f}"
            cells = "  ".join(cell(row, s + suffix) for s in SCORES)
            lines.append(f"{name:<{name_width}}  {n:>8}  " + cells)
        return lines

    lines = block("")
    if reference is not None and any("balanced_accuracy_diff" in row for row in rows.values()):
        lines += ["", difference_header(reference), *block("_diff")]
    return "\n".join(lines)


def curves_path(out: Path | None, split: str = "") -> Path:
    """Where the learning-curve PNG goes: beside ``--out`` as ``<its stem>_curves.png`` (so that runs
    with their own ``--out`` share a folder), else :data:`CURVES_NAME` in the current directory; one per split."""
    name = CURVES_NAME if out is None else f"{Path(out).stem}_curves.png"
    name = name if not split else name.removesuffix(".png") + f"_{split}.png"
    return (Path(".") if out is None else Path(out).parent) / name


def plot_curves(rows: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """Two panels of balanced accuracy (label fraction, log x; shots per class, log2 x), one line per
    probe with its 95 % CI shaded, and dashed in the same colour the ``--compare`` encoder's where the
    rows have one; written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, regime, label in ((axes[0], "fraction", "label fraction"), (axes[1], "shots", "shots per class")):
        probes = list(dict.fromkeys(r["probe"] for r in rows.values() if r["regime"] == regime))
        for probe in probes:
            ours = [r for r in rows.values() if r["regime"] == regime and r["probe"] == probe]
            color = None
            for name, style, alpha, of_row in (
                (probe, "-", 0.2, lambda r: r),
                (f"{probe}, --compare", "--", 0.1, lambda r: r.get("reference")),
            ):
                points = sorted(
                    (r["value"], of_row(r)["balanced_accuracy"], of_row(r)["balanced_accuracy_ci95"])
                    for r in ours
                    if of_row(r) is not None and of_row(r)["balanced_accuracy"] is not None
                )
                if not points:
                    continue
                x = [p[0] for p in points]
                y = [p[1] for p in points]
                (line,) = ax.plot(x, y, style, marker="o", label=name, color=color)
                color = line.get_color()  # the reference in the colour of its probe
                # A CI needs two seeds; without it the band collapses onto the line.
                lo = [p[1] if p[2] is None else p[2][0] for p in points]
                hi = [p[1] if p[2] is None else p[2][1] for p in points]
                ax.fill_between(x, lo, hi, color=color, alpha=alpha, linewidth=0)
        if regime == "fraction":
            ax.set_xscale("log")
        else:
            ax.set_xscale("log", base=2)
        # 1, 2, 4 and 0.1 read better than 2^0 and 10^-1, and shots are whole
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
        if probes:
            ax.legend()
    axes[0].set_ylabel("balanced accuracy (mean, 95% CI)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line


def build_parser() -> Parser:
    p = make_parser(
        "python -m probes.fewshot",
        "Label-efficiency curves of a frozen encoder: kNN, linear and prototype probes on "
        "stratified subsets of the training set (label fractions and k shots per class).",
    )
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=list(DEFAULT_FRACTIONS),
        metavar="F",
        help="label fractions in (0, 1] (default 0.01 0.1 0.5 1.0)",
    )
    p.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=list(DEFAULT_SHOTS),
        metavar="K",
        help="images per class (default 1 2 4 8 16 32)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=DEFAULT_SEEDS,
        help="draws per setting, seeds --seed .. --seed + N - 1 (default %(default)s)",
    )
    p.add_argument(
        "--probes",
        nargs="+",
        default=list(PROBES),
        metavar="PROBE",
        help="any of knn, linear, prototype (default all three)",
    )
    p.add_argument(
        "--episodes",
        type=int,
        default=DEFAULT_EPISODES,
        help="k-shot draws per seed for the prototype probe (default %(default)s)",
    )
    add_linear_arguments(p, ", in a subset that allows a validation split")
    add_compare_argument(p)
    return add_probe_arguments(p, seed_help="first seed of the subset draws (default %(default)s)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad settings before any encoder is built."""
    bad = [f for f in args.fractions if not 0 < f <= 1]  # also catches nan
    if bad:
        raise UserError(f"--fractions must lie in (0, 1], got {bad}")
    bad = [k for k in args.shots if k < 1]
    if bad:
        raise UserError(f"--shots must be >= 1, got {bad}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {args.episodes}")
    unknown = [p for p in args.probes if p not in PROBES]
    if unknown:
        raise UserError(f"--probes {unknown} unknown; choose from {', '.join(PROBES)}")
    linear_settings("ssl-path", args.c_grid, args.val_fraction)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    # Duplicates would only repeat rows; sorted so the curves and table run left to right.
    fractions = sorted(set(args.fractions))
    shots = sorted(set(args.shots))
    probes = list(dict.fromkeys(args.probes))
    seeds = list(range(args.seed, args.seed + args.seeds))
    grid, val_fraction = linear_settings("ssl-path", args.c_grid, args.val_fraction)
    request = probe_request(args)
    # The curve PNGs are outputs like --out: refused without --overwrite, before any features.
    splits, split_info = probe_splits(
        request, "few-shot probe", also_writes=lambda names: [curves_path(request.out, n) for n in names]
    )
    rows: dict[str, dict[str, Any]] = {}
    curves: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for inputs in splits:
        split_rows = run_fewshot(
            inputs.train,
            inputs.test,
            fractions,
            shots,
            seeds,
            probes,
            args.episodes,
            args.c_grid,
            args.val_fraction,
            request.bootstrap,
            f" ({inputs.name})" if inputs.name else "",
            inputs.reference,
        )
        curves.append((inputs.name, split_rows))
        rows.update(prefixed(inputs.name, split_rows))
    encoders = [("", list(rows.values()))]
    if request.compare is not None:
        encoders.append((f" of the --compare encoder {request.compare}", [r["reference"] for r in rows.values()]))
    for of, chosen in encoders:
        fixed = sum(r.get("n_fixed_c", 0) for r in chosen)
        if fixed:
            print(
                f"note: {fixed} linear-probe subsets{of} were too small for a validation split; "
                f"they used a fixed C = {FIXED_C:g}",
                file=sys.stderr,
            )
        edge = sum(r.get("n_c_at_grid_edge", 0) for r in chosen)
        if edge:
            print(
                f"warning: {edge} linear-probe subsets{of} chose C at the edge of the grid "
                f"({grid[0]:g} ... {grid[-1]:g}); the best C may lie beyond it",
                file=sys.stderr,
            )
    config = {
        "fractions": fractions,
        "shots": shots,
        "seeds": seeds,
        "episodes": args.episodes,
        "probes": probes,
        "knn": {"k": f"min({KNN_K}, subset size)", "temperature": DEFAULT_TEMPERATURE},
        "linear": {
            "c_grid": list(grid),
            "val_fraction": val_fraction,
            "fixed_c": FIXED_C,
            "standardize": PROTOCOLS["ssl-path"].standardize,
            "class_weight": PROTOCOLS["ssl-path"].class_weight,
            "selection": PROTOCOLS["ssl-path"].selection,
        },
        "prototype": {"features": "CL2N", "distance": "euclidean", "probs": "softmax(-distance)"},
        "ci": interval_label(len(seeds), request.bootstrap, _redrawn_units(rows)),
    }
    split = {**split_info, "subsets": "stratified draws from train only", "n_seeds": len(seeds)}
    report(
        request,
        "fewshot",
        "image-classification",
        TITLE,
        splits[0],
        rows,
        format_curves(rows, request.compare),
        split,
        config,
        seeds=seeds,
    )
    for name, split_rows in curves:
        title = str(args.ckpt) + (f" (dashed: --compare {request.compare})" if request.compare else "")
        title += f", {name} left out" if name else ""
        png = plot_curves(split_rows, curves_path(request.out, name), title)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
