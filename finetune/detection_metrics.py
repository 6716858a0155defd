"""Detection metrics of the fine-tuned detectors, all on numpy arrays: point F1 and COCO mAP.

Reading guide, from points to the results table:

- ``match_points`` / ``point_counts`` / ``point_scores``: the point rule of the MIDOG mitosis challenge
  (Aubreville et al., "Mitosis domain generalization in histopathology images - The MIDOG challenge",
  Medical Image Analysis 84, 2023, arXiv 2204.03742). Its evaluation container scores each image with
  ``evalutils.scorers.score_detection`` (comic/evalutils) and sums TP/FP/FN over all images before
  precision, recall and F1. The rule, followed here exactly:

  * ground-truth points are visited in the order they are given; each takes the nearest prediction
    within ``radius`` (distance <= radius, inclusive) that no earlier ground-truth point has taken,
    else it is a false negative. A greedy, order-dependent matching, not an optimal assignment: a
    ground-truth point whose nearest prediction is already taken falls back to its next nearest;
  * every prediction left untaken is a false positive, so a second prediction on one object is one;
  * ``radius`` 30 px = 7.5 um at 0.25 um/px (``MIDOG_RADIUS_PX``); MIDOG 2021 states it as 7.5e-3 on
    millimetre coordinates.

  MIDOG leaves the order of predictions at equal distance to sklearn's ``BallTree``; here a tie goes
  to the lower prediction index, so results never depend on a tree's internals.
- ``choose_threshold``: the detection threshold with the best pooled F1 over the distinct predicted
  scores (predictions with score >= threshold are kept), as MIDOG's ``optimize_threshold`` does on a
  grid; here every distinct score is tried and an image is re-matched only when a kept prediction
  could change its matching.
- ``coco_results`` / ``coco_map``: COCO AP by pycocotools (Lin et al., "Microsoft COCO", ECCV 2014,
  arXiv 1405.0312), ground truth built in memory, boxes or masks (``iou_type`` "bbox" / "segm").
- ``detection_report``: the rows of results.json: all images, per class, per domain.

Empty cases of the point scores (as in ``finetune.metrics``: "nothing to find, nothing found" is
perfect, a wrong answer never is); MIDOG adds an eps of 1e-6 instead, which gives F1 1 but precision
and recall 0 when both sides are empty:

====================  ===========  ==================  ====================
                      both empty   no truth, preds     truth, no preds
====================  ===========  ==================  ====================
precision             1            0                   0
recall                1            0                   0
F1 = 2TP/(2TP+FP+FN)  1            0                   0
====================  ===========  ==================  ====================

COCO details that matter here. ``maxDets`` is [1, 10, max(100, most objects or predictions in one
image)], so that ~500 MoNuSeg nuclei in one image are not cut at COCO's default 100, and every AP is
read from ``eval["precision"]`` at the last maxDets and area "all": ``COCOeval.summarize`` hard-codes
maxDets=100 for its first figure, which gives -1 once maxDets changes, so it is not used. A class
without ground truth has no AP in COCO (-1 in the table); it is None here, and the mean over classes
skips it, as COCO's does. Undefined values are None, never NaN, so that results stay valid JSON.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.spatial import cKDTree

__all__ = [
    "MIDOG_RADIUS_PX",
    "box_centres",
    "match_points",
    "point_counts",
    "point_scores",
    "choose_threshold",
    "mask_rle",
    "coco_results",
    "coco_map",
    "detection_report",
]

# 7.5 um, the MIDOG hit radius, at the 0.25 um/px of a 40x scan.
MIDOG_RADIUS_PX = 30.0

IOU_TYPES = ("bbox", "segm")

# ----------------------------------------------------------------------------- points


def _as_rows(array: np.ndarray, width: int, name: str, what: str) -> np.ndarray:
    """``array`` as float64 [N, width] (an empty one of any shape as [0, width])."""
    rows = np.asarray(array, dtype=np.float64)
    if rows.size == 0:
        return rows.reshape(0, width)
    if rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"{name} must be [N, {width}] {what}, got shape {rows.shape}")
    return rows


def _as_points(array: np.ndarray, name: str) -> np.ndarray:
    return _as_rows(array, 2, name, "points (x, y)")


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """[N, 2] centres of [N, 4] xyxy boxes: the points that the point metrics match."""
    boxes = _as_boxes(boxes, "boxes")
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


def _candidates(truth: np.ndarray, predicted: np.ndarray, radius: float) -> list[list[int]]:
    """Per ground-truth point, the predictions within ``radius``, nearest first, ties by lower index."""
    if len(truth) == 0 or len(predicted) == 0:
        return [[] for _ in range(len(truth))]
    hits = cKDTree(predicted).query_ball_point(truth, r=radius)  # distance <= radius, as BallTree
    out = []
    for g, near in enumerate(hits):
        near = np.asarray(near, dtype=np.int64)
        distance = np.linalg.norm(predicted[near] - truth[g], axis=1)
        out.append(near[np.lexsort((near, distance))].tolist())
    return out


def _greedy(candidates: list[list[int]], kept: bytearray, match: list[int] | None = None, start: int = 0) -> list[int]:
    """MIDOG's matching on precomputed candidates: truth in order takes its nearest untaken kept hit.

    ``match[:start]`` is kept as given and truth from ``start`` on is matched again: what an earlier
    truth point took cannot depend on later ones. Plain lists and bytearrays, not numpy, because the
    loop touches one element at a time.
    """
    match = [-1] * len(candidates) if match is None else match
    taken = bytearray(len(kept))
    for p in match[:start]:
        if p >= 0:
            taken[p] = 1
    for g in range(start, len(candidates)):
        match[g] = -1
        for p in candidates[g]:
            if kept[p] and not taken[p]:
                taken[p] = 1
                match[g] = p
                break
    return match


def match_points(truth: np.ndarray, predicted: np.ndarray, radius: float = MIDOG_RADIUS_PX) -> np.ndarray:
    """[G] int: the index of the prediction matched to each ground-truth point [G, 2], or -1.

    Ground-truth points are visited in order, each taking the nearest prediction [P, 2] within
    ``radius`` that no earlier point took (ties: lower prediction index).
    """
    truth, predicted = _as_points(truth, "truth"), _as_points(predicted, "predicted")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    all_kept = bytearray(b"\x01") * len(predicted)
    return np.asarray(_greedy(_candidates(truth, predicted, radius), all_kept), dtype=np.int64)


def point_counts(truth: np.ndarray, predicted: np.ndarray, radius: float = MIDOG_RADIUS_PX) -> tuple[int, int, int]:
    """(TP, FP, FN) of one image under ``match_points``."""
    match = match_points(truth, predicted, radius)
    tp = int((match >= 0).sum())
    return tp, len(_as_points(predicted, "predicted")) - tp, len(match) - tp


def _rates(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 of pooled counts, with the empty cases of the module table."""
    nothing_to_find, nothing_found = tp + fn == 0, tp + fp == 0
    both_empty = nothing_to_find and nothing_found
    return {
        "precision": tp / (tp + fp) if not nothing_found else float(both_empty),
        "recall": tp / (tp + fn) if not nothing_to_find else float(both_empty),
        "f1": 2 * tp / (2 * tp + fp + fn) if not both_empty else 1.0,
    }


