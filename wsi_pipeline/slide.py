"""Open a whole-slide image with openslide or tiffslide; metadata; regions at a level or an mpp.

The public entry point is :func:`open_slide`. Every failure a user can cause (a missing, empty,
truncated, unsupported or undecodable file, a fluorescence or 16-bit image) raises
:class:`~wsi_pipeline.errors.SlideError` with one line naming the file and the reason.

Coordinates are level-0 pixels ``(x, y)``; sizes are ``(width, height)``; arrays are
``(H, W, 3)`` uint8 RGB. Pixels outside the slide read as white.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import SlideError
from .specs import SlideMeta
from .util import resize_rgb, sanitize_id

if TYPE_CHECKING:
    from concurrent.futures import Executor

__all__ = [
    "SLIDE_SUFFIXES",
    "Slide",
    "find_slides",
    "mpp_at",
    "open_slide",
    "slide_id_from_path",
]

log = logging.getLogger(__name__)

#: File name endings treated as slides when a folder is searched.
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
    ".qptiff",
    ".btf",
)

# mpp values that are really a TIFF dpi default (72, 96, 150, 300 dpi), not a scanner resolution.
_DPI_DEFAULT_MPP = tuple(25400.0 / dpi for dpi in (72, 96, 150, 200, 300, 600))
_MPP_RANGE = (0.01, 100.0)


def _trustworthy_mpp(value: Any) -> float | None:
    """A float mpp, or None for missing, non-positive, absurd, or dpi-default values."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(mpp) or not (_MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]):
        return None
    if any(abs(mpp - d) / d < 1e-3 for d in _DPI_DEFAULT_MPP):
        return None
    return mpp


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _reason(exc: BaseException) -> str:
    """One-line reason from a library exception."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) < 300 else msg[:297] + "..."


def slide_id_from_path(path: str | os.PathLike) -> str:
    """A slide id safe to use as a file name, derived from the slide's file name.

    Multi-part endings (``.ome.tif``) are stripped; characters other than letters, digits,
    ``.``, ``_`` and ``-`` become ``_``. A DICOM file's id is its folder's name, since a DICOM
    slide is a folder of instances.

    Parameters
    ----------
    path : str or PathLike
        Slide file (or DICOM folder).

    Returns
    -------
    str
        The id, never empty, never ``.`` or ``..``, never containing a path separator.
    """
    p = Path(path)
    if p.suffix.lower() == ".dcm" or p.is_dir():
        name = p.parent.name if p.suffix.lower() == ".dcm" else p.name
    else:
        name = p.name
        for suffix in (".ome.tiff", ".ome.tif", *SLIDE_SUFFIXES):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
    return sanitize_id(name)


def find_slides(paths: list[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders into slide files.

    Folders are searched recursively for files ending in one of :data:`SLIDE_SUFFIXES`; a folder
    holding DICOM instances counts as one slide (its first ``.dcm`` file, sorted by name).

    Parameters
    ----------
    paths : list of path
        Files and/or folders, as given on the command line.

    Returns
    -------
    slides : list of Path
        Slide files in a stable order (as given; folder contents sorted).
    skipped : list of (Path, str)
        Files found in folders that are not slides, with the reason.
    """
    slides: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            slides.append(p)  # missing files are reported by open_slide, per slide
            continue
        dicom_dirs: set[Path] = set()
        for f in sorted(p.rglob("*")):
            if not f.is_file():
                continue
            name = f.name.lower()
            if any(part.startswith(".") for part in f.relative_to(p).parts):
                continue
            if name.endswith(".dcm"):
                if f.parent not in dicom_dirs:
                    dicom_dirs.add(f.parent)
                    slides.append(f)
            elif name.endswith(SLIDE_SUFFIXES):
                slides.append(f)
            elif not _is_companion(f):
                skipped.append((f, "not a slide file (unknown file type)"))
    return slides, skipped


def _is_companion(f: Path) -> bool:
    """Files that belong to a slide (MRXS data folders, checksums, ...) and need no message."""
    return f.parent.suffix == "" and (f.parent.with_suffix(".mrxs")).exists()


def mpp_at(meta: SlideMeta, downsample: float) -> float | None:
    """µm per pixel of an image at ``downsample`` level-0 pixels per pixel.

    Parameters
    ----------
    meta : SlideMeta
    downsample : float
        Level-0 pixels per pixel (a pyramid level, a thumbnail, a patch grid).

    Returns
    -------
    float or None
        ``None`` when the slide's mpp is unknown.
    """
    return None if meta.mpp is None else meta.mpp * downsample


