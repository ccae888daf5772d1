"""What a training run reports about how far to trust it (wsi_pipeline.train_report): why an
AUC is missing, the stall, selection and validation warnings, the calibration and its report.
How a training run writes them into metrics.json is tested in test_training.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import read_strict_json

from wsi_pipeline.calibration import (
    MIN_CALIBRATION_SLIDES,
    calibration_scores,
    fit_calibration,
    fit_patch_reference,
)
from wsi_pipeline.train_report import (
    MIN_SELECTION_SLIDES,
    STALL_EPOCHS,
    STALL_FRACTION,
    STALL_HELP,
    auc_reason,
    calibrate,
    calibration_report,
    late_auc_warning,
    selection_warning,
    stall_warning,
    validation_warning,
)


# ---------------------------------------------------------------------------------------------
# missing AUCs and the warnings of a run
# ---------------------------------------------------------------------------------------------
def test_auc_reason_and_stall_rule() -> None:
    assert auc_reason([], ("0", "1"), "validation") == "no validation slides"
    assert auc_reason([0, 0], ("0", "1"), "validation") == (
        "validation set has a single class ('0')"
    )
    assert auc_reason([1], ("normal", "tumour"), "test") == "test set has a single class ('tumour')"
    assert auc_reason([0, 1], ("0", "1"), "test") is None
    chance = [{"epoch": e, "train_loss": 0.69} for e in range(30)]
    w = stall_warning(chance, 2)
    assert w is not None and w.startswith(
        "train loss did not move from chance (ln 2 = 0.693) after 30 epochs"
    )
    assert "the model learnt nothing; see README" in w
    # the mean of the last 3 epochs decides: > 0.95 * ln(C)
    falling = [{"epoch": e, "train_loss": x} for e, x in enumerate([0.7, 0.69, 0.6, 0.5, 0.4])]
    assert stall_warning(falling, 2) is None
    assert stall_warning([{"epoch": 0, "train_loss": 1.09}], 3) is not None  # ln 3 = 1.099
    assert stall_warning([{"epoch": 0, "train_loss": 1.0}], 3) is None
    assert stall_warning([], 2) is None


def _history(*losses: float) -> list[dict]:
    return [{"epoch": e, "train_loss": x} for e, x in enumerate(losses)]


def test_late_auc_warning_when_the_best_epoch_was_a_peak() -> None:
    """The demo's old failure: validation AUC 1.0 at one epoch, 0.06-0.31 at the end."""
    hist = [{"epoch": e, "val_auc": a} for e, a in enumerate([0.5, 1.0, 0.3, 0.2, 0.25])]
    w = late_auc_warning(hist, {"epoch": 1, "auc": 1.0})
    assert w is not None and "fell from 1.000 (epoch 2) to 0.250" in w
    held = [{"epoch": e, "val_auc": a} for e, a in enumerate([0.5, 1.0, 0.95, 0.97, 1.0])]
    assert late_auc_warning(held, {"epoch": 1, "auc": 1.0}) is None
    assert late_auc_warning(hist[:3], {"epoch": 1, "auc": 1.0}) is None  # too short to say
    no_auc = [{"epoch": e, "val_auc": math.nan} for e in range(5)]
    assert late_auc_warning(no_auc, {"epoch": 0, "auc": -1.0}) is None


