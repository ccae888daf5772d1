"""metrics: ROC AUC (ties, multi-class), the ROC curve, probability scores, heatmap overlap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_pipeline import metrics
from wsi_pipeline.metrics import (
    area_above,
    auc_score,
    heatmap_hit_rate,
    heatmap_iou,
    probability_metrics,
    roc_curve,
)


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half, by brute force."""
    pos, neg = s[y == 1], s[y != 1]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_known_values_and_ties() -> None:
    assert auc_score([0, 0, 1, 1], np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auc_score([0, 1], np.array([0.5, 0.5])) == 0.5
    # pos {0.2, 0.9} vs neg {0.2, 0.1}: 0.5 + 1 + 1 + 1 of 4 pairs
    assert auc_score([0, 1, 0, 1], np.array([0.2, 0.2, 0.1, 0.9])) == 0.875
    assert auc_score([1, 1, 0], np.array([0.0, 0.1, 0.9])) == 0.0


def test_auc_matches_pairwise_count_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        s = rng.integers(0, 5, 40) / 4  # 5 distinct values: many ties
        if 0 < y.sum() < len(y):
            assert auc_score(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_auc_without_both_classes_is_nan() -> None:
    assert math.isnan(auc_score([1, 1], np.array([0.2, 0.3])))
    assert math.isnan(auc_score([0, 0], np.array([0.2, 0.3])))


def test_auc_multiclass_macro() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[y] * 0.8 + 0.1
    assert auc_score(y, perfect) == 1.0
    scores = np.array(
        [
            [0.6, 0.3, 0.1],
            [0.2, 0.5, 0.3],
            [0.3, 0.4, 0.3],
            [0.5, 0.2, 0.3],
            [0.1, 0.1, 0.8],
            [0.2, 0.2, 0.6],
        ]
    )
    expect = np.mean([_pairwise_auc((y == c).astype(int), scores[:, c]) for c in range(3)])
    assert auc_score(y, scores) == pytest.approx(expect)
    # a class with no slides is left out of the mean
    two = y[y != 2]
    got = auc_score(two, scores[y != 2])
    want = np.mean([_pairwise_auc((two == c).astype(int), scores[y != 2][:, c]) for c in (0, 1)])
    assert got == pytest.approx(want)
    # two columns: the AUC of column 1
    s2 = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
    assert auc_score([0, 1, 0], s2) == auc_score([0, 1, 0], s2[:, 1]) == 0.5


def test_roc_curve_endpoints_and_area() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    s = rng.integers(0, 8, 50) / 7
    fpr, tpr = roc_curve(y, s)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert len(fpr) == len(np.unique(s)) + 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auc_score(y, s))
    fpr, tpr = roc_curve([0, 1], np.array([0.1, 0.9]))
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 1.0, 1.0])


def test_probability_metrics() -> None:
    perfect = probability_metrics(np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 1])
    assert perfect["acc"] == 1.0 and perfect["brier"] == 0.0
    assert perfect["log_loss"] == pytest.approx(0.0, abs=1e-9)
    flat = probability_metrics(np.full((4, 2), 0.5), [0, 1, 1, 0])
    assert flat["log_loss"] == pytest.approx(math.log(2)) and flat["brier"] == pytest.approx(0.5)
    wrong = probability_metrics(np.array([[0.0, 1.0]]), [0])
    assert wrong["acc"] == 0.0 and wrong["brier"] == 2.0
    assert wrong["log_loss"] == pytest.approx(-math.log(1e-12))  # clipped, finite
    three = probability_metrics(np.array([[0.2, 0.7, 0.1]]), [1])
    assert three["brier"] == pytest.approx(0.04 + 0.09 + 0.01)


def test_area_above() -> None:
    v = np.array([[0.1, 0.5, np.nan], [0.9, 0.5, 0.49]])
    assert area_above(v, 0.5) == 3.0  # >= threshold; NaN never counts
    assert area_above(v, 0.5, pixel_area=16.0) == 48.0
    assert area_above(np.full((2, 2), np.nan), 0.0) == 0.0


