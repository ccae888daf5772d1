"""The heatmap stage: a store's scores to exports read back by openslide, tiffslide, tifffile
and shapely; reading scores, the options check, the finished check and the batch's per-slide
errors. (Stitching is tested in test_stitch.py, the writers in test_exports.py and
test_qupath.py, the summary's contents in test_heatmap_summary.py.)

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

import wsi_pipeline
from wsi_pipeline import heatmap as hm
from wsi_pipeline import stitch, synth
from wsi_pipeline.errors import ConfigError, StoreError
from wsi_pipeline.exports import colour_lut, lut_index, overlay_lut
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.store import SCORES, SlideStore, open_store, scores_key, write_scores
from wsi_pipeline.tile_batch import tile_slide
from wsi_pipeline.tissue import rect_fractions

RUN = "test"
DS = 8.0  # heatmap downsample used for the exports (512 x 384 px: a 2-level pyramid)


def _write_scores(
    store: Path, run_id: str, values: np.ndarray, attrs: dict[str, Any], *, attention: bool = False
) -> None:
    write_scores(open_store(store, mode="r+"), run_id, values, attrs, attention=attention)


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
        RUN,
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
    _write_scores(store, RUN, (attn / attn.sum()).astype(np.float32), {"run": RUN}, attention=True)
    # a store without scores, and one without patches
    shutil.copytree(store, stores / "unscored.zarr")
    shutil.rmtree(stores / "unscored.zarr" / SCORES)
    open_store(stores / "unscored.zarr", mode="r+").attrs["slide_id"] = "unscored"
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
    """Probability-mode exports at downsample 8 with the default colours. The fixture's scores
    are each patch's lesion fraction (not a detector's "contains lesion"), so overlapping
    patches are averaged (``combine="mean"``): the lesion centroids below are then where the
    lesions lie; the default rule is tested in test_stitch.py."""
    return hm.export_heatmaps(
        data["store"], data["root"] / "out", run_id=RUN, downsample=DS, combine="mean"
    )


def _stitched_by_hand(data: dict[str, Any], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's scores stitched at downsample 16 with the slide's geometry written out."""
    return stitch.stitch_scores(
        data["coords"],
        data["scores"],
        patch_l0=data["patch_l0"],
        slide_wh=(4096, 3072),
        downsample=16,
        tissue_mask=mask,
        mask_downsample=16,
    )


def test_store_heatmap_is_masked_to_tissue(data: dict[str, Any]) -> None:
    st = SlideStore(data["store"])
    mask = st.tissue_mask
    values, coverage = _stitched_by_hand(data, mask)
    assert values.shape == mask.shape
    assert np.isnan(values[~mask]).all()
    assert np.isfinite(values[mask & (coverage > 0)]).all()


def test_stitch_store_reads_the_store_geometry(data: dict[str, Any]) -> None:
    st = SlideStore(data["store"])
    got, got_cov = hm.stitch_store(st, data["scores"], downsample=16)
    ref, ref_cov = _stitched_by_hand(data, st.tissue_mask)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got_cov, ref_cov)
    default, _ = hm.stitch_store(st, data["scores"], mask_tissue=False)  # the thumbnail's grid
    assert default.shape == st.thumbnail.shape[:2]


def test_public_names_stay_importable() -> None:
    assert hm.stitch_scores is stitch.stitch_scores
    assert wsi_pipeline.stitch_scores is stitch.stitch_scores
    assert wsi_pipeline.export_heatmaps is hm.export_heatmaps
    assert wsi_pipeline.heatmaps is hm.heatmaps


# ------------------------------------------------------------------------ options and scores
def test_check_options_fills_in_the_defaults() -> None:
    assert hm.check_options("score") == ("probability", 0.5)
    assert hm.check_options("attention") == ("percentile", 90.0)
    assert hm.check_options("score", "percentile", 75) == ("percentile", 75.0)
    with pytest.raises(ConfigError, match="which must be 'score' or 'attention', not 'logit'"):
        hm.check_options("logit")
    with pytest.raises(ConfigError, match="not probabilities"):
        hm.check_options("attention", "probability")
    with pytest.raises(ConfigError, match=r"outside the percentile range 0\.\.100"):
        hm.check_options("score", "percentile", 101)


def test_read_scores(data: dict[str, Any], tmp_path: Path) -> None:
    scores, pred = hm.read_scores(SlideStore(data["store"]), RUN)
    np.testing.assert_array_equal(scores, data["scores"])
    assert pred["predicted"] == "tumour"
    attn, pred = hm.read_scores(SlideStore(data["store"]), RUN, "attention")
    assert attn.sum() == pytest.approx(1.0, rel=1e-4) and pred["predicted"] == "tumour"
    copy = tmp_path / "copy.zarr"
    shutil.copytree(data["store"], copy)
    g = open_store(copy, mode="r+")
    write_scores(g, "short", np.zeros(3), {"run": "short"})
    write_scores(g, "solo", np.zeros(len(data["scores"])), {"run": "solo"})
    g[scores_key(RUN)].attrs["complete"] = False
    st = SlideStore(copy)
    with pytest.raises(StoreError, match=r"'scores/short' has 3 values for \d+ patches"):
        hm.read_scores(st, "short")
    with pytest.raises(StoreError, match="run 'solo' has no attention scores"):
        hm.read_scores(st, "solo", "attention")
    with pytest.raises(StoreError, match=r"'scores/test' is unfinished; rerun"):
        hm.read_scores(st, RUN)
    with pytest.raises(StoreError, match=r"no 'scores/none' .*\(it has: short, solo, test\)"):
        hm.read_scores(st, "none")


