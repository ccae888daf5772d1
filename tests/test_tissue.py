"""Tissue masks of thumbnails, user masks, and tissue fractions of rectangles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.slide import open_slide
from wsi_pipeline.specs import MaskSpec
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tissue import load_user_mask, rect_fractions, rgb_to_hsv, tissue_mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.Resampling.NEAREST))


@pytest.mark.parametrize("name", ["pos", "neg", "pen"])
def test_mask_matches_ground_truth(name: str, tmp_path: Path) -> None:
    gt = write_slide(
        tmp_path / f"{name}.svs",
        width=6144,
        height=4608,
        mpp=0.5,
        seed={"pos": 3, "neg": 4, "pen": 8}[name],
        n_lesions=2 if name == "pos" else 0,
        pen_mark=name == "pen",
    )
    with open_slide(gt.path) as s:
        ds = 16.0
        thumb = s.read_thumbnail(ds)
        mask = tissue_mask(thumb, mpp=0.5 * ds)
    truth = _resize_mask(gt.tissue_mask, mask.shape)
    assert _iou(mask, truth) >= 0.9


def test_pen_is_excluded_unless_kept(synth_dir: Path) -> None:
    with open_slide(synth_dir / "pen.svs") as s:
        thumb = s.read_thumbnail(16.0)
    with_pen = tissue_mask(thumb, mpp=8.0, spec=MaskSpec(remove_pen=False))
    without = tissue_mask(thumb, mpp=8.0)
    assert with_pen.sum() > without.sum() * 1.02


def test_blank_slide_has_no_tissue(synth_dir: Path) -> None:
    with open_slide(synth_dir / "blank.svs") as s:
        assert not tissue_mask(s.read_thumbnail(8.0), mpp=4.0).any()
    white = np.full((300, 400, 3), 245, np.uint8)
    assert not tissue_mask(white).any()


@pytest.mark.parametrize(
    "rel",
    [
        "aperio/CMU-1-Small-Region.svs",
        "aperio/tcga-cr-7395-01a-01-ts1.svs",
        "generic-tiff/kidney-48-5.tif",
        "ome-tiff/OS-2-ndpi.ome.tif",
        "ome-tiff/OS-2-vsi.ome.tif",
        "dicom/camelyon-multiframe/multiframe_camelyon_challenge_image.dcm",
    ],
)
def test_mask_plausible_on_real_slides(testdata: Path, rel: str) -> None:
    with open_slide(testdata / rel) as s:
        ds = max(s.meta.width, s.meta.height) / 400
        mask = tissue_mask(
            s.read_thumbnail(ds), mpp=None if s.meta.mpp is None else s.meta.mpp * ds
        )
    assert 0.001 < mask.mean() < 0.95


def test_mask_close_to_histolab_reference(testdata: Path) -> None:
    """Not ground truth, but a sanity check against another tool's answer."""
    with open_slide(testdata / "aperio/CMU-1-Small-Region.svs") as s:
        ref = np.load(testdata / "masks/tissue-mask-cmu-1-small-region.npy")
        ds = s.meta.width / ref.shape[1]
        mask = tissue_mask(s.read_thumbnail(ds), mpp=s.meta.mpp * ds)
    assert _iou(mask, _resize_mask(ref, mask.shape)) > 0.6


def test_rect_fractions_exact() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    f = rect_fractions(
        mask,
        np.array(
            [
                [0, 0, 40, 40],
                [10, 10, 20, 20],
                [15, 15, 10, 10],
                [20, 0, 20, 20],
                [-40, -40, 20, 20],
            ]
        ),
        downsample=10,
    )
    assert np.allclose(f, [0.25, 1.0, 1.0, 0.25, 0.0])


def test_mask_kernels_equal_scipy_and_skimage() -> None:
    """The OpenCV kernels of the mask give what scipy.ndimage and scikit-image give (the same
    masks as before them): Gaussian blur with mirrored edges, 3 x 3 opening and cross dilation
    with outside counting as background (so tissue touching the edge is eroded there), and
    removal of 4-connected components of at most N pixels (diagonal neighbours are apart)."""
    from scipy import ndimage as ndi
    from skimage import morphology

    from wsi_pipeline.tissue import _blur, _morph, _open3, _remove_small

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    for sigma in (1.0, 2.7):
        want = ndi.gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0))
        got = _blur(img, sigma)
        assert got.dtype == np.uint8
        # rounded to the nearest grey level (a tie may go either way)
        assert np.abs(got - want).max() <= 0.5 + 1e-3
    mask = rng.random((61, 83)) > 0.45
    mask[:, :3] = True  # tissue up to the edge
    assert np.array_equal(_open3(mask), ndi.binary_opening(mask, np.ones((3, 3))))
    assert not _morph(mask, "erode")[:, 0].any()  # outside is background
    assert np.array_equal(
        _morph(mask, "dilate", "cross", 2), ndi.binary_dilation(mask, iterations=2)
    )
    for n in (1, 3, 12):
        assert np.array_equal(
            _remove_small(mask, n), morphology.remove_small_objects(mask, max_size=n)
        )
        holes = morphology.remove_small_holes(mask, max_size=n)
        assert np.array_equal(~_remove_small(~mask, n), holes)
    diag = np.zeros((4, 4), bool)
    diag[0, 0] = diag[1, 1] = True
    assert not _remove_small(diag, 1).any()  # two single pixels, not one object of 2


