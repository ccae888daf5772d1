"""Post-hoc calibration of slide logits on the validation slides (numpy only).

A MIL model can rank slides (and patches) well long before its raw probabilities mean anything:
attention pooling dilutes a small lesion's evidence, so logits stay near zero. After training, the
logits of the validation slides are mapped to calibrated probabilities:

- binary: Platt scaling of the logit margin ``m = l_pos - l_neg``, ``p = sigmoid(a * m + b)``,
  fitted with Platt's smoothed targets (``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``) so a small,
  perfectly separated validation set cannot push the slope to infinity;
- multi-class: temperature scaling, ``softmax(logits / T)``, with the same target smoothing.

Per-patch scores cannot use the slide map as is: a slide's logit is an attention-weighted mean of
its patches' logits, so single patches spread much wider than slides do. For two classes the patch
map keeps the slide slope ``a`` but is centred on the negative validation slides, whose patches
are all normal under the MIL assumption: ``p = sigmoid(a * (m - m_ref))`` with ``m_ref`` the
99th percentile of their patch margins. A patch scores above 0.5 when it looks more abnormal than
99% of the patches of slides known to be normal -- a specificity-referenced probability. Without
negative validation slides the slide map is used. Calibration is monotone: AUCs do not change.

A fit needs :data:`MIN_CALIBRATION_SLIDES` validation slides of *each* class. Below that,
:func:`fit_calibration` returns the identity (plain softmax) with ``"skipped": "<reason>"``
(e.g. ``"3 validation slides of class '1' (need >= 5 of each class)"``), and ``train`` logs a
warning: a Platt fit on two slides gave slopes of 136 to 1339, i.e. probabilities of 0 or 1 from
noise. :func:`calibration_scores` reports Brier score and expected calibration error before and
after a calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import brier_score, expected_calibration_error

__all__ = [
    "MIN_CALIBRATION_SLIDES",
    "apply_calibration",
    "apply_patch_calibration",
    "calibration_scores",
    "calibration_skip_reason",
    "fit_calibration",
    "fit_patch_reference",
    "identity_calibration",
]

PATCH_QUANTILE = 99.0

#: Validation slides needed of each class before a calibration is fitted. Fewer give wild fits:
#: Platt scaling on two validation slides gave slopes of 136 to 1339 (every probability 0 or 1),
#: far worse than the uncalibrated softmax. Below this the calibration is the identity.
MIN_CALIBRATION_SLIDES = 5


def identity_calibration(num_classes: int, *, skipped: str | None = None) -> dict[str, Any]:
    """No calibration (plain softmax), e.g. without enough validation slides.

    Parameters
    ----------
    num_classes : int
    skipped : str, optional
        Why no calibration was fitted; recorded as ``"skipped"``.
    """
    out: dict[str, Any] = {"method": "none", "num_classes": int(num_classes)}
    if skipped is not None:
        out["skipped"] = skipped
    return out


def calibration_skip_reason(
    targets: Sequence[int] | np.ndarray,
    num_classes: int,
    *,
    classes: Sequence[str] | None = None,
    min_per_class: int = MIN_CALIBRATION_SLIDES,
) -> str | None:
    """Why a calibration cannot be fitted on validation slides of these classes, or None.

    Parameters
    ----------
    targets : sequence of int
        Class index of each validation slide.
    num_classes : int
    classes : sequence of str, optional
        Class names for the message (default: the indices).
    min_per_class : int
        Slides needed of each class.

    Returns
    -------
    str or None
        E.g. ``"3 validation slides of class '1' (need >= 5 of each class)"``; None when every
        class has ``min_per_class`` slides.
    """
    y = np.asarray(targets, dtype=np.int64)
    if len(y) == 0:
        return "no validation slides"
    names = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
    counts = np.bincount(y, minlength=num_classes)
    short = [(int(counts[c]), names[c]) for c in range(num_classes) if counts[c] < min_per_class]
    if not short:
        return None
    parts = [f"{n} validation slide{'s' * (n != 1)} of class {name!r}" for n, name in short[:1]]
    parts += [f"{n} of class {name!r}" for n, name in short[1:]]
    return f"{', '.join(parts)} (need >= {min_per_class} of each class)"


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fit_calibration(
    logits: np.ndarray,
    targets: Sequence[int],
    *,
    negative: int = 0,
    classes: Sequence[str] | None = None,
    min_per_class: int = MIN_CALIBRATION_SLIDES,
) -> dict[str, Any]:
    """Fit Platt scaling (binary) or a temperature (multi-class) on validation logits.

    With fewer than ``min_per_class`` slides of some class, nothing is fitted: the identity
    calibration with ``"skipped"`` (see :func:`calibration_skip_reason`).

    Parameters
    ----------
    logits : (n, C) ndarray
        Slide logits of the validation slides.
    targets : sequence of int
        Their class indices.
    negative : int
        Index of the negative class (binary: the margin is ``l_other - l_negative``).
    classes : sequence of str, optional
        Class names, for the ``"skipped"`` reason.
    min_per_class : int
        Validation slides needed of each class (:data:`MIN_CALIBRATION_SLIDES`).

    Returns
    -------
    dict
        JSON-ready parameters for :func:`apply_calibration`.
    """
    from scipy.optimize import minimize

    z = np.asarray(logits, np.float64)
    y = np.asarray(targets, int)
    n, c = z.shape
    reason = calibration_skip_reason(y, c, classes=classes, min_per_class=max(1, min_per_class))
    if reason is not None:
        return identity_calibration(c, skipped=reason)
    counts = np.bincount(y, minlength=c).astype(float)
    if c == 2:
        pos = 1 - negative
        m = z[:, pos] - z[:, negative]
        t = np.where(y == pos, (counts[pos] + 1) / (counts[pos] + 2), 1 / (counts[negative] + 2))

        def nll(ab: np.ndarray) -> float:
            s = ab[0] * m + ab[1]
            return float(np.mean(np.logaddexp(0, s) - t * s))

        res = minimize(
            nll, np.array([1.0, 0.0]), method="L-BFGS-B", bounds=[(1e-3, 1e4), (-50.0, 50.0)]
        )
        return {
            "method": "platt",
            "num_classes": 2,
            "negative": int(negative),
            "a": float(res.x[0]),
            "b": float(res.x[1]),
            "n": int(n),
        }
    smooth = np.full((n, c), 0.0)
    for i, yi in enumerate(y):
        smooth[i] = 1.0 / (counts[yi] + 2) / max(c - 1, 1)
        smooth[i, yi] = (counts[yi] + 1) / (counts[yi] + 2)

    def nll_t(logt: np.ndarray) -> float:
        p = _softmax(z / np.exp(logt[0]))
        return float(-np.mean((smooth * np.log(np.clip(p, 1e-12, 1))).sum(1)))

    res = minimize(nll_t, np.array([0.0]), method="L-BFGS-B", bounds=[(-9.0, 5.0)])
    return {
        "method": "temperature",
        "num_classes": int(c),
        "temperature": float(np.exp(res.x[0])),
        "n": int(n),
    }


def apply_calibration(logits: np.ndarray, cal: dict[str, Any] | None) -> np.ndarray:
    """Calibrated class probabilities ``(..., C)`` from logits ``(..., C)``."""
    z = np.asarray(logits, np.float64)
    if cal is None or cal.get("method") in (None, "none"):
        return _softmax(z)
    if cal["method"] == "platt":
        neg = int(cal["negative"])
        return _two_class(cal["a"] * (z[..., 1 - neg] - z[..., neg]) + cal["b"], neg)
    if cal["method"] == "temperature":
        return _softmax(z / float(cal["temperature"]))
    raise ValueError(f"unknown calibration method {cal['method']!r}")


def fit_patch_reference(
    cal: dict[str, Any], negative_patch_logits: list[np.ndarray]
) -> dict[str, Any]:
    """Add the patch map to a binary Platt calibration.

    Parameters
    ----------
    cal : dict
        From :func:`fit_calibration`.
    negative_patch_logits : list of (N_i, 2) ndarray
        Patch logits of each negative validation slide.

    Returns
    -------
    dict
        ``cal`` with a ``patch`` entry (``a``, ``center``, ``quantile``, ``n``), unchanged when it
        is not a binary Platt calibration or there are no negative patches.
    """
    if cal.get("method") != "platt" or not negative_patch_logits:
        return cal
    z = np.concatenate([np.asarray(p, np.float64) for p in negative_patch_logits])
    if len(z) == 0:
        return cal
    neg = int(cal["negative"])
    m = z[:, 1 - neg] - z[:, neg]
    out = dict(cal)
    out["patch"] = {
        "a": float(cal["a"]),
        "center": float(np.percentile(m, PATCH_QUANTILE)),
        "quantile": PATCH_QUANTILE,
        "n": len(m),
    }
    return out


def apply_patch_calibration(patch_logits: np.ndarray, cal: dict[str, Any] | None) -> np.ndarray:
    """Calibrated class probabilities of patches ``(N, C)`` (see the module docstring)."""
    if cal is None or "patch" not in cal:
        return apply_calibration(patch_logits, cal)
    z = np.asarray(patch_logits, np.float64)
    neg = int(cal["negative"])
    pc = cal["patch"]
    return _two_class(pc["a"] * ((z[..., 1 - neg] - z[..., neg]) - pc["center"]), neg)


def calibration_scores(
    logits: np.ndarray, targets: Sequence[int], cal: dict[str, Any] | None, *, n_bins: int = 10
) -> dict[str, Any]:
    """Brier score and expected calibration error of slides before and after ``cal``.

    Parameters
    ----------
    logits : (n, C) ndarray
        Slide logits (n > 0).
    targets : sequence of int
        Their class indices.
    cal : dict or None
        From :func:`fit_calibration`.
    n_bins : int
        Confidence bins of the expected calibration error.

    Returns
    -------
    dict
        ``n``, ``brier_before``, ``brier_after``, ``ece_before``, ``ece_after`` ("before": the
        plain softmax). On the slides the calibration was fitted on, "after" is optimistic.
    """
    before = apply_calibration(logits, None)
    after = apply_calibration(logits, cal)
    y = np.asarray(targets, dtype=np.int64)
    return {
        "n": len(y),
        "brier_before": brier_score(before, y),
        "brier_after": brier_score(after, y),
        "ece_before": expected_calibration_error(before, y, n_bins=n_bins),
        "ece_after": expected_calibration_error(after, y, n_bins=n_bins),
    }


def _two_class(score: np.ndarray, negative: int) -> np.ndarray:
    """``(..., 2)`` probabilities with ``p(positive) = sigmoid(score)`` (overflow-free)."""
    from scipy.special import expit

    p_pos = expit(score)
    out = np.empty((*np.shape(score), 2))
    out[..., 1 - negative] = p_pos
    out[..., negative] = 1.0 - p_pos
    return out
