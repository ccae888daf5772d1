"""The heatmap file writers: colours, pyramidal TIFF, GeoJSON regions and the PNG overlay.

Each writer takes arrays (a stitched heatmap, a thumbnail) and writes one file through
:func:`wsi_pipeline.util.atomic_path`, so a reader never sees a half-written file. Nothing here
reads a store; :mod:`wsi_pipeline.heatmap` decides what goes where.

Formats
-------
Pyramidal TIFF (:func:`write_pyramid_tiff`)
    Tiled (256 px), deflate or JPEG, levels halving until one tile is left, one main IFD per
    level; XResolution/YResolution in centimetres give the µm per pixel, so openslide (vendor
    ``generic-tiff``) and tiffslide both read it with its levels and mpp. Float32 values use
    deflate with a floating-point predictor; their levels are NaN-aware 2 x 2 means.
GeoJSON (:func:`threshold_regions`)
    A FeatureCollection of QuPath annotations in level-0 pixel coordinates.
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
    "TIFF_COMPRESSIONS",
    "background_rows",
    "check_compression",
    "colour_lut",
    "overlay_rgb",
    "render_png",
    "threshold_regions",
    "write_pyramid_tiff",
]

#: Compressions of :func:`write_pyramid_tiff` (JPEG only for RGB; float data uses deflate).
TIFF_COMPRESSIONS = ("deflate", "jpeg")


# --------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------
def colour_lut(cmap: str) -> np.ndarray:
    """The lookup table of a matplotlib colormap.

    Parameters
    ----------
    cmap : str
        A matplotlib colormap name, e.g. ``"jet"``.

    Returns
    -------
    (256, 3) uint8 ndarray

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


def overlay_rgb(
    values: np.ndarray,
    background: np.ndarray,
    *,
    value_range: tuple[float, float],
    cmap: str | np.ndarray = "jet",
    alpha: float = 0.5,
) -> np.ndarray:
    """Colour a heatmap over a background image.

    Parameters
    ----------
    values : (H, W) float ndarray
        NaN where there is no value.
    background : (H, W, 3) uint8 ndarray
        The slide at the heatmap's resolution.
    value_range : (float, float)
        Values mapped to the two ends of the colormap (clipped outside).
    cmap : str or (256, 3) uint8 ndarray
        A matplotlib colormap name, or its lookup table (:func:`colour_lut`).
    alpha : float
        Opacity of the colours where there are values; elsewhere the background is shown in light
        grey.

    Returns
    -------
    (H, W, 3) uint8 ndarray
    """
    lut = colour_lut(cmap) if isinstance(cmap, str) else np.asarray(cmap, np.uint8)
    lo, hi = value_range
    ok = np.isfinite(values)
    t = np.nan_to_num((values - lo) * (255.0 / max(hi - lo, 1e-12)), nan=0.0)
    colour = lut[np.clip(t + 0.5, 0, 255).astype(np.uint8)]
    # integer blending in 1/256 steps: colour over the slide where scored, light grey elsewhere
    a = np.uint16(round(float(alpha) * 256))
    bg = background.astype(np.uint16)
    blend = ((256 - a) * bg + a * colour + 128) >> 8
    grey = (bg[..., 0] * 77 + bg[..., 1] * 150 + bg[..., 2] * 29 + 128) >> 8
    light = (grey * 141 + 255 * 115 + 128) >> 8  # 55 % grey + 45 % white
    return np.where(ok[..., None], blend, light[..., None]).astype(np.uint8)