def point_scores(
    images: Sequence[tuple[np.ndarray, np.ndarray]], radius: float = MIDOG_RADIUS_PX
) -> dict[str, float | int]:
    """TP, FP, FN summed over (truth [G, 2], predicted [P, 2]) images, then precision, recall, F1.

    Pooling before the ratio is MIDOG's rule: an image with one mitosis weighs one object, not one
    image, which the mean of per-image F1 would give it.
    """
    tp = fp = fn = 0
    for truth, predicted in images:
        t, f, n = point_counts(truth, predicted, radius)
        tp, fp, fn = tp + t, fp + f, fn + n
    return {"tp": tp, "fp": fp, "fn": fn, **_rates(tp, fp, fn)}


def _true_positives_by_level(
    truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """One image: its distinct scores ascending, and TP when keeping scores >= each of them.

    Levels are added from the highest score down. A prediction that is no ground-truth point's
    candidate never changes the matching (it is a false positive at every threshold), and one that is
    changes nothing before the first truth point that can see it, so only the rest is matched again.
    """
    candidates = _candidates(truth, predicted, radius)
    # The first truth point that has each prediction as a candidate (len(truth): none has).
    first_truth = np.full(len(predicted), len(truth), dtype=np.int64)
    for g in range(len(candidates) - 1, -1, -1):
        first_truth[candidates[g]] = g
    levels, group = np.unique(scores, return_inverse=True)
    order = np.argsort(-group, kind="stable")  # predictions from the highest level down
    ends = np.cumsum(np.bincount(group, minlength=len(levels))[::-1])
    first_truth, order = first_truth.tolist(), order.tolist()  # element-wise below: plain ints
    kept = bytearray(len(predicted))
    match = [-1] * len(truth)
    tp_by_level = np.zeros(len(levels), dtype=np.int64)
    tp = start_of_level = 0
    for step, end in enumerate(ends.tolist()):
        added = order[start_of_level:end]
        start_of_level = end
        for p in added:
            kept[p] = 1
        start = min(first_truth[p] for p in added)
        if start < len(truth):  # only truth from the first one that can see an added prediction changes
            _greedy(candidates, kept, match, start)
            tp = len(match) - match.count(-1)
        tp_by_level[len(levels) - 1 - step] = tp
    return levels, tp_by_level


def choose_threshold(
    images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], radius: float = MIDOG_RADIUS_PX
) -> dict[str, float | None]:
    """The score threshold with the best pooled F1 over (truth [G, 2], predicted [P, 2], scores [P]) images.

    Candidates are the distinct predicted scores; predictions with score >= threshold are kept. Of
    equally good thresholds the highest is returned (fewest predictions). Without any prediction the
    threshold is None and the scores are those of predicting nothing.
    """
    per_image = []
    n_truth = 0
    for i, (truth, predicted, scores) in enumerate(images):
        truth, predicted = _as_points(truth, "truth"), _as_points(predicted, "predicted")
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(predicted):
            raise ValueError(f"image {i}: {len(predicted)} predicted points but {len(scores)} scores")
        n_truth += len(truth)
        if len(predicted):
            levels, tp = _true_positives_by_level(truth, predicted, scores, radius)
            per_image.append((np.sort(scores), levels, tp))
    if not per_image:
        rates = _rates(0, 0, n_truth)
        return {"threshold": None, "f1": rates["f1"], "precision": rates["precision"], "recall": rates["recall"]}

    thresholds = np.unique(np.concatenate([levels for _, levels, _ in per_image]))  # ascending
    tp = np.zeros(len(thresholds), dtype=np.int64)
    kept = np.zeros(len(thresholds), dtype=np.int64)
    for sorted_scores, levels, tp_by_level in per_image:
        # At threshold t an image keeps its predictions at its own lowest level >= t.
        at = np.searchsorted(levels, thresholds, side="left")
        tp += np.where(at < len(levels), tp_by_level[np.minimum(at, len(levels) - 1)], 0)
        kept += len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side="left")
    f1 = 2 * tp / (kept + n_truth)  # 2TP / (2TP + FP + FN); kept >= 1 at every candidate
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # the last maximum: the highest threshold
    rates = _rates(int(tp[best]), int(kept[best] - tp[best]), int(n_truth - tp[best]))
    return {"threshold": float(thresholds[best]), **rates}


