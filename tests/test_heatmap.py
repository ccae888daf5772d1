"""Heatmaps: exact stitching, block independence, smoothing, exports read back by openslide,
tiffslide, tifffile and shapely, and the batch's per-slide errors.

Stores come from a synthetic slide with two planted lesions; the per-patch "model" scores are
the exact lesion fraction of each patch (from the ground-truth mask) plus noise, so no trained
model is needed and the right answer is known.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from wsi_pipeline import heatmap as hm
from wsi_pipeline import metrics, synth
from wsi_pipeline.errors import ConfigError, StoreError
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.store import SlideStore
from wsi_pipeline.tiling import tile_slide
from wsi_pipeline.tissue import rect_fractions

RUN = "test"
DS = 8.0  # heatmap downsample used for the exports (512 x 384 px: a 2-level pyramid)


def _write_scores(store: Path, key: str, values: np.ndarray, attrs: dict[str, Any]) -> None:
    g = zarr.open_group(str(store), mode="r+")
    arr = g.create_array(
        key, shape=values.shape, dtype="float32", chunks=(max(1, len(values)),), overwrite=True
    )
    arr[...] = values
    arr.attrs.update({**attrs, "complete": True})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A lesion slide's store with synthetic scores, a copy without scores, an empty store."""
    root = tmp_path_factory.mktemp("heatmap")
    slide = synth.write_slide(
        root / "lesion.svs",
        width=4096,
        height=3072,
        mpp=0.5,
        seed=3,
        n_lesions=2,
        lesion_fraction=0.1,
    )
    stores = root / "stores"
    spec = TilingSpec(tile_px=128, mpp=0.5, overlap_px=64)
    tile_slide(slide.path, stores, spec=spec)
    store = stores / "lesion.zarr"
    st = SlideStore(store)
    coords, patch_l0 = st.coords, float(st.tiling["patch_l0"])
    rects = np.column_stack([coords, np.full((len(coords), 2), patch_l0)])
    frac = rect_fractions(slide.lesion_mask, rects, downsample=slide.gt_downsample)
    rng = np.random.default_rng(0)
    scores = np.clip(frac + rng.normal(0.0, 0.05, len(frac)), 0, 1).astype(np.float32)
    _write_scores(
        store,
        f"scores/{RUN}",
        scores,
        {
            "run": RUN,
            "classes": ["normal", "tumour"],
            "negative_class": "normal",
            "probabilities": {"normal": 0.1, "tumour": 0.9},
            "abnormal_probability": 0.9,
            "predicted": "tumour",
        },
    )
    attn = np.exp(5 * frac)
    _write_scores(
        store, f"scores/{RUN}-attention", (attn / attn.sum()).astype(np.float32), {"run": RUN}
    )
    # a store without scores, and one without patches
    shutil.copytree(store, stores / "unscored.zarr")
    shutil.rmtree(stores / "unscored.zarr" / "scores")
    zarr.open_group(str(stores / "unscored.zarr"), mode="r+").attrs["slide_id"] = "unscored"
    blank = synth.write_slide(
        root / "blank.svs", width=1024, height=768, mpp=0.5, seed=1, tissue_fraction=0.0
    )
    tile_slide(blank.path, stores, spec=spec)
    return {
        "root": root,
        "slide": slide,
        "stores": stores,
        "store": store,
        "scores": scores,
        "coords": coords,
        "patch_l0": patch_l0,
    }


@pytest.fixture(scope="module")
def exported(data: dict[str, Any]) -> dict[str, Path]:
    """Probability-mode exports at downsample 8, opaque colours (so colours can be read back)."""
    return hm.export_heatmaps(
        data["store"], data["root"] / "out", run_id=RUN, downsample=DS, alpha=1.0, cmap="jet"
    )


# ------------------------------------------------------------------------------------ stitching
def test_overlap_is_averaged_exactly() -> None:
    """Two patches with scores 0 and 1 overlapping by half: 0.5 in the overlap."""
    coords = np.array([[0, 0], [2, 0]])
    values, coverage = hm.stitch_scores(
        coords, np.array([0.0, 1.0]), patch_l0=4, slide_wh=(8, 4), downsample=1
    )
    assert values.shape == (4, 8) and values.dtype == np.float32
    np.testing.assert_allclose(values[0, :6], [0, 0, 0.5, 0.5, 1, 1], atol=1e-6)
    assert np.isnan(values[:, 6:]).all()
    np.testing.assert_allclose(coverage[0], [1, 1, 2, 2, 1, 1, 0, 0], atol=1e-6)


