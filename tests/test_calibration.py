"""Probability calibration on validation logits."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.calibration import (
    MIN_CALIBRATION_SLIDES,
    apply_calibration,
    calibration_scores,
    calibration_skip_reason,
    fit_calibration,
    identity_calibration,
)
from wsi_pipeline.metrics import auc_score


def test_platt_on_small_margins_is_bounded_and_monotone() -> None:
    # a model that ranks perfectly but whose logits are tiny (p ~ 0.5)
    m = np.array([-0.02, -0.01, -0.015, 0.01, 0.02, 0.03])
    logits = np.stack([np.zeros_like(m), m], axis=1)
    y = [0, 0, 0, 1, 1, 1]
    cal = fit_calibration(logits, y, min_per_class=3)  # the fit itself, below the minimum
    assert cal["method"] == "platt" and cal["a"] > 10
    p = apply_calibration(logits, cal)[:, 1]
    assert np.all(np.diff(p[np.argsort(m)]) >= 0)  # monotone: AUC unchanged
    assert auc_score(y, p) == auc_score(y, m) == 1.0
    # Platt's smoothed targets: confident but never 0/1 on 3 + 3 slides
    assert 0.7 < p[3:].mean() < 0.95
    assert 0.05 < p[:3].mean() < 0.3
    # patches share the slide's scale
    patch = apply_calibration(np.array([[0.0, 0.05], [0.0, -0.05]]), cal)
    assert patch[0, 1] > 0.9 and patch[1, 1] < 0.1


def test_negative_class_index_and_multiclass() -> None:
    logits = np.array([[0.1, 0.0], [-0.1, 0.0], [0.2, 0.0], [-0.2, 0.0]])
    y = [0, 1, 0, 1]  # class 1 is the negative one here
    cal = fit_calibration(logits, y, negative=1, min_per_class=2)
    p = apply_calibration(logits, cal)
    assert np.allclose(p.sum(1), 1) and p[0, 0] > 0.5 and p[1, 0] < 0.5
    rng = np.random.default_rng(0)
    y3 = np.repeat([0, 1, 2], 5)
    z = np.eye(3)[y3] * 0.05 + rng.normal(0, 0.01, (15, 3))
    cal3 = fit_calibration(z, y3)
    assert cal3["method"] == "temperature" and cal3["temperature"] < 0.1
    assert (apply_calibration(z, cal3).argmax(1) == y3).mean() == 1.0


def test_identity_without_two_classes() -> None:
    cal = fit_calibration(np.zeros((3, 2)), [1, 1, 1], min_per_class=1)
    assert cal["method"] == "none" and cal["skipped"].startswith("0 validation slides of class '0'")
    z = np.array([[1.0, 2.0]])
    assert np.allclose(apply_calibration(z, identity_calibration(2)), apply_calibration(z, None))


def test_patch_reference_controls_false_positives_on_negatives() -> None:
    from wsi_pipeline.calibration import apply_patch_calibration, fit_patch_reference

    rng = np.random.default_rng(1)
    slide = np.array([[0.0, -0.02], [0.0, -0.01], [0.0, 0.01], [0.0, 0.02]])
    cal = fit_calibration(slide, [0, 0, 1, 1], min_per_class=2)
    negatives = [np.stack([np.zeros(200), rng.normal(-0.01, 0.05, 200)], 1) for _ in range(2)]
    cal = fit_patch_reference(cal, negatives)
    assert cal["patch"]["quantile"] == 99.0 and cal["patch"]["n"] == 400
    p_neg = apply_patch_calibration(np.concatenate(negatives), cal)[:, 1]
    assert 0.002 <= (p_neg > 0.5).mean() <= 0.02  # ~1% of normal patches above 0.5
    lesion = np.stack([np.zeros(20), np.full(20, 0.4)], 1)
    assert (apply_patch_calibration(lesion, cal)[:, 1] > 0.9).all()


def test_calibration_needs_enough_slides_of_each_class() -> None:
    """Below MIN_CALIBRATION_SLIDES of a class nothing is fitted: a Platt fit on two slides gave
    slopes of 136-1339 (probabilities of 0 or 1 from noise)."""
    assert MIN_CALIBRATION_SLIDES == 5
    rng = np.random.default_rng(2)
    y = np.array([0] * 6 + [1] * 4)
    m = np.where(y == 1, 0.02, -0.02) + rng.normal(0, 0.01, len(y))
    logits = np.stack([np.zeros_like(m), m], axis=1)
    cal = fit_calibration(logits, y, classes=("normal", "tumour"))
    assert cal == {
        "method": "none",
        "num_classes": 2,
        "skipped": "4 validation slides of class 'tumour' (need >= 5 of each class)",
    }
    assert np.allclose(apply_calibration(logits, cal), apply_calibration(logits, None))
    assert fit_calibration(logits[:2], y[:2])["skipped"] == (
        "2 validation slides of class '0', 0 of class '1' (need >= 5 of each class)"
    )
    assert calibration_skip_reason([], 2) == "no validation slides"
    assert calibration_skip_reason([0] * 5 + [1], 2) == (
        "1 validation slide of class '1' (need >= 5 of each class)"
    )
    assert calibration_skip_reason([0] * 5 + [1] * 5, 2) is None
    assert calibration_skip_reason([0] * 5 + [1] * 5, 3, classes="abc") == (
        "0 validation slides of class 'c' (need >= 5 of each class)"
    )
    y5 = np.r_[y, 1]
    logits5 = np.r_[logits, [[0.0, 0.03]]]
    assert fit_calibration(logits5, y5)["method"] == "platt"  # 6 + 5 slides: fitted


def test_calibration_scores_before_and_after() -> None:
    m = np.array([-0.02, -0.01, -0.015, -0.03, -0.005, 0.01, 0.02, 0.03, 0.015, 0.025])
    logits = np.stack([np.zeros_like(m), m], axis=1)
    y = [0] * 5 + [1] * 5
    cal = fit_calibration(logits, y)
    assert cal["method"] == "platt"
    s = calibration_scores(logits, y, cal)
    assert set(s) == {"n", "brier_before", "brier_after", "ece_before", "ece_after"}
    assert s["n"] == 10
    # the softmax of tiny logits says 0.5 for a model that ranks perfectly: calibration helps
    assert s["brier_before"] == pytest.approx(0.5, abs=0.01)
    assert s["brier_after"] < s["brier_before"] and s["ece_after"] < s["ece_before"]
    same = calibration_scores(logits, y, identity_calibration(2))
    assert same["brier_after"] == same["brier_before"]
    assert same["ece_after"] == same["ece_before"]