# ----------------------------------------------------------------------------- COCO


def _as_boxes(array: np.ndarray, name: str) -> np.ndarray:
    return _as_rows(array, 4, name, "xyxy boxes")


def _labels(record: dict, n: int, n_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(record["labels"], dtype=np.int64).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"{where}: {n} boxes but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{where}: labels must be class indices in [0, {n_classes}), got {labels.tolist()}")
    return labels


def _masks(record: dict, n: int, where: str) -> tuple[list[dict], tuple[int, int] | None]:
    """The record's masks as COCO RLEs and the image size (H, W) where known: ``masks`` is boolean
    [N, H, W] or a list of N RLEs (:func:`mask_rle`, which keep the thousand nuclei of a 1000 px image
    in kilobytes rather than a gigabyte); an optional ``size`` gives the size of an image without any."""
    if "masks" not in record:
        raise ValueError(f"{where}: iou_type 'segm' needs 'masks' [N, H, W] or N RLEs")
    masks = record["masks"]
    size = tuple(int(v) for v in record["size"]) if "size" in record else None
    if isinstance(masks, (list, tuple)):
        if len(masks) != n or not all(isinstance(m, dict) and {"size", "counts"} <= set(m) for m in masks):
            raise ValueError(f"{where}: masks must be {n} RLEs ({{'size', 'counts'}}), got {len(masks)} entries")
        sizes = {tuple(int(v) for v in m["size"]) for m in masks} | ({size} if size else set())
        if len(sizes) > 1:
            raise ValueError(f"{where}: masks of several sizes {sorted(sizes)}")
        return list(masks), next(iter(sizes), None)
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) != n or not (masks.dtype == np.bool_ or np.issubdtype(masks.dtype, np.integer)):
        raise ValueError(f"{where}: masks must be boolean [N={n}, H, W] or N RLEs, got {masks.dtype} {masks.shape}")
    return [mask_rle(m) for m in masks.astype(bool)], (int(masks.shape[1]), int(masks.shape[2]))


