"""Tile grid from the tissue mask and slide geometry; extraction into per-slide zarr stores.

One slide goes through three steps, each a plain function so any scheduler can run it:

1. :func:`prepare_slide` — open the slide, thumbnail, tissue mask, grid; create the store (or find
   the unfinished one to resume). Returns a small picklable :class:`SlidePlan`.
2. :func:`extract_shard` — for one shard (``patches_per_shard`` patches): read each source
   region once, resample once (or copy the file's own JPEG tile untouched when the grid lines up),
   encode, and write the shard file atomically. Shards are independent, so a large slide is split
   over workers.
3. :func:`finalize_slide` — record the status and write ``complete: true`` last.

Running them, one slide under its store's lock or a batch with dask and ``manifest.csv``, is
:mod:`wsi_pipeline.tile_batch` (:func:`~wsi_pipeline.tile_batch.tile_slide`,
:func:`~wsi_pipeline.tile_batch.tile_slides`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .codecs import encode_chunk, shard_bytes
from .errors import SlideError, TilingError
from .slide import Slide, mpp_at, open_slide, slide_id_from_path
from .specs import SlideMeta, TilingSpec
from .store import (
    DONE,
    FRESH,
    RESUME,
    STALE,
    create_store,
    finish_store,
    grid_arrays,
    mask_arrays,
    patch_count,
    read_coords,
    store_path,
    store_state,
    tiling_attrs,
    unfinished_shards,
    write_shard,
)
from .tiffsrc import DCT_SCALES, JPEG, TiffLevel, open_tiff_level
from .tissue import load_user_mask, rect_fractions, tissue_mask
from .util import resize_rgb

if TYPE_CHECKING:
    from concurrent.futures import Executor

__all__ = [
    "MAX_PX_PER_BYTE",
    "RESOLUTION_SLACK",
    "Geometry",
    "MeetingRange",
    "SlidePlan",
    "TileResult",
    "check_claimed_size",
    "decode_scale",
    "extract_shard",
    "finalize_slide",
    "mask_slide",
    "meeting_ranges",
    "prepare_slide",
    "release_sources",
    "resample_filter",
    "shard_part",
    "tile_grid",
    "tiling_geometry",
    "write_shard_parts",
]

log = logging.getLogger(__name__)

_MIN_MASK_PX_PER_PATCH = 8  # the mask resolves each patch side into at least this many pixels

#: A pyramid level (or a DCT-domain scale ``1/s`` of it) counts as the patches' resolution when
#: it is at most 2 % coarser (``level downsample * RESOLUTION_SLACK <= patch downsample``); its
#: pixels are then enlarged by up to 2 % in the one resample. Real 40x scans are 0.2520-0.2527
#: µm/px, so their 10x level is 1.005-1.011 µm/px and 0.5 µm/px is 1.98x level 0: tiled at 1.0
#: or 0.5 µm/px they are read from that level or decoded at 1/2 (as the magnification-based
#: tilers read them), not decoded in full from a level four times finer.
RESOLUTION_SLACK = 0.98
#: Most level-0 pixels per byte a TIFF-based slide file may claim. Real slides, even sparse or
#: mostly blank ones, stay below ~100 (JPEG tiles of plain background); a header claiming more
#: is corrupt or forged, and reading its thumbnail would decode billions of missing pixels.
MAX_PX_PER_BYTE = 5000
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class Geometry:
    """Where target pixels come from.

    Attributes
    ----------
    downsample : float
        Level-0 pixels per target pixel.
    target_mpp : float or None
        Target µm per pixel (None when the slide has no mpp and a level was asked for).
    read_level : int
        Pyramid level the pixels are read from (the best one at or above the resolution).
    level_downsample : float
        That level's downsample.
    patch_l0 : float
        Patch side in level-0 pixels.
    stride_l0 : float
        Grid step in level-0 pixels.
    """

    downsample: float
    target_mpp: float | None
    read_level: int
    level_downsample: float
    patch_l0: float
    stride_l0: float

    @functools.cached_property  # asked for every patch
    def read_px(self) -> int:
        """Patch side in pixels at the read level (before the one resample)."""
        return max(1, round(self.patch_l0 / self.level_downsample))

    @functools.cached_property
    def resampled(self) -> bool:
        return abs(self.downsample / self.level_downsample - 1.0) > 1e-3


@dataclass(frozen=True)
class TileResult:
    """One manifest row.

    ``locked`` marks a slide skipped because another run held its store's lock: that run writes
    the slide's manifest row, so this one is added only where the manifest has none.
    """

    slide_id: str
    path: str
    status: str  # ok | skipped | no_tissue | failed
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    locked: bool = False

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def row(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "path": self.path,
            "status": self.status,
            "n_patches": self.n_patches,
            "seconds": f"{self.seconds:.2f}",
            "error": self.error,
        }


@dataclass(frozen=True)
class SlidePlan:
    """What the shard tasks of one slide need (small and picklable; ``coords`` are dropped
    before it travels to another process)."""

    slide_id: str
    path: str
    store: str
    spec: TilingSpec
    geometry: Geometry
    level_wh: tuple[int, int]
    n_patches: int
    todo: tuple[int, ...]
    slide_mpp: float | None = None
    backend: str = "auto"
    started: float = field(default_factory=time.time)
    #: Every patch is a source tile copied as it is (no decode): shards are I/O and
    #: interpreter work, which threads of one process only contend for.
    copies: bool = False
    #: The patches' level-0 ``(x, y)`` (the store's ``coords``), kept in memory so that its
    #: shard tasks in this process do not read them back from the store (2 ms a read, each
    #: interpreter work); None: read from the store.
    coords: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_patches / self.spec.patches_per_shard)


# --------------------------------------------------------------------------------------------
# geometry and grid
# --------------------------------------------------------------------------------------------
def tiling_geometry(slide: Slide, spec: TilingSpec) -> Geometry:
    """Resolve the spec's target resolution against one slide.

    Parameters
    ----------
    slide : Slide
    spec : TilingSpec
        Its ``mpp``, else its ``level`` (the spec guarantees one of them).

    Returns
    -------
    Geometry

    Raises
    ------
    TilingError
        ``mpp`` asked for on a slide without mpp metadata, or a level the slide lacks.
    """
    m = slide.meta
    if spec.mpp is not None:
        if m.mpp is None:
            raise TilingError(
                f"--mpp {spec.mpp:g} asked for, but the slide has no resolution (mpp) "
                "metadata; give the slide's own mpp with --slide-mpp, or tile at a --level",
                path=m.path,
            )
        ds = slide.downsample_for_mpp(spec.mpp)
        if ds < 1.0 - 1e-3:
            log.warning(
                "%s: target %.3g mpp is finer than the scan (%.3g mpp); patches are upsampled",
                m.path,
                spec.mpp,
                m.mpp,
            )
        target_mpp: float | None = float(spec.mpp)
    else:
        assert spec.level is not None  # TilingSpec: without an mpp there is a level
        level = int(spec.level)
        if level >= m.level_count:
            raise TilingError(
                f"level {level} asked for, but the slide has levels 0..{m.level_count - 1}",
                path=m.path,
            )
        ds = m.level_downsamples[level]
        target_mpp = mpp_at(m, ds)
    read_level = slide.best_level(ds, slack=RESOLUTION_SLACK)
    return Geometry(
        downsample=float(ds),
        target_mpp=target_mpp,
        read_level=read_level,
        level_downsample=float(m.level_downsamples[read_level]),
        patch_l0=spec.tile_px * ds,
        stride_l0=spec.stride_px * ds,
    )


def tile_grid(
    meta: SlideMeta,
    geometry: Geometry,
    spec: TilingSpec,
    mask: np.ndarray,
    mask_downsample: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Patch positions kept by the tissue threshold.

    The grid starts at the slide's origin (so at native resolution it lines up with the file's
    own tiles) and steps by the stride. With ``edge="drop"`` only patches entirely inside the
    slide are candidates; with ``edge="pad"`` the grid goes on until it covers the whole slide
    (the last row/column reaches past the edge, read as white).

    Parameters
    ----------
    meta : SlideMeta
    geometry : Geometry
    spec : TilingSpec
    mask : (h, w) bool ndarray
        Tissue mask.
    mask_downsample : float
        Level-0 pixels per mask pixel.

    Returns
    -------
    coords_xy : (N, 2) int64 ndarray
        Level-0 top-left corners, row-major order (by y, then x).
    tissue_fraction : (N,) float32 ndarray
        Fraction of each patch on tissue (>= ``spec.min_tissue`` and > 0).
    """
    p, s = geometry.patch_l0, geometry.stride_l0
    if spec.edge == "drop":
        nx = max(0, math.floor((meta.width - p) / s + 1e-9) + 1) if meta.width >= p - 1e-6 else 0
        ny = max(0, math.floor((meta.height - p) / s + 1e-9) + 1) if meta.height >= p - 1e-6 else 0
    else:  # the fewest steps whose patches cover the slide
        nx = max(1, math.ceil((meta.width - p) / s - 1e-9) + 1)
        ny = max(1, math.ceil((meta.height - p) / s - 1e-9) + 1)
    if nx == 0 or ny == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    xs = np.round(np.arange(nx) * s).astype(np.int64)
    ys = np.round(np.arange(ny) * s).astype(np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    side = np.full(len(coords), p)
    rects = np.stack([coords[:, 0], coords[:, 1], side, side], axis=1)
    frac = rect_fractions(mask, rects, downsample=mask_downsample)
    keep = (frac >= spec.min_tissue) & (frac > 0)
    return coords[keep], frac[keep]


def _mask_downsample(slide: Slide, spec: TilingSpec, geometry: Geometry) -> float:
    """Level-0 px per thumbnail pixel: the mask spec's ``thumb_mpp`` (without a slide mpp, a
    longest side of at most ``min(thumb_max_px, 2048)``), fine enough to resolve each patch side
    into 8 mask pixels, but never a thumbnail longer than ``thumb_max_px``; at least 1.

    Within :data:`THUMB_SNAP` of it, a whole number of pixels of a pyramid level is taken instead
    (:func:`_snap_to_level`): the thumbnail is then that level's exact box average, without a
    fractional resample (5 against 19 ms from a 2,500 x 1,875 level; a 0.2527 µm/px scan's
    8 µm/px is 31.66 level-0 px, 1.98 px of its 16x level: it becomes 2, 8.09 µm/px)."""
    m = slide.meta
    max_px = spec.mask.thumb_max_px if m.mpp is not None else min(spec.mask.thumb_max_px, 2048)
    ds = slide.thumbnail_downsample(max_px=max_px, mpp=spec.mask.thumb_mpp)
    ds = min(ds, geometry.patch_l0 / _MIN_MASK_PX_PER_PATCH)
    lo = max(max(m.width, m.height) / spec.mask.thumb_max_px, 1.0)
    ds = max(ds, lo)
    return _snap_to_level(slide, ds, lo, max(ds, geometry.patch_l0 / _MIN_MASK_PX_PER_PATCH))


#: How far (relative) the thumbnail's downsample may move to a whole number of level pixels.
THUMB_SNAP = 0.05


def _snap_to_level(slide: Slide, ds: float, lo: float, hi: float) -> float:
    """The downsample within :data:`THUMB_SNAP` of ``ds`` (and within ``[lo, hi]``) that is a
    whole number of pixels of the level it is read from (``best_level``), from the coarsest
    such level; ``ds`` itself when there is none."""
    for level, d in reversed(list(enumerate(slide.meta.level_downsamples))):
        n = max(1, round(ds / d))
        snapped = n * d
        if (
            abs(snapped / ds - 1.0) <= THUMB_SNAP
            and lo <= snapped <= hi
            and slide.best_level(snapped) == level
        ):
            return snapped
    return ds


def _thumbnail_source(slide: Slide, downsample: float) -> TiffLevel | None:
    """The thumbnail's source level straight from the file, when it is a tiled TIFF level
    whose codec tifffile decodes to the reader's pixels (:func:`open_tiff_level`), else None.

    Its tiles (JPEG through libjpeg-turbo, Aperio's JPEG 2000 through OpenJPEG, lossless
    codecs) decode to the same pixels as openslide and tiffslide (NOTES.md;
    ``tests/test_slide.py``), without ``read_region``'s RGBA compositing, which costs several
    times the decode (~20 ms of a 1,000 x 750 JPEG level; 0.21 against 0.14 s for the JPEG
    2000 level of the TCGA test slide). It keeps two rows of decoded tiles (a strip's last row
    is the next strip's first; two threads reading it may each be a row ahead of the other).
    """
    level = slide.best_level(downsample)
    tiff = open_tiff_level(slide.path, level, slide.meta.level_dimensions[level])
    if tiff is not None:
        tiff.cache_tiles = 2 * tiff.tiles_across
    return tiff


def mask_slide(
    slide: Slide, spec: TilingSpec, geometry: Geometry, pool: Executor | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """The thumbnail and tissue mask a slide is tiled with.

    Parameters
    ----------
    slide : Slide
    spec : TilingSpec
        Its ``mask`` says how (computed, or the user's mask file).
    geometry : Geometry
        The tiling's geometry on this slide: the thumbnail resolves each patch side into at
        least 8 mask pixels.
    pool : Executor, optional
        Idle threads that decode half of the thumbnail's tiles beside this one
        (:meth:`Slide.read_thumbnail`).

    Returns
    -------
    thumbnail : (h, w, 3) uint8 ndarray
    mask : (h, w) bool ndarray
    downsample : float
        Level-0 pixels per thumbnail (and mask) pixel.
    """
    mask_ds = _mask_downsample(slide, spec, geometry)
    source = _thumbnail_source(slide, mask_ds)
    try:
        thumb = slide.read_thumbnail(mask_ds, source=source, pool=pool)
    finally:
        if source is not None:
            source.close()
    if spec.mask.method == "user" and spec.mask.user_mask is not None:
        mask = load_user_mask(spec.mask.user_mask, shape=thumb.shape[:2], downsample=mask_ds)
    else:
        mask = tissue_mask(thumb, mpp=mpp_at(slide.meta, mask_ds), spec=spec.mask)
    return thumb, mask, mask_ds


# --------------------------------------------------------------------------------------------
# the three steps of one slide
# --------------------------------------------------------------------------------------------
def prepare_slide(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    spec: TilingSpec,
    slide_id: str | None = None,
    slide_mpp: float | None = None,
    overwrite: bool = False,
    backend: str = "auto",
    pool: Executor | None = None,
    on_plan: Callable[[SlidePlan], None] | None = None,
) -> SlidePlan | TileResult:
    """Open, mask and grid one slide and create (or resume) its store.

    What is done with an existing store is decided by :func:`wsi_pipeline.store.store_state`.
    ``pool``: idle threads that decode half of the thumbnail beside this one (:func:`mask_slide`).
    ``on_plan``: called with the plan of a new store's patches (with ``coords``) before the store
    is created, so that other threads may start extracting them (:func:`shard_part`, which does
    not read the store) while this one writes it; nothing may be written into the store before
    this function returns.

    Returns
    -------
    SlidePlan
        When patches remain to be written (``plan.todo`` lists the shards).
    TileResult
        When nothing remains: an already complete store (``skipped``), or a slide with no
        tissue (``no_tissue``, a complete store with N = 0).

    Raises
    ------
    WSIPipelineError
        For a bad slide or parameters; the caller records it and goes on.
    """
    t0 = time.time()
    sid = slide_id or slide_id_from_path(path)
    store = store_path(out_dir, sid)
    state = FRESH
    if not overwrite:
        state = store_state(store, spec, file_size=_file_size(path), slide_mpp=slide_mpp)
    if state == DONE:
        n = patch_count(store)
        return TileResult(sid, str(Path(path).absolute()), "skipped", n, time.time() - t0)
    if state == STALE:
        log.warning(
            "%s: the slide file or the tiling parameters changed since %s was written; "
            "tiling again",
            path,
            store,
        )
    # no pixel check at open (7 ms a slide, a quarter of a small slide's fixed cost): the
    # thumbnail read decodes its level before anything is written, and every patch read or
    # copied tile is checked (a tile that fails names the slide and the region, one line)
    with open_slide(path, mpp=slide_mpp, backend=backend, check_pixels=False) as slide:
        meta = slide.meta
        check_claimed_size(meta)
        geometry = tiling_geometry(slide, spec)
        plan = SlidePlan(
            slide_id=sid,
            path=meta.path,
            store=str(store),
            spec=spec,
            geometry=geometry,
            level_wh=meta.level_dimensions[geometry.read_level],
            n_patches=0,
            todo=(),
            slide_mpp=slide_mpp,
            backend=meta.backend,
            started=t0,
        )
        if state == RESUME:
            level = geometry.read_level
            size = _file_size(path)
            now = store_state(store, spec, file_size=size, slide_mpp=slide_mpp, read_level=level)
            if now == RESUME:
                return _resume_plan(plan)
            log.warning("%s: unfinished %s was read from another level; tiling again", path, store)
        thumb, mask, mask_ds = mask_slide(slide, spec, geometry, pool)
        coords, frac = tile_grid(meta, geometry, spec, mask, mask_ds)
    plan = dataclasses.replace(plan, n_patches=len(coords), copies=_copies(plan), coords=coords)
    plan = dataclasses.replace(plan, todo=tuple(range(plan.n_shards)))
    if on_plan is not None and plan.n_patches:
        on_plan(plan)
    tiling = _tiling_attrs(plan)
    arrays = mask_arrays(thumb, mask, downsample=mask_ds, spec=spec.mask)
    create_store(
        store,
        slide_id=sid,
        meta=meta,
        tiling=tiling,
        arrays=[*arrays, *grid_arrays(coords, frac, spec, tiling)],
    )
    if len(coords) == 0:
        return finalize_slide(plan)
    return plan


def check_claimed_size(meta: SlideMeta) -> None:
    """Refuse a TIFF-based slide whose header claims more pixels than its file can hold.

    Checked from the metadata alone, before any pixel is read or allocated: a 1 MB file that
    claims 100,000 x 100,000 px (10,000 px per byte; real slides stay below ~100) is corrupt
    or forged, and its thumbnail would take hours to decode. Formats whose pixels live in other
    files (MRXS, DICOM, VMS) are not TIFF files and are not checked.

    Raises
    ------
    SlideError
        More than :data:`MAX_PX_PER_BYTE` level-0 pixels per byte of file.
    """
    try:
        with open(meta.path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return
    size = meta.file_size or 0
    if head not in _TIFF_MAGIC or size <= 0:
        return
    px = meta.width * meta.height
    if px > MAX_PX_PER_BYTE * size:
        raise SlideError(
            f"claims {meta.width} x {meta.height} px in a file of {size:,} bytes "
            f"({px / size:,.0f} px per byte, at most {MAX_PX_PER_BYTE:,} in a real slide); "
            "corrupt or forged header, not tiled",
            path=meta.path,
        )


def _tiling_attrs(plan: SlidePlan) -> dict[str, Any]:
    geo = plan.geometry
    return tiling_attrs(
        plan.spec,
        mpp=geo.target_mpp,
        downsample=geo.downsample,
        read_level=geo.read_level,
        patch_l0=geo.patch_l0,
        stride_l0=geo.stride_l0,
        slide_mpp=plan.slide_mpp,
    )


def _resume_plan(plan: SlidePlan) -> SlidePlan:
    """The plan of an unfinished store: its patch count, and the shards still to write."""
    coords = read_coords(plan.store)
    n = len(coords)
    todo = unfinished_shards(plan.store, n, plan.spec.patches_per_shard)
    plan = dataclasses.replace(plan, n_patches=n, todo=todo, copies=_copies(plan), coords=coords)
    log.info(
        "%s: resuming unfinished store (%d of %d shards left)",
        plan.slide_id,
        len(todo),
        plan.n_shards,
    )
    return plan


def _file_size(path: str | os.PathLike) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


#: Most bytes of decoded tiles a slide's source level keeps for reuse (:func:`_cache_tiles`).
TILE_CACHE_BYTES = 192 * 2**20


class _Sources:
    """Per-process cache of open slide sources, so a worker opens each slide once.

    A slide's TIFF level is shared by the threads of the process, with its cache of decoded
    tiles (neighbouring shards, extracted side by side, need the same tiles); a slide reader,
    where the TIFF cannot be read directly, is opened once per thread. The ``size`` most recently
    used of each are kept; an evicted TIFF level closes its file when no thread uses it any more.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.tiffs: OrderedDict[tuple, TiffLevel | None] = OrderedDict()
        self.local = threading.local()

    def level(self, plan: SlidePlan, key: tuple | None = None) -> TiffLevel | None:
        """The slide's read level straight from the file (shared by the threads), or None
        when it cannot be read directly (:func:`open_tiff_level`); ``key``: its
        :func:`_source_key`, when the caller has it."""
        key = key or _source_key(plan)
        with self.lock:
            if key in self.tiffs:
                self.tiffs.move_to_end(key)
                tiff = self.tiffs[key]
            else:
                tiff = open_tiff_level(plan.path, plan.geometry.read_level, plan.level_wh)
                if tiff is not None:
                    tiff.cache_tiles = _cache_tiles(tiff, plan)
                self.tiffs[key] = tiff
                while len(self.tiffs) > self.size:
                    self.tiffs.popitem(last=False)
        return tiff

    def get(self, plan: SlidePlan) -> tuple[TiffLevel | None, Slide | None]:
        """The read level straight from the file, else this thread's open slide reader."""
        key = _source_key(plan)
        tiff = self.level(plan, key)
        if tiff is not None:
            return tiff, None
        slides = getattr(self.local, "slides", None)
        if slides is None:
            slides = self.local.slides = OrderedDict()
        slide = slides.get(key)
        if slide is None:
            slide = slides[key] = open_slide(
                plan.path, mpp=plan.slide_mpp, backend=plan.backend, check_pixels=False
            )
            while len(slides) > self.size:
                slides.popitem(last=False)[1].close()
        slides.move_to_end(key)
        return None, slide

    def forget(self, path: str | None = None) -> None:
        """Let go of the TIFF levels of the slide at ``path`` (every slide: None), with their
        decoded tiles; a thread still reading one keeps it until it is done."""
        with self.lock:
            for key in [k for k in self.tiffs if path is None or k[0] == path]:
                del self.tiffs[key]


def _source_key(plan: SlidePlan) -> tuple:
    """What identifies a slide's open source: its file (and mtime), level, mpp and reader."""
    st = os.stat(plan.path)
    return (plan.path, plan.geometry.read_level, plan.slide_mpp, plan.backend, st.st_mtime_ns)


def _cache_tiles(tiff: TiffLevel, plan: SlidePlan) -> int:
    """Decoded tiles a slide's source level keeps: those of two rows of patches (patches are
    extracted row by row, and a patch that is not on the tile grid shares tile rows with the
    row above), at least 256, at most :data:`TILE_CACHE_BYTES` of them."""
    s = decode_scale(tiff, plan)
    rows = math.ceil(plan.geometry.read_px / tiff.tile_h) + 1
    tile_bytes = max(1, (tiff.tile_w // s) * (tiff.tile_h // s) * 3)
    return max(256, min(2 * rows * tiff.tiles_across, TILE_CACHE_BYTES // tile_bytes))


_SOURCES = _Sources()


def _sources() -> _Sources:
    return _SOURCES


def release_sources() -> None:
    """Let go of every slide's open TIFF levels and decoded tiles in this process (the end of a
    batch: a notebook that tiled a cohort keeps none of it)."""
    _SOURCES.forget()


def extract_shard(plan: SlidePlan, shard: int) -> dict[str, int]:
    """Read, encode and write one shard of a slide's patches.

    Returns
    -------
    dict
        ``copied`` (source JPEG tiles stored as is), ``encoded`` and ``bytes`` written.

    Raises
    ------
    SlideError
        When the slide's pixels cannot be decoded (naming the region).
    """
    return write_shard_parts(plan, shard, [shard_part(plan, shard, 0, 1)])


class MeetingRange:
    """Patches ``lo .. hi - 1`` of a shard that two threads extract from either end until they
    meet (:func:`shard_part`'s ``meet``): whatever each patch costs, neither is left alone with
    the rest of it (fixed halves left one thread 13 ms alone at the end of a 0.13 s slide, its
    half needing 10 % more tile decodes). Each thread moves row by row, so the two share only
    the tiles where they meet."""

    def __init__(self, lo: int, hi: int) -> None:
        self.bounds = (lo, hi)
        self.lo, self.hi = lo, hi
        self._lock = threading.Lock()

    def take(self, front: bool) -> int | None:
        """The next patch from the front (or the back), None once the two ends have met."""
        with self._lock:
            if self.lo >= self.hi:
                return None
            if front:
                self.lo += 1
                return self.lo - 1
            self.hi -= 1
            return self.hi

    def taken_all(self, front: bool) -> bool:
        """Whether the front (or the back) alone has taken every patch of the range: the other
        end has taken none and will take none."""
        with self._lock:
            a, b = self.bounds
            return self.lo >= self.hi and (self.hi == b if front else self.lo == a)

    def stop(self) -> None:
        """Leave nothing more to take (the other end failed: its slide is lost)."""
        with self._lock:
            self.hi = self.lo


def _part_bounds(plan: SlidePlan, shard: int, part: int, parts: int) -> tuple[int, int]:
    """Patches ``a .. b - 1``: part ``part`` of ``parts`` contiguous, nearly equal parts of a
    shard."""
    per = plan.spec.patches_per_shard
    lo, hi = shard * per, min(plan.n_patches, (shard + 1) * per)
    bounds = np.linspace(lo, hi, parts + 1).round().astype(int)
    return int(bounds[part]), int(bounds[part + 1])


def meeting_ranges(plan: SlidePlan, shard: int, parts: int) -> list[MeetingRange]:
    """The ranges that a shard's ``parts`` (even) share in pairs: parts ``2k`` and ``2k + 1``
    extract range ``k`` (of ``parts // 2`` equal ones) from its front and its back
    (:func:`shard_part`)."""
    return [MeetingRange(*_part_bounds(plan, shard, k, parts // 2)) for k in range(parts // 2)]


def shard_part(
    plan: SlidePlan, shard: int, part: int, parts: int, meet: MeetingRange | None = None
) -> tuple[list[bytes], int]:
    """The encoded chunks of part ``part`` of ``parts`` (contiguous, in order) of one shard's
    patches, and how many of them are source tiles copied as they are: a shard's parts may be
    extracted side by side and written together (:func:`write_shard_parts`). Raises like
    :func:`extract_shard`.

    With ``meet`` (threads of one process, ``parts`` even; :func:`meeting_ranges`), part ``2k``
    takes patches from the front of the pair's range and part ``2k + 1`` from its back until
    they meet, so the pair's chunks, in part order, are still the range's in order.
    """
    if meet is None:
        a, b = _part_bounds(plan, shard, part, parts)
    else:
        a, b = meet.bounds
    rows = plan.coords[a:b] if plan.coords is not None else read_coords(plan.store, a, b)
    # Python ints: the per-patch arithmetic below on numpy scalars was a fifth of the time
    # two threads held the interpreter on the overlap path (py-spy --gil)
    coords: list[list[int]] = rows.tolist()
    front = part % 2 == 0
    order: Iterator[int | None] = (
        iter(range(a, b)) if meet is None else iter(lambda: meet.take(front), None)
    )
    tiff, slide = _sources().get(plan)
    copy_from = tiff if tiff is not None and _copyable(tiff, plan) else None
    scale = 1 if tiff is None else decode_scale(tiff, plan)  # the same for every patch
    chunks: list[bytes] = []
    copied = 0
    try:
        for i in order:
            assert i is not None
            x, y = coords[i - a]
            try:
                tile = None if copy_from is None else _source_tile(copy_from, plan, x, y)
                read = None if tile is not None else _read_patch(tiff, slide, plan, x, y, scale)
            except SlideError:
                raise
            except Exception as exc:
                raise SlideError(
                    f"tiles cannot be decoded at level {plan.geometry.read_level} near "
                    f"x={x} y={y}: {' '.join(str(exc).split()) or type(exc).__name__}",
                    path=plan.path,
                ) from exc
            if read is None:
                assert tile is not None
                chunks.append(tile)
                copied += 1
            else:
                chunks.append(_encode_patch(read[0], plan.spec, read[1]))
    except BaseException:
        if meet is not None:
            meet.stop()  # the slide is lost: the other end takes no more of it
        raise
    if meet is not None and not front:
        chunks.reverse()  # taken from the back
    return chunks, copied


def write_shard_parts(
    plan: SlidePlan, shard: int, parts: Sequence[tuple[list[bytes], int]]
) -> dict[str, int]:
    """Write one shard from all its parts (:func:`shard_part`, in order); returns its counts
    like :func:`extract_shard`."""
    chunks: list[bytes | None] = [c for part, _ in parts for c in part]
    copied = sum(n for _, n in parts)
    data = shard_bytes(chunks, plan.spec.patches_per_shard)
    write_shard(plan.store, shard, data)
    return {"copied": copied, "encoded": len(chunks) - copied, "bytes": len(data)}


def _copies(plan: SlidePlan) -> bool:
    """Whether the slide's patches are its own JPEG tiles, copied (:func:`_copyable`), all but
    those reaching past its edge: not so with an overlap, where three in four are decoded."""
    spec = plan.spec
    if spec.stride_px != spec.tile_px or spec.codec != "jpeg" or plan.geometry.resampled:
        return False  # known without opening the file (the slide's first task opens it)
    tiff = _sources().level(plan)
    return tiff is not None and _copyable(tiff, plan)


def _copyable(tiff: TiffLevel, plan: SlidePlan) -> bool:
    """Patches are the file's own JPEG tiles (same size, no resampling), copied as bytes."""
    spec, geo = plan.spec, plan.geometry
    T = spec.tile_px
    return (
        spec.codec == "jpeg"
        and tiff.compression == JPEG
        and not geo.resampled
        and (tiff.tile_w, tiff.tile_h) == (T, T)
        and geo.read_px == T
    )


def _source_tile(tiff: TiffLevel, plan: SlidePlan, x: int, y: int) -> bytes | None:
    """The file's JPEG tile at level-0 ``(x, y)`` when the patch is exactly one whole tile."""
    T, lds = plan.spec.tile_px, plan.geometry.level_downsample
    lx, ly = round(x / lds), round(y / lds)
    if lx % T or ly % T or lx + T > tiff.width or ly + T > tiff.height:
        return None
    jpeg = tiff.jpeg_tile((ly // T) * tiff.tiles_across + lx // T)
    if len(jpeg) < 64 or b"\xff\xd9" not in jpeg[-16:]:  # copied, so check it here
        raise ValueError("stored JPEG tile is truncated (no end-of-image marker)")
    return jpeg


#: Box in region pixels, ``(x0, y0, x1, y1)``, that a patch is resampled from (None: all of it).
Box = tuple[float, float, float, float]
#: Up to this factor left for the one resample (shrinking; any enlarging) it is a bilinear warp:
#: the factors of real scans tiled at 0.5 or 1.0 µm/px (0.98-1.11 after the DCT-domain decode
#: or from a level within 2 %). It does not low-pass filter, which up to ~1.3 brings no
#: difference (mean absolute difference from openslide + area resize on the benchmark slide:
#: 1.66 against bicubic's 1.57 at 0.99, 1.37 / 1.32 at 1.11, 1.08 / 1.15 at 1.32) and is 9-13x
#: cheaper (0.05 against 0.65 ms a 256-px patch, which was 40 % of the x2 path's time; on a
#: slower day of the same machine, 2026-12-07, 0.18-0.19 against 1.6-1.8 ms).
LINEAR_MAX_FACTOR = 1.25
#: Up to this shrink factor left it is bicubic; beyond it, Lanczos.
BICUBIC_MAX_FACTOR = 2.1


def _read_patch(
    tiff: TiffLevel | None, slide: Slide | None, plan: SlidePlan, x: int, y: int, s: int = 1
) -> tuple[np.ndarray, Box | None]:
    """The source pixels of the patch at level-0 ``(x, y)``, read once at the read level, and
    the box inside them that the patch is resampled from.

    A patch that is not resampled is read whole. A resampled one read from the TIFF level
    comes with the box where it lies in the region, to the fraction of a pixel (a patch need not
    start on the level's pixel grid); with ``s`` > 1 (the slide's :func:`decode_scale`) the
    TIFF's JPEG tiles are decoded at ``1/s`` scale and the region comes back that much smaller.
    :func:`_encode_patch` finishes with one resample of the box. A region inside a JPEG level,
    resampled or not, is a view into this thread's band of decoded pixels
    (:meth:`~wsi_pipeline.tiffsrc.TiffLevel.read_view`), good until its next read: a patch
    assembled from its 2-4 tiles instead was four small copies, each handing the interpreter
    to the other threads and back, and two threads doing them ran slower than one (0.76-0.87x,
    the overlap path's tiles all cached).
    """
    geo = plan.geometry
    rp = geo.read_px
    if tiff is not None:
        lds = geo.level_downsample
        box: Box | None = None
        if not geo.resampled:
            x0, y0, w, h, s = round(x / lds), round(y / lds), rp, rp, 1
        else:
            fx, fy, side = x / lds / s, y / lds / s, geo.patch_l0 / lds / s
            x0, y0 = math.floor(fx + 1e-6), math.floor(fy + 1e-6)
            w, h = math.ceil(fx + side - 1e-6) - x0, math.ceil(fy + side - 1e-6) - y0
            box = (fx - x0, fy - y0, fx + side - x0, fy + side - y0)
        region = tiff.read_view(x0, y0, w, h, scale=s)
        return (tiff.read(x0, y0, w, h, scale=s) if region is None else region), box
    assert (
        slide is not None
    )  # the source cache opens the slide when the TIFF cannot be read directly
    return slide.read_region((int(x), int(y)), geo.read_level, (rp, rp)), None


def decode_scale(tiff: TiffLevel, plan: SlidePlan) -> int:
    """The DCT-domain scale (1, 2, 4 or 8) the slide's patches are decoded at.

    The largest scale ``s`` at which the patch still spans at least ``tile_px`` pixels, within
    :data:`RESOLUTION_SLACK` (``read_px >= 0.98 * s * tile_px``); 1 (a full decode) when the patch
    is not about twice as coarse as the read level, when the tiles are not JPEG, or when
    ``plan.spec.scaled_decode`` is off. The same for every patch of a slide, wherever it lies
    on the scaled grid.
    """
    geo, T = plan.geometry, plan.spec.tile_px
    if not plan.spec.scaled_decode:
        return 1
    read_px = geo.patch_l0 / geo.level_downsample
    for s in DCT_SCALES:
        if read_px >= RESOLUTION_SLACK * s * T and tiff.can_scale(s):
            return s
    return 1


def _encode_patch(region: np.ndarray, spec: TilingSpec, box: Box | None = None) -> bytes:
    """Resample the source pixels (the ``box`` of them) once to the patch size, then encode.

    The filter is chosen by the factor left (after a DCT-domain decode, which has done most of
    the low-pass filtering, or from a level within 2x of the patches): a bilinear warp up to
    :data:`LINEAR_MAX_FACTOR`, bicubic up to :data:`BICUBIC_MAX_FACTOR` (1.4x cheaper than
    Lanczos: 0.64 against 0.91 ms a 256-px patch), Lanczos beyond; each as close to openslide +
    area resize as the next (``tests/test_tiling.py``)."""
    T = spec.tile_px
    factor = math.inf if box is None else (box[2] - box[0]) / T
    patch = resize_rgb(region, (T, T), src_box=box, resample=resample_filter(factor))
    return encode_chunk(patch, spec.codec, quality=spec.jpeg_quality)


def resample_filter(factor: float) -> str:
    """The :func:`~wsi_pipeline.util.resize_rgb` filter of the one resample that shrinks a
    patch's source box by ``factor`` (< 1: enlarges it): ``"linear"`` up to
    :data:`LINEAR_MAX_FACTOR`, ``"bicubic"`` up to :data:`BICUBIC_MAX_FACTOR`, else
    ``"lanczos"``."""
    if factor <= LINEAR_MAX_FACTOR:
        return "linear"
    return "bicubic" if factor <= BICUBIC_MAX_FACTOR else "lanczos"


def finalize_slide(plan: SlidePlan, stats: Sequence[dict[str, int]] = ()) -> TileResult:
    """Check every shard is on disk, then mark the store complete (written last); this
    process lets go of the slide's decoded tiles."""
    _SOURCES.forget(plan.path)
    status = "ok" if plan.n_patches else "no_tissue"
    finish_store(
        plan.store,
        n_patches=plan.n_patches,
        patches_per_shard=plan.spec.patches_per_shard,
        status=status,
        copied_source_tiles=int(sum(s.get("copied", 0) for s in stats)),
        seconds=round(time.time() - plan.started, 3),
    )
    return TileResult(
        plan.slide_id,
        plan.path,
        status,
        plan.n_patches,
        time.time() - plan.started,
        "" if plan.n_patches else "no tissue found (store has 0 patches)",
    )