def test_heatmap_iou_same_extent() -> None:
    v = np.zeros((4, 4))
    v[:2, :2] = 1.0
    truth = np.zeros((8, 8), bool)
    truth[:4, :4] = True  # the same square at twice the resolution
    assert heatmap_iou(v, truth, threshold=0.5) == 1.0
    truth[:4, 4:] = True  # twice the area: IoU 1/2
    assert heatmap_iou(v, truth, threshold=0.5) == 0.5
    assert heatmap_iou(np.zeros((4, 4)), np.zeros((2, 2), bool), threshold=0.5) == 1.0
    v[3, 3] = np.nan  # NaN is negative
    assert heatmap_iou(v, truth, threshold=0.5) == 0.5


def test_heatmap_hit_rate_is_the_covered_fraction_of_the_truth() -> None:
    v = np.zeros((4, 4))
    v[:2, :2] = 1.0
    v[3, 3] = 1.0  # a false positive does not lower the hit rate (it lowers the IoU)
    truth = np.zeros((8, 8), bool)
    truth[:4, :8] = True  # twice the area above threshold: half of it is covered
    assert heatmap_hit_rate(v, truth, threshold=0.5) == 0.5
    assert heatmap_iou(v, truth, threshold=0.5) == pytest.approx(4 / 9)
    assert heatmap_hit_rate(v, np.zeros((8, 8), bool), threshold=0.5) is None
    v[:2, :2] = np.nan  # NaN is negative
    assert heatmap_hit_rate(v, truth, threshold=0.5) == 0.0


def test_heatmap_iou_through_level0() -> None:
    # heatmap pixels are 16 level-0 px; the mask's are 8 px and it covers only part of the slide
    v = np.zeros((4, 4))
    v[0, 0] = 1.0  # level-0 px 0..16
    truth = np.zeros((3, 3), bool)
    truth[:2, :2] = True  # level-0 px 0..16 too
    assert heatmap_iou(v, truth, threshold=0.5, downsample=16.0, truth_downsample=8.0) == 1.0
    # without the downsamples the grids are taken to span the same extent: a different answer
    assert heatmap_iou(v, truth, threshold=0.5) != 1.0


def test_iou_and_area_on_a_known_case() -> None:
    values = np.full((4, 4), np.nan, np.float32)
    values[0:2, 0:2] = 0.9  # 4 px above
    values[2, 2] = 0.2
    truth = np.zeros((8, 8), bool)  # twice as fine
    truth[0:4, 0:2] = True  # covers heatmap pixels (0,0) and (1,0) only
    # A = 4 px, B = 2 px, A & B = 2 -> 2 / 4
    assert heatmap_iou(values, truth, threshold=0.5) == pytest.approx(0.5)
    assert heatmap_iou(values, truth, threshold=0.5, downsample=2, truth_downsample=1) == 0.5
    assert heatmap_iou(values, np.zeros((8, 8), bool), threshold=0.95) == 1.0
    assert area_above(values, 0.5) == 4
    assert area_above(values, 0.1, pixel_area=2.5) == 12.5


def test_brier_and_ece_on_known_cases() -> None:
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 1, 1])
    # per sample: 0.02, 0.08, 0.72, 0.18
    assert metrics.brier_score(p, y) == pytest.approx(0.25)
    # bins: 0.9 (right), 0.8 (right), 0.6 (wrong), 0.7 (right) -> |1-.9|+|1-.8|+|0-.6|+|1-.7| over 4
    assert metrics.expected_calibration_error(p, y) == pytest.approx(0.3)
    perfect = np.eye(2)[y]
    assert metrics.brier_score(perfect, y) == 0.0
    assert metrics.expected_calibration_error(perfect, y) == 0.0
    assert np.isnan(metrics.brier_score(np.zeros((0, 2)), np.zeros(0, int)))
    conf, acc, count = metrics.calibration_bins(p, y, n_bins=10)
    assert count.sum() == 4 and count[6] == 1 and acc[6] == 0.0 and np.isnan(conf[0])


def test_bootstrap_ci_covers_the_estimate_and_refuses_undefined() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    s = y + rng.normal(0, 0.8, 80)
    lo, hi = metrics.bootstrap_ci(metrics.auc_score, y, s, n_boot=300)
    assert lo < metrics.auc_score(y, s) < hi and 0.5 < lo and hi <= 1.0
    assert metrics.bootstrap_ci(metrics.auc_score, np.ones(10, int), np.arange(10.0)) is None
    assert metrics.bootstrap_ci(metrics.auc_score, [], []) is None
