"""The heatmap file writers: colours, pyramidal TIFFs read back by openslide, tiffslide and
tifffile, the PNG, and atomic writes (no temporary file left behind). (The GeoJSON writers are
tested in test_qupath.py.)"""

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
    rgba = exports.overlay_lut("gray", value_range=(0, 1), alpha=1.0)
    values = np.array([[0.0, 1.0, np.nan, 0.5]], np.float32)
    bg = np.full((1, 4, 3), 100, np.uint8)
    got = exports.overlay_rgb(values, bg, value_range=(0, 1), lut=rgba)
    assert got.dtype == np.uint8 and got.shape == (1, 4, 3)
    # the bottom of the scale and NaN are transparent: the background itself
    assert got[0, 0].tolist() == [100] * 3 and got[0, 2].tolist() == [100] * 3
    assert got[0, 1].tolist() == [255, 255, 255]  # the top: the colour at full alpha
    assert got[0, 3].tolist() == [114] * 3  # half way: 128 grey at alpha 128/255 over 100


def test_opacity_rises_from_transparent_below_to_alpha() -> None:
    lut = exports.overlay_lut("viridis", value_range=(0, 100), alpha=0.6, transparent_below=50)
    assert lut.shape == (256, 4) and lut.dtype == np.uint8
    v = np.linspace(0, 100, 256)
    expected = np.round(np.clip((v - 50) / 50, 0, 1) * 0.6 * 255)
    np.testing.assert_array_equal(lut[:, 3], expected)
    assert (lut[v <= 50] == 0).all()  # transparent entries are (0, 0, 0, 0)
    np.testing.assert_array_equal(lut[-1, :3], exports.colour_lut("viridis")[-1])
    assert lut[-1, 3] == round(0.6 * 255)
    assert exports.DEFAULT_CMAP == "viridis"  # perceptually uniform; "jet" only on request
    default = exports.overlay_lut(value_range=(0, 1))
    np.testing.assert_array_equal(default[-1, :3], exports.colour_lut("viridis")[-1])
    assert default[0, 3] == 0 and default[-1, 3] == round(exports.DEFAULT_ALPHA * 255)
    with pytest.raises(ConfigError, match=r"transparent_below must be in \[0, 1\)"):
        exports.overlay_lut(value_range=(0, 1), transparent_below=1.0)
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\], not 1.5"):
        exports.overlay_lut(value_range=(0, 1), alpha=1.5)


def test_lut_index_picks_what_matplotlib_picks() -> None:
    from matplotlib.colors import ListedColormap, Normalize

    lut = exports.overlay_lut("magma", value_range=(0, 100), alpha=0.8, transparent_below=20)
    values = np.array([[-5, 0, 0.2, 19.9, 20.1, 33.3, 50, 99.6, 100, 140, np.nan]], np.float32)
    idx = exports.lut_index(values, value_range=(0, 100))
    assert idx.dtype == np.uint8 and idx[0, -1] == 0
    cm = ListedColormap(lut / 255.0).with_extremes(bad=(0, 0, 0, 0))
    want = cm(Normalize(0, 100)(np.ma.masked_invalid(values)), bytes=True)
    np.testing.assert_array_equal(lut[idx], want)


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