# --------------------------------------------------------------------------------------- TIFF
def _opaque_centroids(rgba: np.ndarray, min_alpha: int) -> list[np.ndarray]:
    """(x, y) centroids of the connected areas drawn with an opacity of at least ``min_alpha``."""
    from scipy import ndimage

    strong = rgba[..., 3] >= min_alpha
    labels, n = ndimage.label(strong)
    sizes = ndimage.sum(strong, labels, range(1, n + 1))
    cents = ndimage.center_of_mass(strong, labels, range(1, n + 1))
    return [np.array([c[1], c[0]]) for c, s in zip(cents, sizes) if s >= 4]


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_overlay_tiff_lies_on_the_slide(
    data: dict[str, Any], exported: dict[str, Path], backend: str
) -> None:
    """Level 0 has the slide's size and mpp; each lesion is drawn where it lies on the slide."""
    import tifffile
    from scipy import ndimage

    mod = pytest.importorskip(backend)
    cls = mod.OpenSlide if backend == "openslide" else mod.TiffSlide
    grid = tifffile.imread(exported["values_tiff"], key=0)
    lut, _ = hm.overlay_colours("probability")
    with tifffile.TiffFile(exported["tiff"]) as tf:
        page = tf.pages[0]
        assert page.shape == (3072, 4096, 4) and page.dtype == np.uint8  # RGBA, the slide's size
        assert page.tags["XResolution"].value == (20000, 1)  # 1e4 / 0.5 um per px, per cm
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
    s = cls(str(exported["tiff"]))
    try:
        assert s.dimensions == (4096, 3072)  # the slide's level 0
        assert s.level_count > 1 and s.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
        assert float(s.properties[f"{backend}.mpp-x"]) == pytest.approx(0.5, rel=1e-4)
        assert float(s.properties[f"{backend}.mpp-y"]) == pytest.approx(0.5, rel=1e-4)
        # the highest heatmap pixel, read at its place in level-0 coordinates
        i, j = np.unravel_index(np.nanargmax(grid), grid.shape)
        x, y = int((j + 0.5) * DS), int((i + 0.5) * DS)
        px = np.asarray(s.read_region((x, y), 0, (1, 1)))[0, 0]
        want = lut[lut_index(grid[i : i + 1, j : j + 1], value_range=(0, 1))[0, 0]]
        np.testing.assert_allclose(px.astype(int), want.astype(int), atol=2)  # premultiplied
        assert want[3] > 0.5 * 255
        k = s.get_best_level_for_downsample(DS)
        assert s.level_downsamples[k] == pytest.approx(DS, rel=0.01)
        rgba = np.asarray(s.read_region((0, 0), k, s.level_dimensions[k]))
    finally:
        s.close()
    assert rgba.shape[-1] == 4
    assert (rgba[..., 3][np.nan_to_num(grid, nan=0.0) <= 0.2] == 0).all()  # low: transparent
    # each ground-truth lesion shows as a strongly coloured area (scores >~ 0.85) at its place
    gt = data["slide"]
    labels, n = ndimage.label(gt.lesion_mask)
    assert n >= 2
    found = _opaque_centroids(rgba, lut[lut_index(np.float32([0.85]), value_range=(0, 1))[0], 3])
    gt_ds = gt.gt_downsample
    for k in range(1, n + 1):
        cy, cx = ndimage.center_of_mass(labels == k)
        if (labels == k).sum() < 50:
            continue  # a sliver of lesion: smaller than a patch
        expected = (np.array([cx, cy]) + 0.5) * gt_ds / DS - 0.5  # level-k pixel coordinates
        dist = min(np.hypot(*(c - expected)) for c in found)
        assert dist <= 2.0, (k, expected, found)


def test_values_tiff_holds_the_heatmap(exported: dict[str, Path]) -> None:
    """Float32 values, one pixel per heatmap pixel: tifffile and tiffslide read them."""
    import tifffile

    with tifffile.TiffFile(exported["values_tiff"]) as tf:
        pages = list(tf.pages)
        assert len(pages) > 1 and pages[0].dtype == np.float32
        a = pages[0].asarray()
        assert a.shape == (384, 512)
        assert np.isnan(a).any() and np.nanmax(a) <= 1.0 and np.nanmin(a) >= 0.0
        assert pages[0].tags["ResolutionUnit"].value == 3  # centimetre
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(str(exported["values_tiff"])) as s:
        assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(0.5 * DS)
        got = s.read_region((0, 0), 0, (512, 384), as_array=True)
    np.testing.assert_array_equal(got[..., 0], a)


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


