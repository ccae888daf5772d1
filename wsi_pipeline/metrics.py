"""Numbers that say how good a result is: ROC AUC and curve, probability scores, heatmap overlap.

Plain functions over numpy arrays; every stage that reports a metric calls these.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from .util import sample_mask

__all__ = ["area_above", "auc_score", "heatmap_iou", "probability_metrics", "roc_curve"]


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
        pred = v >= threshold
    union = int(np.count_nonzero(pred | truth))
    return 1.0 if union == 0 else int(np.count_nonzero(pred & truth)) / union
