"""Heatmaps from per-patch scores: stitching, PNG overlay, pyramidal TIFF, GeoJSON regions.

Everything here works from a store alone (``coords``, ``thumbnail``, ``tissue_mask`` and the
``scores/<run>`` written by ``wsi-pipeline predict``); no model and no torch.

Geometry
--------
A heatmap is a grid at ``downsample`` level-0 px per heatmap pixel: pixel ``(i, j)`` covers the
level-0 square ``[j * ds, (j + 1) * ds) x [i * ds, (i + 1) * ds)``, and the grid has
``ceil(height / ds)`` rows and ``ceil(width / ds)`` columns. Each patch covers the level-0 square
``[x, x + patch_l0) x [y, y + patch_l0)``. A heatmap pixel's value is the average of the scores of
the patches that overlap it, each weighted by the exact area of the overlap (fractional at patch
borders), optionally smoothed by a Gaussian (normalised convolution: score sum and weight sum are
smoothed separately, so edges are not darkened) and set to NaN outside tissue and where no patch
lies. The grid is built in blocks of ``block_px`` heatmap pixels; only the patches overlapping a
block (found by binary search on the y-sorted corners) are touched, and nothing is ever allocated
at level-0 resolution.

Display modes
-------------
``"probability"``
    The stored per-patch abnormality probabilities (``scores/<run>``), on a fixed 0..1 colour
    scale: colours mean the same on every slide.
``"percentile"``
    Within-slide percentile ranks (0..100) of the patch scores, so every slide spans the full
    colour range; colours are *not* comparable across slides. The default for attention
    (``scores/<run>-attention``), whose weights sum to 1 over a slide and are not probabilities.

Exports of one slide (:func:`export_heatmaps`), in ``out_dir``
-------------------------------------------------------------
``<id>_<which>_overlay.png``
    The heatmap over the store's thumbnail, with a colour bar and the slide's prediction.
``<id>_<which>_overlay.tif``
    The same overlay as a pyramidal tiled RGB TIFF (256-px tiles, deflate or JPEG, levels halving
    until one tile is left, one main IFD per level). Level 0 spans the whole slide at the heatmap's
    downsample, and XResolution/YResolution (centimetres) give ``mpp * downsample`` µm per pixel,
    so openslide (vendor ``generic-tiff``) and tiffslide both read it with its levels and mpp.
``<id>_<which>_values.tif``
    The heatmap values themselves, float32 (NaN outside tissue), same layout with deflate and a
    floating-point predictor; levels are NaN-aware 2 x 2 means. For tifffile/tiffslide/QuPath
    (openslide reads RGB only).
``<id>_<which>_regions.geojson``
    Regions at or above ``threshold`` as a GeoJSON FeatureCollection of QuPath annotations in
    level-0 pixel coordinates (:func:`threshold_regions`).
``<id>_<which>_summary.json``
    Prediction, area and tissue fraction above the threshold, top-10 patches, parameters and the
    other files' names (relative to the summary); written last, so it marks a finished export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ConfigError, StoreError, WSIPipelineError
from .metrics import area_above
from .store import SlideStore, list_stores
from .util import resize_rgb, sample_mask, sanitize_id

__all__ = [
    "MODES",
    "display_values",
    "export_heatmaps",
    "heatmap_shape",
    "heatmaps",
    "overlay_rgb",
    "percentile_ranks",
    "stitch_scores",
    "threshold_regions",
    "write_pyramid_tiff",
]

log = logging.getLogger(__name__)

#: Display modes and their value range.
MODES: dict[str, tuple[float, float]] = {"probability": (0.0, 1.0), "percentile": (0.0, 100.0)}
_DEFAULT_THRESHOLD = {"probability": 0.5, "percentile": 90.0}
_LEGEND = {
    "probability": "colour: per-patch abnormality probability (0-1, fixed scale, comparable "
    "across slides)",
    "percentile": "colour: within-slide percentile rank of the patch {what} (0-100; every slide "
    "spans the full colour range, so colours are not comparable across slides)",
}
_EPS = 1e-9  # summed overlap (in heatmap-pixel areas) below which a pixel counts as unscored
_TRUNCATE = 4.0  # Gaussian kernel radius in sigmas


# --------------------------------------------------------------------------------------------
# per-patch values
# --------------------------------------------------------------------------------------------
def percentile_ranks(scores: np.ndarray) -> np.ndarray:
    """Within-slide percentile rank of each score.

    Parameters
    ----------
    scores : (N,) float ndarray
        Per-patch scores; NaN stays NaN and is not ranked.

    Returns
    -------
    (N,) float32 ndarray
        ``100 * (rank - 1) / (n - 1)`` with 1-based ranks among the finite scores (ties get their
        average rank): the lowest score gets 0, the highest 100; a single finite score gets 100.
    """
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    out = np.full(s.shape, np.nan, np.float32)
    ok = np.isfinite(s)
    n = int(ok.sum())
    if n == 1:
        out[ok] = 100.0
    elif n > 1:
        out[ok] = 100.0 * (rankdata(s[ok], method="average") - 1.0) / (n - 1)
    return out


def display_values(scores: np.ndarray, *, mode: str) -> np.ndarray:
    """Per-patch values in a display mode's units.

    Parameters
    ----------
    scores : (N,) float ndarray
        Stored per-patch scores.
    mode : {"probability", "percentile"}
        ``"probability"``: the scores as they are (0..1); ``"percentile"``: within-slide ranks
        (0..100, :func:`percentile_ranks`).

    Returns
    -------
    (N,) float32 ndarray
    """
    if mode == "probability":
        return np.asarray(scores, dtype=np.float32).reshape(-1)
    if mode == "percentile":
        return percentile_ranks(scores)
    raise ConfigError(f"heatmap mode must be one of {sorted(MODES)}, not {mode!r}")


# --------------------------------------------------------------------------------------------
# stitching
# --------------------------------------------------------------------------------------------
def heatmap_shape(slide_wh: tuple[int, int], downsample: float) -> tuple[int, int]:
    """``(rows, cols)`` of the heatmap grid of a slide of level-0 size ``slide_wh``."""
    w, h = int(slide_wh[0]), int(slide_wh[1])
    return max(1, math.ceil(h / downsample - 1e-9)), max(1, math.ceil(w / downsample - 1e-9))


def _pieces(lo: np.ndarray, hi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split 1-D footprints ``[lo, hi)`` (heatmap px, block-relative) into up to three runs of
    pixels with constant overlap: the first pixel, the interior, the last pixel.

    Returns starts, ends (clipped to ``0..n``) and overlaps (fractions of a pixel), each (K, 3).
    """
    i0 = np.floor(lo).astype(np.int64)
    i1 = np.maximum(np.ceil(hi).astype(np.int64), i0 + 1)
    single = (i1 - i0) == 1
    first = np.where(single, hi - lo, (i0 + 1) - lo)
    last = np.where(single, 0.0, hi - (i1 - 1))
    starts = np.stack([i0, i0 + 1, i1 - 1], axis=1)
    ends = np.stack([i0 + 1, np.maximum(i0 + 1, i1 - 1), i1], axis=1)
    overlap = np.stack([first, np.ones_like(lo), last], axis=1)
    return np.clip(starts, 0, n), np.clip(ends, 0, n), overlap


