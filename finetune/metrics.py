"""Segmentation and instance metrics of the fine-tuned heads, all on numpy arrays.

Reading guide, from pixels to objects:

- ``pixel_scores``: Dice and IoU of one boolean mask, by MONAI (``compute_dice`` / ``compute_iou``
  with ``ignore_empty=False``). ``segmentation_metrics`` averages them per label over images and adds
  the pooled Dice (all pixels of all images in one sum), which small or empty images cannot sway.
- ``instances``: a binary mask -> connected components (8-connectivity, ``CONNECTIVITY``).
- ``object_scores``: the GlaS challenge object-level metrics, object F1, object Dice and object
  Hausdorff (Sirinukunwattana et al., "Gland segmentation in colon histology images: The GlaS
  challenge contest", Medical Image Analysis 35, 2017, arXiv 1603.00275).
- ``aji`` / ``aji_plus``: the Aggregated Jaccard Index (Kumar et al., "A dataset and a technique for
  generalized nuclear segmentation for computational pathology", IEEE TMI 36(7), 2017) and its
  one-to-one variant AJI+ (Graham et al., "HoVer-Net", Medical Image Analysis 58, 2019, arXiv
  1812.06499).
- ``instance_metrics``: all of the above, averaged over images, and pooled over the test set.

Every object metric starts from one contingency of the two instance maps (``_Overlap``: object areas
and the areas of all overlapping pairs, one ``np.unique`` over the pixel pairs), so a 1000x1000
MoNuSeg image with 500 nuclei never loops over pairs of objects. Hausdorff distances are computed only
for the pairs the definition needs, on the crop of the pair's bounding boxes, by
``skimage.metrics.hausdorff_distance``.

Empty cases ("nothing to find, nothing found" is a perfect score; a wrong mask never is):

==========================  ============  =================  =================
                            both empty    empty truth only   empty pred only
==========================  ============  =================  =================
pixel Dice / IoU            1             0                  0
object F1 / Dice            1             0                  0
object Hausdorff            None          None               None
AJI, AJI+                   1             0                  0
==========================  ============  =================  =================

The Hausdorff distance to an empty set is undefined (infinite), so a side without objects gives None;
an image with no objects at all gives None too (the official code returns 0 there), so that empty
images move the mean Hausdorff in neither direction; ``instance_metrics`` says over how many images it
is taken. Undefined values are None, never NaN or inf, so that results stay valid JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.measure import label as _label
from skimage.metrics import hausdorff_distance

__all__ = [
    "CONNECTIVITY",
    "pixel_scores",
    "segmentation_metrics",
    "instances",
    "object_scores",
    "aji",
    "aji_plus",
    "instance_metrics",
]

# Connected components touch by an edge or a corner (8-connectivity in 2-D): skimage's default and
# MATLAB bwlabel's, which the challenges' reference code used. Post-processing uses the same rule.
CONNECTIVITY = 2


# ----------------------------------------------------------------------------- pixels


def _as_mask(array: np.ndarray, name: str) -> np.ndarray:
    """A boolean view of a mask; 0/1 integers are accepted, floats (probabilities) are refused."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array
    if np.issubdtype(array.dtype, np.integer) and (array.size == 0 or (array.min() >= 0 and array.max() <= 1)):
        return array.astype(bool)
    raise ValueError(f"{name} must be a boolean (or 0/1 integer) mask, got dtype {array.dtype}")