def test_fractional_overlap_is_area_weighted() -> None:
    """A heatmap pixel overlapped 2/2 by one patch and 1/2 by another: weights 2 and 1."""
    coords = np.array([[0, 0], [1, 0]])
    values, coverage = hm.stitch_scores(
        coords, np.array([0.0, 1.0]), patch_l0=2, slide_wh=(4, 2), downsample=2
    )
    np.testing.assert_allclose(values[0], [1 / 3, 1.0], atol=1e-6)
    np.testing.assert_allclose(coverage[0], [1.5, 0.5], atol=1e-6)


@pytest.mark.parametrize("sigma_um", [0.0, 5.0, 40.0])  # none, direct, FFT
def test_blocks_equal_one_block(sigma_um: float) -> None:
    rng = np.random.default_rng(1)
    coords = rng.integers(-100, 3000, size=(400, 2))
    scores = rng.random(400)
    mask = rng.random((40, 60)) > 0.3
    kw = dict(
        patch_l0=223.5,
        slide_wh=(3000, 2000),
        downsample=7.3,
        tissue_mask=mask,
        mask_downsample=50.0,
        sigma_um=sigma_um,
        mpp=0.5,
    )
    ref, ref_cov = hm.stitch_scores(coords, scores, block_px=10**6, **kw)
    got, got_cov = hm.stitch_scores(coords, scores, block_px=13, **kw)
    assert ref.shape == (hm.heatmap_shape((3000, 2000), 7.3)) == (274, 411)
    np.testing.assert_array_equal(np.isnan(ref), np.isnan(got))
    np.testing.assert_allclose(got, ref, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got_cov, ref_cov, atol=1e-6)


def test_smoothing_keeps_a_constant_field_and_masks_outside_tissue() -> None:
    ys, xs = np.mgrid[0:2000:100, 0:3000:100]
    coords = np.column_stack([xs.ravel(), ys.ravel()])
    mask = np.zeros((20, 30), bool)
    mask[3:15, 5:25] = True  # tissue at mask downsample 100
    kw = dict(
        patch_l0=200,
        slide_wh=(3000, 2000),
        downsample=10,
        tissue_mask=mask,
        mask_downsample=100,
        mpp=0.5,
    )
    values, _ = hm.stitch_scores(coords, np.full(len(coords), 0.7), sigma_um=60.0, **kw)
    inside = np.kron(mask, np.ones((10, 10), bool))
    assert np.isfinite(values[inside]).all()
    np.testing.assert_allclose(values[inside], 0.7, atol=1e-5)
    assert np.isnan(values[~inside]).all()
    # a step is blurred, but never darkened at the tissue edge (normalised convolution)
    step = np.where(coords[:, 0] < 1500, 0.0, 1.0)
    sm, _ = hm.stitch_scores(coords, step, sigma_um=60.0, **kw)
    raw, _ = hm.stitch_scores(coords, step, **kw)
    assert np.nanmin(sm) >= 0 and np.nanmax(sm) <= 1
    np.testing.assert_allclose(sm[inside][raw[inside] == 1.0].max(), 1.0, atol=1e-3)
    assert 0 < np.nanmean(np.abs(sm - raw)) < 0.1


def test_stitch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3 rows but scores has 2"):
        hm.stitch_scores(np.zeros((3, 2)), np.zeros(2), patch_l0=4, slide_wh=(8, 8), downsample=1)
    with pytest.raises(ConfigError, match="needs the slide's mpp"):
        hm.stitch_scores(
            np.zeros((1, 2)), np.zeros(1), patch_l0=4, slide_wh=(8, 8), downsample=1, sigma_um=5.0
        )
    with pytest.raises(ConfigError, match="must be positive"):
        hm.stitch_scores(np.zeros((1, 2)), np.zeros(1), patch_l0=4, slide_wh=(8, 8), downsample=0)


