"""The per-slide heatmap summary: areas above the threshold, top patches, geometry, files.

A stand-in for the store (only the attributes the summary reads) keeps these tests free of
slides; the summary written by a real export is tested in test_heatmap.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from wsi_pipeline.heatmap_summary import heatmap_mpp, slide_summary

NAMES = {"png": "s_score_overlay.png", "summary": "s_score_summary.json"}


def _store(mpp: float | None) -> Any:
    coords = np.array([[0, 0], [256, 0], [0, 256], [256, 256]], np.int64)
    meta = SimpleNamespace(mpp=mpp, width=512, height=512)
    return SimpleNamespace(
        slide_id="s", path=Path("s.zarr"), meta=meta, n_patches=len(coords), coords=coords
    )


def _params(mode: str, threshold: float) -> dict[str, Any]:
    return {
        "run": "r",
        "which": "score",
        "mode": mode,
        "threshold": threshold,
        "downsample": 8.0,
        "sigma_um": 0.0,
    }


def test_heatmap_mpp() -> None:
    assert heatmap_mpp(0.5, 8.0) == 4.0
    assert heatmap_mpp(None, 8.0) is None


def test_summary_areas_and_top_patches() -> None:
    values = np.full((4, 4), np.nan, np.float32)
    values[:2] = [[0.1, 0.6, 0.7, 0.2], [0.9, 0.3, 0.5, 0.4]]  # 4 of 8 tissue px >= 0.5
    scores = np.array([0.2, np.nan, 0.9, 0.4], np.float32)
    p = _params("probability", 0.5)
    s = slide_summary(
        _store(0.5),
        values,
        scores,
        scores=scores,
        prediction={"predicted": "tumour", "abnormal_probability": 0.8},
        params=p,
        legend="the legend",
        n_regions=2,
        names=NAMES,
    )
    assert s["slide_id"] == "s" and s["store"] == "s.zarr" and s["params"] is p
    assert s["value_range"] == [0.0, 1.0] and s["legend"] == "the legend"
    assert s["prediction"] == {
        "label": "tumour",
        "abnormal_probability": 0.8,
        "probabilities": None,
        "classes": None,
        "class_probability": None,  # the default (abnormality) heatmap draws no one class
    }
    assert s["heatmap_size_wh"] == [4, 4] and s["slide_size_wh"] == [512, 512]
    assert s["heatmap_mpp"] == 4.0 and s["n_regions"] == 2
    assert s["area_above_threshold_px"] == 4 * 64.0  # level-0 px² (downsample 8)
    assert s["area_above_threshold_mm2"] == pytest.approx(4 * 16.0 * 1e-6)
    assert s["tissue_area_mm2"] == pytest.approx(8 * 16.0 * 1e-6)
    assert s["fraction_above_threshold"] == 0.5
    top = s["top_patches"]
    assert [t["index"] for t in top] == [2, 3, 0, 1]  # NaN last
    assert top[0] == {
        "index": 2,
        "x": 0,
        "y": 256,
        "score": pytest.approx(0.9),
        "percentile": 100.0,
    }
    assert s["files"] == {"png": "s_score_overlay.png"}  # the summary's own name left out


def test_summary_without_mpp_in_percentile_mode() -> None:
    values = np.zeros((2, 2), np.float32)
    scores = np.array([0.1, 0.4, 0.3, 0.2], np.float32)
    shown = np.array([5.0, 6.0, 7.0, 8.0], np.float32)  # percentile mode: shown as recorded
    s = slide_summary(
        _store(None),
        values,
        shown,
        scores=scores,
        prediction={},
        params=_params("percentile", 90.0),
        legend="",
        n_regions=0,
        names=NAMES,
    )
    assert s["mpp"] is None and s["heatmap_mpp"] is None
    assert s["area_above_threshold_mm2"] is None and s["tissue_area_mm2"] is None
    assert s["area_above_threshold_px"] == 0.0 and s["fraction_above_threshold"] == 0.0
    assert [(t["index"], t["percentile"]) for t in s["top_patches"]] == [
        (1, 6.0),
        (2, 7.0),
        (3, 8.0),
        (0, 5.0),
    ]