def mask_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of one [H, W] mask, counts as str so that it is valid JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _area(rle: dict) -> float:
    return float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)


def coco_results(predicted: Sequence[dict], image_ids: Sequence[int], classes: Sequence[str]) -> list[dict]:
    """COCO results entries of per-image predictions {"boxes" [N, 4] xyxy, "scores", "labels", "masks"?}.

    category_id = class index + 1; bbox xywh rounded to 2 decimals; "segmentation" (RLE) when the
    image's record has masks.
    """
    if len(predicted) != len(image_ids):
        raise ValueError(f"need one image id per prediction record: {len(predicted)}, {len(image_ids)}")
    results = []
    for record, image_id in zip(predicted, image_ids):
        where = f"predictions of image {image_id}"
        boxes = _as_boxes(record["boxes"], where)
        scores = np.asarray(record["scores"], dtype=np.float64).reshape(-1)
        labels = _labels(record, len(boxes), len(classes), where)
        if len(scores) != len(boxes):
            raise ValueError(f"{where}: {len(boxes)} boxes but {len(scores)} scores")
        masks = _masks(record, len(boxes), where)[0] if "masks" in record else None
        for j, (box, score, label) in enumerate(zip(np.round(_xywh(boxes), 2), scores, labels)):
            entry = {
                "image_id": int(image_id),
                "category_id": int(label) + 1,
                "bbox": [float(v) for v in box],
                "score": float(score),
            }
            if masks is not None:
                entry["segmentation"] = masks[j]
            results.append(entry)
    return results