def test_a_100k_by_60k_slide_needs_no_level0_array() -> None:
    """Stitching a 6-gigapixel slide allocates only the small grid and block buffers."""
    import tracemalloc

    rng = np.random.default_rng(2)
    coords = rng.integers(0, 100_000, size=(20_000, 2)) * [1, 0.6]
    tracemalloc.start()
    try:
        values, _ = hm.stitch_scores(
            coords.astype(np.int64),
            rng.random(20_000),
            patch_l0=512,
            slide_wh=(100_000, 60_000),
            downsample=32,
            sigma_um=50,
            mpp=0.25,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert values.shape == (1875, 3125)
    assert peak < 200 * 2**20, peak / 2**20  # a level-0 float32 map would be 24 GB


def test_pyramid_writer_jpeg_and_no_mpp(tmp_path: Path) -> None:
    openslide = pytest.importorskip("openslide")
    tiffslide = pytest.importorskip("tiffslide")
    img = np.zeros((700, 1100, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, 1100)[None, :]
    p = hm.write_pyramid_tiff(
        tmp_path / "x.tif", lambda r0, r1: img[r0:r1], img.shape, compression="jpeg"
    )
    for s in (openslide.OpenSlide(str(p)), tiffslide.TiffSlide(str(p))):
        with s:
            assert s.level_dimensions == ((1100, 700), (550, 350), (275, 175), (138, 88))
            assert s.properties.get(f"{s.__class__.__module__.split('.')[0]}.mpp-x") is None
            got = np.asarray(s.read_region((0, 0), 0, (1100, 700)))[..., :3]
            assert np.abs(got.astype(int) - img).mean() < 3


def test_store_heatmap_is_masked_to_tissue(data: dict[str, Any]) -> None:
    st = SlideStore(data["store"])
    mask = st.tissue_mask
    values, coverage = hm.stitch_scores(
        data["coords"],
        data["scores"],
        patch_l0=data["patch_l0"],
        slide_wh=(4096, 3072),
        downsample=16,
        tissue_mask=mask,
        mask_downsample=16,
    )
    assert values.shape == mask.shape
    assert np.isnan(values[~mask]).all()
    assert np.isfinite(values[mask & (coverage > 0)]).all()


# ------------------------------------------------------------------------------ values, metrics
def test_percentile_ranks() -> None:
    np.testing.assert_allclose(
        hm.percentile_ranks(np.array([0.1, 0.5, 0.3, 0.3])), [0, 100, 50, 50]
    )
    r = hm.percentile_ranks(np.array([np.nan, 2.0, 1.0]))
    assert np.isnan(r[0]) and list(r[1:]) == [100.0, 0.0]
    assert list(hm.percentile_ranks(np.array([0.2]))) == [100.0]
    assert hm.percentile_ranks(np.zeros(0)).shape == (0,)
    np.testing.assert_array_equal(
        hm.display_values(np.array([0.2, 0.9]), mode="probability"), np.float32([0.2, 0.9])
    )
    with pytest.raises(ConfigError, match="mode must be one of"):
        hm.display_values(np.zeros(2), mode="rank")


def test_iou_and_area_on_a_known_case() -> None:
    values = np.full((4, 4), np.nan, np.float32)
    values[0:2, 0:2] = 0.9  # 4 px above
    values[2, 2] = 0.2
    truth = np.zeros((8, 8), bool)  # twice as fine
    truth[0:4, 0:2] = True  # covers heatmap pixels (0,0) and (1,0) only
    # A = 4 px, B = 2 px, A & B = 2 -> 2 / 4
    assert metrics.heatmap_iou(values, truth, threshold=0.5) == pytest.approx(0.5)
    assert (
        metrics.heatmap_iou(values, truth, threshold=0.5, downsample=2, truth_downsample=1) == 0.5
    )
    assert metrics.heatmap_iou(values, np.zeros((8, 8), bool), threshold=0.95) == 1.0
    assert metrics.area_above(values, 0.5) == 4
    assert metrics.area_above(values, 0.1, pixel_area=2.5) == 12.5


# --------------------------------------------------------------------------------------- TIFF
def _red_centroids(rgb: np.ndarray) -> list[np.ndarray]:
    """(x, y) centroids of the connected dark-red areas (jet at values >~ 0.8)."""
    from scipy import ndimage

    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    red = (r >= 100) & (g <= 80) & (b <= 80)
    labels, n = ndimage.label(red)
    sizes = ndimage.sum(red, labels, range(1, n + 1))
    cents = ndimage.center_of_mass(red, labels, range(1, n + 1))
    return [np.array([c[1], c[0]]) for c, s in zip(cents, sizes) if s >= 4]


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_overlay_tiff_is_a_pyramid_both_readers_open(
    data: dict[str, Any], exported: dict[str, Path], backend: str
) -> None:
    from scipy import ndimage

    mod = pytest.importorskip(backend)
    cls = mod.OpenSlide if backend == "openslide" else mod.TiffSlide
    s = cls(str(exported["tiff"]))
    try:
        assert s.level_count > 1
        w, h = s.dimensions
        assert abs(w - 4096 / DS) <= 1 and abs(h - 3072 / DS) <= 1
        assert float(s.properties[f"{backend}.mpp-x"]) == pytest.approx(0.5 * DS, rel=1e-4)
        assert float(s.properties[f"{backend}.mpp-y"]) == pytest.approx(0.5 * DS, rel=1e-4)
        assert s.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
        rgb = np.asarray(s.read_region((0, 0), 0, (w, h)))[..., :3]
    finally:
        s.close()
    # each ground-truth lesion shows as a bright (dark red) area at its place
    gt = data["slide"]
    labels, n = ndimage.label(gt.lesion_mask)
    assert n >= 2
    found = _red_centroids(rgb)
    gt_ds = gt.gt_downsample
    for k in range(1, n + 1):
        cy, cx = ndimage.center_of_mass(labels == k)
        if (labels == k).sum() < 50:
            continue  # a sliver of lesion: smaller than a patch
        expected = (np.array([cx, cy]) + 0.5) * gt_ds / DS - 0.5  # heatmap pixel coordinates
        dist = min(np.hypot(*(c - expected)) for c in found)
        assert dist <= 2.0, (k, expected, found)


def test_values_tiff_holds_the_heatmap(exported: dict[str, Path]) -> None:
    import tifffile

    with tifffile.TiffFile(exported["values_tiff"]) as tf:
        pages = list(tf.pages)
        assert len(pages) > 1 and pages[0].dtype == np.float32
        a = pages[0].asarray()
        assert a.shape == (384, 512)
        assert np.isnan(a).any() and np.nanmax(a) <= 1.0 and np.nanmin(a) >= 0.0
        assert pages[0].tags["ResolutionUnit"].value == 3  # centimetre


# ------------------------------------------------------------------------------- GeoJSON, JSON
def test_geojson_is_valid_in_level0_px_and_finds_the_lesions(
    data: dict[str, Any], exported: dict[str, Path]
) -> None:
    import shapely
    from shapely.geometry import shape
    from shapely.ops import unary_union

    fc = json.loads(exported["geojson"].read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"]
    geoms = []
    for f in fc["features"]:
        assert f["type"] == "Feature"
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "Abnormal", "color": [255, 0, 0]}
        m = props["measurements"]
        assert 0.5 <= m["score_mean"] <= m["score_max"] <= 1.0
        g = shape(f["geometry"])
        assert g.is_valid and g.area > 0
        assert m["area_um2"] == pytest.approx(g.area * 0.25, rel=1e-6)
        for poly in getattr(g, "geoms", [g]):  # RFC 7946 winding
            assert poly.exterior.is_ccw
            assert all(not r.is_ccw for r in poly.interiors)
        for rings in _rings(f["geometry"]):  # closed rings
            assert all(r[0] == r[-1] and len(r) >= 4 for r in rings)
        geoms.append(g)
    union = unary_union(geoms)
    minx, miny, maxx, maxy = union.bounds
    assert 0 <= minx and maxx <= 4096 and 0 <= miny and maxy <= 3072  # level-0 px
    gt = data["slide"]
    ds = gt.gt_downsample
    yy, xx = np.mgrid[0 : gt.lesion_mask.shape[0], 0 : gt.lesion_mask.shape[1]]
    inside = shapely.contains_xy(union, (xx + 0.5) * ds, (yy + 0.5) * ds)
    iou = (inside & gt.lesion_mask).sum() / (inside | gt.lesion_mask).sum()
    assert iou > 0.7, iou


def _rings(geometry: dict[str, Any]) -> list[list[list[float]]]:
    if geometry["type"] == "Polygon":
        return [geometry["coordinates"]]
    return list(geometry["coordinates"])


def test_regions_have_holes() -> None:
    values = np.zeros((12, 12), np.float32)
    values[2:10, 2:10] = 1.0
    values[5:7, 5:7] = 0.0  # a hole
    values[0, 11] = 1.0  # a one-pixel region
    fc = hm.threshold_regions(values, threshold=0.5, downsample=4.0, simplify_px=0)
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


def test_summary_and_png(data: dict[str, Any], exported: dict[str, Path]) -> None:
    from PIL import Image

    s = json.loads(exported["summary"].read_text())
    assert s["slide_id"] == "lesion" and s["run"] == RUN and s["mode"] == "probability"
    assert s["threshold"] == 0.5 and s["value_range"] == [0.0, 1.0]
    assert s["prediction"]["label"] == "tumour"
    assert s["prediction"]["probabilities"] == {"normal": 0.1, "tumour": 0.9}
    assert s["heatmap_size_wh"] == [512, 384] and s["heatmap_mpp"] == 4.0
    lesion_mm2 = data["slide"].lesion_mask.sum() * (16 * 0.5) ** 2 * 1e-6
    assert s["area_above_threshold_mm2"] == pytest.approx(lesion_mm2, rel=0.35)
    assert 0 < s["fraction_above_threshold"] < 0.5
    top = s["top_patches"]
    assert len(top) == 10 and [t["score"] for t in top] == sorted(
        (t["score"] for t in top), reverse=True
    )
    assert top[0]["score"] == pytest.approx(float(data["scores"].max()))
    i = top[0]["index"]
    assert [top[0]["x"], top[0]["y"]] == data["coords"][i].tolist()
    for key, name in s["files"].items():
        assert (exported["summary"].parent / name).is_file(), key
    with Image.open(exported["png"]) as im:
        assert im.mode in ("RGB", "RGBA") and im.size[0] >= 512


def test_attention_is_shown_as_percentiles(data: dict[str, Any]) -> None:
    import tifffile

    paths = hm.export_heatmaps(
        data["store"], data["root"] / "attn", run_id=RUN, which="attention", values_tiff=True
    )
    s = json.loads(paths["summary"].read_text())
    assert s["which"] == "attention" and s["mode"] == "percentile" and s["threshold"] == 90.0
    assert "percentile" in s["legend"] and "not comparable across slides" in s["legend"]
    assert s["prediction"]["label"] == "tumour"  # from scores/<run>
    v = tifffile.imread(paths["values_tiff"], key=0)
    assert np.nanmax(v) > 90 and np.nanmin(v) < 50  # most patches tie at 0 lesion
    with pytest.raises(ConfigError, match="not probabilities"):
        hm.export_heatmaps(
            data["store"], data["root"] / "attn", run_id=RUN, which="attention", mode="probability"
        )


def test_export_errors(data: dict[str, Any]) -> None:
    out = data["root"] / "bad"
    with pytest.raises(
        StoreError,
        match=r"unscored\.zarr: no 'scores/test'.*wsi-pipeline predict "
        r"--run test' first",
    ):
        hm.export_heatmaps(data["stores"] / "unscored.zarr", out, run_id=RUN)
    with pytest.raises(StoreError, match=r"no 'scores/other' in the store \(it has: test\)"):
        hm.export_heatmaps(data["store"], out, run_id="other")
    with pytest.raises(ConfigError, match="outside the probability range"):
        hm.export_heatmaps(data["store"], out, run_id=RUN, threshold=50)
    with pytest.raises(ConfigError, match="unknown matplotlib colormap"):
        hm.export_heatmaps(data["store"], out, run_id=RUN, cmap="nope")
    with pytest.raises(StoreError, match="no patches"):
        hm.export_heatmaps(data["stores"] / "blank.zarr", out, run_id=RUN)


def test_batch_reports_each_slide(data: dict[str, Any]) -> None:
    out = data["root"] / "batch"
    rows = hm.heatmaps(data["stores"], out, run_id=RUN, downsample=16)
    by = {r["slide_id"]: r for r in rows}
    assert set(by) == {"blank", "lesion", "unscored"}
    assert by["lesion"]["status"] == "ok" and by["lesion"]["ok"]
    assert Path(by["lesion"]["files"]["tiff"]).parent == out / "lesion"
    assert by["blank"]["status"] == "skipped" and by["blank"]["reason"] == "no patches"
    assert by["blank"]["ok"] and not (out / "blank").exists()
    bad = by["unscored"]
    assert bad["status"] == "failed" and not bad["ok"]
    assert "unscored.zarr" in bad["error"] and "wsi-pipeline predict --run test" in bad["error"]
    assert "\n" not in bad["error"]
    again = {r["slide_id"]: r for r in hm.heatmaps(data["stores"], out, run_id=RUN, downsample=16)}
    assert again["lesion"]["status"] == "skipped"
    assert again["lesion"]["reason"] == "already exported"
    forced = hm.heatmaps(
        data["stores"], out, run_id=RUN, downsample=16, overwrite=True, slide_ids=["lesion"]
    )
    assert [r["status"] for r in forced] == ["ok"]
    changed = hm.heatmaps(
        data["stores"], out, run_id=RUN, downsample=16, threshold=0.6, slide_ids=["lesion"]
    )
    assert [r["status"] for r in changed] == ["ok"]
    with pytest.raises(ConfigError, match="mode must be one of"):
        hm.heatmaps(data["stores"], out, run_id=RUN, mode="zscore")
