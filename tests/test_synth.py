"""Tests of wsi_pipeline.synth: the file as both readers see it, ground truth, looks, cohorts."""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
from helpers import run_script
from PIL import Image
from scipy import ndimage

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.synth import (
    LESION_STYLES,
    SLIDE_DEFAULTS,
    SynthSlide,
    lesion_patches,
    load_ground_truth,
    summarize_cohort,
    write_cohort,
    write_slide,
)

READERS = {"openslide": openslide.OpenSlide, "tiffslide": tiffslide.TiffSlide}


def _vendor_props(slide) -> tuple[str, float, float]:
    """(vendor, mpp-x, objective power) whichever reader opened the slide."""
    p = slide.properties
    ns = "openslide" if "openslide.vendor" in p else "tiffslide"
    return p[f"{ns}.vendor"], float(p[f"{ns}.mpp-x"]), float(p[f"{ns}.objective-power"])


def _read_level(slide, level: int) -> np.ndarray:
    w, h = slide.level_dimensions[level]
    return np.asarray(slide.read_region((0, 0), level, (w, h)))[..., :3]


def _upsample(mask: np.ndarray, ds: int, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(mask, ds, 0), ds, 1)[: shape[0], : shape[1]]


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> SynthSlide:
    """Three levels (4x, 16x), sizes not multiples of the tile or of 4**k."""
    path = tmp_path_factory.mktemp("pyr") / "pyr.svs"
    return write_slide(
        path,
        width=8704,
        height=2100,
        mpp=0.25,
        seed=3,
        tissue_fraction=0.12,
        n_lesions=1,
        pen_mark=True,
    )


@pytest.fixture(scope="module")
def positive(tmp_path_factory) -> SynthSlide:
    path = tmp_path_factory.mktemp("pos") / "pos.svs"
    return write_slide(
        path, width=2048, height=1536, mpp=0.5, seed=7, n_lesions=2, lesion_fraction=0.04
    )


#: Large lesions, for colour and texture statistics (``lesion_rich`` and its twins).
RICH = dict(width=3072, height=2048, mpp=0.5, seed=5, n_lesions=3, lesion_fraction=0.2)


@pytest.fixture(scope="module")
def lesion_rich(tmp_path_factory) -> SynthSlide:
    """Large lesions, for colour and texture statistics."""
    return write_slide(tmp_path_factory.mktemp("rich") / "rich.svs", **RICH)


@pytest.fixture(scope="module")
def rich_twins(tmp_path_factory) -> tuple[SynthSlide, SynthSlide]:
    """``lesion_rich``'s layout with morphology-only lesions, and with no lesion at all."""
    out = tmp_path_factory.mktemp("twins")
    morph = write_slide(out / "morph.svs", **RICH, lesion_style="morphology")
    plain = write_slide(out / "plain.svs", **{**RICH, "n_lesions": 0})
    return morph, plain


# ------------------------------------------------------------------------------- file format


@pytest.mark.parametrize("reader", READERS)
def test_readers_see_aperio_pyramid(pyramid, reader):
    with READERS[reader](pyramid.path) as slide:
        vendor, mpp, power = _vendor_props(slide)
        assert vendor == "aperio"
        assert mpp == pytest.approx(0.25)
        assert power == 40
        assert slide.level_count == 3
        assert slide.level_dimensions == ((8704, 2100), (2176, 525), (544, 131))
        assert slide.level_downsamples == pytest.approx([1, 4, 16], rel=0.01)
        thumb = slide.associated_images["thumbnail"]
        assert max(thumb.size) == 1024
        assert thumb.size[0] / thumb.size[1] == pytest.approx(8704 / 2100, rel=0.01)