def _level_to_l0(v: int, downsample: float) -> int:
    """Smallest level-0 coordinate that maps to level coordinate ``v`` under
    ``floor(x / downsample)`` (the readers' convention)."""
    return math.ceil(v * downsample - 1e-6)


class Slide:
    """An open slide file. Create with :func:`open_slide`; use as a context manager.

    Attributes
    ----------
    meta : SlideMeta
        Everything known about the file.
    """

    def __init__(self, handle: Any, meta: SlideMeta) -> None:
        self._h = handle
        self.meta = meta

    # -- resource handling -------------------------------------------------------------------
    def close(self) -> None:
        """Release the file handle (idempotent)."""
        if self._h is not None:
            try:
                self._h.close()
            finally:
                self._h = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.meta
        return f"Slide({m.path!r}, backend={m.backend!r}, {m.width}x{m.height}, mpp={m.mpp})"

    @property
    def path(self) -> str:
        return self.meta.path

    @property
    def handle(self) -> Any:
        """The underlying ``openslide.OpenSlide`` or ``tiffslide.TiffSlide``."""
        if self._h is None:
            raise SlideError("slide is closed", path=self.meta.path)
        return self._h

    # -- geometry ------------------------------------------------------------------------------
    def best_level(self, downsample: float, *, slack: float = 0.995) -> int:
        """The lowest-resolution level whose downsample is at most ``downsample / slack``:
        by default a level 0.5 % coarser than asked still counts (a pyramid's 2.001 for 2);
        the tiler allows 2 % (:data:`wsi_pipeline.tiling.RESOLUTION_SLACK`)."""
        best = 0
        for i, d in enumerate(self.meta.level_downsamples):
            if d * slack <= downsample and d >= self.meta.level_downsamples[best]:
                best = i
        return best

    def downsample_for_mpp(self, mpp: float) -> float:
        """Level-0 pixels per target pixel for a target ``mpp``.

        Raises
        ------
        SlideError
            When the slide has no mpp (pass ``mpp=`` to :func:`open_slide` to give one).
        """
        if self.meta.mpp is None:
            raise SlideError(
                "has no resolution (mpp) metadata; give the slide's mpp (--slide-mpp) "
                "or tile at a --level instead",
                path=self.meta.path,
            )
        return mpp / self.meta.mpp

    # -- pixels --------------------------------------------------------------------------------
    def read_region(self, xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        """Read a region at a pyramid level.

        Parameters
        ----------
        xy : (int, int)
            Top-left corner in level-0 pixels (may lie outside the slide).
        level : int
            Pyramid level to read from.
        size_wh : (int, int)
            Size at ``level`` in pixels.

        Returns
        -------
        (H, W, 3) uint8 ndarray
            RGB pixels; anything outside the slide is white.

        Raises
        ------
        SlideError
            For a bad level or size, or when the file's tiles cannot be decoded.
        """
        m = self.meta
        if not (0 <= level < m.level_count):
            raise SlideError(
                f"level {level} does not exist (levels 0..{m.level_count - 1})", path=m.path
            )
        w, h = int(size_wh[0]), int(size_wh[1])
        if w <= 0 or h <= 0:
            raise SlideError(f"region size must be positive, not {size_wh}", path=m.path)
        ds = m.level_downsamples[level]
        lw, lh = m.level_dimensions[level]
        # clip to the level's bounds (in level px); outside stays white
        lx, ly = math.floor(xy[0] / ds), math.floor(xy[1] / ds)
        if level == 0:
            lx, ly = int(xy[0]), int(xy[1])
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        # smallest level-0 position that maps to level pixel (x0, y0) under floor(x / ds)
        loc = (_level_to_l0(x0, ds), _level_to_l0(y0, ds))
        try:
            px = self._read(loc, level, (x1 - x0, y1 - y0))
        except SlideError:
            raise
        except Exception as exc:  # library errors become ours, with the region named
            raise SlideError(
                f"tiles cannot be decoded (region x={loc[0]} y={loc[1]} w={x1 - x0} h={y1 - y0} "
                f"at level {level}): {_reason(exc)}",
                path=m.path,
            ) from exc
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = px
        return out

    def _read(self, loc: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        h = self.handle
        if self.meta.backend == "tiffslide":
            arr = h.read_region(loc, level, size_wh, as_array=True)
            arr = np.asarray(arr)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] < 3:
                raise SlideError(
                    f"pixels are {arr.dtype} with shape {arr.shape}, not 8-bit RGB",
                    path=self.meta.path,
                )
            return arr[..., :3]
        rgba = np.asarray(h.read_region(loc, level, size_wh))
        rgb = rgba[..., :3]
        alpha = rgba[..., 3]
        if alpha.min() < 255:  # transparent = no scanned data: composite onto white
            a = alpha[..., None].astype(np.uint16)
            rgb = ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        return rgb

    def read_region_mpp(
        self, xy: tuple[int, int], size_wh: tuple[int, int], mpp: float
    ) -> np.ndarray:
        """Read a region at a target resolution.

        Reads once from the best level at or above the resolution, then resamples once.

        Parameters
        ----------
        xy : (int, int)
            Top-left corner in level-0 pixels.
        size_wh : (int, int)
            Output size in target pixels.
        mpp : float
            Target µm per pixel.

        Returns
        -------
        (H, W, 3) uint8 ndarray
        """
        return self.read_region_ds(xy, size_wh, self.downsample_for_mpp(mpp))

    def read_region_ds(
        self, xy: tuple[int, int], size_wh: tuple[int, int], downsample: float
    ) -> np.ndarray:
        """Read a region of ``size_wh`` output pixels at ``downsample`` level-0 px per pixel."""
        level = self.best_level(downsample)
        rel = downsample / self.meta.level_downsamples[level]
        if abs(rel - 1.0) < 1e-3:
            return self.read_region(xy, level, size_wh)
        src_wh = (max(1, round(size_wh[0] * rel)), max(1, round(size_wh[1] * rel)))
        return resize_rgb(self.read_region(xy, level, src_wh), size_wh)

    def thumbnail_downsample(self, *, max_px: int = 4096, mpp: float | None = None) -> float:
        """Downsample of a thumbnail at ``mpp`` (when the slide's mpp is known), bounded so its
        longest side is at most ``max_px``."""
        m = self.meta
        ds = max(m.width, m.height) / max_px
        if mpp is not None and m.mpp is not None:
            ds = max(ds, mpp / m.mpp)
        return max(ds, 1.0)

    def read_thumbnail(
        self,
        downsample: float,
        *,
        strip_px: int = 2048,
        source: Any = None,
        pool: Executor | None = None,
    ) -> np.ndarray:
        """The whole slide at ``downsample`` level-0 px per pixel, built strip by strip.

        Parameters
        ----------
        downsample : float
            Level-0 pixels per thumbnail pixel (>= 1).
        strip_px : int
            Height of each strip read from the source level (bounds memory).
        source : TiffLevel, optional
            The source level (``best_level(downsample)``) opened straight from the file
            (:func:`wsi_pipeline.tiffsrc.open_tiff_level`), whose decoded tiles equal the
            reader's: strips are read from it, without the reader's ``read_region``. A strip it
            cannot read is read through ``read_region`` (which names the failing region).
        pool : Executor, optional
            Idle threads: the left half of each strip read from ``source`` is decoded by one of
            them while this thread decodes the right half (the same pixels; JPEG 2000 and
            JPEG decoders release the interpreter).

        Returns
        -------
        (ceil(H / downsample), ceil(W / downsample), 3) uint8 ndarray
        """
        m = self.meta
        tw, th = max(1, math.ceil(m.width / downsample)), max(1, math.ceil(m.height / downsample))
        level = self.best_level(downsample)
        lds = m.level_downsamples[level]
        rel = downsample / lds  # source level px per thumbnail px
        out = np.empty((th, tw, 3), np.uint8)
        rows = max(1, int(strip_px // rel))  # thumbnail rows per strip
        sw = round(tw * rel)  # may reach past the edge: read_region pads with white
        for r0 in range(0, th, rows):
            r1 = min(th, r0 + rows)
            sy0, sy1 = round(r0 * rel), round(r1 * rel)
            strip = None
            if source is not None:
                try:  # white outside the level, like read_region
                    strip = _read_strip(source, sy0, sw, max(1, sy1 - sy0), pool)
                except Exception:
                    source = None  # the reader decides, and names the region if it fails too
            if strip is None:
                strip = self.read_region(
                    (0, _level_to_l0(sy0, lds)), level, (sw, max(1, sy1 - sy0))
                )
            out[r0:r1] = resize_rgb(strip, (tw, r1 - r0), resample="area")
        return out


def _read_strip(source: Any, y: int, w: int, h: int, pool: Executor | None) -> np.ndarray:
    """Rows ``y .. y + h`` of ``source`` (a :class:`~wsi_pipeline.tiffsrc.TiffLevel`), ``w``
    wide; with ``pool``, its left half (whole tile columns) decoded by the pool beside this
    thread's right half."""
    half = (getattr(source, "tiles_across", 0) // 2) * getattr(source, "tile_w", 0)
    if pool is None or not 0 < half < w:
        return source.read(0, y, w, h)
    strip = np.empty((h, w, 3), np.uint8)
    left = pool.submit(source.read, 0, y, half, h, out=strip[:, :half])
    try:
        source.read(half, y, w - half, h, out=strip[:, half:])
    finally:
        left.result()
    return strip


def open_slide(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    mpp: float | None = None,
    check_pixels: bool = True,
) -> Slide:
    """Open a whole-slide image.

    Parameters
    ----------
    path : str or PathLike
        The slide file.
    backend : {"auto", "openslide", "tiffslide"}
        ``"auto"`` tries openslide and falls back to tiffslide for the TIFFs openslide refuses
        (OME-TIFF, big-endian TIFF, untiled TIFF).
    mpp : float, optional
        The slide's level-0 µm per pixel, overriding (or supplying) the file's value.
    check_pixels : bool
        Decode a small region of the first and last level now, so a file whose tiles cannot be
        decoded fails here rather than half-way through a batch.

    Returns
    -------
    Slide
        Use as a context manager; ``slide.meta`` has the metadata (``meta.backend`` says which
        reader was used).

    Raises
    ------
    SlideError
        Missing file, directory, empty or truncated file, unsupported format, a fluorescence or
        non-8-bit image, or undecodable pixels. The message is one line naming the file.
    """
    p = Path(path)
    spath = str(p.absolute())
    if backend not in ("auto", "openslide", "tiffslide"):
        raise SlideError(f"unknown backend {backend!r} (auto, openslide, tiffslide)", path=spath)
    if not p.exists():
        raise SlideError("no such file", path=spath)
    if p.is_dir():
        raise SlideError("is a directory, not a slide file", path=spath)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise SlideError(f"cannot read file: {exc.strerror or _reason(exc)}", path=spath) from exc
    if size == 0:
        raise SlideError("empty file (0 bytes)", path=spath)
    if mpp is not None and _float_or_none(mpp) is None:
        raise SlideError(f"given mpp {mpp!r} is not a positive number", path=spath)

    reasons: list[str] = []
    order = ["openslide", "tiffslide"] if backend == "auto" else [backend]
    slide: Slide | None = None
    for name in order:
        if name == "tiffslide" and head[:2] not in (b"II", b"MM"):
            reasons.append("tiffslide: not a TIFF file")
            continue
        try:
            slide = _open_with(name, p, spath, size)
            break
        except _NotBrightfield as exc:  # opened fine, but no other reader will make it RGB
            raise SlideError(str(exc), path=spath) from exc
        except Exception as exc:
            reasons.append(f"{name}: {_reason(exc)}")
    if slide is None:
        raise SlideError(f"unsupported or unreadable slide ({'; '.join(reasons)})", path=spath)
    if mpp is not None:
        slide.meta = _with_mpp(slide.meta, float(mpp))
    log.debug("%s: opened with %s", spath, slide.meta.backend)
    if check_pixels:
        try:
            _check_pixels(slide)
        except BaseException:
            slide.close()
            raise
    return slide


class _NotBrightfield(ValueError):
    """The file opened but cannot be a usable slide (not 8-bit RGB brightfield, or truncated);
    no other reader would do better."""


def _with_mpp(meta: SlideMeta, mpp: float) -> SlideMeta:
    import dataclasses

    if meta.mpp is not None and abs(meta.mpp - mpp) / meta.mpp > 0.05:
        log.warning("%s: given mpp %.4g overrides the file's %.4g", meta.path, mpp, meta.mpp)
    return dataclasses.replace(meta, mpp_x=mpp, mpp_y=mpp, mpp_source="user")


def _open_with(name: str, p: Path, spath: str, size: int) -> Slide:
    if name == "openslide":
        return _open_openslide(p, spath, size)
    return _open_tiffslide(p, spath, size)


def _open_openslide(p: Path, spath: str, size: int) -> Slide:
    import openslide

    h = openslide.OpenSlide(str(p))
    props = dict(h.properties)
    return Slide(
        h, _meta(h, props, "openslide", props.get(openslide.PROPERTY_NAME_VENDOR), spath, size)
    )


def _meta(
    h: Any, props: dict[str, Any], backend: str, vendor: str | None, spath: str, size: int
) -> SlideMeta:
    """SlideMeta from an open reader; both readers name properties ``<backend>.<name>``."""
    mpp_x = _trustworthy_mpp(props.get(f"{backend}.mpp-x"))
    mpp_y = _trustworthy_mpp(props.get(f"{backend}.mpp-y"))
    if mpp_x is None or mpp_y is None:
        mpp_x = mpp_y = None
    tw = props.get(f"{backend}.level[0].tile-width") or 0
    th = props.get(f"{backend}.level[0].tile-height") or 0
    return SlideMeta(
        path=spath,
        file_size=size,
        backend=backend,
        vendor=vendor,
        width=int(h.dimensions[0]),
        height=int(h.dimensions[1]),
        level_dimensions=tuple((int(w), int(hh)) for w, hh in h.level_dimensions),
        level_downsamples=tuple(float(d) for d in h.level_downsamples),
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        mpp_source="file" if mpp_x is not None else None,
        objective_power=_float_or_none(props.get(f"{backend}.objective-power")),
        tile_wh=(int(tw), int(th)) if int(tw) and int(th) else None,
    )


def _open_tiffslide(p: Path, spath: str, size: int) -> Slide:
    import tiffslide

    from .tiffsrc import tifffile_complaints

    # no warnings.catch_warnings here: it swaps the process's filters, and two threads
    # opening slides at once left them ignoring every warning
    with tifffile_complaints() as complaints:
        h = tiffslide.TiffSlide(str(p))
        props = dict(h.properties)
        tf = h.ts_tifffile
        series = tf.series[int(props.get("tiffslide.series-index") or 0)]
    try:
        _check_tiff_integrity(series, size, complaints)
        _check_brightfield(series)
    except Exception:
        h.close()
        raise
    vendor = props.get("tiffslide.vendor")
    if vendor is None:
        vendor = "ome" if tf.is_ome else "qptiff" if tf.is_qpi else "generic-tiff"
    return Slide(h, _meta(h, props, "tiffslide", vendor, spath, size))


def _check_tiff_integrity(series: Any, size: int, complaints: list[str]) -> None:
    """Refuse a truncated TIFF: a broken IFD chain, or tile data past the end of the file."""
    broken = [m for m in complaints if "invalid" in m and "offset" in m]
    if broken:
        detail = re.sub(r"<[^>]*>\s*", "", broken[0])
        raise _NotBrightfield(f"truncated or corrupt TIFF ({detail})")
    for i, level in enumerate(series.levels):
        page = level.keyframe
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        if offsets.size and int((offsets + counts).max()) > size:
            raise _NotBrightfield(
                f"truncated file: level {i} pixel data ends at byte "
                f"{int((offsets + counts).max())} but the file has {size} bytes"
            )


def _check_brightfield(series: Any) -> None:
    """Refuse fluorescence/multichannel and non-8-bit images that tiffslide would read as RGB."""
    axes = str(series.axes)
    dtype = np.dtype(series.dtype)
    samples = int(getattr(series.keyframe, "samplesperpixel", 1))
    bits = f"{dtype.itemsize * 8}-bit"
    if "C" in axes:
        raise _NotBrightfield(
            f"multichannel fluorescence image ({series.shape[axes.index('C')]} channels, axes "
            f"{axes!r}); only RGB brightfield slides are supported"
        )
    if samples == 1:
        raise _NotBrightfield(
            f"{bits} grayscale image; only 8-bit RGB brightfield slides are supported"
        )
    if dtype != np.uint8 or samples not in (3, 4):
        raise _NotBrightfield(
            f"{bits} image with {samples} samples per pixel; only 8-bit RGB brightfield slides "
            "are supported"
        )


def _check_pixels(slide: Slide) -> None:
    """Decode a small region of level 0 and of the last level; raise SlideError if that fails."""
    m = slide.meta
    tile = m.tile_wh or (256, 256)
    size = (min(m.width, tile[0], 512), min(m.height, tile[1], 512))
    slide.read_region((0, 0), 0, size)
    last = m.level_count - 1
    if last:
        lw, lh = m.level_dimensions[last]
        slide.read_region((0, 0), last, (min(lw, 512), min(lh, 512)))


def iter_levels(meta: SlideMeta) -> Iterator[tuple[int, tuple[int, int], float]]:
    """Yield ``(level, (width, height), downsample)`` for every level."""
    for i, (wh, ds) in enumerate(zip(meta.level_dimensions, meta.level_downsamples)):
        yield i, wh, ds