def _coco_truth(truth: Sequence[dict], classes: Sequence[str], iou_type: str) -> dict:
    """The COCO ground-truth dataset of per-image records; images are numbered 1..N."""
    images, annotations = [], []
    for i, record in enumerate(truth):
        where = f"truth of image {i}"
        boxes = _as_boxes(record["boxes"], where)
        labels = _labels(record, len(boxes), len(classes), where)
        crowd = np.asarray(record.get("iscrowd", np.zeros(len(boxes))), dtype=np.int64).reshape(-1)
        if len(crowd) != len(boxes):
            raise ValueError(f"{where}: {len(boxes)} boxes but {len(crowd)} iscrowd flags")
        masks, size = _masks(record, len(boxes), where) if iou_type == "segm" else (None, None)
        image = {"id": i + 1}
        if size is not None:
            image.update(height=size[0], width=size[1])
        images.append(image)
        for j, (box, label) in enumerate(zip(_xywh(boxes), labels)):
            annotation = {
                # COCOeval stores the matched truth's id as "matched" (0 = unmatched): ids start at 1.
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": int(label) + 1,
                "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]) if masks is None else _area(masks[j]),
                "iscrowd": int(crowd[j]),
            }
            if masks is not None:
                annotation["segmentation"] = masks[j]
            annotations.append(annotation)
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _mean_valid(precision: np.ndarray) -> float | None:
    """COCO's average over a slice of eval["precision"]: entries of -1 (no truth) do not count."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


def coco_map(
    truth: Sequence[dict], predicted: Sequence[dict], classes: Sequence[str], iou_type: str = "bbox"
) -> dict[str, Any]:
    """COCO AP@[.5:.95], AP@.5, AP@.75 and per-class AP / AP@.5, by pycocotools.

    ``truth`` per image: {"boxes" [N, 4] xyxy, "labels" [N] class indices, "masks" [N, H, W] for
    "segm", "iscrowd" [N] optional}; ``predicted`` per image: {"boxes", "scores", "labels", "masks"}.
    No prediction at all gives AP 0 for every class with truth; no truth at all gives None.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if len(truth) != len(predicted) or len(truth) == 0:
        raise ValueError(f"need one prediction record per truth record, at least one: {len(truth)}, {len(predicted)}")
    classes = list(classes)
    image_ids = list(range(1, len(truth) + 1))
    dataset = _coco_truth(truth, classes, iou_type)
    results = coco_results(predicted, image_ids, classes)
    if iou_type == "segm" and any("segmentation" not in r for r in results):
        raise ValueError("iou_type 'segm' needs 'masks' in every prediction record with boxes")

    most_per_image = max(
        max(len(_as_boxes(r["boxes"], "boxes")) for r in truth),
        max(len(_as_boxes(r["boxes"], "boxes")) for r in predicted),
    )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = _coco(dataset)
        if results:
            dt = gt.loadRes([dict(r) for r in results])  # loadRes writes ids and areas into its entries
        else:  # loadRes cannot take an empty list; an empty result set scores 0, as it should
            dt = _coco({"images": dataset["images"], "annotations": [], "categories": dataset["categories"]})
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        p = evaluator.params
        p.imgIds = image_ids
        p.catIds = [c + 1 for c in range(len(classes))]  # so that precision[..., k, ...] is class k
        p.maxDets = [1, 10, max(100, most_per_image)]
        # Only area "all" is reported; evaluating the other three ranges would take 4x the time.
        all_index = p.areaRngLbl.index("all")
        p.areaRng, p.areaRngLbl = [p.areaRng[all_index]], ["all"]
        evaluator.evaluate()
        evaluator.accumulate()

    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [T IoUs, R recalls, K classes], all, last maxDets
    at_50 = int(np.argmin(np.abs(p.iouThrs - 0.5)))
    at_75 = int(np.argmin(np.abs(p.iouThrs - 0.75)))
    per_class = {
        name: {"ap": _mean_valid(precision[:, :, k]), "ap_50": _mean_valid(precision[at_50, :, k])}
        for k, name in enumerate(classes)
    }
    return {
        "map": _mean_valid(precision),
        "map_50": _mean_valid(precision[at_50]),
        "map_75": _mean_valid(precision[at_75]),
        "per_class": per_class,
    }


# ----------------------------------------------------------------------------- report