def test_stall_warning_at_and_around_the_threshold() -> None:
    """Stalled when the mean train loss of the last STALL_EPOCHS epochs is above
    STALL_FRACTION * ln(C); at the threshold itself it is not."""
    assert (STALL_EPOCHS, STALL_FRACTION) == (3, 0.95)
    for c in (2, 3, 5):
        limit = STALL_FRACTION * math.log(c)
        assert stall_warning(_history(limit), c) is None  # at: not stalled
        assert stall_warning(_history(limit - 1e-6), c) is None
        w = stall_warning(_history(limit + 1e-6), c)
        assert w == (
            f"train loss did not move from chance (ln {c} = {math.log(c):.3f}) after 1 epochs "
            f"(mean of the last 1: {limit + 1e-6:.3f}): the model learnt nothing; "
            f"see {STALL_HELP}"
        )
    limit = STALL_FRACTION * math.log(2)
    # only the last 3 epochs count: a high start does not make a stall, a low one does not
    # save a run that went back to chance
    assert (
        stall_warning(_history(5.0, 5.0, 5.0, limit - 0.01, limit - 0.01, limit - 0.01), 2) is None
    )
    late = stall_warning(_history(0.1, 0.1, 0.1, limit + 0.01, limit + 0.01, limit + 0.01), 2)
    assert late is not None and "after 6 epochs (mean of the last 3:" in late
    # their mean, not each of them: one low epoch among high ones
    assert stall_warning(_history(limit + 0.2, limit + 0.2, limit - 0.5), 2) is None
    assert stall_warning(_history(limit + 0.2, limit + 0.2, limit - 0.3), 2) is not None


def test_stall_warning_skips_what_it_cannot_judge() -> None:
    nan, inf = math.nan, math.inf
    assert stall_warning(_history(nan, inf), 2) is None  # no finite loss
    assert stall_warning([{"epoch": 0}], 2) is None  # no train loss recorded
    assert stall_warning(_history(5.0), 1) is None  # one class: no chance level
    # non-finite epochs are left out of the mean but counted as epochs run
    w = stall_warning(_history(0.69, nan, 0.69), 2)
    assert w is not None and "after 3 epochs (mean of the last 2: 0.690)" in w


def test_selection_warning() -> None:
    few = MIN_SELECTION_SLIDES - 1
    best = {"epoch": 1, "auc": 1.0, "loss": 0.2, "by": "val_auc"}
    assert selection_warning(best, 2) == (
        "the best epoch (2) was chosen by a validation AUC of 1.000 on only 2 slides (< 10): "
        "one lucky epoch can score that; trust the test or cross-validation AUC instead"
    )
    assert selection_warning({k: v for k, v in best.items() if k != "by"}, few) is not None
    assert selection_warning(best, MIN_SELECTION_SLIDES) is None  # enough slides
    assert selection_warning({**best, "by": "val_loss"}, 2) is None  # not chosen by an AUC
    assert selection_warning({**best, "by": "train_loss"}, 0) is None
    assert selection_warning({**best, "auc": -1.0}, 2) is None  # no AUC at all


def test_validation_warning_from_auc_reason() -> None:
    classes = ("0", "1")
    assert validation_warning(auc_reason([0, 1], classes, "validation")) is None
    assert validation_warning(auc_reason([], classes, "validation")) == (
        "no validation slides: the best epoch is chosen by the train loss, there is no "
        "validation AUC and no calibration"
    )
    assert validation_warning(auc_reason([1, 1], classes, "validation")) == (
        "validation set has a single class ('1'): there is no validation AUC; the best epoch "
        "is chosen by the validation loss and calibration is skipped"
    )


# ---------------------------------------------------------------------------------------------
# calibration and its report
# ---------------------------------------------------------------------------------------------
def test_calibrate_without_validation_slides() -> None:
    """The calibration of a run without validation slides is the identity, saying why."""
    assert calibrate(None, ("0", "1")) == {
        "method": "none",
        "num_classes": 2,
        "skipped": "no validation slides",
    }


def _validation(per_class: int, seed: int = 0) -> dict:
    """An evaluation of ``per_class`` validation slides of each of 2 classes, as
    ``training.evaluate`` returns it: slide logits that separate the classes (noisily), targets,
    and each slide's patch logits."""
    rng = np.random.default_rng(seed)
    targets = [0, 1] * per_class
    logits = np.stack([[0.0, 2.0 * t - 1.0] for t in targets]) + rng.normal(
        0, 1.0, (len(targets), 2)
    )
    patches = [rng.normal(0, 1, (5 + i, 2)) for i in range(len(targets))]
    return {"n": len(targets), "logits": logits, "targets": targets, "patch_logits": patches}