def _lesion_grid() -> np.ndarray:
    """A 70 x 100 heatmap (ds 10 over a 995 x 696 slide): low scores, a lesion, no tissue."""
    v = np.full((70, 100), np.nan, np.float32)
    v[10:60, 10:90] = 0.1
    v[20:30, 40:60] = 0.9  # the lesion: level-0 x 400..600, y 200..300
    v[40, 20] = 0.6
    return v


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_overlay_tiff_has_the_slides_size_and_mpp(tmp_path: Path, backend: str) -> None:
    import tifffile

    mod = pytest.importorskip(backend)
    v = _lesion_grid()
    lut = exports.overlay_lut(value_range=(0, 1), transparent_below=0.2)
    p = exports.write_overlay_tiff(
        tmp_path / "o.tif",
        v,
        lut=lut,
        value_range=(0, 1),
        slide_wh=(995, 696),
        downsample=10,
        mpp=0.25,
        tile_px=128,
    )
    lesion = lut[exports.lut_index(np.float32([0.9]), value_range=(0, 1))[0]]
    with tifffile.TiffFile(p) as tf:
        pages = list(tf.pages)
        assert [pg.shape for pg in pages] == [
            (696, 995, 4),
            (348, 498, 4),
            (174, 249, 4),
            (87, 125, 4),
        ]
        assert pages[0].tags["XResolution"].value == (40000, 1)  # 1e4 / 0.25 um per px, per cm
        assert pages[0].tags["ResolutionUnit"].value == 3  # centimetre
        assert pages[0].extrasamples == (2,)  # unassociated alpha
        a = pages[0].asarray()
        np.testing.assert_array_equal(a[200:300, 400:600], np.broadcast_to(lesion, (100, 200, 4)))
        assert (a[150, 150] == 0).all() and (a[5, 5] == 0).all()  # low score, no tissue
        np.testing.assert_array_equal(a[405, 205], lut[153])  # 0.6 -> floor(0.6 * 256)
        np.testing.assert_array_equal(pages[2].asarray()[60, 120], lesion)  # level 2: 4 x
    cls = mod.OpenSlide if backend == "openslide" else mod.TiffSlide
    with cls(str(p)) as s:
        assert s.dimensions == (995, 696) and s.level_count == 4
        assert float(s.properties[f"{backend}.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties[f"{backend}.mpp-y"]) == pytest.approx(0.25)
        px = np.asarray(s.read_region((500, 250), 0, (1, 1)))[0, 0]
        np.testing.assert_allclose(px.astype(int), lesion.astype(int), atol=2)  # premultiplied
        assert np.asarray(s.read_region((150, 150), 0, (1, 1)))[0, 0, 3] == 0
    _no_temporaries(tmp_path)


def test_overlay_tiff_jpeg_is_rgb_over_white(tmp_path: Path) -> None:
    import tifffile

    v = _lesion_grid()
    lut = exports.overlay_lut(value_range=(0, 1), alpha=1.0, transparent_below=0.2)
    p = exports.write_overlay_tiff(
        tmp_path / "j.tif",
        v,
        lut=lut,
        value_range=(0, 1),
        slide_wh=(995, 696),
        downsample=10,
        compression="jpeg",
    )
    with tifffile.TiffFile(p) as tf:
        a = tf.pages[0].asarray()
        assert a.shape == (696, 995, 3) and tf.pages[0].compression == 7  # JPEG
    c = lut[exports.lut_index(np.float32([0.9]), value_range=(0, 1))[0]].astype(int)
    lesion = (255 * (255 - c[3]) + c[:3] * c[3]) // 255  # over white
    assert np.abs(a[250, 500].astype(int) - lesion).max() <= 6  # JPEG
    assert a[150, 150].min() >= 250  # transparent: white
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(p)) as s:
        assert s.level_dimensions[:2] == ((995, 696), (498, 348))
        assert "openslide.mpp-x" not in s.properties  # no mpp given
        px = np.asarray(s.read_region((500, 250), 0, (1, 1)))[0, 0, :3]
        assert np.abs(px.astype(int) - lesion).max() <= 6


def test_overlay_tiff_of_a_large_slide_is_drawn_tile_by_tile(tmp_path: Path) -> None:
    """A 20,000 x 15,000 px overlay needs the memory of its heatmap grid, not of the slide."""
    import tracemalloc

    import tifffile

    from wsi_pipeline.stitch import heatmap_shape

    shape = heatmap_shape((20_000, 15_000), 32)
    v = np.full(shape, np.nan, np.float32)
    v[100:400, 100:500] = 0.1
    v[300:350, 400:500] = np.linspace(0.5, 1, 100, dtype=np.float32)
    lut = exports.overlay_lut(value_range=(0, 1), transparent_below=0.2)
    tracemalloc.start()
    try:
        p = exports.write_overlay_tiff(
            tmp_path / "big.tif",
            v,
            lut=lut,
            value_range=(0, 1),
            slide_wh=(20_000, 15_000),
            downsample=32,
            mpp=0.25,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30 * 2**20, peak / 2**20  # level 0 as RGBA is 1.2 GB
    with tifffile.TiffFile(p) as tf:
        assert tf.pages[0].shape == (15_000, 20_000, 4)
        assert len(tf.pages) == 8  # down to 157 x 118 px
    assert p.stat().st_size < 20 * 2**20  # the same empty tile compressed once


def test_overlay_tiff_rejects_a_grid_that_does_not_cover_the_slide(tmp_path: Path) -> None:
    lut = exports.overlay_lut(value_range=(0, 1))
    with pytest.raises(ConfigError, match=r"grid of 10 x 5 px at downsample 10 does not cover"):
        exports.write_overlay_tiff(
            tmp_path / "x.tif",
            np.zeros((5, 10), np.float32),
            lut=lut,
            value_range=(0, 1),
            slide_wh=(300, 50),
            downsample=10,
        )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- PNG
def test_render_png(tmp_path: Path) -> None:
    """Low scores leave the thumbnail as it is; high ones are drawn in the LUT's colour."""
    from PIL import Image

    values = np.full((300, 500), np.nan, np.float32)
    values[50:250, 100:250] = 0.05  # low: transparent
    values[50:250, 250:400] = 0.95  # high
    he = (214, 150, 190)  # an H&E pink, found nowhere else in the figure
    thumb = np.full((30, 50, 3), he, np.uint8)
    lut = exports.overlay_lut(value_range=(0, 1), transparent_below=0.2)
    p = exports.render_png(
        tmp_path / "x.png",
        values,
        thumb,
        value_range=(0.0, 1.0),
        threshold=0.5,
        lut=lut,
        title="a title",
        legend="a legend",
        bar_label="score",
        max_px=128,
    )
    assert p == tmp_path / "x.png"
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] >= 600
        rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
    high = exports.overlay_rgb(np.float32([[0.95]]), np.uint8([[he]]), value_range=(0, 1), lut=lut)[
        0, 0
    ]
    n_he = int((rgb == he).all(axis=1).sum())
    n_high = int((rgb == high).all(axis=1).sum())
    # the image is drawn about 128 x 77 px: 2/3 of it the plain thumbnail (NaN and low scores)
    assert n_he > 0.5 * 128 * 77 * 2 / 3, n_he
    assert n_high > 0.5 * 128 * 77 / 3, n_high
    _no_temporaries(tmp_path)
