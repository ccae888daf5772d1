"""Slide reading against every real file in ../shared/testdata/slides, and the bad-input cases."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.errors import SlideError
from wsi_pipeline.slide import (
    find_slides,
    mpp_at,
    open_slide,
    slide_id_from_path,
)

# path -> expected (backend, vendor, (w, h), level count, mpp or None, objective power or None)
GOOD = {
    "aperio/CMU-1-Small-Region.svs": ("openslide", "aperio", (2220, 2967), 1, 0.499, 20.0),
    "aperio/small.svs": ("openslide", "aperio", (16, 16), 1, 0.499, 20.0),
    "aperio/tcga-cr-7395-01a-01-ts1.svs": ("openslide", "aperio", (4443, 3567), 2, None, None),
    "generic-tiff/boxes.tiff": ("openslide", "generic-tiff", (300, 250), 4, None, None),
    "generic-tiff/kidney-48-5.tif": ("tiffslide", "generic-tiff", (1493, 901), 1, None, None),
    "ome-tiff/OS-1-detail.ome.tif": ("tiffslide", "ome", (1101, 1101), 1, 0.2271, None),
    "ome-tiff/OS-2-ndpi.ome.tif": ("tiffslide", "ome", (2202, 2202), 1, 0.2271, None),
    "ome-tiff/OS-2-vsi.ome.tif": ("tiffslide", "ome", (1445, 1445), 1, 0.3461, None),
    "dicom/boxes/boxes_0.dcm": ("openslide", "dicom", (16, 16), 1, 0.499, 20.0),
    "dicom/camelyon-multiframe/multiframe_camelyon_challenge_image.dcm": (
        "openslide",
        "dicom",
        (1152, 700),
        1,
        28.97,
        None,
    ),
}

# path -> a regex the one-line error must match
BAD = {
    "broken/broken.svs": r"broken\.svs: unsupported or unreadable slide .*not a TIFF",
    "broken/unreadable.svs": r"unreadable\.svs: tiles cannot be decoded .*Bogus marker length",
    "broken/unopenable.tiff": r"unopenable\.tiff: tiles cannot be decoded .*52479",
    "dicom/pathml-small/small_dicom.dcm": r"small_dicom\.dcm: unsupported .*image flavor",
    "qptiff/small_vectra.qptiff": r"small_vectra\.qptiff: multichannel fluorescence image "
    r"\(3 channels",
    "odd/smalltif.tif": r"smalltif\.tif: 16-bit grayscale image",
}

# files both readers open: their pixels must agree
BOTH = [
    "aperio/CMU-1-Small-Region.svs",
    "aperio/small.svs",
    "aperio/tcga-cr-7395-01a-01-ts1.svs",
    "generic-tiff/boxes.tiff",
]


def test_every_real_file_is_classified(testdata: Path) -> None:
    """Every slide-like file in the test data is covered by GOOD or BAD (or is a DICOM sibling)."""
    slides, _ = find_slides([testdata])
    known = set(GOOD) | set(BAD)
    for p in slides:
        assert str(p.relative_to(testdata)) in known, p


@pytest.mark.parametrize("rel", sorted(GOOD))
def test_good_files_open_with_metadata(testdata: Path, rel: str) -> None:
    backend, vendor, wh, nlevels, mpp, power = GOOD[rel]
    with open_slide(testdata / rel) as s:
        m = s.meta
        assert m.backend == backend
        assert m.vendor == vendor
        assert (m.width, m.height) == wh
        assert m.level_count == nlevels == len(m.level_downsamples)
        assert m.level_dimensions[0] == wh
        assert m.level_downsamples[0] == 1.0
        if mpp is None:
            assert m.mpp is None and m.mpp_source is None
        else:
            assert m.mpp == pytest.approx(mpp, rel=1e-3)
            assert m.mpp_source == "file"
        assert m.objective_power == power
        assert m.file_size == (testdata / rel).stat().st_size
        region = s.read_region((0, 0), 0, (min(64, wh[0]), min(48, wh[1])))
        assert region.dtype == np.uint8 and region.shape == (min(48, wh[1]), min(64, wh[0]), 3)


@pytest.mark.parametrize("rel", sorted(BAD))
def test_bad_files_raise_one_line(testdata: Path, rel: str) -> None:
    with pytest.raises(SlideError, match=BAD[rel]) as info:
        open_slide(testdata / rel)
    assert "\n" not in str(info.value)
    assert str(testdata / rel) in str(info.value)


@pytest.mark.parametrize("rel", BOTH)
def test_backends_agree(testdata: Path, rel: str) -> None:
    with (
        open_slide(testdata / rel, backend="openslide") as a,
        open_slide(testdata / rel, backend="tiffslide") as b,
    ):
        assert a.meta.level_dimensions == b.meta.level_dimensions
        assert a.meta.mpp == b.meta.mpp
        for level, (w, h) in enumerate(a.meta.level_dimensions):
            size = (min(w, 700), min(h, 500))
            assert np.array_equal(
                a.read_region((0, 0), level, size), b.read_region((0, 0), level, size)
            ), (rel, level)
            xy = (
                int(a.meta.level_downsamples[level] * (w - size[0]) // 2),
                int(a.meta.level_downsamples[level] * (h - size[1]) // 2),
            )
            pa = a.read_region(xy, level, size).astype(int)
            pb = b.read_region(xy, level, size).astype(int)
            if level == 0 or float(a.meta.level_downsamples[level]).is_integer():
                assert np.array_equal(pa, pb), (rel, level)
            else:  # openslide interpolates sub-pixel offsets at non-integer downsamples
                assert np.abs(pa - pb).mean() < 8, (rel, level)


def test_boxes_tiff_matches_png(testdata: Path) -> None:
    from PIL import Image

    expected = np.asarray(Image.open(testdata / "generic-tiff/boxes.png").convert("RGB"))
    for backend in ("openslide", "tiffslide"):
        with open_slide(testdata / "generic-tiff/boxes.tiff", backend=backend) as s:
            assert np.array_equal(s.read_region((0, 0), 0, (300, 250)), expected)


def test_dpi_default_mpp_is_unknown(testdata: Path) -> None:
    """boxes.tiff says 352.8 µm/px (72 dpi): meaningless, reported as unknown by both readers."""
    for backend in ("openslide", "tiffslide"):
        with open_slide(testdata / "generic-tiff/boxes.tiff", backend=backend) as s:
            assert s.meta.mpp is None


def test_region_size_is_width_height(testdata: Path) -> None:
    with open_slide(testdata / "aperio/CMU-1-Small-Region.svs") as s:
        assert s.read_region((100, 200), 0, (30, 20)).shape == (20, 30, 3)


def test_outside_the_slide_is_white(testdata: Path) -> None:
    for backend in ("openslide", "tiffslide"):
        with open_slide(testdata / "aperio/CMU-1-Small-Region.svs", backend=backend) as s:
            r = s.read_region((2200, -10), 0, (40, 30))
            assert (r[:10] == 255).all() and (r[:, 20:] == 255).all()
            inside = s.read_region((2200, 0), 0, (20, 20))
            assert np.array_equal(r[10:, :20], inside)
            assert (s.read_region((5000, 5000), 0, (8, 8)) == 255).all()


def test_ome_tiff_outside_is_white_not_black(testdata: Path) -> None:
    """tiffslide zero-fills past the edge; we must give white like openslide's transparency."""
    with open_slide(testdata / "ome-tiff/OS-1-detail.ome.tif") as s:
        r = s.read_region((1000, 1000), 0, (200, 200))
        assert (r[101:, :] == 255).all() and (r[:, 101:] == 255).all()