def test_saturation_tables_and_otsu_equal_per_pixel() -> None:
    """The mask's looked-up saturation and dark pixels, and its Otsu threshold from the counts
    of each (max, min) code, are the per-pixel numbers and scikit-image's threshold of the
    saturation image, to the bit (the same masks as computing them pixel by pixel)."""
    from skimage.filters import threshold_otsu

    from wsi_pipeline.tissue import (
        _DARK_MAX_VALUE,
        _max_min_code,
        _otsu_of_counts,
        _sat_val,
        _tables,
    )

    def _otsu(code: np.ndarray, sat_table: np.ndarray) -> float:
        return _otsu_of_counts(np.bincount(code.ravel(), minlength=65536), sat_table, code.size)

    rng = np.random.default_rng(1)
    tissue = rng.normal((200, 120, 170), 30, (70, 90, 3))  # pink, with glass on one side
    img = np.clip(np.concatenate([tissue, rng.normal(235, 4, (70, 40, 3))], axis=1), 0, 255)
    img = img.astype(np.uint8)
    _, _, _, val, _, sat = _sat_val(img)
    code = _max_min_code(img)
    sat_table, dark_table = _tables()
    assert np.array_equal(sat_table.take(code), sat)
    assert np.array_equal(dark_table.take(code >> 8), val < _DARK_MAX_VALUE)
    assert _otsu(code, sat_table) == float(threshold_otsu(sat))
    assert _otsu(code[:4, :4], sat_table) == 1.0  # 16 pixels: no threshold
    assert _otsu(np.full((9, 9), code[0, 0]), sat_table) == 1.0  # one value


def test_mask_counts_percentile_and_ink_hue_equal_numpy() -> None:
    """The mask's counts (OpenCV's histogram), the 2nd percentile of optical density from the
    counts of each largest channel, and the ink test on OpenCV's 8-bit hue give numpy's
    bincount, numpy's percentile of the per-pixel density, and the float hue's test (but within
    1/256 of the hue range's ends)."""
    from wsi_pipeline.tissue import _PEN_HUE, _counts, _od_percentile, _od_table, _pen_hue

    rng = np.random.default_rng(2)
    for n, shape in ((65536, (70, 90)), (13, (5, 7)), (70000, (40, 40))):
        values = rng.integers(0, n, shape).astype(np.uint16 if n <= 65536 else np.int32)
        assert np.array_equal(_counts(values, n), np.bincount(values.ravel(), minlength=n))
    for size in (1, 2, 50, 4001):
        mx = rng.choice([255, 250, 240, 120, 3], size=size).astype(np.uint8)
        want = np.percentile(_od_table().take(mx), 2)
        assert _od_percentile(np.bincount(mx, minlength=256), 2) == pytest.approx(want, abs=1e-6)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    hue = rgb_to_hsv(img)[0]
    want = (hue >= _PEN_HUE[0]) & (hue <= _PEN_HUE[1])
    off = _pen_hue(img) != want
    assert off.mean() < 0.01
    edge = np.minimum(np.abs(hue - _PEN_HUE[0]), np.abs(hue - _PEN_HUE[1]))
    assert (edge[off] < 1 / 256).all()


def test_rgb_to_hsv() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], np.uint8)
    hue, sat, val = rgb_to_hsv(rgb)
    assert np.allclose(hue[0], [0.0, 1 / 3, 2 / 3, 0.0], atol=1e-6)
    assert np.allclose(sat[0], [1, 1, 1, 0]) and np.allclose(val[0], [1, 1, 1, 128 / 255])


def test_tissue_mask_needs_rgb() -> None:
    with pytest.raises(ConfigError, match=r"thumbnail must be \(H, W, 3\) RGB, not shape \(8, 8\)"):
        tissue_mask(np.zeros((8, 8), np.uint8))


def test_user_mask_png_is_scaled_nearest(tmp_path: Path) -> None:
    m = np.zeros((10, 20), np.uint8)
    m[:, 10:] = 7
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = load_user_mask(tmp_path / "m.png", shape=(5, 8), downsample=4.0)
    assert mask.shape == (5, 8) and mask.dtype == bool
    assert not mask[:, :4].any() and mask[:, 4:].all()


def test_user_mask_geojson_holes(tmp_path: Path) -> None:
    """Polygons are in level-0 px; later rings of a polygon are holes."""
    outer = [[0, 0], [400, 0], [400, 400], [0, 400], [0, 0]]
    hole = [[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]
    gj = tmp_path / "m.geojson"
    gj.write_text(json.dumps({"type": "Polygon", "coordinates": [outer, hole]}))
    mask = load_user_mask(gj, shape=(60, 60), downsample=10.0)
    assert mask[5, 5] and not mask[20, 20] and not mask[50, 50]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.png", None, "user mask file not found"),
        ("bad.png", b"not an image", "user mask is not a readable image"),
        ("bad.geojson", b"{oops", "user mask is not valid JSON"),
        ("points.geojson", b'{"type": "Point", "coordinates": [1, 2]}', "no Polygon"),
    ],
)
def test_user_mask_failures(tmp_path: Path, name: str, content: bytes | None, match: str) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_user_mask(p, shape=(10, 10), downsample=1.0)
