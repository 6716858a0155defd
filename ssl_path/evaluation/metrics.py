"""Classification metrics every probe reports, all computed by scikit-learn.

One function, one dict: accuracy, balanced accuracy, macro F1, AUROC, Cohen's kappa, the confusion
matrix and n (:data:`SCORES`, what tables show), and beside them the variants the anchors report
(:data:`VARIANT_SCORES`), so a figure can be set against a paper's:

- ``positive_f1``: F1 of the rarer class of the test set (binary sets only, else None; a tie goes to
  the second class), the abnormal one where the anchors report it (AMi-Br: atypical). It is chosen
  from the labels, not from the class order, which differs between readers (``amibr:`` lists normal
  first, ``csv:`` and ``folder:`` sort by name); the row names it (``positive_class``), and a
  bootstrap scores that class on every redraw;
- ``weighted_f1``: per-class F1 averaged with the classes' test counts as weights (UNI);
- ``quadratic_kappa``: Cohen's kappa with quadratic weights (UNI reports it for every task), whatever
  ``ordinal`` makes of ``cohen_kappa``.

Class ids are fixed by ``classes`` (index = id), so a class missing from a small test split still
has its row and column, and two probes of the same set give comparable matrices. Macro F1 averages
the classes that are in the test set or predicted (scikit-learn's default): a class with neither
has no F1, and counting it as 0 would understate the score.
Undefined values (AUROC with a class absent from ``y_true``, kappa of a constant labelling) are None,
never NaN, so that the dict is valid JSON.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

__all__ = [
    "classification_metrics",
    "auroc",
    "SCORES",
    "VARIANT_SCORES",
    "CLASSIFICATION_SCORES",
    "positive_class",
    "SEGMENTATION_SCORES",
    "DETECTION_SCORES",
    "LOWER_IS_BETTER",
    "TASK_SCORES",
]

# The scores of a row (higher is better); the rest of a row (n, confusion matrix) describes it.
SCORES = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "cohen_kappa")
# The anchors' variants of these, kept in results beside ours (see the module docstring).
VARIANT_SCORES = ("positive_f1", "weighted_f1", "quadratic_kappa")
CLASSIFICATION_SCORES = SCORES + VARIANT_SCORES
# A segmentation row's scores (finetune.metrics computes them): per label pixel Dice / IoU, and per
# object (GlaS, AJI) where objects are scored; the object Hausdorff distance is lower-better, in pixels.
SEGMENTATION_SCORES = ("dice", "iou", "dice_pooled", "aji", "object_f1", "object_dice", "object_hausdorff")
# A detection row's (finetune.detection_metrics): COCO box mAP over all classes, AP of one class, the
# point matching's precision, recall and F1 at the threshold chosen on validation; for Mask R-CNN also
# mask mAP / AP and, from the masks pasted into each image, AJI and object F1 / Dice.
DETECTION_SCORES = (
    "map",
    "map_50",
    "map_75",
    "ap",
    "ap_50",
    "precision",
    "recall",
    "f1",
    "mask_map",
    "mask_map_50",
    "mask_map_75",
    "mask_ap",
    "mask_ap_50",
    "aji",
    "object_f1",
    "object_dice",
)
LOWER_IS_BETTER = ("object_hausdorff",)
# What a model card shows of a results file, by the task it states.
TASK_SCORES = {"image-classification": SCORES, "segmentation": SEGMENTATION_SCORES, "detection": DETECTION_SCORES}


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def positive_class(y_true: np.ndarray, n_classes: int) -> int | None:
    """The class id whose F1 is ``positive_f1``: the rarer of two in ``y_true`` (1 on a tie), the one
    present where the other is absent (an all-atypical test set scores atypical); None unless binary."""
    if n_classes != 2:
        return None
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=2)
    return 0 if 0 < counts[0] < counts[1] or counts[1] == 0 else 1


def auroc(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> float | None:
    """Binary: AUROC of the class-1 scores; multiclass: one-vs-rest macro average.

    None when a class is absent from ``y_true`` (its one-vs-rest curve is undefined). For more than
    two classes scikit-learn needs rows that sum to 1, i.e. probabilities, not logits.
    """
    labels = np.arange(n_classes)
    if not np.isin(labels, y_true).all():
        return None
    if n_classes == 2:
        return _finite(skm.roc_auc_score(y_true, probs[:, 1]))
    return _finite(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    probs: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    ordinal: bool = False,
) -> dict[str, Any]:
    """Metrics of predicted class ids against true ones.

    ``probs`` [N, C] (optional) gives AUROC; ``classes`` fixes C (default: the ids seen, or the width of
    ``probs``); ``ordinal`` makes kappa quadratic-weighted (grades), else plain Cohen's kappa. Every key
    of :data:`CLASSIFICATION_SCORES` is in the dict (None where undefined).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true and y_pred must be equal-length, 1-D, non-empty: {y_true.shape}, {y_pred.shape}")
    if classes is not None:
        n_classes = len(classes)
    elif probs is not None:
        n_classes = int(np.asarray(probs).shape[1])
    else:
        n_classes = int(max(y_true.max(), y_pred.max())) + 1
    if min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n_classes:
        raise ValueError(
            f"class ids must lie in [0, {n_classes}); got {y_true.min()}..{y_true.max()} true, "
            f"{y_pred.min()}..{y_pred.max()} predicted"
        )
    labels = np.arange(n_classes)
    with warnings.catch_warnings():
        # Small test splits miss classes; the values sklearn still returns then are the ones we want.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")  # from balanced_accuracy_score
        result: dict[str, Any] = {
            "n": int(len(y_true)),
            "accuracy": _finite(skm.accuracy_score(y_true, y_pred)),
            "balanced_accuracy": _finite(skm.balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": _finite(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "auroc": None,
            "cohen_kappa": _finite(
                skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic" if ordinal else None)
            ),
            "positive_f1": None,
            "weighted_f1": _finite(skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
            "quadratic_kappa": _finite(skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")),
            "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        }
        positive = positive_class(y_true, n_classes)
        if positive is not None:
            result["positive_class"] = classes[positive] if classes is not None else positive
            result["positive_f1"] = _finite(
                skm.f1_score(y_true, y_pred, labels=labels, pos_label=positive, average="binary", zero_division=0)
            )
        if probs is not None:
            probs = np.asarray(probs, dtype=np.float64)
            if probs.shape != (len(y_true), n_classes):
                raise ValueError(f"probs must be [{len(y_true)}, {n_classes}], got {list(probs.shape)}")
            result["auroc"] = auroc(y_true, probs, n_classes)
    if classes is not None:
        result["classes"] = list(classes)
    return result
