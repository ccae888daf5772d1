"""Low-level access to one pyramid level of a tiled TIFF: raw tile bytes and decoded tiles.

The tiler uses this instead of ``read_region`` wherever it can: each source tile is read once
(``os.pread``, no shared file position), decoded at most once per task, and — when the patch grid
lines up with the file's own JPEG tiles — copied as bytes without decoding at all. JPEG tiles can
also be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg-turbo's TurboJPEG API
through simplejpeg) when the patches are coarser than the level: less work than a full decode.

Files that are not tiled TIFFs, or whose codec the readers treat specially (Aperio JPEG 2000
YCbCr, 33003), get ``None`` from :func:`open_tiff_level` and are read through the slide reader.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codecs import join_jpeg_tables

__all__ = [
    "DCT_SCALES",
    "JPEG",
    "TiffLevel",
    "decode_jpeg_scaled",
    "open_tiff_level",
    "tifffile_complaints",
]

log = logging.getLogger(__name__)

#: TIFF compression code of JPEG tiles (the ones a tiler may copy as bytes).
JPEG = 7
# codecs tifffile decodes to the same pixels as the slide readers
_DECODABLE = {1, 5, 7, 8, 32946, 33005, 34712, 50000, 50001}
#: The scales libjpeg decodes at in the DCT domain (1/2, 1/4, 1/8), largest first.
DCT_SCALES = (8, 4, 2)
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6


class _ThreadComplaints(logging.Filter):
    """The filter on tifffile's logger: collects the warnings of the threads inside
    :func:`tifffile_complaints` (each its own) and holds back those of its quiet ones."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: dict[int, tuple[list[str], bool]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # a logger's filters run in the thread that logs (record.thread is None when
        # logging.logThreads is off)
        mine = self.threads.get(threading.get_ident())
        if mine is None:
            return True
        if record.levelno >= logging.WARNING:
            mine[0].append(record.getMessage())
        return not mine[1]


_COMPLAINTS = _ThreadComplaints()
logging.getLogger("tifffile").addFilter(_COMPLAINTS)


@contextlib.contextmanager
def tifffile_complaints(*, quiet: bool = False) -> Iterator[list[str]]:
    """The warnings tifffile logs in this thread inside the block (it logs, rather than
    raises, on a broken IFD chain); with ``quiet``, kept from the logging handlers too.

    tifffile's logger is the process's: a file another thread opens at the same time neither
    lends this thread its complaints nor loses its own (a good slide was failed as truncated
    when a truncated one was opened beside it).
    """
    key = threading.get_ident()
    messages: list[str] = []
    outer = _COMPLAINTS.threads.get(key)  # a block inside another one of this thread
    _COMPLAINTS.threads[key] = (messages, quiet)
    try:
        yield messages
    finally:
        if outer is None:
            del _COMPLAINTS.threads[key]
        else:
            _COMPLAINTS.threads[key] = outer
            outer[0].extend(messages)