def test_read_region_mpp_resamples_once(testdata: Path) -> None:
    with open_slide(testdata / "aperio/CMU-1-Small-Region.svs") as s:
        half = s.read_region_mpp((400, 600), (128, 96), 0.998)
        full = s.read_region((400, 600), 0, (256, 192))
        assert half.shape == (96, 128, 3)
        box = full.reshape(96, 2, 128, 2, 3).mean(axis=(1, 3))
        assert np.abs(half.astype(float) - box).max() <= 1.0
        same = s.read_region_mpp((400, 600), (64, 64), 0.499)
        assert np.array_equal(same, full[:64, :64])


def test_read_region_picks_a_pyramid_level(testdata: Path) -> None:
    with open_slide(testdata / "aperio/tcga-cr-7395-01a-01-ts1.svs", mpp=0.25) as s:
        assert s.best_level(1.99) == 0
        assert s.best_level(2.0) == 1  # level 1 is 2.001: close enough to 2 (0.5%)
        assert s.best_level(4.0) == 1
        r = s.read_region_mpp((0, 0), (100, 80), 1.0)  # 4x: level 1, then a ~2x resample
        assert r.shape == (80, 100, 3)


def test_mpp_missing_gives_clear_error(testdata: Path) -> None:
    with open_slide(testdata / "aperio/tcga-cr-7395-01a-01-ts1.svs") as s:
        with pytest.raises(SlideError, match=r"tcga.*has no resolution \(mpp\) metadata"):
            s.read_region_mpp((0, 0), (64, 64), 0.5)


