"""GeoJSON for QuPath: threshold regions (holes, small regions and NaN left out) and one
detection per patch, streamed (chunked or not), with atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline import qupath


# ------------------------------------------------------------------------------------ regions
def test_regions_have_holes() -> None:
    values = np.zeros((12, 12), np.float32)
    values[2:10, 2:10] = 1.0
    values[5:7, 5:7] = 0.0  # a hole
    values[0, 11] = 1.0  # a one-pixel region
    fc = qupath.threshold_regions(values, threshold=0.5, downsample=4.0, simplify_px=0)
    from shapely.geometry import shape

    geoms = sorted((shape(f["geometry"]) for f in fc["features"]), key=lambda g: -g.area)
    assert len(geoms) == 2 and all(g.is_valid for g in geoms)
    big = geoms[0]
    assert len(big.interiors) == 1
    assert big.bounds == (8.0, 8.0, 40.0, 40.0)  # pixel edges 2..10 at 4 level-0 px per pixel
    assert big.area == pytest.approx(32 * 32 - 8 * 8, rel=0.05)
    assert fc["features"][0]["properties"]["measurements"].keys() == {
        "score_mean",
        "score_max",
        "area_px",
    }


def test_small_regions_and_nan_are_left_out() -> None:
    values = np.full((10, 10), np.nan, np.float32)
    values[1:3, 1:3] = 0.9  # 4 px
    values[6, 6] = 0.8  # 1 px
    fc = qupath.threshold_regions(values, threshold=0.5, downsample=2.0, min_region_px=2, mpp=0.5)
    assert len(fc["features"]) == 1
    f = fc["features"][0]
    assert f["properties"]["name"] == "Abnormal 1"
    m = f["properties"]["measurements"]
    assert m["score_max"] == pytest.approx(0.9) and m["area_um2"] == pytest.approx(
        m["area_px"] * 0.25
    )
    assert qupath.threshold_regions(values, threshold=0.95, downsample=2.0)["features"] == []


# -------------------------------------------------------------------------------------- tiles
@pytest.mark.parametrize("chunk", [2, 8192])  # streamed in chunks, or all at once
def test_tiles_geojson_is_one_detection_per_patch(tmp_path: Path, chunk: int) -> None:
    import json

    coords = np.array([[0, 0], [256, 0], [100_000, 59_744], [512, 128], [-3, 7]])
    score = np.array([0.1, 0.95, np.nan, 0.5, 1e-7], np.float32)
    tissue = np.array([1.0, 0.5, 0.25, 0.75, 1.0], np.float32)
    p = qupath.write_tiles_geojson(
        tmp_path / "t.geojson",
        coords,
        patch_l0=256,
        measurements={"score": score, "tissue_fraction": tissue},
        classified=score >= 0.5,
        name="Abnormal",
        chunk=chunk,
    )
    fc = json.loads(p.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(coords)
    for f, (x, y), s, t in zip(fc["features"], coords, score, tissue):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = f["geometry"]["coordinates"][0]
        assert ring == [[x, y], [x + 256, y], [x + 256, y + 256], [x, y + 256], [x, y]]
        props = f["properties"]
        assert props["objectType"] == "detection"
        m = props["measurements"]
        assert all(isinstance(v, float) or isinstance(v, int) for v in m.values())
        assert m["tissue_fraction"] == pytest.approx(t)
        if np.isnan(s):
            assert "score" not in m  # JSON has no NaN: left out
        else:
            assert m["score"] == pytest.approx(s, rel=1e-5)
        if s >= 0.5:
            assert props["classification"] == {"name": "Abnormal", "color": [255, 0, 0]}
        else:
            assert "classification" not in props
    assert not [q.name for q in tmp_path.iterdir() if q.name.startswith(".")]  # atomic
    frac = qupath.write_tiles_geojson(
        tmp_path / "f.geojson", [[10.5, 3]], patch_l0=223.25, measurements={}
    )
    (f,) = json.loads(frac.read_text())["features"]
    assert f["geometry"]["coordinates"][0][2] == [233.75, 226.25]
    assert f["properties"]["measurements"] == {}
    with pytest.raises(ValueError, match="score has 1 values for 2 patches"):
        qupath.write_tiles_geojson(
            tmp_path / "x.geojson", [[0, 0], [1, 1]], patch_l0=1, measurements={"score": [0.5]}
        )
    empty = qupath.write_tiles_geojson(
        tmp_path / "e.geojson", np.zeros((0, 2)), patch_l0=1, measurements={}
    )
    assert json.loads(empty.read_text()) == {"type": "FeatureCollection", "features": []}