def test_tiff_layout(pyramid):
    """Page 0 tiled JPEG YCbCr 2x2; page 1 stripped thumbnail; then tiled levels; little-endian."""
    with tifffile.TiffFile(pyramid.path) as tif:
        assert tif.byteorder == "<" and not tif.is_bigtiff
        pages = tif.pages
        assert len(pages) == 4
        assert [p.is_tiled for p in pages] == [True, False, True, True]
        for p in pages:
            assert p.compression == tifffile.COMPRESSION.JPEG
            assert p.photometric == tifffile.PHOTOMETRIC.YCBCR
            assert p.subsampling == (2, 2)
            assert p.description.startswith("Aperio Image Library")
        assert (pages[0].tilewidth, pages[0].tilelength) == (256, 256)
        assert pages[0].description.splitlines()[1].startswith("8704x2100 (256x256) JPEG/RGB Q=85|")
        assert "|MPP = 0.25|" in pages[0].description
        assert "|Filename = pyr|" in pages[0].description


@pytest.mark.parametrize("level", [0, 1, 2])
def test_readers_return_same_pixels(pyramid, level):
    with openslide.OpenSlide(pyramid.path) as a, tiffslide.TiffSlide(pyramid.path) as b:
        pa, pb = _read_level(a, level), _read_level(b, level)
        w, h = a.level_dimensions[level]
    assert pa.shape == pb.shape == (h, w, 3)
    diff = np.abs(pa.astype(np.int16) - pb)
    assert diff.max() <= 2 and diff.mean() < 0.01  # both decode with libjpeg-turbo: identical here


def test_thumbnail_same_in_both_readers(pyramid):
    with openslide.OpenSlide(pyramid.path) as a, tiffslide.TiffSlide(pyramid.path) as b:
        ta = np.asarray(a.associated_images["thumbnail"].convert("RGB"), np.int16)
        tb = np.asarray(b.associated_images["thumbnail"].convert("RGB"), np.int16)
    assert np.abs(ta - tb).max() <= 2


def test_lower_levels_are_box_downsampled_level0(pyramid):
    with tiffslide.TiffSlide(pyramid.path) as slide:
        l0, l1, l2 = (_read_level(slide, k).astype(np.float32) for k in range(3))
    for low, ds in ((l1, 4), (l2, 16)):
        h, w = low.shape[:2]
        box = l0[: h * ds, : w * ds].reshape(h, ds, w, ds, 3).mean((1, 3))
        assert np.abs(box - low).mean() < 2.0


def test_level0_tiles_are_standalone_jpegs(positive):
    """A tiler may copy a level-0 tile's bytes as a patch: they decode alone to the same pixels."""
    with tifffile.TiffFile(positive.path) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts  # load before seeking
        n_across = math.ceil(page.imagewidth / page.tilewidth)
        index = len(offsets) // 2
        tif.filehandle.seek(offsets[index])
        data = tif.filehandle.read(counts[index])
    tile = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    x, y = index % n_across * 256, index // n_across * 256
    with tiffslide.TiffSlide(positive.path) as slide:
        region = np.asarray(slide.read_region((x, y), 0, (256, 256)))[..., :3]
    assert tile.shape == (256, 256, 3)
    assert np.abs(tile - region).max() <= 2


def test_deterministic_bytes(tmp_path):
    kw = dict(width=700, height=500, seed=11, n_lesions=1, pen_mark=True, fold=True)
    a = write_slide(tmp_path / "a.svs", threads=1, **kw)
    b = write_slide(tmp_path / "b.svs", threads=2, **kw)
    c = write_slide(tmp_path / "c.svs", **{**kw, "seed": 12})
    data = open(a.path, "rb").read()
    assert data.replace(b"Filename = a", b"Filename = b") == open(b.path, "rb").read()
    assert np.array_equal(a.lesion_mask, b.lesion_mask)
    assert open(c.path, "rb").read() != data


def test_app_mag_from_mpp_or_given(tmp_path):
    for mpp, power, expected in ((0.5, None, "20"), (1.0, None, "10"), (0.25, 60, "60")):
        slide = write_slide(
            tmp_path / "m.svs", width=300, height=200, mpp=mpp, objective_power=power
        )
        with openslide.OpenSlide(slide.path) as s:
            assert s.properties["openslide.objective-power"] == expected
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp)