@dataclass
class TiffLevel:
    """One tiled level of a TIFF file.

    Attributes
    ----------
    path : str
    width, height : int
        Level size in pixels.
    tile_w, tile_h : int
        The file's tile size.
    compression : int
        TIFF compression code (7 = JPEG).
    rgb_jpeg : bool
        JPEG tiles whose components are RGB (photometric RGB, e.g. Aperio): copies need an Adobe
        marker to decode right.
    """

    path: str
    width: int
    height: int
    tile_w: int
    tile_h: int
    compression: int
    rgb_jpeg: bool
    _offsets: np.ndarray = field(repr=False)
    _counts: np.ndarray = field(repr=False)
    _tables: bytes | None = field(repr=False)
    _decode: Any = field(repr=False)
    _fd: int = field(default=-1, repr=False)
    _cache: OrderedDict[tuple[int, int], np.ndarray] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _pending: dict[tuple[int, int], threading.Lock] = field(
        default_factory=dict, repr=False, compare=False
    )
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)
    cache_tiles: int = 256

    @property
    def tiles_across(self) -> int:
        return math.ceil(self.width / self.tile_w)

    @property
    def tiles_down(self) -> int:
        return math.ceil(self.height / self.tile_h)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def raw_tile(self, index: int) -> bytes:
        """The tile's bytes as stored in the file."""
        if self._fd < 0:
            with self._lock:
                if self._fd < 0:
                    self._fd = os.open(self.path, os.O_RDONLY)
        off, n = int(self._offsets[index]), int(self._counts[index])
        if n == 0:
            return b""
        data = os.pread(self._fd, n, off)
        if len(data) != n:
            raise OSError(f"tile {index}: file ends after {len(data)} of {n} bytes (truncated)")
        return data

    def jpeg_tile(self, index: int) -> bytes:
        """A JPEG tile as a standalone JPEG file (tables joined, RGB marked)."""
        return join_jpeg_tables(self.raw_tile(index), self._tables, rgb=self.rgb_jpeg)

    def can_scale(self, scale: int) -> bool:
        """Whether tiles can be decoded at ``1/scale`` in the DCT domain (JPEG tiles whose
        sides ``scale`` divides)."""
        return (
            scale in DCT_SCALES
            and self.compression == JPEG
            and self.tile_w % scale == 0
            and self.tile_h % scale == 0
        )

    def tile(self, index: int, scale: int = 1) -> np.ndarray:
        """Decoded tile ``(h, w, 3)`` uint8 (cached, LRU of :attr:`cache_tiles` tiles, shared
        by the threads that read this level).

        ``scale`` > 1 decodes a JPEG tile at ``1/scale`` in the DCT domain
        (:meth:`can_scale`): ``(tile_h / scale, tile_w / scale)`` pixels, each about the mean of
        the ``scale x scale`` pixels it stands for. JPEG tiles decode through
        :func:`decode_jpeg_scaled` at every scale (full JPEG tiles, not cropped at the level's
        edge), the others through tifffile.
        """
        key = (index, scale)
        while True:
            with self._lock:  # threads share the cache; a tile is decoded by one of them
                if self._cache is None:
                    self._cache = OrderedDict()
                arr = self._cache.get(key)
                if arr is not None:
                    self._cache.move_to_end(key)
                    return arr
                busy = self._pending.get(key)
                if busy is None:  # held while this thread decodes it (a Lock: cheaper than Event)
                    done = self._pending[key] = threading.Lock()
                    done.acquire()
                    break
            with busy:  # another thread is decoding it; if that failed, decode it here
                pass
        try:
            arr = self._decode_tile(index, scale)
        except BaseException:
            with self._lock:
                del self._pending[key]
            done.release()
            raise
        with self._lock:
            self._cache[key] = arr
            while len(self._cache) > self.cache_tiles:
                self._cache.popitem(last=False)
            del self._pending[key]
        done.release()
        return arr

    def _decode_tile(self, index: int, scale: int) -> np.ndarray:
        if scale > 1 and not self.can_scale(scale):
            raise ValueError(f"tiles of {self.path} cannot be decoded at 1/{scale} scale")
        data = self.raw_tile(index)
        if not data:
            raise OSError(f"tile {index} has no data")
        if self.compression == JPEG:
            jpeg = join_jpeg_tables(data, self._tables, rgb=self.rgb_jpeg)
            return decode_jpeg_scaled(jpeg, scale, (self.tile_w // scale, self.tile_h // scale))
        arr, _, shape = self._decode(data, index, jpegtables=self._tables)
        return np.asarray(arr).reshape(shape[1], shape[2], -1)[..., :3]

    def read(
        self, x: int, y: int, w: int, h: int, scale: int = 1, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Region at this level, ``(h, w, 3)`` uint8, white outside the level.

        With ``scale`` > 1 the coordinates and sizes are those of the level shrunk ``scale``
        times, and the tiles are decoded at that scale (:meth:`tile`). ``out``, if given, is
        the ``(h, w, 3)`` uint8 array (or view) it is written into and returned.
        """
        lw, lh = -(-self.width // scale), -(-self.height // scale)
        whole = self._inside_jpeg(x, y, w, h, scale)
        if out is None:
            out = np.empty((h, w, 3), np.uint8) if whole else np.full((h, w, 3), 255, np.uint8)
        elif not whole:
            out[...] = 255
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        tw, th = self.tile_w // scale, self.tile_h // scale
        across = self.tiles_across
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            ty0 = ty * th
            ay0 = max(y0, ty0)
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                t = self.tile(ty * across + tx, scale)
                # overlap of tile and request, in level coordinates
                tx0 = tx * tw
                ax0 = max(x0, tx0)
                ax1, ay1 = min(x1, tx0 + t.shape[1]), min(y1, ty0 + t.shape[0])
                if ax1 > ax0 and ay1 > ay0:
                    out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = t[
                        ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0
                    ]
        return out

    def _inside_jpeg(self, x: int, y: int, w: int, h: int, scale: int) -> bool:
        """Whether a request lies inside a JPEG level: its decoded tiles (whole, through
        :func:`decode_jpeg_scaled`) then cover it, with no white padding."""
        lw, lh = -(-self.width // scale), -(-self.height // scale)
        return self.compression == JPEG and x >= 0 and y >= 0 and x + w <= lw and y + h <= lh

    def read_view(self, x: int, y: int, w: int, h: int, scale: int = 1) -> np.ndarray | None:
        """Region at this level like :meth:`read`, as a view into this thread's band of
        decoded pixels (valid until this thread's next call), or None when the request is not
        inside a JPEG level (:meth:`read` then pads it with white).

        The band holds rows ``y .. y + h`` of up to :data:`BAND_TILES` tile columns around the
        request (a row of patches shares its rows), each column copied in once from its decoded
        tiles. Every copy hands the interpreter to the other threads and back: a patch from a
        2 x 2 block of tiles was four copies, and a tenth of two threads' time; here it is
        about two, one per tile row of the column it brings in.
        """
        if not self._inside_jpeg(x, y, w, h, scale):
            return None
        tw, th = self.tile_w // scale, self.tile_h // scale
        tx0, tx1 = x // tw, (x + w - 1) // tw
        band = self._local.__dict__.get("band")
        key = (scale, y, h)
        if band is None or band.key != key or tx0 < band.tx or tx1 >= band.tx + band.cols:
            cols = max(min(BAND_TILES, BAND_BYTES // (h * tw * 3)), tx1 - tx0 + 1)
            if band is not None and band.key == key and tx0 >= band.tx:
                start = tx0  # moving right along the row
            elif band is not None and band.key == key:
                start = tx1 - cols + 1  # moving left
            else:
                start = tx0 - (cols - (tx1 - tx0 + 1)) // 2
            start = max(0, min(start, self.tiles_across - cols))
            band = self._local.band = _Band.make(band, key, start, cols, h, tw)
        ty0, ty1 = y // th, (y + h - 1) // th
        across = self.tiles_across
        for tx in range(tx0, tx1 + 1):
            if tx in band.have:
                continue
            c = (tx - band.tx) * tw
            for ty in range(ty0, ty1 + 1):
                r0, r1 = max(y, ty * th), min(y + h, (ty + 1) * th)
                tile = self.tile(ty * across + tx, scale)
                band.pixels[r0 - y : r1 - y, c : c + tw] = tile[r0 - ty * th : r1 - ty * th]
            band.have.add(tx)
        ox = x - band.tx * tw
        return band.pixels[:, ox : ox + w]

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_fd"] = -1
        d["_cache"] = None
        del d["_lock"], d["_pending"], d["_local"]
        d["_decode"] = None
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()
        self._pending = {}
        self._local = threading.local()


#: Tile columns a thread's band of decoded pixels spans (:meth:`TiffLevel.read_view`), at
#: most :data:`BAND_BYTES` of them (and at least a request's): 3 MB for 256-px patches of
#: 256-px tiles.
BAND_TILES = 16
BAND_BYTES = 16 * 2**20


@dataclass
class _Band:
    """A thread's band of decoded pixels (:meth:`TiffLevel.read_view`): rows ``y .. y + h``
    (``key``: scale, y, h) of tile columns ``tx .. tx + cols - 1``; ``have``: the columns
    copied in."""

    key: tuple[int, int, int]
    tx: int
    cols: int
    pixels: np.ndarray
    have: set[int]

    @classmethod
    def make(
        cls, old: _Band | None, key: tuple[int, int, int], tx: int, cols: int, h: int, tw: int
    ) -> _Band:
        """An empty band, reusing ``old``'s pixels when they are as large."""
        shape = (h, cols * tw, 3)
        same = old is not None and old.pixels.shape == shape
        pixels = old.pixels if old is not None and same else np.empty(shape, np.uint8)
        return cls(key, tx, cols, pixels, set())


def decode_jpeg_scaled(jpeg: bytes, scale: int, size: tuple[int, int]) -> np.ndarray:
    """Decode a whole JPEG at ``1/scale`` in the DCT domain: ``(h, w, 3)`` uint8 RGB.

    libjpeg-turbo through simplejpeg (TurboJPEG, the GIL released while it decodes): at
    ``scale=1`` the same pixels as imagecodecs' and tifffile's decode at the same speed, at 1/2,
    1/4 and 1/8 the pixels of Pillow's ``draft`` decode, in ~0.8, 0.74 and 0.67 of a full
    decode's time (``benchmarks/bench_tiling.py`` prints the costs).

    Parameters
    ----------
    jpeg : bytes
        A complete JPEG (tables included).
    scale : {1, 2, 4, 8}
    size : (int, int)
        ``(w, h)`` it decodes to at that scale.

    Raises
    ------
    OSError
        The JPEG is truncated, corrupt, or decodes to another size.
    """
    import simplejpeg

    w, h = size
    try:
        full_h, full_w = simplejpeg.decode_jpeg_header(jpeg)[:2]
        if (full_w, full_h) != (w * scale, h * scale):
            raise ValueError(f"{full_w} x {full_h} px, not {w} x {h} at 1/{scale} (another size)")
        arr = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_width=w, min_height=h)
    except ValueError as exc:
        raise OSError(
            f"JPEG tile does not decode at 1/{scale} scale to {w} x {h} px "
            f"({' '.join(str(exc).split())}; truncated, corrupt or another size)"
        ) from exc
    if arr.shape[:2] != (h, w):  # pragma: no cover - libjpeg-turbo scales by 1/2, 1/4, 1/8
        raise OSError(f"JPEG tile decoded to {arr.shape[1]} x {arr.shape[0]} px, not {w} x {h}")
    return arr


def open_tiff_level(path: str, level: int, expected_wh: tuple[int, int]) -> TiffLevel | None:
    """The ``level``-th level of the file's main series, if it is a tiled TIFF level of size
    ``expected_wh`` with a codec we decode exactly like the slide readers; else ``None``."""
    try:
        import tifffile

        with open(path, "rb") as fh:
            if fh.read(2) not in (b"II", b"MM"):
                return None
        with tifffile_complaints(quiet=True), tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            if level >= len(series.levels):
                return None
            page = series.levels[level].keyframe
            if not page.is_tiled or page.planarconfig != 1:
                return None
            if (int(page.imagewidth), int(page.imagelength)) != tuple(expected_wh):
                return None
            if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4):
                return None
            if int(page.imagedepth) != 1 or int(page.compression) not in _DECODABLE:
                return None
            # load lazily-read attributes before any file access of ours (NOTES.md)
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
            tables = page.jpegtables
            decode = page.decode
            comp = int(page.compression)
            photometric = int(page.photometric)
            tile_w, tile_h = int(page.tilewidth), int(page.tilelength)
            width, height = int(page.imagewidth), int(page.imagelength)
    except Exception as exc:  # not a TIFF we can take apart: the slide reader will do
        log.debug("%s: no direct TIFF access (%s)", path, exc)
        return None
    if comp == JPEG and photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        return None
    return TiffLevel(
        path=path,
        width=width,
        height=height,
        tile_w=tile_w,
        tile_h=tile_h,
        compression=comp,
        rgb_jpeg=comp == JPEG and photometric == _PHOTOMETRIC_RGB,
        _offsets=offsets,
        _counts=counts,
        _tables=bytes(tables) if tables else None,
        _decode=decode,
    )