def test_tiles_geojson_has_a_detection_per_patch(
    data: dict[str, Any], exported: dict[str, Path]
) -> None:
    """QuPath detections: the patch squares in level-0 px with numeric measurements."""
    st = SlideStore(data["store"])
    fc = json.loads(exported["tiles_geojson"].read_text())
    assert exported["tiles_geojson"].name == "lesion_score_tiles.geojson"
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == st.n_patches
    p = data["patch_l0"]
    tissue = st.tissue_fraction
    n_classified = 0
    for f, (x, y), score, tf in zip(fc["features"], data["coords"], data["scores"], tissue):
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon"
        assert ring == [[x, y], [x + p, y], [x + p, y + p], [x, y + p], [x, y]]
        props = f["properties"]
        assert props["objectType"] == "detection"
        m = props["measurements"]
        assert set(m) == {"score", "probability", "tissue_fraction"}
        assert all(isinstance(v, (int, float)) for v in m.values())
        assert m["score"] == pytest.approx(score, abs=1e-6)  # probability mode: the score
        assert m["probability"] == pytest.approx(score, abs=1e-6)
        assert m["tissue_fraction"] == pytest.approx(tf, abs=1e-6)
        if score >= 0.5:
            assert props["classification"] == {"name": "Abnormal", "color": [255, 0, 0]}
            n_classified += 1
        else:
            assert "classification" not in props
    assert 0 < n_classified < st.n_patches


def test_default_colours_are_perceptual_and_shared(exported: dict[str, Path]) -> None:
    s = json.loads(exported["summary"].read_text())
    assert s["params"]["cmap"] == "viridis" and s["params"]["transparent_below"] == 0.2
    lut, t = hm.overlay_colours("probability")
    assert t == 0.2
    np.testing.assert_array_equal(
        lut, overlay_lut("viridis", value_range=(0, 1), alpha=0.7, transparent_below=0.2)
    )
    np.testing.assert_array_equal(lut[-1, :3], colour_lut("viridis")[-1])
    assert hm.overlay_colours("percentile")[1] == 50.0
    jet, _ = hm.overlay_colours("probability", cmap="jet")  # a rainbow only on request
    np.testing.assert_array_equal(jet[-1, :3], colour_lut("jet")[-1])
    with pytest.raises(ConfigError, match=r"transparent_below must be in \[0, 100\)"):
        hm.overlay_colours("percentile", transparent_below=100)


def _rings(geometry: dict[str, Any]) -> list[list[list[float]]]:
    if geometry["type"] == "Polygon":
        return [geometry["coordinates"]]
    return list(geometry["coordinates"])


def test_summary_and_png(data: dict[str, Any], exported: dict[str, Path]) -> None:
    from PIL import Image

    s = json.loads(exported["summary"].read_text())
    assert s["slide_id"] == "lesion" and s["run"] == RUN and s["mode"] == "probability"
    assert s["threshold"] == 0.5 and s["value_range"] == [0.0, 1.0]
    assert s["prediction"]["label"] == "tumour"
    assert s["prediction"]["probabilities"] == {"normal": 0.1, "tumour": 0.9}
    assert s["heatmap_size_wh"] == [512, 384] and s["heatmap_mpp"] == 4.0
    assert s["slide_size_wh"] == [4096, 3072]  # the overlay TIFF's level 0
    assert set(s["files"]) == {"png", "tiff", "values_tiff", "geojson", "tiles_geojson"}
    assert "transparent at or below 0.2" in s["legend"]
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
    tiles = json.loads(paths["tiles_geojson"].read_text())["features"]
    m = tiles[0]["properties"]["measurements"]
    assert set(m) == {"score", "attention", "tissue_fraction"} and 0 <= m["score"] <= 100
    classes = {f["properties"].get("classification", {}).get("name") for f in tiles}
    assert classes == {None, "High attention"}
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


def test_batch_opens_each_store_once(data: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    class Counting(SlideStore):
        def __init__(self, path: Any) -> None:
            opened.append(Path(path).name)
            super().__init__(path)

    monkeypatch.setattr(hm, "SlideStore", Counting)
    out = data["root"] / "once"
    for overwrite in (True, False):  # exported, then skipped as finished
        opened.clear()
        rows = hm.heatmaps(data["stores"], out, run_id=RUN, downsample=32, overwrite=overwrite)
        assert sorted(opened) == ["blank.zarr", "lesion.zarr", "unscored.zarr"]
        assert {r["slide_id"]: r["status"] for r in rows}["lesion"] == (
            "ok" if overwrite else "skipped"
        )


def test_batch_checks_every_option_before_any_slide(data: dict[str, Any]) -> None:
    out = data["root"] / "never"
    with pytest.raises(ConfigError, match="must be 'deflate' or 'jpeg'"):
        hm.heatmaps(data["stores"], out, run_id=RUN, compression="lzw")
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
        hm.heatmaps(data["stores"], out, run_id=RUN, alpha=2.0)
    with pytest.raises(ConfigError, match="which must be"):
        hm.heatmaps(data["stores"], out, run_id=RUN, which="logit")
    assert not out.exists()