def test_mpp_at_a_downsample(testdata: Path) -> None:
    with open_slide(testdata / "aperio/CMU-1-Small-Region.svs") as s:
        assert mpp_at(s.meta, 4.0) == pytest.approx(4 * 0.499)
    with open_slide(testdata / "aperio/tcga-cr-7395-01a-01-ts1.svs") as s:
        assert mpp_at(s.meta, 4.0) is None


def test_user_mpp_override(testdata: Path) -> None:
    with open_slide(testdata / "aperio/tcga-cr-7395-01a-01-ts1.svs", mpp=0.25) as s:
        assert s.meta.mpp == 0.25 and s.meta.mpp_source == "user"
    with pytest.raises(SlideError, match="not a positive number"):
        open_slide(testdata / "aperio/small.svs", mpp=-1)


def test_thumbnail(testdata: Path) -> None:
    with open_slide(testdata / "aperio/tcga-cr-7395-01a-01-ts1.svs") as s:
        ds = s.thumbnail_downsample(max_px=512)
        t = s.read_thumbnail(ds, strip_px=300)  # several strips
        assert max(t.shape[:2]) == 512 and t.shape == (412, 512, 3)
        # strip-wise thumbnail ~ one-strip thumbnail (box filter phase differs per strip)
        one = s.read_thumbnail(ds, strip_px=100_000)
        assert np.abs(t.astype(int) - one).mean() < 3.0
        # and lines up with level 0: a thumbnail pixel is the mean of its level-0 block
        r0 = s.read_region((int(200 * ds), int(150 * ds)), 0, (int(10 * ds), int(10 * ds)))
        assert np.abs(t[150:160, 200:210].mean((0, 1)) - r0.mean((0, 1))).max() < 4


def test_thumbnail_from_the_file_s_own_tiles(testdata: Path, tmp_path: Path) -> None:
    """Strips read straight from the file's JPEG or JPEG 2000 tiles are the reader's pixels
    exactly (openslide for Aperio, tiffslide for OME-TIFF); a source that fails falls back to
    it."""
    from wsi_pipeline.tiling import _thumbnail_source

    for name, backend in [
        ("aperio/CMU-1-Small-Region.svs", "openslide"),
        ("ome-tiff/OS-2-ndpi.ome.tif", "tiffslide"),
        ("aperio/tcga-cr-7395-01a-01-ts1.svs", "openslide"),  # JPEG 2000 (33005)
    ]:
        with open_slide(testdata / name) as s:
            assert s.meta.backend == backend
            # the TCGA slide's level 1 is 2.00045x level 0: openslide reads a strip that starts
            # inside it at a fractional level position (resampled), so compare whole levels
            strip = 4096 if "tcga" in name else 300
            for ds in (3.0, 8.0, 37.5):
                src = _thumbnail_source(s, ds)
                assert src is not None
                fast = s.read_thumbnail(ds, strip_px=strip, source=src)
                # half of each strip decoded by another thread: the same pixels
                with ThreadPoolExecutor(2) as pool:
                    halves = s.read_thumbnail(ds, strip_px=strip, source=src, pool=pool)
                src.close()
                assert np.array_equal(fast, s.read_thumbnail(ds, strip_px=strip))
                assert np.array_equal(halves, fast)

    class Broken:
        def read(self, *args: object, **kwargs: object) -> np.ndarray:
            raise OSError("tile 0 has no data")

    with open_slide(testdata / "aperio/CMU-1-Small-Region.svs") as s:
        got = s.read_thumbnail(8.0, source=Broken())
        assert np.array_equal(got, s.read_thumbnail(8.0))
        broken = Broken()
        broken.tiles_across, broken.tile_w = 4, 64  # split in two: each half fails
        with ThreadPoolExecutor(2) as pool:
            got = s.read_thumbnail(8.0, source=broken, pool=pool)
        assert np.array_equal(got, s.read_thumbnail(8.0))
    # not a tiled TIFF level: no direct source, read_region as before
    with open_slide(testdata / "generic-tiff/kidney-48-5.tif") as s:
        assert _thumbnail_source(s, 4.0) is None


def test_missing_directory_empty_truncated(tmp_path: Path, testdata: Path) -> None:
    with pytest.raises(SlideError, match=r"nope\.svs: no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="is a directory"):
        open_slide(tmp_path)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match=r"empty\.svs: empty file \(0 bytes\)"):
        open_slide(empty)
    data = (testdata / "aperio/CMU-1-Small-Region.svs").read_bytes()
    for frac in (0.3, 0.8, 0.99):
        cut = tmp_path / f"cut{int(frac * 100)}.svs"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(
            SlideError, match=rf"cut{int(frac * 100)}\.svs: (truncated|unsupported)"
        ):
            open_slide(cut)
    notslide = tmp_path / "notes.svs"
    notslide.write_text("hello")
    with pytest.raises(SlideError, match="unsupported or unreadable"):
        open_slide(notslide)
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(testdata / "aperio/small.svs", backend="bioformats")