def test_calibrate_fits_platt_and_the_patch_reference_of_negative_slides(logged) -> None:
    """Enough validation slides: Platt scaling, and the patch map from the patches of the
    negative slides only (class 'normal', index 1 here)."""
    classes = ("tumour", "normal")
    val = _validation(MIN_CALIBRATION_SLIDES)
    cal = calibrate(val, classes)
    assert cal["method"] == "platt" and cal["negative"] == 1 and cal["n"] == val["n"]
    negatives = [p for p, t in zip(val["patch_logits"], val["targets"]) if t == 1]
    want = fit_patch_reference(
        fit_calibration(val["logits"], val["targets"], negative=1, classes=classes), negatives
    )
    assert cal == want
    z = np.concatenate(negatives)
    assert cal["patch"]["n"] == len(z) == sum(5 + i for i in range(1, val["n"], 2))
    assert cal["patch"]["center"] == pytest.approx(np.percentile(z[:, 0] - z[:, 1], 99.0))
    json.dumps(cal, allow_nan=False)  # JSON-ready
    assert not logged.records


def test_calibrate_skips_with_a_logged_reason(logged) -> None:
    classes = ("0", "1")
    few = _validation(MIN_CALIBRATION_SLIDES - 1)
    cal = calibrate(few, classes)
    reason = "4 validation slides of class '0', 4 of class '1' (need >= 5 of each class)"
    assert cal == {"method": "none", "num_classes": 2, "skipped": reason}
    empty = {"n": 0, "logits": np.zeros((0, 2)), "targets": [], "patch_logits": []}
    assert calibrate(empty, classes)["skipped"] == "no validation slides"
    assert [r.getMessage() for r in logged.records] == [
        f"calibration skipped: {reason}; probabilities are the uncalibrated softmax",
        "calibration skipped: no validation slides; probabilities are the uncalibrated softmax",
    ]


def test_calibration_report() -> None:
    classes = ("0", "1")
    val = _validation(MIN_CALIBRATION_SLIDES, seed=1)
    test = _validation(2, seed=2)
    cal = calibrate(val, classes)
    rep = calibration_report(cal, {"val": val, "test": test})
    assert rep == {
        "method": "platt",
        "val": calibration_scores(val["logits"], val["targets"], cal),
        "test": calibration_scores(test["logits"], test["targets"], cal),
    }
    assert rep["test"]["n"] == 4
    json.dumps(rep, allow_nan=False)
    # a skipped calibration says so; a missing or empty split is null with its reason
    skipped = calibrate(None, classes)
    empty = {"n": 0, "logits": np.zeros((0, 2)), "targets": []}
    rep = calibration_report(skipped, {"val": None, "test": empty})
    assert rep == {
        "method": "none",
        "skipped": "no validation slides",
        "val": None,
        "val_reason": "no validation slides",
        "test": None,
        "test_reason": "no test slides",
    }
    only_test = calibration_report(skipped, {"test": test})
    assert (
        only_test["val"] is None
        and only_test["test"]["brier_after"] == (only_test["test"]["brier_before"])
    )  # the identity changes nothing


def test_calibration_skipped_below_minimum(fast_run: Path) -> None:
    """fast_run has one validation slide of each class: no calibration, and it says why."""
    cal = read_strict_json(fast_run / "calibration.json")
    assert cal == {
        "method": "none",
        "num_classes": 2,
        "skipped": "1 validation slide of class '0', 1 of class '1' (need >= 5 of each class)",
    }
    m = read_strict_json(fast_run / "metrics.json")
    assert f"calibration skipped: {cal['skipped']}" in m["warnings"]
    c = m["calibration"]
    assert c["method"] == "none" and c["skipped"] == cal["skipped"]
    for split in ("val", "test"):
        assert c[split]["n"] == 2
        assert c[split]["brier_after"] == c[split]["brier_before"]  # the identity
        assert 0 <= c[split]["ece_before"] <= 1
    # the AUC of 2 validation slides chose the best epoch: said so
    assert m["best_epoch_by"] == "val_auc"
    assert any("on only 2 slides (< 10)" in w for w in m["warnings"])
