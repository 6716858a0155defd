"""finetune.detection_metrics: the MIDOG point rule on hand-placed points (order, ties, duplicates, the
radius, pooling over images), the threshold search against brute force, and COCO AP by pycocotools on
boxes and masks whose IoUs are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.detection_metrics import (
    MIDOG_RADIUS_PX,
    choose_threshold,
    coco_map,
    coco_results,
    detection_report,
    match_points,
    point_counts,
    point_scores,
)

NONE = np.zeros((0, 2))

# ----------------------------------------------------------------------------- points


def test_truth_visited_in_order_takes_its_nearest_untaken_prediction_or_none():
    truth = np.array([[10.0, 0.0], [0.0, 0.0]])
    # Prediction 0 is the nearest of both points; the first point takes it, the second falls back on
    # its next nearest within the radius, or on nothing.
    assert match_points(truth, np.array([[6.0, 0.0], [-20.0, 0.0]]), radius=30).tolist() == [0, 1]
    assert match_points(truth, np.array([[6.0, 0.0], [-31.0, 0.0]]), radius=30).tolist() == [0, -1]


def test_the_earlier_truth_point_wins_even_when_a_later_one_is_closer():
    # MIDOG is greedy in the order of the truth points, not closest pair first.
    truth = np.array([[0.0, 0.0], [10.0, 0.0]])
    assert match_points(truth, np.array([[7.0, 0.0]]), radius=30).tolist() == [0, -1]
    assert match_points(truth[::-1], np.array([[7.0, 0.0]]), radius=30).tolist() == [0, -1]  # now (10, 0)'s


def test_ties_in_distance_go_to_the_lower_prediction_index():
    at_five = np.array([[3.0, 4.0], [-4.0, 3.0], [5.0, 0.0]])  # all 5 px from the origin
    assert match_points(np.array([[0.0, 0.0]]), at_five, radius=30).tolist() == [0]
    assert match_points(np.array([[0.0, 0.0]]), at_five[::-1], radius=30).tolist() == [0]
    assert match_points(np.zeros((3, 2)), at_five, radius=30).tolist() == [0, 1, 2]


def test_a_second_prediction_on_one_object_is_a_false_positive():
    assert point_counts(np.array([[0.0, 0.0]]), np.array([[1.0, 0.0], [2.0, 0.0]]), radius=30) == (1, 1, 0)


def test_the_radius_is_inclusive_and_a_prediction_just_outside_is_a_false_positive_and_a_miss():
    origin = np.array([[0.0, 0.0]])
    assert point_counts(origin, np.array([[18.0, 24.0]]), radius=30) == (1, 0, 0)  # exactly 30 px
    assert point_counts(origin, np.array([[30.01, 0.0]]), radius=30) == (0, 1, 1)
    assert MIDOG_RADIUS_PX == 30.0  # 7.5 um at 0.25 um/px


def test_counts_are_summed_over_images_before_the_f1():
    one_hit = (np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]))  # TP 1: F1 1
    truth = np.array([[0.0, 0.0], [200.0, 0.0], [400.0, 0.0]])
    noisy = (truth, np.array([[1.0, 0.0], [100.0, 100.0], [300.0, 300.0], [500.0, 500.0]]))  # 1, 3, 2: F1 2/7
    scores = point_scores([one_hit, noisy], radius=30)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 3, 2)
    assert scores["f1"] == pytest.approx(4 / 9)  # 2TP / (2TP + FP + FN) of the sums
    assert scores["f1"] != pytest.approx((1 + 2 / 7) / 2)  # not the mean of per-image F1
    assert scores["precision"] == pytest.approx(2 / 5) and scores["recall"] == pytest.approx(2 / 4)


def test_empty_sides_score_one_when_both_are_empty_and_zero_otherwise():
    assert point_scores([(NONE, NONE)]) == {"tp": 0, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    missed = point_scores([(np.array([[0.0, 0.0]]), NONE)])
    false_alarm = point_scores([(NONE, np.array([[0.0, 0.0]]))])
    for scores in (missed, false_alarm):
        assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)


def test_choose_threshold_drops_the_low_score_false_positive_but_keeps_every_hit():
    truth = np.array([[0.0, 0.0], [100.0, 0.0]])
    predicted = np.array([[1.0, 0.0], [101.0, 0.0], [50.0, 50.0]])
    best = choose_threshold([(truth, predicted, np.array([0.9, 0.8, 0.3]))], radius=30)
    assert best == {"threshold": 0.8, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    # A false positive that outscores a hit: keeping all (F1 4/5) beats dropping it together with the
    # hit below it (threshold 0.9: F1 2/3) and keeping it without that hit (0.8: F1 1/2).
    best = choose_threshold([(truth, predicted, np.array([0.9, 0.3, 0.8]))], radius=30)
    assert best["threshold"] == 0.3 and best["f1"] == pytest.approx(0.8)


def test_choose_threshold_agrees_with_scoring_every_candidate_threshold():
    rng = np.random.default_rng(0)
    images = []
    for n_truth in (0, 3, 8, 12, 5):
        truth = rng.uniform(0, 300, (n_truth, 2))
        near = truth[rng.integers(0, max(n_truth, 1), 10)] if n_truth else rng.uniform(0, 300, (10, 2))
        predicted = np.concatenate([near + rng.normal(0, 15, near.shape), rng.uniform(0, 300, (10, 2))])
        images.append((truth, predicted, np.round(rng.uniform(0, 1, 20), 2)))  # rounded: shared scores
    candidates = np.unique(np.concatenate([s for _, _, s in images]))
    f1 = [point_scores([(t, p[s >= c]) for t, p, s in images])["f1"] for c in candidates]
    best = choose_threshold(images)
    assert best["f1"] == pytest.approx(max(f1))
    assert best["threshold"] == candidates[len(f1) - 1 - int(np.argmax(f1[::-1]))]


def test_choose_threshold_without_predictions_has_no_threshold():
    best = choose_threshold([(np.array([[0.0, 0.0]]), NONE, np.zeros(0))])
    assert best == {"threshold": None, "precision": 0.0, "recall": 0.0, "f1": 0.0}


# ----------------------------------------------------------------------------- COCO

SQUARE = np.array([[0.0, 0.0, 10.0, 10.0]])


def _truth(boxes, labels, masks=None) -> dict:
    record = {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, int)}
    if masks is not None:
        record["masks"] = masks
    return record


def _pred(boxes, labels, scores=None, masks=None) -> dict:
    record = _truth(boxes, labels, masks)
    record["scores"] = np.linspace(0.9, 0.5, len(record["labels"])) if scores is None else np.asarray(scores)
    return record


def test_perfect_boxes_give_map_one():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 30], [50, 0, 60, 25.0]])
    scores = coco_map([_truth(boxes, [0, 1, 0])], [_pred(boxes, [0, 1, 0])], ["a", "b"])
    assert scores["map"] == pytest.approx(1.0) and scores["map_50"] == pytest.approx(1.0)
    assert scores["per_class"]["b"]["ap"] == pytest.approx(1.0)


def test_a_box_with_iou_0_62_counts_at_iou_0_5_not_at_0_75():
    scores = coco_map([_truth(SQUARE, [0])], [_pred([[0, 0, 10, 6.2]], [0])], ["a"])  # IoU 62/100
    assert scores["map_50"] == pytest.approx(1.0)
    assert scores["map_75"] == pytest.approx(0.0)
    assert scores["map"] == pytest.approx(0.3)  # hits at IoU 0.50, 0.55, 0.60 of ten thresholds


def test_no_predictions_give_zero_not_a_crash():
    scores = coco_map([_truth(SQUARE, [0]), _truth(SQUARE, [0])], [_pred([], []), _pred([], [])], ["a"])
    assert (scores["map"], scores["map_50"], scores["map_75"]) == (0.0, 0.0, 0.0)


def test_an_image_without_truth_counts_its_predictions_as_false_positives():
    found = _pred(SQUARE, [0], scores=[0.8])
    assert coco_map([_truth(SQUARE, [0]), _truth([], [])], [found, _pred([], [])], ["a"])["map_50"] == pytest.approx(1)
    # A false alarm above the hit: precision 1/2 at every recall.
    false_alarm = _pred(SQUARE, [0], scores=[0.9])
    scores = coco_map([_truth(SQUARE, [0]), _truth([], [])], [found, false_alarm], ["a"])
    assert scores["map_50"] == pytest.approx(0.5)


def test_per_class_ap_perfect_missing_and_absent():
    truth = _truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])
    scores = coco_map([truth], [_pred(SQUARE, [0])], ["found", "missed", "absent"])
    assert scores["per_class"]["found"] == {"ap": pytest.approx(1.0), "ap_50": pytest.approx(1.0)}
    assert scores["per_class"]["missed"] == {"ap": 0.0, "ap_50": 0.0}
    assert scores["per_class"]["absent"] == {"ap": None, "ap_50": None}  # no truth: no AP
    assert scores["map"] == pytest.approx(0.5)  # the mean over the classes with truth


def test_segm_scores_the_masks_not_the_boxes():
    truth_mask = np.zeros((1, 20, 20), bool)
    truth_mask[0, :10, :10] = True
    half_mask = np.zeros_like(truth_mask)
    half_mask[0, :6, :10] = True  # mask IoU 0.6 inside the very same box
    truth, predicted = _truth(SQUARE, [0], truth_mask), _pred(SQUARE, [0], masks=half_mask)
    assert coco_map([truth], [predicted], ["a"], "bbox")["map_75"] == pytest.approx(1.0)
    masks = coco_map([truth], [predicted], ["a"], "segm")
    assert masks["map_50"] == pytest.approx(1.0) and masks["map_75"] == pytest.approx(0.0)
    perfect = coco_map([truth], [_pred(SQUARE, [0], masks=truth_mask)], ["a"], "segm")
    assert perfect["map"] == pytest.approx(1.0)


def test_an_image_with_150_objects_is_not_cut_at_100_detections():
    x, y = np.arange(150) % 15 * 20.0, np.arange(150) // 15 * 20.0
    boxes = np.stack([x, y, x + 10, y + 10], axis=1)
    labels = np.zeros(150, int)
    scores = coco_map([_truth(boxes, labels)], [_pred(boxes, labels)], ["cell"])
    assert scores["map"] == pytest.approx(1.0) and scores["map_50"] == pytest.approx(1.0)


def test_coco_results_are_json_with_shifted_categories_xywh_and_rle():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 1:3, 2:5] = True
    results = coco_results([_pred([[2, 1, 5.004, 3]], [1], scores=[0.7], masks=masks)], [7], ["a", "b"])
    entry = json.loads(json.dumps(results))[0]
    assert (entry["image_id"], entry["category_id"], entry["score"]) == (7, 2, 0.7)
    assert entry["bbox"] == [2.0, 1.0, 3.0, 2.0]
    assert isinstance(entry["segmentation"]["counts"], str) and entry["segmentation"]["size"] == [8, 8]


# ----------------------------------------------------------------------------- report


def test_detection_report_rows_by_class_and_domain_at_the_threshold():
    classes = ["rbc", "wbc"]
    truth = [
        _truth([[0, 0, 10, 10], [100, 100, 120, 120]], [0, 1]),
        _truth([[0, 0, 10, 10]], [0]),
    ]
    predicted = [
        # The wbc is found with the wrong class: a false positive of rbc and a miss of wbc.
        _pred([[0, 0, 10, 10], [100, 100, 120, 120]], [0, 0], scores=[0.9, 0.8]),
        _pred([[0, 0, 10, 10], [200, 200, 210, 210]], [0, 0], scores=[0.9, 0.2]),  # 0.2: below threshold
    ]
    report = detection_report(truth, predicted, classes, radius=30, threshold=0.5, domains=["scanner1", "scanner2"])
    assert set(report) == {"all", "class/rbc", "class/wbc", "domain/scanner1", "domain/scanner2"}
    assert (report["all"]["tp"], report["all"]["fp"], report["all"]["fn"]) == (2, 1, 1)
    assert (report["class/rbc"]["tp"], report["class/rbc"]["fp"], report["class/rbc"]["fn"]) == (2, 1, 0)
    assert report["class/wbc"]["recall"] == 0.0 and report["class/wbc"]["ap"] == 0.0
    assert report["class/wbc"]["n_truth"] == 1
    assert report["domain/scanner2"]["f1"] == 1.0 and report["domain/scanner2"]["n_images"] == 1
    assert report["domain/scanner2"]["map"] == pytest.approx(1.0)  # AP uses every score, not the threshold
    json.dumps(report)
