"""Direct access to one level of a tiled TIFF (tiffsrc), pinned to openslide's pixels.

On a slide written by :func:`wsi_pipeline.synth.write_slide` (YCbCr JPEG tiles, two levels) and on
a real Aperio file (RGB JPEG tiles of 240 px).
"""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from wsi_pipeline.codecs import adobe_rgb_marker, join_jpeg_tables
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tiffsrc import JPEG, TiffLevel, decode_jpeg_scaled, open_tiff_level

CMU = "aperio/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def synth_svs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """2600 x 2100 px (level 1: 650 x 525), sizes not multiples of the 256-px tiles."""
    path = tmp_path_factory.mktemp("tiffsrc") / "s.svs"
    write_slide(path, width=2600, height=2100, mpp=0.5, seed=12, n_lesions=1)
    return str(path)


@pytest.fixture()
def cmu(testdata: Path) -> str:
    return str(testdata / CMU)


def _level(path: str, level: int) -> tuple[TiffLevel, openslide.OpenSlide]:
    ref = openslide.OpenSlide(path)
    tiff = open_tiff_level(path, level, ref.level_dimensions[level])
    assert tiff is not None
    return tiff, ref


def _openslide(ref: openslide.OpenSlide, level: int, xywh: tuple[int, int, int, int]) -> np.ndarray:
    """openslide's pixels of a region given in level coordinates."""
    x, y, w, h = xywh
    ds = ref.level_downsamples[level]
    return np.asarray(ref.read_region((round(x * ds), round(y * ds)), level, (w, h)))[..., :3]


@pytest.mark.parametrize("level", [0, 1])
def test_synth_level_matches_openslide(synth_svs: str, level: int) -> None:
    tiff, ref = _level(synth_svs, level)
    w, h = ref.level_dimensions[level]
    assert (tiff.width, tiff.height) == (w, h) and (tiff.tile_w, tiff.tile_h) == (256, 256)
    assert tiff.compression == JPEG and not tiff.rgb_jpeg  # YCbCr JPEG: no marker needed
    assert (tiff.tiles_across, tiff.tiles_down) == (math.ceil(w / 256), math.ceil(h / 256))
    region = (200, 150, 600, 300) if level == 0 else (0, 0, w, h)  # across tile borders
    got = tiff.read(*region)
    assert got.shape == (region[3], region[2], 3)  # (h, w, 3) from (x, y, w, h)
    assert np.array_equal(got, _openslide(ref, level, region))
    ref.close()


def test_cmu_matches_openslide(cmu: str) -> None:
    tiff, ref = _level(cmu, 0)
    assert (tiff.width, tiff.height) == (2220, 2967) and (tiff.tile_w, tiff.tile_h) == (240, 240)
    assert tiff.compression == JPEG and tiff.rgb_jpeg  # Aperio: RGB components
    for region in [(100, 200, 300, 250), (0, 0, 240, 240), (1900, 2700, 320, 267)]:
        assert np.array_equal(tiff.read(*region), _openslide(ref, 0, region))
    ref.close()


def test_outside_the_level_is_white(synth_svs: str) -> None:
    tiff, ref = _level(synth_svs, 1)
    w, h = tiff.width, tiff.height
    got = tiff.read(-10, -20, w + 40, h + 30)
    assert (got[:20] == 255).all() and (got[:, :10] == 255).all()
    assert (got[20 + h :] == 255).all() and (got[:, 10 + w :] == 255).all()
    assert np.array_equal(got[20 : 20 + h, 10 : 10 + w], _openslide(ref, 1, (0, 0, w, h)))
    assert (tiff.read(w + 5, 0, 8, 8) == 255).all()
    ref.close()


@pytest.mark.parametrize("which", ["synth", "cmu"])
def test_jpeg_tiles_are_standalone(which: str, synth_svs: str, testdata: Path) -> None:
    """A copied tile decodes on its own to the pixels of the decoded tile."""
    path = synth_svs if which == "synth" else str(testdata / CMU)
    tiff, ref = _level(path, 0)
    ref.close()
    for index in (0, tiff.tiles_across + 1, tiff.tiles_across * tiff.tiles_down - 1):
        jpeg = tiff.jpeg_tile(index)
        assert jpeg[:2] == b"\xff\xd8" and (adobe_rgb_marker() in jpeg) == tiff.rgb_jpeg
        full = imagecodecs.jpeg8_decode(jpeg)
        tile = tiff.tile(index)  # cropped at the level's edge
        assert np.array_equal(full[: tile.shape[0], : tile.shape[1]], tile)