def test_closed_slide_and_bad_level(testdata: Path) -> None:
    s = open_slide(testdata / "aperio/small.svs")
    with pytest.raises(SlideError, match="level 3 does not exist"):
        s.read_region((0, 0), 3, (4, 4))
    with pytest.raises(SlideError, match="region size must be positive"):
        s.read_region((0, 0), 0, (0, 4))
    s.close()
    s.close()
    with pytest.raises(SlideError, match="slide is closed"):
        s.read_region((0, 0), 0, (4, 4))


def test_slide_ids_are_safe() -> None:
    assert slide_id_from_path("/a/b/TCGA-01.svs") == "TCGA-01"
    assert slide_id_from_path("/a/b/x.ome.tif") == "x"
    assert slide_id_from_path("/a/b/../evil name;rm.svs") == "evil_name_rm"
    assert slide_id_from_path("/a/..svs") == "slide"
    assert slide_id_from_path("/a/case7/instance_0.dcm") == "case7"
    assert "/" not in slide_id_from_path("/x/..\\..\\etc.svs")


def test_find_slides(testdata: Path, tmp_path: Path) -> None:
    slides, skipped = find_slides([testdata])
    rels = {str(p.relative_to(testdata)) for p in slides}
    assert "dicom/boxes/boxes_0.dcm" in rels and "dicom/boxes/boxes_1.dcm" not in rels
    assert "aperio/CMU-1-Small-Region.svs" in rels
    skipped_names = {p.name for p, _ in skipped}
    assert {"SOURCES.md", "boxes.png", "compat_probe.json"} <= skipped_names
    # a file given explicitly is always taken (and refused later if it is no slide)
    f = tmp_path / "a.txt"
    shutil.copy(testdata / "SOURCES.md", f)
    assert find_slides([f]) == ([f], [])


def test_tifffile_complaints_stay_with_their_thread(testdata: Path, tmp_path: Path) -> None:
    """tifffile logs a broken IFD chain on one process-wide logger. What one thread's file logs
    must not be read as another's (a good slide was failed as 'truncated' when a truncated one
    was opened beside it), nor be lost while another thread parses a file quietly
    (:func:`~wsi_pipeline.tiffsrc.open_tiff_level`)."""
    import threading

    from wsi_pipeline.tiffsrc import open_tiff_level

    data = (testdata / "aperio/CMU-1-Small-Region.svs").read_bytes()
    cut = tmp_path / "cut.tif"  # tiffslide opens it, and tifffile logs its broken chain
    cut.write_bytes(data[: int(len(data) * 0.8)])  # its pyramid cut short
    good = testdata / "generic-tiff/kidney-48-5.tif"
    with open_slide(good) as s:
        wh = s.meta.level_dimensions[0]
    stop = threading.Event()

    def open_cut() -> None:
        while not stop.is_set():
            with pytest.raises(SlideError, match=r"cut\.tif: truncated or corrupt TIFF \(invalid"):
                open_slide(cut, backend="tiffslide")

    def parse_quietly() -> None:
        while not stop.is_set():
            open_tiff_level(str(good), 0, wh)

    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(open_cut), pool.submit(parse_quietly)]
        try:
            for _ in range(200):
                open_slide(good, backend="tiffslide").close()
        finally:
            stop.set()
        for f in others:
            f.result()


def test_slides_opened_by_threads_leave_the_warning_filters_alone(testdata: Path) -> None:
    """Opening slides in two threads at once (a threaded tile batch) must not change the
    process's warning filters: ``warnings.catch_warnings`` around the opens left them ignoring
    every warning in about half of such batches (the user's notebook then saw none)."""
    import warnings

    from wsi_pipeline.tiffsrc import open_tiff_level

    good = testdata / "generic-tiff/kidney-48-5.tif"
    with open_slide(good) as s:
        wh = s.meta.level_dimensions[0]
    before = list(warnings.filters)

    def opens() -> None:
        for _ in range(5):
            open_slide(good, backend="tiffslide").close()

    def parses() -> None:
        for _ in range(5):
            open_tiff_level(str(good), 0, wh)

    for _ in range(20):
        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(opens), pool.submit(parses)]:
                f.result()
        assert warnings.filters == before