def _accumulate(
    x_lo: np.ndarray,
    x_hi: np.ndarray,
    y_lo: np.ndarray,
    y_hi: np.ndarray,
    values: np.ndarray,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Overlap-weighted sums of ``values`` and of the overlaps over a ``shape`` block.

    Each footprint (heatmap px, block-relative) is split into at most 3 x 3 rectangles of constant
    fractional overlap, added to a 2-D difference array (4 corners each) and integrated by two
    cumulative sums: exact areas, O(K + block area) whatever the patch size.
    """
    bh, bw = shape
    xs, xe, xw = _pieces(x_lo, x_hi, bw)
    ys, ye, yw = _pieces(y_lo, y_hi, bh)
    w = (yw[:, :, None] * xw[:, None, :]).reshape(-1)
    stride = bw + 1
    ys, ye = ys[:, :, None] * stride, ye[:, :, None] * stride
    xs, xe = xs[:, None, :], xe[:, None, :]
    idx = np.concatenate(
        [(ys + xs).ravel(), (ys + xe).ravel(), (ye + xs).ravel(), (ye + xe).ravel()]
    )
    wts = np.concatenate([w, -w, -w, w])
    v = np.repeat(values.astype(np.float64), 9)
    size = (bh + 1) * stride
    den = np.bincount(idx, weights=wts, minlength=size).reshape(bh + 1, stride)
    num = np.bincount(idx, weights=wts * np.tile(v, 4), minlength=size).reshape(bh + 1, stride)
    for a in (den, num):  # integrate the corners, in place
        np.cumsum(a, axis=0, out=a)
        np.cumsum(a, axis=1, out=a)
    return num[:bh, :bw], den[:bh, :bw]


def _smooth(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian filter with zeros outside (``scipy.ndimage.gaussian_filter``'s kernel, truncated
    at ``_TRUNCATE`` sigmas); by FFT along each axis when the kernel is long."""
    from scipy.ndimage import gaussian_filter
    from scipy.signal import oaconvolve

    r = int(_TRUNCATE * sigma_px + 0.5)
    if r <= 16:
        return gaussian_filter(a, sigma_px, mode="constant", truncate=_TRUNCATE)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_px) ** 2)
    k /= k.sum()
    a = oaconvolve(a, k[None, :], mode="same", axes=1)
    return oaconvolve(a, k[:, None], mode="same", axes=0)