def test_not_a_tiled_level_gives_none(synth_svs: str, testdata: Path, tmp_path: Path) -> None:
    with openslide.OpenSlide(synth_svs) as ref:
        wh = ref.level_dimensions[0]
    assert open_tiff_level(synth_svs, 0, (wh[0] - 1, wh[1])) is None  # not the expected size
    assert open_tiff_level(synth_svs, 2, wh) is None  # no such level
    notes = tmp_path / "notes.svs"
    notes.write_text("hello")
    assert open_tiff_level(str(notes), 0, wh) is None
    assert open_tiff_level(str(tmp_path / "missing.svs"), 0, wh) is None
    kidney = testdata / "generic-tiff/kidney-48-5.tif"  # a TIFF without tiles
    assert open_tiff_level(str(kidney), 0, (1493, 901)) is None


@pytest.mark.parametrize("which", ["synth", "cmu"])
def test_scaled_decode_matches_full_decode_and_reduce(
    which: str, synth_svs: str, testdata: Path
) -> None:
    """A 1/2, 1/4, 1/8 DCT-domain decode is the full decode box-reduced, within a grey level."""
    from wsi_pipeline.util import resize_rgb

    path, wh = (synth_svs, (2600, 2100)) if which == "synth" else (str(testdata / CMU), None)
    tiff, ref = _level(path, 0)
    ref.close()
    assert wh is None or (tiff.width, tiff.height) == wh
    full = tiff.read(0, 0, 960, 960)
    for s in (2, 4, 8):
        assert tiff.can_scale(s)
        got = tiff.read(0, 0, 960 // s, 960 // s, scale=s)
        assert got.shape == (960 // s, 960 // s, 3)
        want = resize_rgb(full, (960 // s, 960 // s))
        assert np.abs(got.astype(int) - want).mean() < 1.0
    # the scaled level ends where the level ends: white beyond it
    edge = tiff.read(tiff.width // 2 - 4, 0, 8, 8, scale=2)
    assert (edge[:, 4:] == 255).all() and tiff.tile(0, 2).shape[:2] == (
        tiff.tile_h // 2,
        tiff.tile_w // 2,
    )
    assert not tiff.can_scale(3)


def _pillow_draft(jpeg: bytes, size: tuple[int, int]) -> np.ndarray:
    """The reference scaled decode: Pillow's ``Image.open`` + ``draft`` (libjpeg's scaling)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        im.draft("RGB", size)
        assert im.size == tuple(size)
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("which", ["synth", "cmu"])
def test_scaled_decode_is_pillows_draft_decode(which: str, synth_svs: str, testdata: Path) -> None:
    """The decode gives exactly the pixels of Pillow's ``Image.open`` + ``draft`` at 1/2, 1/4
    and 1/8, and of imagecodecs' and tifffile's decode at full size (YCbCr tiles with shared
    tables, and Aperio's RGB ones); a truncated or corrupt tile, or one of another size, is an
    OSError, never a partly filled patch."""
    path = synth_svs if which == "synth" else str(testdata / CMU)
    tiff, ref = _level(path, 0)
    ref.close()
    n = len(tiff._offsets)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        for i in (0, n // 2, n - 1):
            jpeg = join_jpeg_tables(tiff.raw_tile(i), tiff._tables, rgb=tiff.rgb_jpeg)
            for s in (1, 2, 4, 8):
                size = (tiff.tile_w // s, tiff.tile_h // s)
                got = decode_jpeg_scaled(jpeg, s, size)
                assert got.shape == (size[1], size[0], 3)
                assert np.array_equal(got, _pillow_draft(jpeg, size))
            full = decode_jpeg_scaled(jpeg, 1, (tiff.tile_w, tiff.tile_h))
            assert np.array_equal(full, imagecodecs.jpeg8_decode(jpeg))
            seg, _, shape = page.decode(tiff.raw_tile(i), i, jpegtables=page.jpegtables)
            seg = np.asarray(seg).reshape(shape[1], shape[2], -1)[..., :3]
            assert np.array_equal(full[: seg.shape[0], : seg.shape[1]], seg)
    for bad in (jpeg[: len(jpeg) // 2], jpeg[:2] + b"\x00" * (len(jpeg) - 2), b""):
        with pytest.raises(OSError, match="JPEG tile does not decode at 1/2 scale"):
            decode_jpeg_scaled(bad, 2, (tiff.tile_w // 2, tiff.tile_h // 2))
    with pytest.raises(OSError, match="another size"):
        decode_jpeg_scaled(jpeg, 2, (tiff.tile_w // 4, tiff.tile_h // 4))
    tiff.close()


def _with_broken_tile_5(synth_svs: str, tmp_path: Path) -> TiffLevel:
    """Level 0 of a copy of the slide whose tile 5 is zeroed after its first two bytes."""
    with tifffile.TiffFile(synth_svs) as tf:
        off, n = int(tf.pages[0].dataoffsets[5]), int(tf.pages[0].databytecounts[5])
    bad = tmp_path / "bad.svs"
    shutil.copy(synth_svs, bad)
    with open(bad, "r+b") as fh:
        fh.seek(off + 2)
        fh.write(b"\x00" * (n - 2))
    tiff = open_tiff_level(str(bad), 0, (2600, 2100))
    assert tiff is not None
    return tiff


def test_scaled_decode_of_a_broken_tile_is_an_error(synth_svs: str, tmp_path: Path) -> None:
    tiff = _with_broken_tile_5(synth_svs, tmp_path)
    with pytest.raises(OSError, match="does not decode at 1/2 scale"):  # the tiler names the region
        tiff.tile(5, 2)
    tiff.close()


def test_truncated_tile_is_an_error(synth_svs: str, tmp_path: Path) -> None:
    with tifffile.TiffFile(synth_svs) as tf:
        offsets = np.asarray(tf.pages[0].dataoffsets)
        counts = np.asarray(tf.pages[0].databytecounts)
    last = int(np.argmax(offsets))
    cut = tmp_path / "cut.svs"
    shutil.copy(synth_svs, cut)
    with open(cut, "r+b") as fh:
        fh.truncate(int(offsets[last] + counts[last] // 2))
    tiff = open_tiff_level(str(cut), 0, (2600, 2100))
    assert tiff is not None and len(tiff.raw_tile(0)) == counts[0]
    with pytest.raises(OSError, match=rf"tile {last}: file ends after \d+ of {counts[last]} bytes"):
        tiff.raw_tile(last)
    tiff.close()


def test_pickled_level_reads_raw_tiles(synth_svs: str) -> None:
    tiff, ref = _level(synth_svs, 0)
    ref.close()
    tiff.tile(0)  # opens the file and fills the cache: neither travels
    back = pickle.loads(pickle.dumps(tiff))
    assert back.jpeg_tile(3) == tiff.jpeg_tile(3) and back.width == tiff.width
    back.close()
    tiff.close()


class _Counting(TiffLevel):
    """The same level, counting the tiles it decodes."""

    decoded: list[tuple[int, int]]

    def _decode_tile(self, index: int, scale: int) -> np.ndarray:
        self.decoded.append((index, scale))
        return super()._decode_tile(index, scale)


@pytest.mark.parametrize("scale", [1, 2])
def test_threads_share_the_tile_cache(synth_svs: str, scale: int) -> None:
    """Threads reading overlapping regions of one level decode each tile once between them
    (no duplicate decode while another thread is decoding it) and get the pixels one thread
    gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    tiff, ref = _level(synth_svs, 0)
    ref.close()
    tiff.__class__ = _Counting
    tiff.decoded = []
    side = 300 // scale  # patches straddling tile borders, half overlapping their neighbours
    boxes = [
        (x, y)
        for y in range(0, 1700 // scale, side // 2)
        for x in range(0, 2300 // scale, side // 2)
    ]

    def read(xy: tuple[int, int]) -> np.ndarray:
        return tiff.read(xy[0], xy[1], side, side, scale=scale)

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(read, boxes))
    assert len(tiff.decoded) == len(set(tiff.decoded)) == len(tiff._cache)
    alone = open_tiff_level(synth_svs, 0, (2600, 2100))
    assert alone is not None
    for (x, y), arr in zip(boxes, got):
        assert np.array_equal(arr, alone.read(x, y, side, side, scale=scale))
    alone.close()
    tiff.close()


def test_a_tile_that_fails_fails_every_thread_waiting_for_it(
    synth_svs: str, tmp_path: Path
) -> None:
    """A thread waiting for a tile another thread failed to decode tries it itself and fails
    too (no hang, no half-filled cache entry)."""
    from concurrent.futures import ThreadPoolExecutor

    tiff = _with_broken_tile_5(synth_svs, tmp_path)

    def decode(_: int) -> str:
        try:
            tiff.tile(5)
        except OSError as exc:
            return str(exc)
        return "decoded"

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(decode, range(8)))
    assert all("does not decode" in r for r in results), results
    assert (5, 1) not in (tiff._cache or {}) and not tiff._pending
    back = pickle.loads(pickle.dumps(tiff))  # the lock and the waits do not travel
    assert np.array_equal(back.tile(6), tiff.tile(6))
    tiff.close()
    back.close()


@pytest.mark.parametrize("scale", [1, 2])
def test_a_view_from_the_band_is_the_region_read(synth_svs: str, scale: int) -> None:
    """:meth:`TiffLevel.read_view` gives the pixels :meth:`TiffLevel.read` gives, whichever
    way a thread moves along a row of patches (right, left, jumping), from row to row and
    between threads (each has its own band); a request not inside the level gives None."""
    from concurrent.futures import ThreadPoolExecutor

    tiff, ref = _level(synth_svs, 0)
    ref.close()
    lw, lh = -(-tiff.width // scale), -(-tiff.height // scale)
    side = 253 // scale  # straddles tile borders, off the tile grid
    rows = [(y, side) for y in range(3, lh - side, 197 // scale)]
    xs = list(range(1, lw - side, side))
    order = xs + xs[::-1] + xs[::3] + xs[::-2]  # right, left, jumping both ways

    def read_rows(_: int) -> int:
        n = 0
        for y, h in rows:
            for x in order:
                view = tiff.read_view(x, y, side, h, scale=scale)
                assert view is not None and view.shape == (h, side, 3)
                assert np.array_equal(view, tiff.read(x, y, side, h, scale=scale)), (x, y)
                n += 1
        return n

    with ThreadPoolExecutor(2) as ex:
        assert sum(ex.map(read_rows, range(2))) == 2 * len(rows) * len(order)
    assert tiff.read_view(-1, 0, 10, 10, scale=scale) is None
    assert tiff.read_view(lw - 5, 0, 10, 10, scale=scale) is None
    assert tiff.read_view(0, lh - 5, 10, 10, scale=scale) is None
    back = pickle.loads(pickle.dumps(tiff))  # the band does not travel
    assert np.array_equal(back.read_view(5, 7, 40, 30), tiff.read(5, 7, 40, 30))
    back.close()
    tiff.close()


def test_a_view_with_a_broken_tile_fails_and_the_band_is_not_left_half_filled(
    synth_svs: str, tmp_path: Path
) -> None:
    """A request that needs a tile that fails to decode raises like :meth:`TiffLevel.read`,
    and the column it was filling is filled again by the next request (not taken as read)."""
    tiff = _with_broken_tile_5(synth_svs, tmp_path)
    tw = tiff.tile_w
    with pytest.raises(OSError, match="does not decode"):
        tiff.read_view(5 * tw - 100, 10, 200, 300)  # columns 4 and 5 of tile rows 0, 1
    good = open_tiff_level(synth_svs, 0, (2600, 2100))
    assert good is not None
    tiff._decode_tile = good._decode_tile  # type: ignore[method-assign]  # mended
    view = tiff.read_view(5 * tw - 100, 10, 200, 300)
    assert view is not None
    assert np.array_equal(view, good.read(5 * tw - 100, 10, 200, 300))
    tiff.close()
    good.close()


def test_tifffile_complaints_are_this_threads_nested_or_not() -> None:
    """What tifffile logs inside ``tifffile_complaints`` is collected in the thread that logs
    it (also with ``logging.logThreads`` off), an inner block's also reaching the outer one;
    quiet blocks keep it from the handlers, and other threads' records pass."""
    import logging
    import threading

    from wsi_pipeline.tiffsrc import tifffile_complaints

    log_ = logging.getLogger("tifffile")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep(logging.WARNING)
    log_.addHandler(keep)
    threads_flag = logging.logThreads
    try:
        logging.logThreads = False
        with tifffile_complaints() as outer:
            log_.warning("outer")
            with tifffile_complaints(quiet=True) as inner:
                log_.warning("inner")
                other = threading.Thread(target=log_.warning, args=("other thread",))
                other.start()
                other.join()
            log_.warning("after")
        log_.warning("outside")
    finally:
        logging.logThreads = threads_flag
        log_.removeHandler(keep)
    assert inner == ["inner"]
    assert outer == ["outer", "inner", "after"]
    assert seen == ["outer", "other thread", "after", "outside"]