# ----------------------------------------------------------------------------- ground truth


def test_ground_truth_masks(positive):
    ds = positive.gt_downsample
    assert positive.tissue_mask.shape == (math.ceil(1536 / ds), math.ceil(2048 / ds))
    assert positive.tissue_mask.dtype == bool and positive.lesion_mask.dtype == bool
    assert positive.lesion_mask.shape == positive.tissue_mask.shape
    assert not (positive.lesion_mask & ~positive.tissue_mask).any()
    assert positive.label == 1
    assert 0 < positive.lesion_fraction <= 0.05
    assert positive.lesion_fraction == pytest.approx(0.04, rel=0.25)
    assert positive.lesion_fraction == positive.lesion_mask.sum() / positive.tissue_mask.sum()
    assert positive.tissue_fraction == pytest.approx(positive.tissue_mask.mean())


@pytest.mark.parametrize("target", [0.1, 0.3, 0.6])
def test_tissue_fraction_near_target(tmp_path, target):
    slide = write_slide(tmp_path / "t.svs", width=1200, height=900, seed=2, tissue_fraction=target)
    assert slide.tissue_fraction == pytest.approx(target, rel=0.3)
    assert slide.label == 0 and not slide.lesion_mask.any() and slide.lesion_fraction == 0


def test_ground_truth_matches_image(positive):
    """The tissue mask is where the image is stained (saturated), at the mask's resolution."""
    with tiffslide.TiffSlide(positive.path) as slide:
        img = _read_level(slide, 1).astype(np.int16)  # 4x
    sat = (img.max(2) - img.min(2)) > 25
    k = positive.gt_downsample // 4
    h, w = sat.shape[0] // k, sat.shape[1] // k
    stained = sat[: h * k, : w * k].reshape(h, k, w, k).mean((1, 3)) > 0.5
    truth = positive.tissue_mask[:h, :w]
    assert (stained & truth).sum() / (stained | truth).sum() > 0.9


def test_pen_and_fold_do_not_change_ground_truth(tmp_path):
    kw = dict(width=1600, height=1200, mpp=0.5, seed=4, n_lesions=1)
    plain = write_slide(tmp_path / "plain.svs", **kw)
    marked = write_slide(tmp_path / "marked.svs", pen_mark=True, fold=True, **kw)
    assert np.array_equal(plain.tissue_mask, marked.tissue_mask)
    assert np.array_equal(plain.lesion_mask, marked.lesion_mask)
    with tiffslide.TiffSlide(plain.path) as a, tiffslide.TiffSlide(marked.path) as b:
        pa, pb = _read_level(a, 0).astype(np.int16), _read_level(b, 0).astype(np.int16)
    r, g, bl = pb[..., 0], pb[..., 1], pb[..., 2]
    ink = ((bl - r > 80) | (g - r > 60)) & ~_upsample(marked.tissue_mask, 16, r.shape)
    assert ink.sum() > 1000  # saturated blue or green ink on glass
    tissue = _upsample(plain.tissue_mask, 16, r.shape)
    assert pb[tissue].mean() < pa[tissue].mean() - 2  # fold and ink darken tissue


# ---------------------------------------------------------------------------------- looks


def test_colours_background_white_tissue_pink(positive):
    with tiffslide.TiffSlide(positive.path) as slide:
        img = _read_level(slide, 0)
    ds = positive.gt_downsample
    glass = _upsample(
        ndimage.binary_erosion(~positive.tissue_mask, iterations=2), ds, img.shape[:2]
    )
    inner = ndimage.binary_erosion(positive.tissue_mask, iterations=2)
    tissue = _upsample(inner, ds, img.shape[:2])
    assert glass.sum() > 10_000 and tissue.sum() > 10_000
    assert (img[glass] > 220).all(axis=1).mean() > 0.999
    r, g, b = img[tissue].reshape(-1, 3).mean(0)
    assert r > g + 20 and b > g + 10  # pink-purple, not YCbCr-swapped
    assert 120 < g < 200