def stitch_scores(
    coords_xy: np.ndarray,
    scores: np.ndarray,
    *,
    patch_l0: float,
    slide_wh: tuple[int, int],
    downsample: float,
    tissue_mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
    sigma_um: float = 0.0,
    mpp: float | None = None,
    block_px: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Stitch per-patch scores into a heatmap grid, block by block.

    Parameters
    ----------
    coords_xy : (N, 2) int ndarray
        Level-0 ``(x, y)`` of each patch's top-left corner.
    scores : (N,) float ndarray
        One value per patch (any units); NaN scores are left out.
    patch_l0 : float
        Patch side in level-0 px.
    slide_wh : (int, int)
        Level-0 ``(width, height)`` of the slide.
    downsample : float
        Level-0 px per heatmap pixel.
    tissue_mask : (h, w) bool ndarray, optional
        Tissue mask; heatmap pixels whose centre falls outside tissue are NaN.
    mask_downsample : float, optional
        Level-0 px per mask pixel; default ``slide width / mask width``.
    sigma_um : float
        Gaussian smoothing sigma in µm (0: none). Needs ``mpp``.
    mpp : float, optional
        Level-0 µm per pixel.
    block_px : int
        Side of a stitching block in heatmap pixels (bounds the working memory to a few arrays of
        ``(block_px + 2 * halo)**2`` float64).

    Returns
    -------
    values : (H, W) float32 ndarray
        Overlap-weighted mean score; NaN outside tissue and where no patch lies.
    coverage : (H, W) float32 ndarray
        Summed patch overlap per pixel in pixel areas (1: covered by one patch; 2 where two
        overlap; fractional at patch borders); before smoothing and tissue masking.

    Raises
    ------
    ConfigError
        A non-positive ``patch_l0``/``downsample``/``block_px``, a negative ``sigma_um``, or
        ``sigma_um > 0`` without ``mpp``.
    ValueError
        ``coords_xy`` and ``scores`` of mismatched shapes.
    """
    coords = np.asarray(coords_xy, dtype=np.float64).reshape(-1, 2)
    vals = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(vals):
        raise ValueError(f"coords_xy has {len(coords)} rows but scores has {len(vals)} values")
    ds, p = float(downsample), float(patch_l0)
    if not (ds > 0 and p > 0 and int(block_px) >= 1):
        raise ConfigError(
            f"downsample ({downsample!r}), patch_l0 ({patch_l0!r}) and block_px ({block_px!r}) "
            "must be positive"
        )
    if not sigma_um >= 0:
        raise ConfigError(f"sigma_um must be >= 0, not {sigma_um!r}")
    sigma_px = 0.0
    if sigma_um > 0:
        if not mpp:
            raise ConfigError(
                "smoothing in µm needs the slide's mpp, which is unknown; set sigma_um=0 or "
                "re-tile with --slide-mpp"
            )
        sigma_px = float(sigma_um) / (float(mpp) * ds)
    halo = int(_TRUNCATE * sigma_px + 0.5) + 1 if sigma_px > 0 else 0
    h, w = heatmap_shape(slide_wh, ds)
    if tissue_mask is not None:
        tissue_mask = np.asarray(tissue_mask, dtype=bool)
        mask_ds = float(mask_downsample or int(slide_wh[0]) / tissue_mask.shape[1])
    keep = np.isfinite(vals)
    coords, vals = coords[keep], vals[keep]
    order = np.argsort(coords[:, 1], kind="stable")
    xs, ys, vals = coords[order, 0], coords[order, 1], vals[order]
    values = np.full((h, w), np.nan, np.float32)
    coverage = np.zeros((h, w), np.float32)
    b = int(block_px)
    for r0 in range(0, h, b):
        r1 = min(h, r0 + b)
        er0, er1 = max(0, r0 - halo), min(h, r1 + halo)
        # patches with y < er1 * ds and y + p > er0 * ds, by binary search on the sorted y
        lo = int(np.searchsorted(ys, er0 * ds - p, side="right"))
        hi = int(np.searchsorted(ys, er1 * ds, side="left"))
        row_x, row_y, row_v = xs[lo:hi], ys[lo:hi], vals[lo:hi]
        for c0 in range(0, w, b):
            c1 = min(w, c0 + b)
            ec0, ec1 = max(0, c0 - halo), min(w, c1 + halo)
            sel = (row_x < ec1 * ds) & (row_x + p > ec0 * ds)
            if not sel.any():
                continue  # no patch here: NaN, coverage 0
            px, py = row_x[sel] / ds, row_y[sel] / ds
            num, den = _accumulate(
                px - ec0,
                px + p / ds - ec0,
                py - er0,
                py + p / ds - er0,
                row_v[sel],
                (er1 - er0, ec1 - ec0),
            )
            inner = (slice(r0 - er0, r1 - er0), slice(c0 - ec0, c1 - ec0))
            raw = den[inner]
            if sigma_px > 0:
                num, den = _smooth(num, sigma_px), _smooth(den, sigma_px)
            num, den = num[inner], den[inner]
            ok = (raw > _EPS) & (den > _EPS)
            if tissue_mask is not None:
                ok &= sample_mask(tissue_mask, mask_ds, ds, (r0, r1), (c0, c1))
            block = np.full(raw.shape, np.nan, np.float32)
            block[ok] = num[ok] / den[ok]
            values[r0:r1, c0:c1] = block
            coverage[r0:r1, c0:c1] = np.maximum(raw, 0.0)
    if len(vals):  # rounding in the cumulative sums must not leave the scores' range
        np.clip(values, vals.min(), vals.max(), out=values)
    return values, coverage


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------
def _lut(cmap: str) -> np.ndarray:
    """(256, 3) uint8 colours of a matplotlib colormap."""
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
        A matplotlib colormap name, or its lookup table.
    alpha : float
        Opacity of the colours where there are values; elsewhere the background is shown in light
        grey.

    Returns
    -------
    (H, W, 3) uint8 ndarray
    """
    lut = _lut(cmap) if isinstance(cmap, str) else np.asarray(cmap, np.uint8)
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


def _background_rows(
    thumb: np.ndarray, thumb_ds: float, ds: float, shape: tuple[int, int]
) -> Callable[[int, int], np.ndarray]:
    """A function ``(r0, r1) -> (r1 - r0, W, 3) uint8``: the thumbnail on the heatmap grid.

    A grid no larger than the thumbnail is box-resampled once (it is smaller than the
    thumbnail); a finer grid is interpolated bilinearly, row block by row block.
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
def _reduce2(a: np.ndarray) -> np.ndarray:
    """2 x 2 mean (NaN-aware for floats; rounded for uint8), odd edges replicated."""
    if a.shape[0] % 2 or a.shape[1] % 2:
        a = np.pad(
            a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2)) + ((0, 0),) * (a.ndim - 2), mode="edge"
        )
    q = (a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2])
    if a.dtype == np.uint8:
        return ((sum(x.astype(np.uint16) for x in q) + 2) // 4).astype(np.uint8)
    finite = [np.isfinite(x) for x in q]
    n = sum(f.astype(np.float32) for f in finite)
    s = sum(np.where(f, x, 0.0) for x, f in zip(q, finite))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / n, np.nan).astype(a.dtype)


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
    """
    import tifffile

    if compression not in ("deflate", "jpeg"):
        raise ConfigError(f"TIFF compression must be 'deflate' or 'jpeg', not {compression!r}")
    if int(tile_px) < 16 or int(tile_px) % 16:
        raise ConfigError(f"TIFF tile size must be a multiple of 16, not {tile_px!r}")
    dtype = np.dtype(dtype)
    rgb = len(shape) == 3
    if compression == "jpeg" and not rgb:
        compression = "deflate"
    h, w = int(shape[0]), int(shape[1])
    t = int(tile_px)
    sizes = [(h, w)]
    while max(sizes[-1]) > t:
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    level1 = np.empty((*sizes[1], *shape[2:]), dtype) if len(sizes) > 1 else None

    def tiles(a: np.ndarray) -> Iterator[np.ndarray]:
        """Full tiles of one strip (edge-padded), left to right."""
        pad = ((0, t - a.shape[0]), (0, -a.shape[1] % t)) + ((0, 0),) * (a.ndim - 2)
        a = np.pad(a, pad, mode="edge")
        for x in range(0, a.shape[1], t):
            yield np.ascontiguousarray(a[:, x : x + t])

    def level0() -> Iterator[np.ndarray]:
        for r0 in range(0, h, t):
            strip = np.asarray(rows(r0, min(h, r0 + t)), dtype=dtype)
            if level1 is not None:
                level1[r0 // 2 : r0 // 2 + (len(strip) + 1) // 2] = _reduce2(strip)
            yield from tiles(strip)

    def level(a: np.ndarray) -> Iterator[np.ndarray]:
        for r0 in range(0, a.shape[0], t):
            yield from tiles(a[r0 : r0 + t])

    kw: dict[str, Any] = {"photometric": "rgb" if rgb else "minisblack", "metadata": None}
    if compression == "jpeg":
        kw.update(compression="jpeg", compressionargs={"level": 90})
    else:
        kw.update(compression="zlib", compressionargs={"level": 6})
        if not rgb:
            kw["predictor"] = True
    res = None if not mpp else 1e4 / float(mpp)
    out = Path(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        big = h * w * dtype.itemsize * (3 if rgb else 1) > 2**31
        with tifffile.TiffWriter(tmp, bigtiff=big) as tw:
            arr = None
            for k, (lh, lw) in enumerate(sizes):
                extra: dict[str, Any] = {"subfiletype": 1 if k else 0}
                if res:
                    extra["resolution"] = (res * lw / w, res * lh / h)
                    extra["resolutionunit"] = "CENTIMETER"
                if k == 0:
                    data: Any = level0()
                    extra["description"] = description
                else:
                    arr = level1 if k == 1 else _reduce2(arr)[:lh, :lw]
                    data = level(arr)
                tw.write(data, shape=(lh, lw, *shape[2:]), dtype=dtype, tile=(t, t), **kw, **extra)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


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
    import shapely
    from scipy import ndimage
    from shapely.affinity import affine_transform
    from shapely.geometry import MultiPolygon, Polygon, mapping
    from shapely.geometry.polygon import orient
    from skimage.measure import find_contours

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
        npx = int(sub.sum())
        if npx < max(1, int(min_region_px)):
            continue
        rings = find_contours(np.pad(sub, 1).astype(np.float32), 0.5)
        if not rings:
            continue
        r0, c0 = sl[0].start - 1, sl[1].start - 1
        rings = [np.column_stack([r[:, 1] + c0, r[:, 0] + r0]) for r in rings if len(r) >= 4]
        areas = [abs(_ring_area(r[:, ::-1])) for r in rings]
        if not rings:
            continue
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
            continue
        parts = [orient(p, sign=1.0) for p in parts]
        geom = parts[0] if len(parts) == 1 else MultiPolygon(parts)
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


def _write_json(path: Path, obj: Any, *, indent: int | None = None) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


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


def _render_png(
    path: Path,
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
    """The overlay (averaged down to ``max_px``) with title, colour bar and legend, as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    f = max(1, math.ceil(max(values.shape) / max_px))
    v = _pool(values, f)
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
    cb = fig.colorbar(
        ScalarMappable(norm=Normalize(*value_range), cmap=cmap), ax=ax, fraction=0.04, pad=0.02
    )
    cb.ax.axhline(threshold, color="white", linewidth=1.5)
    cb.ax.tick_params(labelsize=8)
    cb.set_label(bar_label, fontsize=8)
    width_in = fig.get_size_inches()[0]
    fig.supxlabel(textwrap.fill(legend, width=max(40, int(width_in * 15))), fontsize=7)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# one slide
# --------------------------------------------------------------------------------------------
def _read_scores(store: SlideStore, run_id: str, which: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-patch scores of a run and the prediction attrs (from ``scores/<run>``)."""
    if which not in ("score", "attention"):
        raise ConfigError(f"which must be 'score' or 'attention', not {which!r}")
    key = f"scores/{run_id}" + ("-attention" if which == "attention" else "")
    g = store.group
    try:
        arr = g[key]
    except KeyError:
        try:
            runs = sorted(k for k in g["scores"].array_keys() if not k.endswith("-attention"))
        except KeyError:
            runs = []
        have = f" (it has: {', '.join(runs)})" if runs else " (it has no scores)"
        if which == "attention" and run_id in runs:
            raise StoreError(
                f"run {run_id!r} has no attention scores (its head has no attention); "
                "use which='score'",
                path=store.path,
            ) from None
        raise StoreError(
            f"no '{key}' in the store{have}; run 'wsi-pipeline predict --run {run_id}' first",
            path=store.path,
        ) from None
    if arr.attrs.get("complete") is not True:
        raise StoreError(
            f"'{key}' is unfinished; rerun 'wsi-pipeline predict --run {run_id}'", path=store.path
        )
    scores = np.asarray(arr[...], dtype=np.float32).reshape(-1)
    if len(scores) != store.n_patches:
        raise StoreError(
            f"'{key}' has {len(scores)} values for {store.n_patches} patches; rerun "
            f"'wsi-pipeline predict --run {run_id}'",
            path=store.path,
        )
    try:  # the slide's prediction lives with the scores
        pred = dict(arr.attrs) if which == "score" else dict(g[f"scores/{run_id}"].attrs)
    except KeyError:
        pred = {}
    return scores, pred


def _check_options(which: str, mode: str | None, threshold: float | None) -> tuple[str, float]:
    mode = mode or ("percentile" if which == "attention" else "probability")
    if mode not in MODES:
        raise ConfigError(f"heatmap mode must be one of {sorted(MODES)}, not {mode!r}")
    if which == "attention" and mode == "probability":
        raise ConfigError("attention weights are not probabilities; use mode='percentile'")
    lo, hi = MODES[mode]
    thr = _DEFAULT_THRESHOLD[mode] if threshold is None else float(threshold)
    if not lo <= thr <= hi:
        raise ConfigError(f"threshold {threshold!r} is outside the {mode} range {lo:g}..{hi:g}")
    return mode, thr


def _file_names(slide_id: str, which: str) -> dict[str, str]:
    base = f"{sanitize_id(slide_id)}_{which}"
    return {
        "png": f"{base}_overlay.png",
        "tiff": f"{base}_overlay.tif",
        "values_tiff": f"{base}_values.tif",
        "geojson": f"{base}_regions.geojson",
        "summary": f"{base}_summary.json",
    }


def _prepare(
    store_path: str | os.PathLike,
    *,
    run_id: str,
    which: str,
    mode: str | None,
    threshold: float | None,
    downsample: float | None,
    options: dict[str, Any],
) -> tuple[SlideStore, np.ndarray, dict[str, Any], dict[str, Any]]:
    """Open and check one export: the store, its scores, the prediction attrs and the
    parameters (recorded in the summary, compared to skip a finished export)."""
    store = SlideStore(store_path)
    mode, thr = _check_options(which, mode, threshold)
    if store.n_patches == 0:
        raise StoreError("no patches in the store (no tissue); nothing to draw", path=store.path)
    scores, pred = _read_scores(store, run_id, which)
    ds = float(downsample or store.group["thumbnail"].attrs["downsample"])
    if not ds > 0:
        raise ConfigError(f"downsample must be > 0, not {downsample!r}")
    digest = hashlib.sha1(np.ascontiguousarray(scores).tobytes()).hexdigest()
    params = {
        "run": run_id,
        "which": which,
        "mode": mode,
        "threshold": thr,
        "downsample": ds,
        **options,
        "n_patches": store.n_patches,
        "scores_sha1": digest,
    }
    return store, scores, pred, params


def export_heatmaps(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    run_id: str,
    which: str = "score",
    mode: str | None = None,
    threshold: float | None = None,
    downsample: float | None = None,
    sigma_um: float = 0.0,
    cmap: str = "jet",
    alpha: float = 0.5,
    compression: str = "deflate",
    values_tiff: bool = True,
    png_max_px: int = 2048,
    block_px: int = 1024,
    mask_tissue: bool = True,
) -> dict[str, Path]:
    """Stitch one store's scores and write the PNG, pyramidal TIFFs, GeoJSON and summary.

    Parameters
    ----------
    store_path : path
        A complete store with ``scores/<run_id>``.
    out_dir : path
        Folder for this slide's files (created); names are ``<slide_id>_<which>_*``.
    run_id : str
        The predict run whose scores are drawn.
    which : {"score", "attention"}
        ``scores/<run_id>`` (per-patch abnormality probability) or ``scores/<run_id>-attention``.
    mode : {"probability", "percentile"}, optional
        Display units (see the module docs); default ``"probability"`` for scores and
        ``"percentile"`` for attention (attention cannot be shown as a probability).
    threshold : float, optional
        Regions at or above it go to the GeoJSON and the summary's areas; in the mode's units.
        Default 0.5 (probability) or 90 (percentile: the top 10 % of the slide).
    downsample : float, optional
        Level-0 px per heatmap pixel; default the store thumbnail's.
    sigma_um : float
        Gaussian smoothing in µm (0: none; needs the slide's mpp).
    cmap, alpha :
        Matplotlib colormap and overlay opacity.
    compression : {"deflate", "jpeg"}
        Of the overlay TIFF.
    values_tiff : bool
        Also write the float32 values as a pyramidal TIFF.
    png_max_px : int
        Longest side of the PNG's image (the heatmap is averaged down to fit).
    block_px : int
        Stitching block side in heatmap pixels.
    mask_tissue : bool
        Blank the heatmap outside the store's tissue mask.

    Returns
    -------
    dict of str to Path
        ``png``, ``tiff``, ``values_tiff`` (when written), ``geojson``, ``summary``.

    Raises
    ------
    StoreError
        An unfinished store, no ``scores/<run_id>`` (run predict first), no patches.
    ConfigError
        A bad mode, threshold, downsample, colormap or compression.
    """
    lut = _lut(cmap)
    if compression not in ("deflate", "jpeg"):
        raise ConfigError(f"TIFF compression must be 'deflate' or 'jpeg', not {compression!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], not {alpha!r}")
    options = {
        "sigma_um": float(sigma_um),
        "cmap": cmap,
        "alpha": float(alpha),
        "compression": compression,
        "values_tiff": bool(values_tiff),
        "mask_tissue": bool(mask_tissue),
    }
    store, scores, pred, params = _prepare(
        store_path,
        run_id=run_id,
        which=which,
        mode=mode,
        threshold=threshold,
        downsample=downsample,
        options=options,
    )
    mode, thr, ds = params["mode"], params["threshold"], params["downsample"]
    meta, g, sid = store.meta, store.group, store.slide_id
    thumb = np.asarray(g["thumbnail"][...])
    mpp = meta.mpp
    mask = mask_ds = None
    if mask_tissue:
        mask = np.asarray(g["tissue_mask"][...], dtype=bool)
        mask_ds = float(g["tissue_mask"].attrs.get("downsample", meta.width / mask.shape[1]))
    coords = store.coords
    shown = display_values(scores, mode=mode)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    values, _ = stitch_scores(
        coords,
        shown,
        patch_l0=float(store.tiling["patch_l0"]),
        slide_wh=(meta.width, meta.height),
        downsample=ds,
        tissue_mask=mask,
        mask_downsample=mask_ds,
        sigma_um=sigma_um,
        mpp=mpp,
        block_px=block_px,
    )
    seconds["stitch"] = time.perf_counter() - t0
    vrange = MODES[mode]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _file_names(sid, which)
    if not values_tiff:
        names.pop("values_tiff")
    paths = {k: out / v for k, v in names.items()}
    hmpp = None if mpp is None else mpp * ds
    what = "attention weight" if which == "attention" else "abnormality score"
    legend = _LEGEND[mode].format(what=what)

    # pyramidal TIFFs, strip by strip from the (small) stitched grid
    t0 = time.perf_counter()
    desc = (
        f"wsi-pipeline {__version__} heatmap overlay of {sid}: {which}, {mode} mode, run "
        f"{run_id}; level 0 spans the slide at downsample {ds:g} "
        f"({'unknown' if hmpp is None else f'{hmpp:g}'} um per pixel)"
    )
    bg_rows = _background_rows(thumb, float(g["thumbnail"].attrs["downsample"]), ds, values.shape)
    write_pyramid_tiff(
        paths["tiff"],
        lambda r0, r1: overlay_rgb(
            values[r0:r1], bg_rows(r0, r1), value_range=vrange, cmap=lut, alpha=alpha
        ),
        (*values.shape, 3),
        mpp=hmpp,
        compression=compression,
        description=desc,
    )
    if values_tiff:
        write_pyramid_tiff(
            paths["values_tiff"],
            lambda r0, r1: values[r0:r1],
            values.shape,
            dtype=np.float32,
            mpp=hmpp,
            description=desc.replace("overlay", f"values ({mode})"),
        )
    seconds["tiff"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    p_abn = pred.get("abnormal_probability")
    p_txt = "?" if p_abn is None else f"{float(p_abn):.3f}"
    title = (
        f"{sid}: predicted {pred.get('predicted', '?')} (P abnormal {p_txt}), run {run_id}"
        f"\n{which} heatmap, {mode} mode, threshold {thr:g}"
    )
    _render_png(
        paths["png"],
        values,
        thumb,
        value_range=vrange,
        threshold=thr,
        cmap=cmap,
        alpha=alpha,
        title=title,
        legend=legend + "; white outline: at or above the threshold",
        bar_label=f"{what} ({mode})",
        max_px=png_max_px,
    )
    seconds["png"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    regions = threshold_regions(values, threshold=thr, downsample=ds, mpp=mpp)
    _write_json(paths["geojson"], regions)
    seconds["geojson"] = time.perf_counter() - t0

    n_valid = int(np.count_nonzero(np.isfinite(values)))
    above_px = area_above(values, thr, pixel_area=ds * ds)
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:10]
    pct = shown if mode == "percentile" else percentile_ranks(scores)
    summary = {
        "slide_id": sid,
        "store": str(store.path),
        "run": run_id,
        "which": which,
        "mode": mode,
        "value_range": list(vrange),
        "legend": legend,
        "threshold": thr,
        "prediction": {
            "label": pred.get("predicted"),
            "abnormal_probability": p_abn,
            "probabilities": pred.get("probabilities"),
            "classes": pred.get("classes"),
        },
        "n_patches": store.n_patches,
        "downsample": ds,
        "heatmap_size_wh": [int(values.shape[1]), int(values.shape[0])],
        "mpp": mpp,
        "heatmap_mpp": hmpp,
        "sigma_um": float(sigma_um),
        "area_above_threshold_px": above_px,
        "area_above_threshold_mm2": None if mpp is None else above_px * mpp * mpp * 1e-6,
        "tissue_area_mm2": None if mpp is None else n_valid * (ds * mpp) ** 2 * 1e-6,
        "fraction_above_threshold": area_above(values, thr) / n_valid if n_valid else 0.0,
        "n_regions": len(regions["features"]),
        "top_patches": [
            {
                "index": int(i),
                "x": int(coords[i, 0]),
                "y": int(coords[i, 1]),
                "score": float(scores[i]),
                "percentile": float(pct[i]),
            }
            for i in top
        ],
        "files": {k: v for k, v in names.items() if k != "summary"},
        "params": params,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "wsi_pipeline_version": __version__,
    }
    _write_json(paths["summary"], summary, indent=1)
    return paths


# --------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------
def heatmaps(
    store_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    run_id: str,
    which: str = "score",
    mode: str | None = None,
    threshold: float | None = None,
    downsample: float | None = None,
    sigma_um: float = 0.0,
    cmap: str = "jet",
    alpha: float = 0.5,
    compression: str = "deflate",
    values_tiff: bool = True,
    slide_ids: Sequence[str] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Export heatmaps of every store in ``store_dir`` into ``out_dir/<slide_id>/``.

    Options are those of :func:`export_heatmaps`. A slide whose summary records the same
    parameters and the same scores (a hash), with all its files present, is skipped unless
    ``overwrite``.

    Returns
    -------
    list of dict
        One per store, sorted by slide id (the store's name): ``slide_id``, ``store``,
        ``status`` (``"ok"``, ``"skipped"`` or ``"failed"``), ``ok`` (False only for failures),
        ``error`` (one line naming the store, e.g. no ``scores/<run_id>``: run predict first),
        ``reason`` (why skipped: ``"no patches"`` or ``"already exported"``), ``seconds`` and
        ``files`` (name -> path).

    Raises
    ------
    StoreError
        ``store_dir`` is not a folder.
    ConfigError
        Bad options (checked before any slide).
    """
    _check_options(which, mode, threshold)
    _lut(cmap)
    stores = list_stores(store_dir)
    if slide_ids is not None:
        wanted = {sanitize_id(s) for s in slide_ids}
        stores = [s for s in stores if s.stem in wanted]
    options = {
        "sigma_um": float(sigma_um),
        "cmap": cmap,
        "alpha": float(alpha),
        "compression": compression,
        "values_tiff": bool(values_tiff),
        "mask_tissue": True,
    }
    results: list[dict[str, Any]] = []
    for sp in stores:
        t0 = time.time()
        folder = Path(out_dir) / sp.stem  # the store's name: the sanitised slide id
        row: dict[str, Any] = {
            "slide_id": sp.stem,
            "store": str(sp),
            "status": "failed",
            "ok": False,
            "error": "",
            "reason": "",
            "files": {},
        }
        try:
            if SlideStore(sp).n_patches == 0:
                row.update(status="skipped", ok=True, reason="no patches")
            elif not overwrite and (
                done := _finished(
                    sp,
                    folder,
                    run_id=run_id,
                    which=which,
                    mode=mode,
                    threshold=threshold,
                    downsample=downsample,
                    options=options,
                )
            ):
                row.update(status="skipped", ok=True, reason="already exported", files=done)
            else:
                paths = export_heatmaps(
                    sp,
                    folder,
                    run_id=run_id,
                    which=which,
                    mode=mode,
                    threshold=threshold,
                    downsample=downsample,
                    **options,
                )
                row.update(status="ok", ok=True, files={k: str(v) for k, v in paths.items()})
        except (WSIPipelineError, OSError) as exc:
            msg = str(exc) if isinstance(exc, WSIPipelineError) else f"{sp}: {exc}"
            log.error("%s", msg)
            row["error"] = msg
        row["seconds"] = round(time.time() - t0, 3)
        results.append(row)
    results.sort(key=lambda r: r["slide_id"])
    return results


def _finished(
    store_path: Path,
    folder: Path,
    *,
    run_id: str,
    which: str,
    mode: str | None,
    threshold: float | None,
    downsample: float | None,
    options: dict[str, Any],
) -> dict[str, str] | None:
    """The files of a finished export with the same parameters and scores, else None."""
    try:
        store, _, _, params = _prepare(
            store_path,
            run_id=run_id,
            which=which,
            mode=mode,
            threshold=threshold,
            downsample=downsample,
            options=options,
        )
        summary = folder / _file_names(store.slide_id, which)["summary"]
        old = json.loads(summary.read_text())
    except (WSIPipelineError, OSError, ValueError):
        return None
    files = {k: folder / v for k, v in old.get("files", {}).items()}
    if old.get("params") != params or not all(p.is_file() for p in files.values()):
        return None
    return {k: str(v) for k, v in {**files, "summary": summary}.items()}
