"""Numbers that say how good a result is: ROC AUC and curve, probability scores, heatmap overlap.

Plain functions over numpy arrays; every stage that reports a metric calls these.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from .util import sample_mask

__all__ = [
    "area_above",
    "auc_score",
    "bootstrap_ci",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "heatmap_hit_rate",
    "heatmap_iou",
    "probability_metrics",
    "roc_curve",
]


def auc_score(y_true: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC: binary, or the macro mean of one-vs-rest AUCs.

    Ties count half (Mann-Whitney U).

    Parameters
    ----------
    y_true : (N,) ints
        True labels: 1 is positive in the binary case, class indices otherwise.
    scores : (N,) or (N, C) floats
        Scores of class 1, or per-class scores (two columns: column 1 is scored).

    Returns
    -------
    float
        NaN when there is no positive or no negative (for every class, with C > 2; classes
        without both are left out of the mean).
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2:
        if s.shape[1] == 2:
            return auc_score(y, s[:, 1])
        aucs = [auc_score((y == c).astype(int), s[:, c]) for c in range(s.shape[1])]
        aucs = [a for a in aucs if not math.isnan(a)]
        return float(np.mean(aucs)) if aucs else float("nan")
    pos, neg = s[y == 1], s[y != 1]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over all thresholds (binary).

    Parameters
    ----------
    y_true : (N,) ints
        1 for positives.
    scores : (N,) floats

    Returns
    -------
    fpr, tpr : (K + 1,) float ndarrays
        From ``(0, 0)`` (threshold above every score) to ``(1, 1)``, one point per distinct
        score; ``K`` distinct scores.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (1 + distinct) - tps
    tpr = np.r_[0, tps / max(1, y.sum())]
    fpr = np.r_[0, fps / max(1, len(y) - y.sum())]
    return fpr, tpr


def probability_metrics(probs: ArrayLike, targets: ArrayLike) -> dict[str, float]:
    """Accuracy, log loss and Brier score of class probabilities.

    Parameters
    ----------
    probs : (N, C) float ndarray
        Class probabilities (rows sum to 1).
    targets : (N,) ints
        True class indices.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, int)
    onehot = np.eye(p.shape[1])[y]
    return {
        "acc": float(np.mean(p.argmax(1) == y)),
        "log_loss": float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)))),
        "brier": float(np.mean(((p - onehot) ** 2).sum(1))),
    }


def brier_score(probs: ArrayLike, targets: ArrayLike) -> float:
    """Multi-class Brier score: mean over samples of ``sum_c (p_c - [y = c])**2``.

    Parameters
    ----------
    probs : (N, C) floats
        Class probabilities.
    targets : (N,) ints
        True class indices.

    Returns
    -------
    float
        0 is perfect; NaN for no samples. (Two classes: twice the binary Brier score.)
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(((p - onehot) ** 2).sum(axis=1)))


def calibration_bins(
    probs: ArrayLike, targets: ArrayLike, *, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence-binned accuracy: the data of a reliability diagram.

    Parameters
    ----------
    probs : (N, C) floats
        Class probabilities; a sample's confidence is its largest probability.
    targets : (N,) ints
    n_bins : int
        Equal-width bins over [0, 1].

    Returns
    -------
    confidence, accuracy : (n_bins,) float ndarray
        Mean confidence and accuracy per bin (NaN in empty bins).
    count : (n_bins,) int ndarray
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == y).astype(np.float64) if len(p) else np.zeros(0)
    b = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct, minlength=n_bins) / count
    return mean_conf, acc, count


def expected_calibration_error(probs: ArrayLike, targets: ArrayLike, *, n_bins: int = 10) -> float:
    """Expected calibration error (top-label, equal-width bins; Guo et al. 2017).

    ``sum_b (n_b / N) * |accuracy_b - confidence_b|``; NaN for no samples.
    """
    conf, acc, count = calibration_bins(probs, targets, n_bins=n_bins)
    n = int(count.sum())
    if n == 0:
        return float("nan")
    used = count > 0
    return float(np.sum(count[used] / n * np.abs(acc[used] - conf[used])))


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    targets: ArrayLike,
    scores: ArrayLike,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of ``metric(targets, scores)`` over samples.

    Resamples rows with replacement ``n_boot`` times (seeded); resamples on which the metric is
    undefined (NaN, e.g. one class only) are left out.

    Parameters
    ----------
    metric : callable
        ``metric(targets, scores) -> float``.
    targets : (N,) ints
    scores : (N, ...) array
        Whatever ``metric`` takes, indexed along the first axis.
    n_boot : int
    level : float
        Coverage of the interval (0.95: the 2.5th and 97.5th percentiles).
    seed : int

    Returns
    -------
    (low, high) or None
        None when fewer than half of the resamples give a defined value.
    """
    y = np.asarray(targets)
    s = np.asarray(scores)
    if len(y) == 0:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        v = metric(y[idx], s[idx])
        if not math.isnan(v):
            vals.append(v)
    if len(vals) < n_boot / 2:
        return None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(vals), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def area_above(values: np.ndarray, threshold: float, *, pixel_area: float = 1.0) -> float:
    """Area of the heatmap pixels with a value ``>= threshold`` (NaN never counts).

    Parameters
    ----------
    values : (H, W) float ndarray
    threshold : float
        In the heatmap's units.
    pixel_area : float
        Area of one heatmap pixel in the unit wanted (e.g. ``(downsample * mpp)**2`` µm², or
        ``downsample**2`` level-0 px²); 1 counts pixels.
    """
    with np.errstate(invalid="ignore"):
        return float(np.count_nonzero(np.asarray(values) >= threshold)) * float(pixel_area)