def _class_counts(
    truth: Sequence[dict], predicted: Sequence[dict], n_classes: int, radius: float, threshold: float
) -> np.ndarray:
    """[images, classes, 3] TP, FP, FN of box centres, class by class, predictions at score >= threshold."""
    counts = np.zeros((len(truth), n_classes, 3), dtype=np.int64)
    for i, (t, p) in enumerate(zip(truth, predicted)):
        t_boxes, p_boxes = _as_boxes(t["boxes"], "boxes"), _as_boxes(p["boxes"], "boxes")
        t_labels = _labels(t, len(t_boxes), n_classes, f"truth of image {i}")
        p_labels = _labels(p, len(p_boxes), n_classes, f"predictions of image {i}")
        kept = np.asarray(p["scores"], dtype=np.float64).reshape(-1) >= threshold
        for c in range(n_classes):
            counts[i, c] = point_counts(
                box_centres(t_boxes[t_labels == c]), box_centres(p_boxes[kept & (p_labels == c)]), radius
            )
    return counts


def _point_row(counts: np.ndarray) -> dict[str, float | int]:
    tp, fp, fn = (int(v) for v in counts.reshape(-1, 3).sum(axis=0))
    return {"tp": tp, "fp": fp, "fn": fn, **_rates(tp, fp, fn)}


def _map_row(truth: Sequence[dict], predicted: Sequence[dict], classes: list[str], iou_types: Sequence[str]) -> dict:
    row: dict[str, Any] = {}
    for iou_type in iou_types:
        scores = coco_map(truth, predicted, classes, iou_type)
        prefix = "" if iou_type == "bbox" else "mask_"
        row.update({f"{prefix}{k}": scores[k] for k in ("map", "map_50", "map_75")})
        row[f"{prefix}per_class"] = scores["per_class"]
    return row


def detection_report(
    truth: Sequence[dict],
    predicted: Sequence[dict],
    classes: Sequence[str],
    radius: float,
    threshold: float,
    domains: Sequence[str | None] | None = None,
    iou_types: Sequence[str] = ("bbox",),
) -> dict[str, dict[str, Any]]:
    """The rows of results.json: "all", "class/<name>" and, with ``domains``, "domain/<d>".

    Box AP ("map", "map_50", "map_75"; "ap", "ap_50" per class) for "bbox" in ``iou_types``, mask AP
    ("mask_map", ...; "mask_ap", ...) for "segm". Point scores match box centres class by class
    (a prediction of another class never hits), predictions at score >= ``threshold``; "all" sums the
    counts of all classes. An image whose domain is None counts in "all" only.
    """
    classes = list(classes)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_types must be drawn from {IOU_TYPES}, got {iou_type!r}")
    if domains is not None and len(domains) != len(truth):
        raise ValueError(f"need one domain per image: {len(domains)} domains, {len(truth)} images")
    counts = _class_counts(truth, predicted, len(classes), radius, threshold)

    def maps(indices: list[int]) -> dict[str, Any]:
        return _map_row([truth[i] for i in indices], [predicted[i] for i in indices], classes, iou_types)

    def row(indices: list[int], scores: dict[str, Any]) -> dict[str, Any]:
        scores = {k: v for k, v in scores.items() if not k.endswith("per_class")}
        return {**scores, **_point_row(counts[indices]), "n_images": len(indices)}

    all_images = list(range(len(truth)))
    all_maps = maps(all_images)
    report = {"all": row(all_images, all_maps)}
    for c, name in enumerate(classes):
        entry: dict[str, Any] = {}
        for key, prefix in (("per_class", ""), ("mask_per_class", "mask_")):
            if key in all_maps:
                entry.update({f"{prefix}{k}": v for k, v in all_maps[key][name].items()})
        n_truth = sum(int((np.asarray(t["labels"]).reshape(-1) == c).sum()) for t in truth)
        report[f"class/{name}"] = {**entry, **_point_row(counts[:, c]), "n_truth": n_truth}
    if domains is not None:
        for domain in sorted({d for d in domains if d is not None}):
            indices = [i for i, d in enumerate(domains) if d == domain]
            report[f"domain/{domain}"] = row(indices, maps(indices))
    return report