def background_rows(
    thumb: np.ndarray, thumb_ds: float, ds: float, shape: tuple[int, int]
) -> Callable[[int, int], np.ndarray]:
    """The thumbnail resampled onto a heatmap grid, served row block by row block.

    A grid no larger than the thumbnail is box-resampled once (it is smaller than the
    thumbnail); a finer grid is interpolated bilinearly, one row block at a time, so a large
    grid's background never exists in memory at once.

    Parameters
    ----------
    thumb : (h, w, 3) uint8 ndarray
        The slide's thumbnail.
    thumb_ds, ds : float
        Level-0 px per thumbnail pixel and per heatmap pixel.
    shape : (int, int)
        ``(H, W)`` of the heatmap grid.

    Returns
    -------
    callable
        ``rows(r0, r1)`` returns grid rows ``r0..r1`` as a ``(r1 - r0, W, 3)`` uint8 ndarray.
    """
    h, w = shape
    if h * w <= thumb.shape[0] * thumb.shape[1]:
        full = resize_rgb(thumb, (w, h), box=True)
        return lambda r0, r1: full[r0:r1]
    th, tw = thumb.shape[:2]

    def taps(n: int, size: int, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Linear-interpolation taps of grid pixels ``start..n`` in a thumbnail axis."""
        pos = np.clip((np.arange(start, n) + 0.5) * ds / thumb_ds - 0.5, 0, size - 1)
        i0 = np.minimum(pos.astype(np.int64), size - 1)
        return i0, np.minimum(i0 + 1, size - 1), (pos - i0).astype(np.float32)[:, None]

    c0, c1, fc = taps(w, tw)
    src = thumb.astype(np.float32)

    def rows(r0: int, r1: int) -> np.ndarray:
        i0, i1, fr = taps(r1, th, r0)
        a = src[i0] * (1 - fr[:, :, None]) + src[i1] * fr[:, :, None]  # (rows, tw, 3)
        b = a[:, c0] * (1 - fc) + a[:, c1] * fc
        return np.clip(b + 0.5, 0, 255).astype(np.uint8)

    return rows


# --------------------------------------------------------------------------------------------
# pyramidal TIFF
# --------------------------------------------------------------------------------------------
def check_compression(compression: str) -> str:
    """``compression`` if it is one of :data:`TIFF_COMPRESSIONS`, else ConfigError."""
    if compression not in TIFF_COMPRESSIONS:
        raise ConfigError(f"TIFF compression must be 'deflate' or 'jpeg', not {compression!r}")
    return compression


def _reduce2(a: np.ndarray) -> np.ndarray:
    """2 x 2 mean (NaN-aware for floats; rounded for uint8), odd edges replicated."""
    if a.shape[0] % 2 or a.shape[1] % 2:
        a = np.pad(
            a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2)) + ((0, 0),) * (a.ndim - 2), mode="edge"
        )
    q = (a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2])
    if a.dtype == np.uint8:
        total = q[0].astype(np.uint16) + q[1] + q[2] + q[3]  # at most 1020: no overflow
        return ((total + 2) // 4).astype(np.uint8)
    finite = [np.isfinite(x) for x in q]
    n = sum(f.astype(np.float32) for f in finite)
    s = sum(np.where(f, x, 0.0) for x, f in zip(q, finite))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / n, np.nan).astype(a.dtype)


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
    if int(tile_px) < 16 or int(tile_px) % 16:
        raise ConfigError(f"TIFF tile size must be a multiple of 16, not {tile_px!r}")
    dtype = np.dtype(dtype)
    rgb = len(shape) == 3
    h, w, t = int(shape[0]), int(shape[1]), int(tile_px)
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


# --------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------
def _ring_area(rc: np.ndarray) -> float:
    y, x = rc[:, 0], rc[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _polygons(g: Any) -> list[Any]:
    """The polygons of any geometry (lines and points from repairs are dropped)."""
    if g.is_empty:
        return []
    if g.geom_type == "Polygon":
        return [g]
    if g.geom_type in ("MultiPolygon", "GeometryCollection"):
        return [p for part in g.geoms for p in _polygons(part)]
    return []


def _region_geometry(sub: np.ndarray, origin_rc: tuple[int, int], simplify_px: float) -> Any:
    """One region's mask (its bounding box) as a valid polygon in heatmap-pixel (x, y), or None.

    Traced at the pixel edges (marching squares on the padded mask), holes included,
    simplified, repaired and dissolved if needed; exteriors counter-clockwise.
    """
    import shapely
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.polygon import orient
    from skimage.measure import find_contours

    rings = find_contours(np.pad(sub, 1).astype(np.float32), 0.5)
    if not rings:
        return None
    r0, c0 = origin_rc[0] - 1, origin_rc[1] - 1
    rings = [np.column_stack([r[:, 1] + c0, r[:, 0] + r0]) for r in rings if len(r) >= 4]
    areas = [abs(_ring_area(r[:, ::-1])) for r in rings]
    if not rings:
        return None
    outer = int(np.argmax(areas))
    geom: Any = Polygon(rings[outer], [r for i, r in enumerate(rings) if i != outer])
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if simplify_px > 0:
        simple = geom.simplify(float(simplify_px), preserve_topology=True)
        if simple.is_valid and not simple.is_empty:
            geom = simple
    parts = [p for p in _polygons(geom) if p.area > 0]
    if len(parts) > 1:  # pieces of a repair: dissolve shared edges
        parts = _polygons(shapely.union_all(parts))
    if not parts:
        return None
    parts = [orient(p, sign=1.0) for p in parts]
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def threshold_regions(
    values: np.ndarray,
    *,
    threshold: float,
    downsample: float,
    mpp: float | None = None,
    name: str = "Abnormal",
    color_rgb: tuple[int, int, int] = (255, 0, 0),
    simplify_px: float = 1.0,
    min_region_px: int = 1,
) -> dict[str, Any]:
    """Regions of the heatmap at or above ``threshold`` as a GeoJSON FeatureCollection.

    Each 4-connected region of pixels ``>= threshold`` is traced by marching squares at the pixel
    edges (``skimage.measure.find_contours`` on the padded mask), holes included, simplified by
    ``simplify_px`` heatmap pixels, repaired if needed, and scaled to level-0 pixels. Exteriors are
    counter-clockwise and holes clockwise in the (x, y) coordinates as written (RFC 7946).

    Parameters
    ----------
    values : (H, W) float ndarray
        Heatmap (NaN never counts).
    threshold : float
        In the heatmap's units.
    downsample : float
        Level-0 px per heatmap pixel.
    mpp : float, optional
        Level-0 µm per pixel, for ``area_um2``.
    name, color_rgb :
        The QuPath classification of every region.
    simplify_px : float
        Douglas-Peucker tolerance in heatmap pixels (0: none).
    min_region_px : int
        Regions with fewer heatmap pixels are left out.

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [...]}``; one Feature per region with a
        Polygon or MultiPolygon geometry in level-0 px and properties ``objectType: "annotation"``,
        ``classification: {name, color}`` and ``measurements``: ``score_mean``, ``score_max`` (in
        the heatmap's units), ``area_px`` (level-0 px²), ``area_um2`` (only with ``mpp``).
    """
    from scipy import ndimage
    from shapely.affinity import affine_transform
    from shapely.geometry import mapping

    v = np.asarray(values, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        above = v >= threshold
    labels, _ = ndimage.label(above)  # 4-connected, like find_contours' default
    ds = float(downsample)
    features: list[dict[str, Any]] = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        sub = labels[sl] == k
        if int(sub.sum()) < max(1, int(min_region_px)):
            continue
        geom = _region_geometry(sub, (sl[0].start, sl[1].start), simplify_px)
        if geom is None:
            continue
        geom = affine_transform(geom, [ds, 0, 0, ds, 0.5 * ds, 0.5 * ds])
        vals = v[sl][sub]
        meas = {
            "score_mean": float(np.mean(vals)),
            "score_max": float(np.max(vals)),
            "area_px": float(geom.area),
        }
        if mpp:
            meas["area_um2"] = float(geom.area) * float(mpp) ** 2
        props = {
            "objectType": "annotation",
            "name": f"{name} {len(features) + 1}",
            "classification": {"name": name, "color": [int(c) for c in color_rgb]},
            "measurements": meas,
        }
        features.append({"type": "Feature", "geometry": mapping(geom), "properties": props})
    return {"type": "FeatureCollection", "features": features}


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------
def _pool(values: np.ndarray, f: int) -> np.ndarray:
    """NaN-aware ``f x f`` mean (display only)."""
    if f == 1:
        return values
    h, w = values.shape
    a = np.pad(values, ((0, -h % f), (0, -w % f)), constant_values=np.nan)
    a = a.reshape(a.shape[0] // f, f, a.shape[1] // f, f)
    ok = np.isfinite(a)
    n = ok.sum(axis=(1, 3))
    s = np.where(ok, a, 0.0).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / n, np.nan).astype(np.float32)


def _colour_bar(
    fig: Any, ax: Any, *, value_range: tuple[float, float], threshold: float, cmap: str, label: str
) -> None:
    """A colour bar of ``value_range`` with the threshold drawn as a white line."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cb = fig.colorbar(
        ScalarMappable(norm=Normalize(*value_range), cmap=cmap), ax=ax, fraction=0.04, pad=0.02
    )
    cb.ax.axhline(threshold, color="white", linewidth=1.5)
    cb.ax.tick_params(labelsize=8)
    cb.set_label(label, fontsize=8)


def render_png(
    path: str | os.PathLike,
    values: np.ndarray,
    thumb: np.ndarray,
    *,
    value_range: tuple[float, float],
    threshold: float,
    cmap: str,
    alpha: float,
    title: str,
    legend: str,
    bar_label: str,
    max_px: int,
) -> Path:
    """Write the heatmap over the thumbnail as a PNG figure.

    The heatmap is averaged down (NaN-aware) until its longest side is at most ``max_px``, drawn
    over the thumbnail (:func:`overlay_rgb`) with the regions at or above ``threshold`` outlined
    in white, a title, a colour bar and a wrapped legend below.

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
    cmap : str
        A matplotlib colormap name.
    alpha : float
        Overlay opacity.
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
    bg = resize_rgb(thumb, (v.shape[1], v.shape[0]), box=True)
    rgb = overlay_rgb(v, bg, value_range=value_range, cmap=cmap, alpha=alpha)
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
    _colour_bar(fig, ax, value_range=value_range, threshold=threshold, cmap=cmap, label=bar_label)
    width_in = fig.get_size_inches()[0]
    fig.supxlabel(textwrap.fill(legend, width=max(40, int(width_in * 15))), fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