def _thresholded(
    values: np.ndarray,
    truth_mask: np.ndarray,
    threshold: float,
    downsample: float | None,
    truth_downsample: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap pixels ``>= threshold`` and the ground truth on the heatmap's grid."""
    v = np.asarray(values)
    t = np.asarray(truth_mask, dtype=bool)
    h, w = v.shape
    if downsample and truth_downsample:
        truth = sample_mask(t, float(truth_downsample), float(downsample), (0, h), (0, w))
    else:
        r = np.minimum(((np.arange(h) + 0.5) * t.shape[0] / h).astype(np.int64), t.shape[0] - 1)
        c = np.minimum(((np.arange(w) + 0.5) * t.shape[1] / w).astype(np.int64), t.shape[1] - 1)
        truth = t[r[:, None], c[None, :]]
    with np.errstate(invalid="ignore"):
        return v >= threshold, truth


def heatmap_iou(
    values: np.ndarray,
    truth_mask: np.ndarray,
    *,
    threshold: float,
    downsample: float | None = None,
    truth_downsample: float | None = None,
) -> float:
    """Intersection over union of the thresholded heatmap with a ground-truth mask.

    Parameters
    ----------
    values : (H, W) float ndarray
        Heatmap; pixels ``>= threshold`` are positive, NaN is negative.
    truth_mask : (h, w) bool ndarray
        Ground truth at any resolution; resampled to the heatmap grid by nearest neighbour.
    threshold : float
    downsample, truth_downsample : float, optional
        Level-0 px per heatmap / mask pixel. With both, heatmap pixel centres are mapped through
        level-0 coordinates; otherwise the two grids are taken to span the same extent.

    Returns
    -------
    float
        ``|A & B| / |A | B|``; 1.0 when both are empty.
    """
    pred, truth = _thresholded(values, truth_mask, threshold, downsample, truth_downsample)
    union = int(np.count_nonzero(pred | truth))
    return 1.0 if union == 0 else int(np.count_nonzero(pred & truth)) / union


def heatmap_hit_rate(
    values: np.ndarray,
    truth_mask: np.ndarray,
    *,
    threshold: float,
    downsample: float | None = None,
    truth_downsample: float | None = None,
) -> float | None:
    """The fraction of a ground-truth region that the thresholded heatmap covers (its recall).

    Parameters are those of :func:`heatmap_iou`.

    Returns
    -------
    float or None
        ``|A & B| / |B|``; None when the ground truth is empty on the heatmap's grid.
    """
    pred, truth = _thresholded(values, truth_mask, threshold, downsample, truth_downsample)
    n = int(np.count_nonzero(truth))
    return None if n == 0 else int(np.count_nonzero(pred & truth)) / n
