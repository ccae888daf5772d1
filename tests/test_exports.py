"""The heatmap file writers: colours, pyramidal TIFFs read back by openslide, tiffslide and
tifffile, GeoJSON regions, the PNG, and atomic writes (no temporary file left behind)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline import exports
from wsi_pipeline.errors import ConfigError


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------- colour
def test_colour_lut_and_overlay() -> None:
    lut = exports.colour_lut("gray")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert lut[0].tolist() == [0, 0, 0] and lut[-1].tolist() == [255, 255, 255]
    with pytest.raises(ConfigError, match="unknown matplotlib colormap 'nope'"):
        exports.colour_lut("nope")
    values = np.array([[0.0, 1.0, np.nan]], np.float32)
    bg = np.full((1, 3, 3), 100, np.uint8)
    opaque = exports.overlay_rgb(values, bg, value_range=(0, 1), cmap="gray", alpha=1.0)
    assert opaque.dtype == np.uint8 and opaque.shape == (1, 3, 3)
    assert opaque[0, 0].tolist() == [0, 0, 0] and opaque[0, 1].tolist() == [255, 255, 255]
    assert opaque[0, 2].tolist() == [170, 170, 170]  # no value: the background in light grey
    clear = exports.overlay_rgb(values, bg, value_range=(0, 1), cmap=lut, alpha=0.0)
    assert clear[0, :2].tolist() == [[100] * 3] * 2


@pytest.mark.parametrize("shape", [(6, 8), (36, 48)])  # coarser, finer than the thumbnail
def test_background_rows_follow_the_grid(shape: tuple[int, int]) -> None:
    thumb = np.zeros((12, 16, 3), np.uint8)
    thumb[:, 8:] = 200  # right half bright
    rows = exports.background_rows(thumb, 8.0, 8.0 * 12 / shape[0], shape)
    full = np.concatenate([rows(r0, min(shape[0], r0 + 5)) for r0 in range(0, shape[0], 5)])
    assert full.shape == (*shape, 3) and full.dtype == np.uint8
    m = shape[1] // 8 + 1  # the bilinear transition at the edge
    assert full[:, : shape[1] // 2 - m].max() == 0 and full[:, shape[1] // 2 + m :].min() == 200


# --------------------------------------------------------------------------------------- TIFF
def test_pyramid_writer_jpeg_and_no_mpp(tmp_path: Path) -> None:
    openslide = pytest.importorskip("openslide")
    tiffslide = pytest.importorskip("tiffslide")
    img = np.zeros((700, 1100, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, 1100)[None, :]
    p = exports.write_pyramid_tiff(
        tmp_path / "x.tif", lambda r0, r1: img[r0:r1], img.shape, compression="jpeg"
    )
    for s in (openslide.OpenSlide(str(p)), tiffslide.TiffSlide(str(p))):
        with s:
            assert s.level_dimensions == ((1100, 700), (550, 350), (275, 175), (138, 88))
            assert s.properties.get(f"{s.__class__.__module__.split('.')[0]}.mpp-x") is None
            got = np.asarray(s.read_region((0, 0), 0, (1100, 700)))[..., :3]
            assert np.abs(got.astype(int) - img).mean() < 3


def test_values_tiff_levels_are_nan_aware_means(tmp_path: Path) -> None:
    import tifffile

    a = np.arange(300 * 400, dtype=np.float32).reshape(300, 400)
    a[:, :2] = np.nan
    p = exports.write_pyramid_tiff(
        tmp_path / "v.tif", lambda r0, r1: a[r0:r1], a.shape, dtype=np.float32, mpp=2.0
    )
    with tifffile.TiffFile(p) as tf:
        pages = list(tf.pages)
        assert [pg.shape for pg in pages] == [(300, 400), (150, 200)]
        np.testing.assert_array_equal(pages[0].asarray(), a)
        lvl1 = pages[1].asarray()
        assert np.isnan(lvl1[:, 0]).all()
        np.testing.assert_allclose(lvl1[0, 1], a[0:2, 2:4].mean())
        assert pages[0].tags["XResolution"].value == (5000, 1)  # 1e4 / 2 um per px, per cm
        assert pages[1].tags["NewSubfileType"].value == 1  # reduced
    _no_temporaries(tmp_path)


def test_pyramid_writer_rejects_bad_options_and_leaves_nothing(tmp_path: Path) -> None:
    img = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ConfigError, match="must be 'deflate' or 'jpeg', not 'lzw'"):
        exports.write_pyramid_tiff(
            tmp_path / "a.tif", lambda r0, r1: img, img.shape, compression="lzw"
        )
    with pytest.raises(ConfigError, match="multiple of 16"):
        exports.write_pyramid_tiff(tmp_path / "a.tif", lambda r0, r1: img, img.shape, tile_px=100)

    def broken(r0: int, r1: int) -> np.ndarray:
        raise RuntimeError("strip failed")

    with pytest.raises(RuntimeError, match="strip failed"):
        exports.write_pyramid_tiff(tmp_path / "a.tif", broken, img.shape)
    assert list(tmp_path.iterdir()) == []  # atomic: neither the file nor a temporary one


# ------------------------------------------------------------------------------------ GeoJSON
def test_regions_have_holes() -> None:
    values = np.zeros((12, 12), np.float32)
    values[2:10, 2:10] = 1.0
    values[5:7, 5:7] = 0.0  # a hole
    values[0, 11] = 1.0  # a one-pixel region
    fc = exports.threshold_regions(values, threshold=0.5, downsample=4.0, simplify_px=0)
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
    fc = exports.threshold_regions(values, threshold=0.5, downsample=2.0, min_region_px=2, mpp=0.5)
    assert len(fc["features"]) == 1
    f = fc["features"][0]
    assert f["properties"]["name"] == "Abnormal 1"
    m = f["properties"]["measurements"]
    assert m["score_max"] == pytest.approx(0.9) and m["area_um2"] == pytest.approx(
        m["area_px"] * 0.25
    )
    assert exports.threshold_regions(values, threshold=0.95, downsample=2.0)["features"] == []


# ---------------------------------------------------------------------------------------- PNG
def test_render_png(tmp_path: Path) -> None:
    from PIL import Image

    values = np.full((300, 500), np.nan, np.float32)
    values[50:250, 100:400] = np.linspace(0, 1, 300)[None, :]
    thumb = np.full((30, 50, 3), 230, np.uint8)
    p = exports.render_png(
        tmp_path / "x.png",
        values,
        thumb,
        value_range=(0.0, 1.0),
        threshold=0.5,
        cmap="jet",
        alpha=0.5,
        title="a title",
        legend="a legend",
        bar_label="score",
        max_px=128,
    )
    assert p == tmp_path / "x.png"
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] >= 600
    _no_temporaries(tmp_path)
