"""The heatmap file writers: colours, pyramidal TIFFs and the PNG overlay.

Each writer takes arrays (a stitched heatmap, a thumbnail, per-patch values) and writes one file
through :func:`wsi_pipeline.util.atomic_path`, so a reader never sees a half-written file, in
memory bounded by the heatmap grid, never by the slide. Nothing here reads a store;
:mod:`wsi_pipeline.heatmap` decides what goes where. The GeoJSON for QuPath is written by
:mod:`wsi_pipeline.qupath`.

Colour
------
One function, :func:`overlay_lut`, gives the colour *and* the opacity of every value: the
colormap's colour (``viridis`` by default: perceptually uniform, readable by colour-blind
viewers, its bright yellow top stands out on pink and purple H&E), with an opacity that is zero
at and below ``transparent_below`` and rises linearly to ``alpha`` at the top of the scale, so
low scores leave the H&E visible. The PNG (:func:`render_png`, :func:`overlay_rgb`), the overlay
TIFF (:func:`write_overlay_tiff`) and :func:`wsi_pipeline.viz.plot_heatmap` all draw with it.

Formats
-------
Overlay TIFF (:func:`write_overlay_tiff`)
    RGBA with unassociated alpha (the colours above, to lay over the slide), tiled (256 px),
    deflate; level 0 has the *slide's* level-0 size and mpp, so viewers that overlay images line it
    up 1:1; levels halve until one tile is left. Written tile by tile from the heatmap grid
    (nearest neighbour), identical tiles compressed once. ``compression="jpeg"`` writes opaque RGB
    (the colours over white) instead: JPEG has no alpha channel.
Pyramidal TIFF (:func:`write_pyramid_tiff`)
    Any level-0 image served strip by strip (here the float32 heatmap values, one pixel per
    heatmap pixel), tiled (256 px), deflate or JPEG, levels halving until one tile is left, one
    main IFD per level; float32 uses deflate with a floating-point predictor and NaN-aware
    2 x 2 means for its levels.
    In both, XResolution/YResolution in centimetres give the µm per pixel, so openslide
    (vendor ``generic-tiff``; uint8 only) and tiffslide read the levels and mpp.
PNG (:func:`render_png`)
    The overlay with a title, a colour bar and a legend (matplotlib, no pyplot).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .util import atomic_path, resize_rgb

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_CMAP",
    "TIFF_COMPRESSIONS",
    "check_compression",
    "colour_lut",
    "lut_index",
    "overlay_lut",
    "overlay_rgb",
    "render_png",
    "write_overlay_tiff",
    "write_pyramid_tiff",
]

#: Compressions of the TIFF writers (JPEG only for RGB; float data uses deflate).
TIFF_COMPRESSIONS = ("deflate", "jpeg")
#: The default colormap: perceptually uniform and colour-blind safe ("jet" only on request).
DEFAULT_CMAP = "viridis"
#: The default opacity at the top of the colour scale.
DEFAULT_ALPHA = 0.7


# --------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------
def colour_lut(cmap: str) -> np.ndarray:
    """The lookup table of a matplotlib colormap.

    Parameters
    ----------
    cmap : str
        A matplotlib colormap name, e.g. ``"viridis"``.

    Returns
    -------
    (256, 3) uint8 ndarray
        Entry ``i`` is the colour at ``i / 255`` of the scale.

    Raises
    ------
    ConfigError
        An unknown colormap.
    """
    import matplotlib

    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise ConfigError(f"unknown matplotlib colormap {cmap!r}") from None
    return np.round(cm(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def overlay_lut(
    cmap: str = DEFAULT_CMAP,
    *,
    value_range: tuple[float, float],
    alpha: float = DEFAULT_ALPHA,
    transparent_below: float | None = None,
) -> np.ndarray:
    """Colour and opacity of every value: the one colour function of all heatmap drawings.

    Entry ``i`` stands for the value ``v = lo + i / 255 * (hi - lo)``: its colour is the
    colormap's, its opacity ``alpha * clip((v - t) / (hi - t), 0, 1)`` with
    ``t = transparent_below``, so values at or below ``t`` (and the bottom of the scale) are fully
    transparent and the top of the scale has opacity ``alpha``. Transparent entries are
    ``(0, 0, 0, 0)``. Values map to entries as matplotlib maps them (:func:`lut_index`).

    Parameters
    ----------
    cmap : str
        A matplotlib colormap name (default ``"viridis"``).
    value_range : (float, float)
        The values at the two ends of the scale.
    alpha : float
        Opacity at the top of the scale, in [0, 1].
    transparent_below : float, optional
        Values at or below it are transparent; default the bottom of the scale.

    Returns
    -------
    (256, 4) uint8 ndarray
        RGBA, alpha not premultiplied.

    Raises
    ------
    ConfigError
        An unknown colormap, ``alpha`` outside [0, 1] or ``transparent_below`` outside
        ``[lo, hi)``.
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ConfigError(f"value_range must be increasing, not {value_range!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], not {alpha!r}")
    t = lo if transparent_below is None else float(transparent_below)
    if not lo <= t < hi:
        raise ConfigError(
            f"transparent_below must be in [{lo:g}, {hi:g}) (the colour scale), not "
            f"{transparent_below!r}"
        )
    v = lo + np.linspace(0.0, 1.0, 256) * (hi - lo)
    a = np.round(np.clip((v - t) / (hi - t), 0.0, 1.0) * float(alpha) * 255).astype(np.uint8)
    lut = np.concatenate([colour_lut(cmap), a[:, None]], axis=1)
    lut[a == 0] = 0
    return lut