def test_lesion_colour_close_texture_different(lesion_rich):
    """Lesions differ from normal tissue in texture (nuclear size, rims), not in mean colour."""
    with tiffslide.TiffSlide(lesion_rich.path) as slide:
        img = _read_level(slide, 0)
    ds = lesion_rich.gt_downsample
    lesion = ndimage.binary_erosion(lesion_rich.lesion_mask, iterations=2)
    normal = lesion_rich.tissue_mask & ~ndimage.binary_dilation(
        lesion_rich.lesion_mask, iterations=3
    )
    normal = ndimage.binary_erosion(normal, iterations=2)
    p = 64
    patches = {"lesion": [], "normal": []}
    for name, mask in (("lesion", lesion), ("normal", normal)):
        full = _upsample(mask, ds, img.shape[:2])
        for y in range(0, img.shape[0] - p, p):
            for x in range(0, img.shape[1] - p, p):
                if full[y : y + p, x : x + p].all():
                    patches[name].append(img[y : y + p, x : x + p].astype(np.float32))
    les, nor = np.array(patches["lesion"]), np.array(patches["normal"])
    assert len(les) >= 20 and len(nor) >= 20
    colour_diff = np.abs(les.mean((0, 1, 2)) - nor.mean((0, 1, 2)))
    assert (colour_diff < 15).all(), colour_diff

    def texture(batch):  # mean |2-D Laplacian| of each lightly smoothed grey patch
        g = ndimage.gaussian_filter(batch.mean(3), (0, 1, 1))
        lap = (
            g[:, 2:, 1:-1]
            + g[:, :-2, 1:-1]
            + g[:, 1:-1, 2:]
            + g[:, 1:-1, :-2]
            - 4 * g[:, 1:-1, 1:-1]
        )
        return np.abs(lap).mean((1, 2))

    assert np.median(texture(les)) > 1.4 * np.median(texture(nor))