def pixel_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice and IoU of two boolean [H, W] masks.

    MONAI with ``ignore_empty=False`` gives exactly the definition wanted: both empty -> 1, an empty
    truth with a non-empty prediction -> 0, otherwise 2|P∩T| / (|P| + |T|) and |P∩T| / |P∪T|.
    """
    pred, truth = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"pred and truth must be [H, W] masks of one shape: {pred.shape}, {truth.shape}")
    # float64: float32 would write 0.6000000238418579 for 12 / 20 into results.json
    p = torch.from_numpy(pred[None, None].astype(np.float64))  # [B=1, C=1, H, W]
    t = torch.from_numpy(truth[None, None].astype(np.float64))
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)
    iou = compute_iou(p, t, include_background=True, ignore_empty=False)
    return {"dice": float(dice.item()), "iou": float(iou.item())}


def segmentation_metrics(
    preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], labels: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per label: mean Dice and IoU over images, pooled Dice over all pixels, and n images.

    ``preds`` and ``truths`` hold one boolean [L, H, W] array per image (L = len(labels)); images may
    differ in size. Pooled Dice = 2 Σ|P∩T| / (Σ|P| + Σ|T|), 1 when the label is absent everywhere and
    never predicted.
    """
    labels = list(labels)
    if len(preds) != len(truths) or len(preds) == 0:
        raise ValueError(f"need as many predictions as truths, at least one: {len(preds)}, {len(truths)}")
    scores = {name: {"dice": [], "iou": []} for name in labels}
    inter = np.zeros(len(labels), dtype=np.int64)
    total = np.zeros(len(labels), dtype=np.int64)
    for i, (pred, truth) in enumerate(zip(preds, truths)):
        pred, truth = _as_mask(pred, "pred"), _as_mask(truth, "truth")
        if pred.shape != truth.shape or pred.ndim != 3 or pred.shape[0] != len(labels):
            raise ValueError(
                f"image {i}: pred and truth must both be [L={len(labels)}, H, W]: {pred.shape}, {truth.shape}"
            )
        for c, name in enumerate(labels):
            s = pixel_scores(pred[c], truth[c])
            scores[name]["dice"].append(s["dice"])
            scores[name]["iou"].append(s["iou"])
        inter += np.logical_and(pred, truth).sum(axis=(1, 2))
        total += pred.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
    out = {}
    for c, name in enumerate(labels):
        pooled = 2.0 * inter[c] / total[c] if total[c] > 0 else 1.0
        out[name] = {
            "dice": float(np.mean(scores[name]["dice"])),
            "iou": float(np.mean(scores[name]["iou"])),
            "dice_pooled": float(pooled),
            "n": len(preds),
        }
    return out


# ----------------------------------------------------------------------------- objects


def instances(binary: np.ndarray) -> np.ndarray:
    """int32 instance labels of a boolean mask: its connected components (8-connectivity), 0 = background."""
    binary = _as_mask(binary, "binary")
    return _label(binary, connectivity=CONNECTIVITY).astype(np.int32)


@dataclass(frozen=True)
class _Overlap:
    """The contingency of two instance maps, objects renumbered 1..K in label order (index = id - 1).

    ``pred`` / ``truth``: the renumbered maps (for crops); ``*_area`` [K]; ``pairs_*`` [M]: every
    overlapping (pred, truth) pair, as 0-based indices, with its intersection area ``pairs_inter``.
    """

    pred: np.ndarray
    truth: np.ndarray
    pred_area: np.ndarray
    truth_area: np.ndarray
    pairs_pred: np.ndarray
    pairs_truth: np.ndarray
    pairs_inter: np.ndarray