def lut_index(values: np.ndarray, *, value_range: tuple[float, float]) -> np.ndarray:
    """The lookup-table entry of each value, as matplotlib's colormaps pick it.

    Parameters
    ----------
    values : (H, W) float ndarray
        NaN where there is no value.
    value_range : (float, float)
        The values at the two ends of the scale (clipped outside).

    Returns
    -------
    (H, W) uint8 ndarray
        ``floor((v - lo) / (hi - lo) * 256)`` clipped to 0..255; NaN gives 0 (transparent in
        every :func:`overlay_lut`).
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    x = (np.asarray(values, dtype=np.float32) - np.float32(lo)) * np.float32(256.0 / (hi - lo))
    np.fmax(x, 0, out=x)  # fmax/fmin drop NaN: NaN -> 0
    np.fmin(x, 255, out=x)
    return x.astype(np.uint8)


def _blend(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``rgba`` over an opaque ``background`` (integer rounding; alpha 0 gives it unchanged)."""
    a = rgba[..., 3:].astype(np.uint16)
    bg = background.astype(np.uint16)
    return ((bg * (255 - a) + rgba[..., :3] * a + 127) // 255).astype(np.uint8)


def overlay_rgb(
    values: np.ndarray,
    background: np.ndarray,
    *,
    value_range: tuple[float, float],
    lut: np.ndarray,
) -> np.ndarray:
    """Draw a heatmap over a background image with the colours and opacities of ``lut``.

    Parameters
    ----------
    values : (H, W) float ndarray
        NaN where there is no value (left transparent).
    background : (H, W, 3) uint8 ndarray
        The slide at the heatmap's resolution.
    value_range : (float, float)
        The values at the two ends of the scale.
    lut : (256, 4) uint8 ndarray
        :func:`overlay_lut`.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        The background itself wherever the opacity is 0 (low values, NaN).
    """
    return _blend(lut[lut_index(values, value_range=value_range)], background)


# --------------------------------------------------------------------------------------------
# pyramidal TIFF
# --------------------------------------------------------------------------------------------
def check_compression(compression: str) -> str:
    """``compression`` if it is one of :data:`TIFF_COMPRESSIONS`, else ConfigError."""
    if compression not in TIFF_COMPRESSIONS:
        raise ConfigError(f"TIFF compression must be 'deflate' or 'jpeg', not {compression!r}")
    return compression


def _check_tile(tile_px: int) -> int:
    """``tile_px`` as an int if it is a multiple of 16 (TIFF tiles), else ConfigError."""
    if int(tile_px) < 16 or int(tile_px) % 16:
        raise ConfigError(f"TIFF tile size must be a multiple of 16, not {tile_px!r}")
    return int(tile_px)


def _reduce2(a: np.ndarray, band: int = 256) -> np.ndarray:
    """2 x 2 mean (NaN-aware for floats; rounded for uint8), odd edges replicated; ``band``
    output rows at a time, so the temporaries stay small whatever the size of ``a``."""
    h, w = a.shape[:2]
    out = np.empty(((h + 1) // 2, (w + 1) // 2, *a.shape[2:]), a.dtype)
    for r0 in range(0, len(out), band):
        b = a[2 * r0 : 2 * (r0 + band)]
        if len(b) % 2 or w % 2:
            b = np.pad(b, ((0, len(b) % 2), (0, w % 2)) + ((0, 0),) * (a.ndim - 2), mode="edge")
        q = (b[0::2, 0::2], b[0::2, 1::2], b[1::2, 0::2], b[1::2, 1::2])
        if a.dtype == np.uint8:
            total = q[0].astype(np.uint16) + q[1] + q[2] + q[3]  # at most 1020: no overflow
            out[r0 : r0 + band] = (total + 2) // 4
            continue
        n = np.zeros(q[0].shape, np.float32)
        s = np.zeros(q[0].shape, np.float32)
        for x in q:
            ok = np.isfinite(x)
            n += ok
            s += np.where(ok, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[r0 : r0 + band] = s / n  # 0 / 0: NaN
    return out


def _level_sizes(h: int, w: int, t: int) -> list[tuple[int, int]]:
    """``(rows, cols)`` of each pyramid level: halving (``ceil``) until one tile is left."""
    sizes = [(h, w)]
    while max(sizes[-1]) > t:
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    return sizes


def _tiles(a: np.ndarray, t: int) -> Iterator[np.ndarray]:
    """Full ``t x t`` tiles of one strip of at most ``t`` rows (edge-padded), left to right."""
    pad = ((0, t - a.shape[0]), (0, -a.shape[1] % t)) + ((0, 0),) * (a.ndim - 2)
    a = np.pad(a, pad, mode="edge")
    for x in range(0, a.shape[1], t):
        yield np.ascontiguousarray(a[:, x : x + t])


def _codec_options(compression: str, *, rgb: bool) -> dict[str, Any]:
    """tifffile's ``write`` options of a compression (JPEG quality 90, zlib level 6)."""
    kw: dict[str, Any] = {"photometric": "rgb" if rgb else "minisblack", "metadata": None}
    if compression == "jpeg" and rgb:
        kw.update(compression="jpeg", compressionargs={"level": 90})
    else:
        kw.update(compression="zlib", compressionargs={"level": 6})
        if not rgb:
            kw["predictor"] = True
    return kw


def _level_tags(
    k: int, size: tuple[int, int], shape: tuple[int, ...], mpp: float | None
) -> dict[str, Any]:
    """Subfile type and resolution (pixels per centimetre) of pyramid level ``k``."""
    tags: dict[str, Any] = {"subfiletype": 1 if k else 0}
    if mpp:
        res = 1e4 / float(mpp)
        tags["resolution"] = (res * size[1] / int(shape[1]), res * size[0] / int(shape[0]))
        tags["resolutionunit"] = "CENTIMETER"
    return tags


def write_pyramid_tiff(
    path: str | os.PathLike,
    rows: Callable[[int, int], np.ndarray],
    shape: tuple[int, ...],
    *,
    dtype: Any = np.uint8,
    mpp: float | None = None,
    tile_px: int = 256,
    compression: str = "deflate",
    description: str = "",
) -> Path:
    """Write a tiled pyramidal TIFF from a function that returns strips of level 0.

    Level 0 is requested ``tile_px`` rows at a time and written tile by tile; only its 2 x 2
    reduction (a quarter of its size) is kept in memory to build the lower levels. Levels halve
    (``ceil``) until one tile is left and follow level 0 as successive main IFDs (subfile type
    "reduced"), which openslide (``generic-tiff``) and tiffslide both read as a pyramid.

    Parameters
    ----------
    path : path
        Output file (written to a temporary name, then renamed).
    rows : callable
        ``rows(r0, r1)`` returns level-0 rows ``r0..r1`` as ``(r1 - r0, W[, C])`` of ``dtype``.
    shape : (H, W) or (H, W, 3)
        Level-0 shape: RGB (``uint8``) or one float channel.
    dtype : numpy dtype
        ``uint8`` for RGB, ``float32`` for values (NaN allowed).
    mpp : float, optional
        µm per level-0 pixel, written as XResolution/YResolution in pixels per centimetre.
    tile_px : int
        Tile side (a multiple of 16).
    compression : {"deflate", "jpeg"}
        JPEG (quality 90) only for RGB.
    description : str
        ImageDescription of level 0 (ASCII).

    Returns
    -------
    Path

    Raises
    ------
    ConfigError
        An unknown compression or a tile side that is not a multiple of 16.
    """
    import tifffile

    check_compression(compression)
    t = _check_tile(tile_px)
    dtype = np.dtype(dtype)
    rgb = len(shape) == 3
    h, w = int(shape[0]), int(shape[1])
    sizes = _level_sizes(h, w, t)
    level1 = np.empty((*sizes[1], *shape[2:]), dtype) if len(sizes) > 1 else None

    def level0() -> Iterator[np.ndarray]:
        """Level 0's tiles, strip by strip, filling ``level1`` on the way."""
        for r0 in range(0, h, t):
            strip = np.asarray(rows(r0, min(h, r0 + t)), dtype=dtype)
            if level1 is not None:
                level1[r0 // 2 : r0 // 2 + (len(strip) + 1) // 2] = _reduce2(strip)
            yield from _tiles(strip, t)

    def level(a: np.ndarray) -> Iterator[np.ndarray]:
        for r0 in range(0, a.shape[0], t):
            yield from _tiles(a[r0 : r0 + t], t)

    kw = _codec_options(compression, rgb=rgb)
    big = h * w * dtype.itemsize * (3 if rgb else 1) > 2**31
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=big) as tw:
        arr = level1  # filled while level 0 is written
        for k, (lh, lw) in enumerate(sizes):
            tags = _level_tags(k, (lh, lw), shape, mpp)
            if k == 0:
                data: Any = level0()
                tags["description"] = description
            else:
                assert arr is not None  # there is a level 1 whenever there are lower levels
                arr = arr if k == 1 else _reduce2(arr)[:lh, :lw]
                data = level(arr)
            tw.write(data, shape=(lh, lw, *shape[2:]), dtype=dtype, tile=(t, t), **kw, **tags)
    return Path(path)


def _tile_encoder(compression: str) -> Callable[[np.ndarray], bytes]:
    """Encode one RGBA tile as the overlay TIFF stores it: deflate RGBA, or JPEG RGB over white
    (as tifffile writes JPEG: YCbCr, 2 x 2 chroma subsampling, quality 90)."""
    import imagecodecs

    if compression == "deflate":
        return lambda tile: bytes(imagecodecs.deflate_encode(tile.tobytes(), level=6))
    white = np.full(3, 255, np.uint8)
    return lambda tile: bytes(
        imagecodecs.jpeg_encode(
            _blend(tile, white),
            level=90,
            colorspace="RGB",
            outcolorspace="YCBCR",
            subsampling=(2, 2),
        )
    )


def _overlay_tiles(
    index: np.ndarray,
    scale: float,
    size: tuple[int, int],
    t: int,
    tile: Callable[[np.ndarray], bytes],
    uniform: Callable[[int], bytes],
) -> Iterator[bytes]:
    """The encoded tiles of one overlay level, row by row.

    Level pixel ``j`` shows grid pixel ``floor((j + 0.5) * scale)`` (nearest neighbour;
    ``scale`` = grid pixels per level pixel). A tile whose grid pixels share one entry is
    ``uniform(entry)``; any other is ``tile(entries)`` of its ``(t, t)`` entries. Tiles at the
    right and bottom edges repeat the last row/column.
    """

    def axis(n: int, g: int) -> np.ndarray:
        return np.minimum(((np.arange(-(-n // t) * t) + 0.5) * scale).astype(np.int64), g - 1)

    rows, cols = axis(size[0], index.shape[0]), axis(size[1], index.shape[1])
    for y in range(0, len(rows), t):
        r = rows[y : y + t]
        band = index[r[0] : r[-1] + 1]
        rr = r - r[0]
        for x in range(0, len(cols), t):
            c = cols[x : x + t]
            block = band[:, c[0] : c[-1] + 1]
            lo = block.min()
            if lo == block.max():
                yield uniform(int(lo))
            else:
                yield tile(np.take(np.take(block, rr, axis=0), c - c[0], axis=1))


def write_overlay_tiff(
    path: str | os.PathLike,
    values: np.ndarray,
    *,
    lut: np.ndarray,
    value_range: tuple[float, float],
    slide_wh: tuple[int, int],
    downsample: float,
    mpp: float | None = None,
    tile_px: int = 256,
    compression: str = "deflate",
    description: str = "",
) -> Path:
    """Write a heatmap as a pyramidal RGBA TIFF with the slide's level-0 size and mpp.

    Level 0 is ``slide_wh`` pixels at ``mpp``, so a viewer that lays images over the slide lines
    it up 1:1; levels halve (``ceil``) until one tile is left, as successive main IFDs (subfile
    type "reduced") that openslide (``generic-tiff``) and tiffslide read as a pyramid. Each tile
    is drawn from the heatmap grid when it is written (nearest neighbour; levels coarser than the
    grid use its NaN-aware 2 x 2 means), so memory stays that of the grid whatever the slide's
    size; identical tiles (most of a slide: no tissue, or scores that are transparent) are
    compressed once.

    Parameters
    ----------
    path : path
        Output file (written to a temporary name, then renamed).
    values : (H, W) float ndarray
        The heatmap grid: pixel ``(i, j)`` covers level-0 ``[j * ds, (j + 1) * ds) x
        [i * ds, (i + 1) * ds)``; NaN where there is no value.
    lut : (256, 4) uint8 ndarray
        :func:`overlay_lut`: colour and opacity of each value.
    value_range : (float, float)
        The values at the two ends of the scale.
    slide_wh : (int, int)
        Level-0 ``(width, height)`` of the slide: the size of level 0.
    downsample : float
        Level-0 px per heatmap pixel (``ds``).
    mpp : float, optional
        The slide's µm per level-0 pixel, written as XResolution/YResolution in pixels per cm.
    tile_px : int
        Tile side (a multiple of 16).
    compression : {"deflate", "jpeg"}
        ``"deflate"``: RGBA with unassociated alpha; ``"jpeg"``: RGB, the colours over white
        (quality 90).
    description : str
        ImageDescription of level 0 (ASCII).

    Returns
    -------
    Path

    Raises
    ------
    ConfigError
        An unknown compression, a tile side that is not a multiple of 16, a non-positive
        downsample, or a grid that does not cover the slide at that downsample.
    """
    import tifffile

    check_compression(compression)
    t = _check_tile(tile_px)
    w, h = int(slide_wh[0]), int(slide_wh[1])
    grid = np.asarray(values, dtype=np.float32)
    ds = float(downsample)
    if not ds > 0 or grid.shape[0] * ds < h - ds or grid.shape[1] * ds < w - ds:
        raise ConfigError(
            f"a heatmap grid of {grid.shape[1]} x {grid.shape[0]} px at downsample {downsample!r} "
            f"does not cover a {w} x {h} px slide"
        )
    lut = np.asarray(lut, np.uint8)
    keep = np.where(lut[:, 3] > 0, np.arange(256), 0).astype(np.uint8)  # transparent -> 0

    def index(v: np.ndarray) -> np.ndarray:
        """LUT entries of a grid, every transparent one as 0, 1024 rows at a time."""
        out = np.empty(v.shape, np.uint8)
        for r0 in range(0, len(v), 1024):
            out[r0 : r0 + 1024] = keep[lut_index(v[r0 : r0 + 1024], value_range=value_range)]
        return out

    encode = _tile_encoder(compression)
    lut32 = np.ascontiguousarray(lut).view(np.uint32).reshape(256)  # one RGBA pixel per entry
    cache: dict[int, bytes] = {}

    def uniform(k: int) -> bytes:
        if k not in cache:
            cache[k] = encode(np.ascontiguousarray(np.broadcast_to(lut[k], (t, t, 4))))
        return cache[k]

    rgba = compression == "deflate"
    kw: dict[str, Any] = {"photometric": "rgb", "metadata": None}
    if rgba:
        kw.update(compression="zlib", extrasamples=("unassalpha",))
    else:
        kw.update(compression="jpeg")
    samples = 4 if rgba else 3
    grid_ds, entries = ds, index(grid)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=h * w * samples > 2**31) as tw:
        for k, (lh, lw) in enumerate(_level_sizes(h, w, t)):
            level_ds = float(2**k)
            while grid_ds * 2 <= level_ds and min(grid.shape) > 1:  # the coarsest finer grid
                grid, grid_ds = _reduce2(grid), grid_ds * 2
                entries = index(grid)
            tags = _level_tags(k, (lh, lw), (h, w), mpp)
            if k == 0:
                tags["description"] = description
            data = _overlay_tiles(
                entries,
                level_ds / grid_ds,
                (lh, lw),
                t,
                lambda e: encode(lut32[e].view(np.uint8).reshape(t, t, 4)),
                uniform,
            )
            tw.write(data, shape=(lh, lw, samples), dtype=np.uint8, tile=(t, t), **kw, **tags)
    return Path(path)


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------
def _pool(values: np.ndarray, f: int, band: int = 64) -> np.ndarray:
    """NaN-aware ``f x f`` mean (display only), ``band`` output rows at a time."""
    if f == 1:
        return values
    h, w = values.shape
    out = np.empty((-(-h // f), -(-w // f)), np.float32)
    for r0 in range(0, len(out), band):
        a = values[r0 * f : (r0 + band) * f]
        a = np.pad(a, ((0, -len(a) % f), (0, -w % f)), constant_values=np.nan)
        a = a.reshape(a.shape[0] // f, f, a.shape[1] // f, f)
        ok = np.isfinite(a)
        n = ok.sum(axis=(1, 3))
        s = np.where(ok, a, 0.0).sum(axis=(1, 3))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[r0 : r0 + band] = s / n
    return out


def _colour_bar(
    fig: Any,
    ax: Any,
    *,
    value_range: tuple[float, float],
    threshold: float,
    lut: np.ndarray,
    label: str,
) -> None:
    """A colour bar of ``lut`` (its opacity over white) with the threshold as a black line."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    cb = fig.colorbar(
        ScalarMappable(norm=Normalize(*value_range), cmap=ListedColormap(lut / 255.0)),
        ax=ax,
        fraction=0.04,
        pad=0.02,
    )
    cb.ax.axhline(threshold, color="black", linewidth=1.2)
    cb.ax.tick_params(labelsize=8)
    cb.set_label(label, fontsize=8)


def render_png(
    path: str | os.PathLike,
    values: np.ndarray,
    thumb: np.ndarray,
    *,
    value_range: tuple[float, float],
    threshold: float,
    lut: np.ndarray,
    title: str,
    legend: str,
    bar_label: str,
    max_px: int,
) -> Path:
    """Write the heatmap over the thumbnail as a PNG figure.

    The heatmap is averaged down (NaN-aware) until its longest side is at most ``max_px``, drawn
    over the thumbnail (:func:`overlay_rgb`: the thumbnail itself where the opacity is 0) with
    the regions at or above ``threshold`` outlined in white, a title, a colour bar and a wrapped
    legend below.

    Parameters
    ----------
    path : path
        Output PNG (written to a temporary name, then renamed).
    values : (H, W) float ndarray
        The stitched heatmap; NaN where there is no value.
    thumb : (h, w, 3) uint8 ndarray
        The slide's thumbnail (resampled to the drawn heatmap).
    value_range : (float, float)
        Ends of the colour scale.
    threshold : float
        Outlined, and marked on the colour bar.
    lut : (256, 4) uint8 ndarray
        Colours and opacities (:func:`overlay_lut`).
    title, legend, bar_label : str
        Texts of the figure.
    max_px : int
        Longest side of the drawn heatmap.

    Returns
    -------
    Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    v = _pool(values, max(1, math.ceil(max(values.shape) / max_px)))
    bg = resize_rgb(thumb, (v.shape[1], v.shape[0]), resample="area")
    rgb = overlay_rgb(v, bg, value_range=value_range, lut=lut)
    dpi = 100
    h, w = v.shape
    fig = Figure(
        figsize=(max(6.0, w / dpi + 1.6), max(4.0, h / dpi + 1.3)), dpi=dpi, layout="constrained"
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(rgb, interpolation="nearest")
    with np.errstate(invalid="ignore"):
        above = np.nan_to_num(v, nan=-np.inf) >= threshold
    if above.any() and not above.all():
        ax.contour(above.astype(np.float32), levels=[0.5], colors="white", linewidths=0.8)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    _colour_bar(fig, ax, value_range=value_range, threshold=threshold, lut=lut, label=bar_label)
    width_in = fig.get_size_inches()[0]
    fig.supxlabel(textwrap.fill(legend, width=max(40, int(width_in * 15))), fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