def _nuclei_per_area(img: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """Bluish blobs (nuclei) of at least 8 px centred in ``region``: per 10^4 px, median size."""
    blue = ndimage.gaussian_filter(img[..., 2] - img[..., 0], 1) > 0
    lab, n = ndimage.label(blue)
    size = np.bincount(lab.ravel())[1:]
    cy, cx = np.round(ndimage.center_of_mass(blue, lab, np.arange(1, n + 1))).astype(int).T
    inside = region[cy, cx] & (size >= 8)
    return inside.sum() / region.sum() * 1e4, float(np.median(size[inside]))


def test_morphology_lesion_same_colour_more_nuclei(lesion_rich, rich_twins):
    """A morphology-only lesion has the colour of the tissue it replaces (the same region of the
    lesion-free twin: no regional confound) and ~4x more, smaller nuclei; a tumour one is redder."""
    morph, plain = rich_twins
    assert np.array_equal(morph.lesion_mask, lesion_rich.lesion_mask)  # same layout, any style
    assert np.array_equal(plain.tissue_mask, lesion_rich.tissue_mask) and plain.label == 0
    imgs = {}
    for name, slide in (("tumour", lesion_rich), ("morphology", morph), ("plain", plain)):
        with tiffslide.TiffSlide(slide.path) as s:
            imgs[name] = _read_level(s, 0).astype(np.float32)
    region = ndimage.binary_erosion(lesion_rich.lesion_mask, iterations=2)
    les = _upsample(region, lesion_rich.gt_downsample, imgs["plain"].shape[:2])
    assert les.sum() > 100_000
    normal = imgs["plain"][les].mean(0)
    diff = {name: np.abs(imgs[name][les].mean(0) - normal) for name in LESION_STYLES}
    assert (diff["morphology"] < 3).all(), diff
    assert diff["tumour"].max() > 5 and diff["tumour"].max() > 2 * diff["morphology"].max(), diff
    n_morph, size_morph = _nuclei_per_area(imgs["morphology"], les)
    n_plain, size_plain = _nuclei_per_area(imgs["plain"], les)
    assert n_morph > 3 * n_plain, (n_morph, n_plain)
    assert size_morph < 0.5 * size_plain, (size_morph, size_plain)


def test_no_seams_at_tile_borders(positive):
    """Differences across tile borders are no larger than across any JPEG 8x8 block edge."""
    with tiffslide.TiffSlide(positive.path) as slide:
        img = _read_level(slide, 0).astype(np.int16)
    tissue = _upsample(positive.tissue_mask, positive.gt_downsample, img.shape[:2])
    for axis in (0, 1):
        d = np.abs(np.diff(img, axis=axis)).mean(2)
        m = tissue[:-1] & tissue[1:] if axis == 0 else tissue[:, :-1] & tissue[:, 1:]
        idx = np.arange(d.shape[axis])
        border = idx % 256 == 255
        block = (idx % 8 == 7) & ~border
        d, m = (d, m) if axis == 0 else (d.T, m.T)  # differences across rows
        assert d[border][m[border]].mean() < 1.2 * d[block][m[block]].mean()


# ----------------------------------------------------------------------------- edge cases


def test_blank_slide(tmp_path):
    slide = write_slide(tmp_path / "blank.svs", width=1500, height=1000, tissue_fraction=0.0)
    assert slide.label == 0 and slide.tissue_fraction == 0 and slide.lesion_fraction == 0
    assert not slide.tissue_mask.any() and not slide.lesion_mask.any()
    with openslide.OpenSlide(slide.path) as s:
        img = _read_level(s, 0)
    assert img.min() > 220


@pytest.mark.parametrize("reader", READERS)
def test_slide_smaller_than_a_tile(tmp_path, reader):
    slide = write_slide(tmp_path / "small.svs", width=200, height=150, n_lesions=1)
    assert slide.tissue_mask.shape == (10, 13) and slide.label == 1
    with READERS[reader](slide.path) as s:
        assert _vendor_props(s)[0] == "aperio"
        assert s.level_count == 1 and s.dimensions == (200, 150)
        img = _read_level(s, 0)
        assert img.shape == (150, 200, 3)
        assert s.associated_images["thumbnail"].size == (200, 150)


def test_tif_suffix_and_tile_size(tmp_path):
    slide = write_slide(
        tmp_path / "sub" / "x.tiff", width=1000, height=800, tile_px=128, jpeg_quality=70
    )
    with openslide.OpenSlide(slide.path) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.properties["openslide.level[0].tile-width"] == "128"
        assert slide.slide_id == "x"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": -5}, "width must be between"),
        ({"height": 0}, "height must be between"),
        ({"width": 100.5}, "width must be an integer"),
        ({"mpp": 0}, "mpp must be between"),
        ({"mpp": float("nan")}, "mpp must be between"),
        ({"lesion_fraction": 1.5}, "lesion_fraction must be between"),
        ({"tissue_fraction": -0.1}, "tissue_fraction must be between"),
        ({"n_lesions": -1}, "n_lesions must be between"),
        ({"tile_px": 100}, "tile_px must be a multiple of 16"),
        ({"jpeg_quality": 0}, "jpeg_quality must be between"),
        ({"gt_downsample": 0}, "gt_downsample must be between"),
        ({"seed": -1}, "seed must be between"),
        ({"objective_power": -2.0}, "objective_power must be between"),
        ({"n_lesions": 2, "tissue_fraction": 0.0}, "needs tissue"),
        ({"n_lesions": 2, "lesion_fraction": 0.0}, "needs lesion_fraction"),
        ({"lesion_style": "tumor"}, "lesion_style must be one of tumour, morphology, got 'tumor'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"width": 300, "height": 200, **kwargs}
    with pytest.raises(ConfigError, match=match):
        write_slide(tmp_path / "bad.svs", **args)
    assert not os.listdir(tmp_path)


def test_bad_path_suffix(tmp_path):
    with pytest.raises(ConfigError, match=r"\.svs, \.tif or \.tiff"):
        write_slide(tmp_path / "bad.png", width=300, height=200)


# -------------------------------------------------------------------------------- cohorts


#: The cohort of the ``cohort`` fixture (a rerun with the same options skips its slides).
COHORT = dict(
    n_slides=8, width=768, height=512, mpp=0.5, seed=1, lesion_fraction=0.05, pen_mark=False
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    return out, write_cohort(out, **COHORT)


def test_cohort_files(cohort):
    out, slides = cohort
    assert [s.slide_id for s in slides] == [f"synth_{i:03d}" for i in range(8)]
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["slide_id", "label"]
    labels = {sid: int(label) for sid, label in rows[1:]}
    assert labels == {s.slide_id: s.label for s in slides}
    assert sum(labels.values()) == 4  # balanced
    assert list(labels.values()) != sorted(labels.values(), reverse=True)  # spread, not all first
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["complete"] is True and meta["gt_downsample"] == 16
    assert meta["parameters"]["n_slides"] == 8 and meta["parameters"]["slide_options"] == {
        "pen_mark": False
    }
    for s, entry in zip(slides, meta["slides"]):
        assert (out / "slides" / f"{s.slide_id}.svs").is_file()
        assert entry["id"] == s.slide_id and entry["label"] == s.label
        assert (entry["width"], entry["height"], entry["mpp"]) == (768, 512, 0.5)
        assert entry["tissue_fraction"] == pytest.approx(s.tissue_fraction)
        assert entry["lesion_fraction"] == pytest.approx(s.lesion_fraction)
        assert (s.lesion_fraction > 0) == bool(s.label)
        png = np.asarray(Image.open(out / "masks" / f"{s.slide_id}_lesion.png"))
        assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
        tissue, lesion, ds = load_ground_truth(out, s.slide_id)
        assert ds == 16
        assert np.array_equal(tissue, s.tissue_mask) and np.array_equal(lesion, s.lesion_mask)


def test_lesion_patches_are_half_inside_a_lesion(cohort):
    """The lesion-patch label: a patch box at least half inside the planted lesions, counted
    here directly on the ground-truth mask (patches on its pixel grid, and off it)."""
    out, slides = cohort
    positive = next(s for s in slides if s.label == 1)
    _, lesion, ds = load_ground_truth(out, positive.slide_id)
    side = 4 * ds  # level-0 px: 4 x 4 mask pixels
    ys, xs = np.mgrid[0 : 512 - side + 1 : ds, 0 : 768 - side + 1 : ds]
    coords = np.c_[xs.ravel(), ys.ravel()]
    got = lesion_patches(out, positive.slide_id, coords, side)
    want = [
        lesion[y // ds : (y + side) // ds, x // ds : (x + side) // ds].mean() >= 0.5
        for x, y in coords
    ]
    assert got.dtype == bool and np.array_equal(got, want)
    assert 0 < got.sum() < len(got)  # both kinds present: the check can fail
    # half a mask pixel off the grid: box fractions, still the same rule
    shifted = lesion_patches(out, positive.slide_id, coords + ds // 2, side)
    assert 0 < shifted.sum() < len(shifted)
    negative = next(s for s in slides if s.label == 0)
    assert not lesion_patches(out, negative.slide_id, coords, side).any()


def test_cohort_summary(cohort):
    out, _ = cohort
    text = summarize_cohort(out)
    assert "8 slides (4 abnormal, 4 normal)" in text
    assert "0.5 um/px" in text and len(text.splitlines()) >= 3


def test_cohort_rerun_skips_finished_slides(cohort):
    out, slides = cohort
    path = out / "slides" / "synth_003.svs"
    before = os.stat(path).st_mtime_ns
    again = write_cohort(out, **COHORT)
    assert os.stat(path).st_mtime_ns == before
    assert [s.label for s in again] == [s.label for s in slides]
    assert all(np.array_equal(a.tissue_mask, b.tissue_mask) for a, b in zip(again, slides))


def test_cohort_workers_same_files(tmp_path):
    kw = dict(n_slides=3, width=512, height=384, mpp=0.5, seed=2)
    one = write_cohort(tmp_path / "one", **kw)
    two = write_cohort(tmp_path / "two", workers=2, **kw)
    assert [s.label for s in one] == [s.label for s in two]
    for i in range(3):
        name = f"slides/synth_{i:03d}.svs"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_cohort_workers_do_not_rerun_an_unguarded_script(tmp_path):
    """A user's script that writes a cohort with worker processes at its top level, without an
    ``if __name__ == "__main__":`` guard, runs once (its workers were spawned re-running it,
    and failed: a process started while bootstrapping)."""
    script = tmp_path / "make_cohort.py"
    script.write_text(
        "import wsi_pipeline as wp\n"
        "print('script ran', flush=True)\n"
        f"out = wp.write_cohort({str(tmp_path / 'c')!r}, n_slides=3, width=512, height=384,"
        " workers=2)\n"
        "print(len(out), flush=True)\n"
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["script ran", "3"], proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_slides": 0}, "n_slides must be between"),
        ({"positive_fraction": 1.5}, "positive_fraction must be between"),
        ({"n_lesions": (0, 2)}, "n_lesions must be a"),
        ({"n_lesions": (3, 1)}, "n_lesions must be a"),
        ({"colour": "blue"}, "unknown slide option"),
        ({"width": -1}, "width must be between"),
        ({"tissue_fraction": 0.0}, "positive slides need tissue"),
        ({"lesion_style": None}, "lesion_style must be one of tumour, morphology"),
    ],
)
def test_cohort_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        write_cohort(tmp_path, **{"n_slides": 2, "width": 300, "height": 200, **kwargs})
    assert not (tmp_path / "slides").exists()


def test_cohort_lesion_style_round_trips(tmp_path):
    """The style is recorded in cohort.json and summarised; it changes the lesions only."""
    kw = dict(n_slides=2, width=512, height=384, mpp=0.5, seed=2)
    morph = write_cohort(tmp_path / "morph", **kw, lesion_style="morphology")
    tumour = write_cohort(tmp_path / "tumour", **kw)
    meta = json.loads((tmp_path / "morph" / "cohort.json").read_text())
    assert meta["parameters"]["slide_options"] == {"lesion_style": "morphology"}
    assert "lesion style: morphology" in summarize_cohort(tmp_path / "morph")
    assert "lesion style" not in summarize_cohort(tmp_path / "tumour")
    labels = [s.label for s in morph]
    assert labels == [s.label for s in tumour] and sorted(labels) == [0, 1]
    for a, b in zip(morph, tumour):
        assert np.array_equal(a.lesion_mask, b.lesion_mask)
        same = open(a.path, "rb").read() == open(b.path, "rb").read()
        assert same == (a.label == 0)  # a normal slide has nothing to restyle
    path = tmp_path / "morph" / "slides" / "synth_000.svs"
    before = os.stat(path).st_mtime_ns
    write_cohort(tmp_path / "morph", **kw, lesion_style="morphology")  # rerun: skipped
    assert os.stat(path).st_mtime_ns == before


def test_slide_defaults_are_write_slide_defaults():
    """SLIDE_DEFAULTS are write_slide's own keyword defaults (what a cohort passes on)."""
    import inspect

    params = inspect.signature(write_slide).parameters
    assert SLIDE_DEFAULTS == {k: params[k].default for k in SLIDE_DEFAULTS}
    assert set(SLIDE_DEFAULTS).isdisjoint(inspect.signature(write_cohort).parameters)


def test_no_temporary_files_left(tmp_path):
    write_cohort(tmp_path, n_slides=1, width=300, height=200)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cohort.json",
        "labels.csv",
        "masks",
        "slides",
    ]
    assert [p.name for p in (tmp_path / "slides").iterdir()] == ["synth_000.svs"]


def test_cohort_readers_fail_cleanly(tmp_path):
    with pytest.raises(ConfigError, match=r"cohort\.json"):
        summarize_cohort(tmp_path)
    with pytest.raises(ConfigError, match=r"cohort\.json"):
        load_ground_truth(tmp_path, "synth_000")
