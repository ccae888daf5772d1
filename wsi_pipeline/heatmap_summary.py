"""What one slide's heatmap summary holds (``<id>_<which>_summary.json``).

The prediction, the area and tissue fraction above the threshold, the top-10 patches, the
geometry, the parameters and the other files' names of one export, as a JSON-ready dict.
Nothing here reads scores or writes files: :mod:`wsi_pipeline.heatmap` stitches, adds the
timings and writes the summary last, so it marks a finished export.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import area_above
from .stitch import MODES, percentile_ranks
from .store import SlideStore

__all__ = ["heatmap_mpp", "slide_summary"]


def heatmap_mpp(mpp: float | None, downsample: float) -> float | None:
    """µm per heatmap pixel: the slide's ``mpp`` times ``downsample`` (None when it is unknown)."""
    return None if mpp is None else mpp * downsample


def _areas(values: np.ndarray, threshold: float, ds: float, mpp: float | None) -> dict[str, Any]:
    """Area above the threshold (level-0 px², mm²), tissue area and the fraction above."""
    n_valid = int(np.count_nonzero(np.isfinite(values)))
    above_px = area_above(values, threshold, pixel_area=ds * ds)
    return {
        "area_above_threshold_px": above_px,
        "area_above_threshold_mm2": None if mpp is None else above_px * mpp * mpp * 1e-6,
        "tissue_area_mm2": None if mpp is None else n_valid * (ds * mpp) ** 2 * 1e-6,
        "fraction_above_threshold": area_above(values, threshold) / n_valid if n_valid else 0.0,
    }


def _top_patches(
    coords: np.ndarray, scores: np.ndarray, shown: np.ndarray, *, mode: str, n: int = 10
) -> list[dict[str, Any]]:
    """The ``n`` highest-scoring patches: index, level-0 corner, score and percentile."""
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:n]
    pct = shown if mode == "percentile" else percentile_ranks(scores)
    return [
        {
            "index": int(i),
            "x": int(coords[i, 0]),
            "y": int(coords[i, 1]),
            "score": float(scores[i]),
            "percentile": float(pct[i]),
        }
        for i in top
    ]


def slide_summary(
    store: SlideStore,
    values: np.ndarray,
    shown: np.ndarray,
    *,
    scores: np.ndarray,
    prediction: dict[str, Any],
    params: dict[str, Any],
    legend: str,
    n_regions: int,
    names: dict[str, str],
) -> dict[str, Any]:
    """The summary of one export (without its timings and version).

    Parameters
    ----------
    store : SlideStore
        The slide's store (id, path, geometry, mpp, coords).
    values : (H, W) float ndarray
        The stitched heatmap, in the mode's units; NaN outside tissue.
    shown : (N,) float ndarray
        The per-patch values drawn (:func:`wsi_pipeline.stitch.display_values`).
    scores : (N,) float32 ndarray
        The stored per-patch values.
    prediction : dict
        The attributes of ``scores/<run>`` (``predicted``, ``abnormal_probability``, ...).
    params : dict
        The export's parameters (``run``, ``which``, ``class`` (the class whose probability is
        drawn, or None for the abnormality score), ``mode``, ``threshold``, ``downsample``,
        ``sigma_um``, ...), recorded as they are.
    legend : str
        The colour scale's description.
    n_regions : int
        Regions in the regions GeoJSON.
    names : dict of str to str
        File kind -> file name of the export (the summary's own is left out).

    Returns
    -------
    dict
        JSON-ready (``None`` where the mpp is unknown).
    """
    p, pred = params, prediction
    mpp = store.meta.mpp
    return {
        "slide_id": store.slide_id,
        "store": str(store.path),
        "run": p["run"],
        "which": p["which"],
        "class": p.get("class"),
        "mode": p["mode"],
        "value_range": list(MODES[p["mode"]]),
        "legend": legend,
        "threshold": p["threshold"],
        "prediction": {
            "label": pred.get("predicted"),
            "abnormal_probability": pred.get("abnormal_probability"),
            "probabilities": pred.get("probabilities"),
            "classes": pred.get("classes"),
            # the slide-level probability of the class drawn (None for the abnormality score)
            "class_probability": (pred.get("probabilities") or {}).get(p["class"])
            if p.get("class") is not None
            else None,
        },
        "n_patches": store.n_patches,
        "downsample": p["downsample"],
        "slide_size_wh": [store.meta.width, store.meta.height],
        "heatmap_size_wh": [int(values.shape[1]), int(values.shape[0])],
        "mpp": mpp,
        "heatmap_mpp": heatmap_mpp(mpp, p["downsample"]),
        "sigma_um": p["sigma_um"],
        **_areas(values, p["threshold"], p["downsample"], mpp),
        "n_regions": n_regions,
        "top_patches": _top_patches(store.coords, scores, shown, mode=p["mode"]),
        "files": {k: v for k, v in names.items() if k != "summary"},
        "params": p,
    }
