"""What a training run reports about how far to trust it: missing AUCs, calibration, warnings.

:func:`calibrate` fits the probability calibration on the validation slides (the identity, with
the reason, when it cannot), and :func:`calibration_report` says how much it helped (Brier score
and expected calibration error before and after, ``calibration`` in ``metrics.json``).
:func:`auc_reason` says why an AUC is undefined (no slides, or a single class), for the
``<name>_reason`` next to a ``null`` metric. The warnings of a run, logged and listed under
``warnings`` in ``metrics.json`` by :mod:`wsi_pipeline.training`: a validation set without an AUC
(:func:`validation_warning`), a best epoch chosen by the AUC of fewer than
:data:`MIN_SELECTION_SLIDES` validation slides (:func:`selection_warning`), and a train loss that
never left chance (:func:`stall_warning`), and a validation AUC that did not hold over the last
epochs (:func:`late_auc_warning`: the best epoch was a peak, not where training ended up).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .calibration import calibration_scores
from .data import negative_class

__all__ = [
    "LATE_AUC_DROP",
    "MIN_SELECTION_SLIDES",
    "STALL_EPOCHS",
    "STALL_FRACTION",
    "STALL_HELP",
    "auc_reason",
    "calibrate",
    "calibration_report",
    "late_auc_warning",
    "selection_warning",
    "stall_warning",
    "validation_warning",
]

log = logging.getLogger(__name__)

#: A best epoch chosen by the AUC of fewer validation slides than this is a warning: on two
#: slides one lucky epoch scores AUC 1.000 (the demo's did).
MIN_SELECTION_SLIDES = 10
#: A finished run is stalled when the mean train loss of its last :data:`STALL_EPOCHS` epochs is
#: above :data:`STALL_FRACTION` of chance, ``ln(num_classes)`` (what predicting every class
#: with equal probability costs).
STALL_EPOCHS = 3
STALL_FRACTION = 0.95
#: A finished run whose validation AUC, averaged over its last :data:`STALL_EPOCHS` epochs, is
#: more than this below its best epoch's is a warning: what was learnt did not hold.
LATE_AUC_DROP = 0.1
#: Where the warning of a stalled run points to.
STALL_HELP = "README, 'When training does not learn'"


def auc_reason(targets: Sequence[int], classes: Sequence[str], split: str) -> str | None:
    """Why the AUC of slides with these targets is undefined, or None when it is defined.

    Parameters
    ----------
    targets : sequence of int
        Class indices of the slides.
    classes : sequence of str
        Class names, in index order.
    split : str
        How to name the slides (``"validation"``, ``"test"``).

    Returns
    -------
    str or None
        ``"no validation slides"``, ``"validation set has a single class ('0')"``, or None.
    """
    present = sorted({int(t) for t in targets})
    if not present:
        return f"no {split} slides"
    if len(present) == 1:
        name = classes[present[0]] if present[0] < len(classes) else str(present[0])
        return f"{split} set has a single class ({name!r})"
    return None


def stall_warning(history: Sequence[dict[str, Any]], num_classes: int) -> str | None:
    """The warning of a run whose train loss never moved below chance, or None.

    The rule: the mean ``train_loss`` of the last :data:`STALL_EPOCHS` epochs (all of them when
    fewer ran) is above :data:`STALL_FRACTION` ``* ln(num_classes)``.

    Parameters
    ----------
    history : sequence of dict
        One record per epoch, with ``train_loss``.
    num_classes : int

    Returns
    -------
    str or None
    """
    losses = [h["train_loss"] for h in history if math.isfinite(h.get("train_loss", math.nan))]
    if not losses or num_classes < 2:
        return None
    chance = math.log(num_classes)
    last = float(np.mean(losses[-STALL_EPOCHS:]))
    if last <= STALL_FRACTION * chance:
        return None
    return (
        f"train loss did not move from chance (ln {num_classes} = {chance:.3f}) after "
        f"{len(history)} epochs (mean of the last {min(STALL_EPOCHS, len(losses))}: "
        f"{last:.3f}): the model learnt nothing; see {STALL_HELP}"
    )


def late_auc_warning(history: Sequence[dict[str, Any]], best: Mapping[str, Any]) -> str | None:
    """The warning of a run whose validation AUC fell away from its best epoch, or None.

    Early stopping keeps the best epoch's weights; when the validation AUC of the last
    :data:`STALL_EPOCHS` epochs averages more than :data:`LATE_AUC_DROP` below it, those weights
    are a peak that training did not hold (on a small validation set, possibly luck).

    Parameters
    ----------
    history : sequence of dict
        One record per epoch, with ``val_auc`` (NaN or absent without one).
    best : mapping
        The best epoch (``TrainState.best``): ``epoch`` (0-based) and ``auc`` (-1 without one).

    Returns
    -------
    str or None
    """
    aucs = [h.get("val_auc", math.nan) for h in history]
    late = [a for a in aucs[-STALL_EPOCHS:] if math.isfinite(a)]
    top = float(best.get("auc", -1.0))
    if not late or top < 0 or len(history) <= STALL_EPOCHS:
        return None
    mean = float(np.mean(late))
    if mean >= top - LATE_AUC_DROP:
        return None
    return (
        f"validation AUC fell from {top:.3f} (epoch {int(best['epoch']) + 1}) to {mean:.3f} "
        f"(mean of the last {len(late)} epochs): the kept weights are a peak training did not "
        f"hold; see {STALL_HELP}"
    )


def selection_warning(best: Mapping[str, Any], n_val: int) -> str | None:
    """The warning of a best epoch chosen by the AUC of few validation slides, or None.

    Parameters
    ----------
    best : mapping
        The best epoch (``TrainState.best``): ``epoch`` (0-based), ``auc`` (-1 without one) and
        ``by`` (what chose it; ``val_auc`` when absent).
    n_val : int
        Validation slides.

    Returns
    -------
    str or None
        None when the epoch was not chosen by a validation AUC, or by that of at least
        :data:`MIN_SELECTION_SLIDES` slides.
    """
    if best.get("by", "val_auc") != "val_auc" or best["auc"] < 0 or n_val >= MIN_SELECTION_SLIDES:
        return None
    return (
        f"the best epoch ({best['epoch'] + 1}) was chosen by a validation AUC of "
        f"{best['auc']:.3f} on only {n_val} slides (< {MIN_SELECTION_SLIDES}): one lucky epoch "
        "can score that; trust the test or cross-validation AUC instead"
    )


def validation_warning(reason: str | None) -> str | None:
    """The warning of a validation set without an AUC (empty, or of a single class).

    Parameters
    ----------
    reason : str or None
        From :func:`auc_reason` on the validation slides.

    Returns
    -------
    str or None
        None when the validation AUC is defined (``reason`` is None); else what the run does
        instead (the best epoch chosen by the train or validation loss, no calibration).
    """
    if reason is None:
        return None
    if reason.startswith("no "):
        return (
            f"{reason}: the best epoch is chosen by the train loss, there is no validation AUC "
            "and no calibration"
        )
    return (
        f"{reason}: there is no validation AUC; the best epoch is chosen by the validation "
        "loss and calibration is skipped"
    )


def calibrate(val: dict[str, Any] | None, classes: Sequence[str]) -> dict[str, Any]:
    """The probability calibration fitted on a validation evaluation (see
    :mod:`wsi_pipeline.calibration`); the identity, with ``"skipped"`` and a logged warning,
    without :data:`~wsi_pipeline.calibration.MIN_CALIBRATION_SLIDES` validation slides of each
    class.

    Parameters
    ----------
    val : dict or None
        From :func:`wsi_pipeline.training.evaluate` on the validation bags.
    classes : sequence of str

    Returns
    -------
    dict
        JSON-ready, for ``calibration.json``.
    """
    from .calibration import fit_calibration, fit_patch_reference, identity_calibration

    neg = negative_class(classes)
    if val is None or not val["n"]:
        cal = identity_calibration(len(classes), skipped="no validation slides")
    else:
        cal = fit_calibration(val["logits"], val["targets"], negative=neg, classes=classes)
    if val is None or "skipped" in cal:
        log.warning(
            "calibration skipped: %s; probabilities are the uncalibrated softmax", cal["skipped"]
        )
        return cal
    negatives = [p for p, t in zip(val["patch_logits"], val["targets"]) if t == neg]
    return fit_patch_reference(cal, negatives)


def calibration_report(
    cal: dict[str, Any], evaluations: Mapping[str, dict[str, Any] | None]
) -> dict[str, Any]:
    """``metrics.json``'s ``calibration``: the method, why it was skipped, and Brier score and
    expected calibration error before and after it on each evaluated split.

    Parameters
    ----------
    cal : dict
        From :func:`calibrate`.
    evaluations : mapping of str -> dict or None
        ``val`` and ``test`` evaluations (:func:`wsi_pipeline.training.evaluate`); a missing or
        empty one is ``null`` with a ``<split>_reason``.

    Returns
    -------
    dict
        JSON-ready: ``method``, ``skipped`` (when it was), ``val``, ``test``.
    """
    out: dict[str, Any] = {"method": cal.get("method")}
    if "skipped" in cal:
        out["skipped"] = cal["skipped"]
    for split, name in (("val", "validation"), ("test", "test")):
        ev = evaluations.get(split)
        if ev is None or not ev["n"]:
            out[split] = None
            out[f"{split}_reason"] = f"no {name} slides"
        else:
            out[split] = calibration_scores(ev["logits"], ev["targets"], cal)
    return out