def _renumber(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Objects renumbered 1..K in the order of their labels, background 0."""
    top = int(labels.max())
    if top <= 4 * labels.size:  # the usual case: a lookup table, linear time (np.unique sorts)
        present = np.bincount(labels.ravel(), minlength=top + 1) > 0
        present[0] = False
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[present] = np.arange(1, int(present.sum()) + 1)
        return lut[labels], int(present.sum())
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids[0] != 0:
        return inverse + 1, len(ids)
    return inverse, len(ids) - 1


def _overlap(pred: np.ndarray, truth: np.ndarray) -> _Overlap:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"pred and truth must be [H, W] instance maps of one shape: {pred.shape}, {truth.shape}")
    for name, array in (("pred", pred), ("truth", truth)):
        if not np.issubdtype(array.dtype, np.integer) or (array.size and array.min() < 0):
            raise ValueError(f"{name} must be a non-negative integer instance map, got dtype {array.dtype}")
    if pred.size == 0:
        pred, truth = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
    p, n_pred = _renumber(pred)
    t, n_truth = _renumber(truth)
    both = (p > 0) & (t > 0)
    keys, inter = np.unique(p[both].astype(np.int64) * (n_truth + 1) + t[both], return_counts=True)
    return _Overlap(
        pred=p,
        truth=t,
        pred_area=np.bincount(p.ravel(), minlength=n_pred + 1)[1:],
        truth_area=np.bincount(t.ravel(), minlength=n_truth + 1)[1:],
        pairs_pred=keys // (n_truth + 1) - 1,
        pairs_truth=keys % (n_truth + 1) - 1,
        pairs_inter=inter,
    )


def _best(rows: np.ndarray, cols: np.ndarray, score: np.ndarray, n_rows: int) -> np.ndarray:
    """For each row the index (into the pair arrays) of its pair of highest score, -1 if it has none.

    Ties go to the lowest column, as MATLAB's ``mode`` and ``max`` in the reference code do.
    """
    best = np.full(n_rows, -1, dtype=np.int64)
    if len(rows):
        order = np.lexsort((cols, -score, rows))
        first = order[np.unique(rows[order], return_index=True)[1]]
        best[rows[first]] = first
    return best


def _take(values: np.ndarray, index: np.ndarray, fill: int) -> np.ndarray:
    """``values[index]``, ``fill`` where the index is -1 (no partner)."""
    out = np.full(len(index), fill, dtype=values.dtype)
    out[index >= 0] = values[index[index >= 0]]
    return out


class _Hausdorff:
    """Hausdorff distances between objects of the two maps, on crops, cached by pair."""

    def __init__(self, ov: _Overlap):
        self.ov = ov
        self.boxes = {"pred": ndimage.find_objects(ov.pred), "truth": ndimage.find_objects(ov.truth)}
        self.cache: dict[tuple[int, int], float] = {}

    def __call__(self, i_pred: int, i_truth: int) -> float:
        key = (i_pred, i_truth)
        if key not in self.cache:
            a, b = self.boxes["pred"][i_pred], self.boxes["truth"][i_truth]
            box = tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))
            self.cache[key] = float(
                hausdorff_distance(self.ov.pred[box] == i_pred + 1, self.ov.truth[box] == i_truth + 1)
            )
        return self.cache[key]

    def nearest(self, side: str, index: int) -> int:
        """The object of the other side nearest (by Hausdorff distance) to object ``index`` of ``side``.

        Exact, with pruning: H(A, B) >= max over a in A of the distance from a to B's bounding box,
        so candidates are tried in the order of that lower bound until it exceeds the best found.
        """
        other = "truth" if side == "pred" else "pred"
        own_map = self.ov.pred if side == "pred" else self.ov.truth
        own_box = self.boxes[side][index]
        points = np.argwhere(own_map[own_box] == index + 1) + [s.start for s in own_box]  # [N, 2]
        step = max(1, len(points) // 64)
        extremes = points[[points[:, 0].argmin(), points[:, 0].argmax(), points[:, 1].argmin(), points[:, 1].argmax()]]
        sample = np.concatenate([points[::step], extremes])[:, None, :]  # [S, 1, 2]
        boxes = np.array([[s.start for s in b] + [s.stop - 1 for s in b] for b in self.boxes[other]])  # [K, 4]
        gap = np.maximum(np.maximum(boxes[None, :, :2] - sample, sample - boxes[None, :, 2:]), 0)  # [S, K, 2]
        bound = np.sqrt((gap**2).sum(-1)).max(0)  # [K]
        best, best_dist = -1, np.inf
        for j in np.lexsort((np.arange(len(bound)), bound)):
            if bound[j] > best_dist:
                break
            dist = self(index, int(j)) if side == "pred" else self(int(j), index)
            if dist < best_dist or (dist == best_dist and j < best):
                best, best_dist = int(j), dist
        return best


def object_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """GlaS object-level metrics of two int instance maps [H, W] (0 = background).

    - F1: a predicted object is a true positive when it covers more than 50 % of the ground-truth
      object it overlaps most. Two disjoint predictions cannot both cover more than half of one GT
      object, so each GT object is matched at most once; FP = predictions - TP, FN = GT objects - TP.
    - Object Dice = ½ [Σ_i ω_i D(G_i, S*(G_i)) + Σ_j ω̃_j D(G*(S_j), S_j)], ω_i = |G_i| / Σ|G|,
      ω̃_j = |S_j| / Σ|S|, where S*(G_i) is the prediction overlapping G_i most (an empty set, Dice 0,
      when none does) and G*(S_j) likewise.
    - Object Hausdorff: the same weighted two-sided average of Hausdorff distances, where an object
      without an overlapping partner is paired with the nearest object of the other side by
      Hausdorff distance.

    Checked against the challenge's MATLAB code as translated to Python (evaluation_v6: ``F1score``,
    ``ObjectDice``, ``ObjectHausdorff``); the partner is the object of largest overlap, background
    excluded, ties to the lowest label. Returns ``object_f1``, ``object_precision``,
    ``object_recall``, ``object_dice``, ``object_hausdorff`` and the counts ``tp``, ``n_pred``,
    ``n_truth``; precision (recall) is None without predicted (GT) objects unless both are empty.
    """
    return _object_scores(_overlap(pred, truth))[0]


def _object_scores(ov: _Overlap) -> tuple[dict[str, Any], np.ndarray]:
    """The scores, and the area-weighted sums behind them for pooling over images:
    [Σ_j |S_j| D_j, Σ_i |G_i| D_i, Σ_j |S_j| H_j, Σ_i |G_i| H_i, Σ|S|, Σ|G|]."""
    n_pred, n_truth = len(ov.pred_area), len(ov.truth_area)
    out: dict[str, Any] = {"n_pred": n_pred, "n_truth": n_truth}
    areas = [float(ov.pred_area.sum()), float(ov.truth_area.sum())]
    if n_pred == 0 or n_truth == 0:
        score = 1.0 if n_pred == n_truth == 0 else 0.0
        out.update(
            tp=0,
            object_f1=score,
            object_precision=0.0 if n_pred else (None if n_truth else 1.0),
            object_recall=0.0 if n_truth else (None if n_pred else 1.0),
            object_dice=score,
            object_hausdorff=None,
        )
        return out, np.array([0.0, 0.0, 0.0, 0.0, *areas])
    rows_p, rows_t, inter = ov.pairs_pred, ov.pairs_truth, ov.pairs_inter
    k_pred = _best(rows_p, rows_t, inter, n_pred)  # pair (S_j, G*(S_j)), -1 when S_j touches no GT
    k_truth = _best(rows_t, rows_p, inter, n_truth)  # pair (S*(G_i), G_i)
    truth_of_pred, inter_pred = _take(rows_t, k_pred, -1), _take(inter, k_pred, 0)  # G*(S_j), |S_j ∩ G*(S_j)|
    pred_of_truth, inter_truth = _take(rows_p, k_truth, -1), _take(inter, k_truth, 0)

    tp = int((inter_pred > 0.5 * _take(ov.truth_area, truth_of_pred, 0)).sum())  # 0 > 0 without a partner
    dice_pred = 2.0 * inter_pred / (ov.pred_area + _take(ov.truth_area, truth_of_pred, 0))
    dice_truth = 2.0 * inter_truth / (ov.truth_area + _take(ov.pred_area, pred_of_truth, 0))

    haus = _Hausdorff(ov)
    haus_pred = [haus(j, int(i) if i >= 0 else haus.nearest("pred", j)) for j, i in enumerate(truth_of_pred)]
    haus_truth = [haus(int(j) if j >= 0 else haus.nearest("truth", i), i) for i, j in enumerate(pred_of_truth)]

    sums = np.array(
        [
            np.dot(ov.pred_area, dice_pred),
            np.dot(ov.truth_area, dice_truth),
            np.dot(ov.pred_area, haus_pred),
            np.dot(ov.truth_area, haus_truth),
            *areas,
        ]
    )
    out.update(
        tp=tp,
        object_f1=2.0 * tp / (n_pred + n_truth),
        object_precision=tp / n_pred,
        object_recall=tp / n_truth,
        object_dice=_two_sided(sums[0], sums[1], sums[4], sums[5]),
        object_hausdorff=_two_sided(sums[2], sums[3], sums[4], sums[5]),
    )
    return out, sums


def _two_sided(pred_sum: float, truth_sum: float, pred_area: float, truth_area: float) -> float:
    """½ (Σ_j |S_j| x_j / Σ|S| + Σ_i |G_i| y_i / Σ|G|); a side without objects adds 0."""
    pred_side = pred_sum / pred_area if pred_area else 0.0
    truth_side = truth_sum / truth_area if truth_area else 0.0
    return float((pred_side + truth_side) / 2)


# ----------------------------------------------------------------------------- AJI


def _aji_counts(ov: _Overlap, one_to_one: bool) -> tuple[int, int]:
    """(aggregated intersection, aggregated union) of AJI (``one_to_one=False``) or AJI+."""
    rows_t, rows_p, inter = ov.pairs_truth, ov.pairs_pred, ov.pairs_inter
    union = ov.truth_area[rows_t] + ov.pred_area[rows_p] - inter
    iou = inter / union
    n_truth, n_pred = len(ov.truth_area), len(ov.pred_area)
    if one_to_one:  # Hungarian assignment among the objects that overlap anything
        ids_t, at_t = np.unique(rows_t, return_inverse=True)
        ids_p, at_p = np.unique(rows_p, return_inverse=True)
        cost = np.zeros((len(ids_t), len(ids_p)))
        pair = np.full(cost.shape, -1, dtype=np.int64)
        cost[at_t, at_p], pair[at_t, at_p] = -iou, np.arange(len(iou))
        t_idx, p_idx = linear_sum_assignment(cost)
        k = pair[t_idx, p_idx]
        matched = np.full(n_truth, -1, dtype=np.int64)
        matched[ids_t[t_idx[k >= 0]]] = k[k >= 0]
    else:  # each GT object takes its best prediction, used or not
        matched = _best(rows_t, rows_p, iou, n_truth)
    k = matched[matched >= 0]  # the pairs counted
    used = np.zeros(n_pred, dtype=bool)
    used[rows_p[k]] = True
    total_inter = int(inter[k].sum())
    total_union = int(union[k].sum() + ov.truth_area[matched < 0].sum() + ov.pred_area[~used].sum())
    return total_inter, total_union


def aji(pred: np.ndarray, truth: np.ndarray) -> float:
    """Aggregated Jaccard Index of two int instance maps [H, W] (Kumar et al., IEEE TMI 2017).

    Each GT object adds its intersection and union with the prediction of highest IoU (ties: lowest
    label); a GT object that overlaps no prediction adds its area to the union; predictions chosen by
    no GT object add their areas to the union. As in the paper's algorithm and HoVer-Net's
    ``get_fast_aji`` (vqdang/hover_net, metrics/stats_utils.py: "dont care about reusing pred instance
    multiple times"), one prediction may be the best match of several GT objects: a merge is counted in
    each GT object's union ("over-penalisation"). We follow that, so that scores compare with those of
    HoVer-Net's evaluation code, which many nuclear-segmentation papers reuse. The MoNuSeg MATLAB code (as quoted in HoVer-Net's earlier port) instead
    removes a used prediction, which makes the score depend on the order of the GT labels;
    ``aji_plus`` is the order-free variant that uses each prediction at most once.
    Both maps empty -> 1 (nothing to find, nothing found).
    """
    total_inter, total_union = _aji_counts(_overlap(pred, truth), one_to_one=False)
    return total_inter / total_union if total_union else 1.0


def aji_plus(pred: np.ndarray, truth: np.ndarray) -> float:
    """AJI+ (Graham et al., HoVer-Net, arXiv 1812.06499): AJI with each prediction used at most once.

    GT objects and predictions are paired one-to-one to maximise the summed IoU (Hungarian
    assignment, ``scipy.optimize.linear_sum_assignment``); unpaired objects of either side add their
    areas to the union. Both maps empty -> 1.
    """
    total_inter, total_union = _aji_counts(_overlap(pred, truth), one_to_one=True)
    return total_inter / total_union if total_union else 1.0


# ----------------------------------------------------------------------------- over images


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def instance_metrics(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict[str, Any]:
    """Object metrics of int instance maps over images: means of per-image values, and pooled values.

    ``object_f1``, ``object_precision``, ``object_recall``, ``object_dice``, ``object_hausdorff``,
    ``aji``, ``aji_plus``: means over images of the per-image values, each over the images where it is
    defined (``n_hausdorff`` counts those of the Hausdorff distance; MoNuSeg ranks by this mean AJI).
    Pooled, the test set as one collection of objects, as the GlaS challenge defines its scores (weights
    relative to all objects of the set): ``object_f1_pooled`` from the summed TP and object counts,
    ``object_dice_pooled``, ``object_hausdorff_pooled`` (over the images where it is defined), and
    ``aji_pooled`` = Σ intersections / Σ unions. ``n``: images.
    """
    if len(preds) != len(truths) or len(preds) == 0:
        raise ValueError(f"need as many predictions as truths, at least one: {len(preds)}, {len(truths)}")
    rows, sums = [], []
    pooled_inter = pooled_union = 0
    for pred, truth in zip(preds, truths):
        ov = _overlap(pred, truth)
        row, image_sums = _object_scores(ov)
        inter, union = _aji_counts(ov, one_to_one=False)
        pooled_inter, pooled_union = pooled_inter + inter, pooled_union + union
        row["aji"] = inter / union if union else 1.0
        inter_plus, union_plus = _aji_counts(ov, one_to_one=True)
        row["aji_plus"] = inter_plus / union_plus if union_plus else 1.0
        rows.append(row)
        sums.append(image_sums)
    keys = ("object_f1", "object_precision", "object_recall", "object_dice", "object_hausdorff", "aji", "aji_plus")
    out: dict[str, Any] = {key: _mean([row[key] for row in rows]) for key in keys}
    out["n_hausdorff"] = sum(row["object_hausdorff"] is not None for row in rows)
    tp, n_objects = sum(row["tp"] for row in rows), sum(row["n_pred"] + row["n_truth"] for row in rows)
    out["object_f1_pooled"] = 2.0 * tp / n_objects if n_objects else 1.0
    total = np.sum(sums, axis=0)
    out["object_dice_pooled"] = _two_sided(total[0], total[1], total[4], total[5]) if total[4:].any() else 1.0
    defined = [s for s, row in zip(sums, rows) if row["object_hausdorff"] is not None]
    if defined:
        haus = np.sum(defined, axis=0)
        out["object_hausdorff_pooled"] = _two_sided(haus[2], haus[3], haus[4], haus[5])
    else:
        out["object_hausdorff_pooled"] = None
    out["aji_pooled"] = pooled_inter / pooled_union if pooled_union else 1.0
    out["n"] = len(rows)
    return out
