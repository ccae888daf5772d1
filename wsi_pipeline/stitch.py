"""Stitching per-patch scores onto a heatmap grid (numpy and scipy only; no store, no files).

Geometry
--------
A heatmap is a grid at ``downsample`` level-0 px per heatmap pixel: pixel ``(i, j)`` covers the
level-0 square ``[j * ds, (j + 1) * ds) x [i * ds, (i + 1) * ds)``, and the grid has
``ceil(height / ds)`` rows and ``ceil(width / ds)`` columns. Each patch covers the level-0 square
``[x, x + patch_l0) x [y, y + patch_l0)``. Where patches overlap, a heatmap pixel's value combines
the scores of the ``n`` patches over it (``combine``):

``"tercile"`` (the default)
    The lower tercile: the ``(n - 1) // 3 + 1``-th lowest score (one patch: its score; 4 patches,
    as with 50 % overlap: the second lowest). A patch's score says whether the patch *contains*
    something abnormal, so a pixel is only as abnormal as the patches over it agree it is; the
    lower tercile stops a border patch that is partly lesion from growing the region by up to
    a patch around the lesion, and forgives one patch that missed it.
``"min"``
    The lowest score: tightest, but one missed patch removes the pixel.
``"mean"``
    The average of those scores, each weighted by the exact area of its overlap (fractional at
    patch borders): smoother, and wider than the lesion by up to a patch.

``benchmarks/bench_training.py`` measures the heatmap IoU with planted lesions by each rule.
With non-overlapping patches whose borders fall on heatmap pixel borders all give the same map.
The values are optionally smoothed by a Gaussian (normalised convolution: value sum and weight sum
are smoothed separately, so edges are not darkened) and set to NaN outside tissue and where no
patch lies. The grid is built in blocks of ``block_px`` heatmap pixels; only the patches overlapping a
block (found by binary search on the y-sorted corners) are touched, and nothing is ever allocated
at level-0 resolution.

Display modes
-------------
``"probability"``
    The stored per-patch abnormality probabilities, on a fixed 0..1 colour scale: colours mean
    the same on every slide.
``"percentile"``
    Within-slide percentile ranks (0..100) of the patch scores, so every slide spans the full
    colour range; colours are *not* comparable across slides. The default for attention, whose
    weights sum to 1 over a slide and are not probabilities.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .errors import ConfigError
from .util import sample_mask

__all__ = [
    "COMBINE",
    "MODES",
    "display_values",
    "heatmap_shape",
    "percentile_ranks",
    "stitch_scores",
]

#: How the scores of overlapping patches combine in a heatmap pixel (module docs); first: default.
COMBINE = ("tercile", "min", "mean")
#: Display modes and their value range.
MODES: dict[str, tuple[float, float]] = {"probability": (0.0, 1.0), "percentile": (0.0, 100.0)}
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


def _kth_lowest(
    x_lo: np.ndarray,
    x_hi: np.ndarray,
    y_lo: np.ndarray,
    y_hi: np.ndarray,
    values: np.ndarray,
    shape: tuple[int, int],
    *,
    tercile: bool,
) -> np.ndarray:
    """Per pixel of a ``shape`` block, the k-th lowest of ``values`` over the footprints (heatmap
    px, block-relative) that overlap it by more than ``_EPS``: ``k = 1`` (the lowest), or with
    ``tercile`` ``k = (n - 1) // 3 + 1`` for ``n`` such footprints; +inf where none does.

    Footprints are visited in ascending order of value, counting per pixel: a pixel takes the
    value at which its count reaches its ``k``."""
    bh, bw = shape
    c0 = np.clip(np.floor(x_lo + _EPS), 0, bw).astype(np.int64).tolist()
    c1 = np.clip(np.ceil(x_hi - _EPS), 0, bw).astype(np.int64).tolist()
    r0 = np.clip(np.floor(y_lo + _EPS), 0, bh).astype(np.int64).tolist()
    r1 = np.clip(np.ceil(y_hi - _EPS), 0, bh).astype(np.int64).tolist()
    boxes = [(a, b, c, d) for a, b, c, d in zip(r0, r1, c0, c1)]
    k = np.ones(shape, np.int32)
    if tercile:
        n = np.zeros(shape, np.int32)
        for a, b, c, d in boxes:
            n[a:b, c:d] += 1
        k = (np.maximum(n, 1) - 1) // 3 + 1
    out = np.full(shape, np.inf)
    count = np.zeros(shape, np.int32)
    for i in np.argsort(values, kind="stable").tolist():
        a, b, c, d = boxes[i]
        if a < b and c < d:
            cnt = count[a:b, c:d]
            cnt += 1
            view = out[a:b, c:d]
            view[cnt == k[a:b, c:d]] = values[i]
    return out


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
    combine: str = COMBINE[0],
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
    combine : {"tercile", "min", "mean"}
        How the scores of the patches over a pixel combine (module docs).

    Returns
    -------
    values : (H, W) float32 ndarray
        The combined score; NaN outside tissue and where no patch lies.
    coverage : (H, W) float32 ndarray
        Summed patch overlap per pixel in pixel areas (1: covered by one patch; 2 where two
        overlap; fractional at patch borders); before smoothing and tissue masking.

    Raises
    ------
    ConfigError
        A non-positive ``patch_l0``/``downsample``/``block_px``, a negative ``sigma_um``,
        ``sigma_um > 0`` without ``mpp``, or an unknown ``combine``.
    ValueError
        ``coords_xy`` and ``scores`` of mismatched shapes.
    """
    coords = np.asarray(coords_xy, dtype=np.float64).reshape(-1, 2)
    vals = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(vals):
        raise ValueError(f"coords_xy has {len(coords)} rows but scores has {len(vals)} values")
    sigma_px = _sigma_px(
        downsample=downsample, patch_l0=patch_l0, block_px=block_px, sigma_um=sigma_um, mpp=mpp
    )
    check_combine(combine)
    ds = float(downsample)
    h, w = heatmap_shape(slide_wh, ds)
    tissue = None
    if tissue_mask is not None:
        tissue_mask = np.asarray(tissue_mask, dtype=bool)
        tissue = (tissue_mask, float(mask_downsample or int(slide_wh[0]) / tissue_mask.shape[1]))
    grid = _Grid(
        shape=(h, w),
        ds=ds,
        patch_l0=float(patch_l0),
        sigma_px=sigma_px,
        halo=int(_TRUNCATE * sigma_px + 0.5) + 1 if sigma_px > 0 else 0,
        tissue=tissue,
        combine=combine,
    )
    patches = _y_sorted(coords, vals)
    values = np.full((h, w), np.nan, np.float32)
    coverage = np.zeros((h, w), np.float32)
    b = int(block_px)
    for r0 in range(0, h, b):
        rows = (r0, min(h, r0 + b))
        band = _band(grid, patches, rows)
        for c0 in range(0, w, b):
            cols = (c0, min(w, c0 + b))
            block = _block(grid, band, rows, cols)
            if block is not None:  # else no patch here: NaN, coverage 0
                values[r0 : rows[1], c0 : cols[1]], coverage[r0 : rows[1], c0 : cols[1]] = block
    if len(patches[2]):  # rounding in the cumulative sums must not leave the scores' range
        np.clip(values, patches[2].min(), patches[2].max(), out=values)
    return values, coverage


def check_combine(combine: str) -> str:
    """``combine`` if it is one of :data:`COMBINE`, else the ConfigError naming them."""
    if combine not in COMBINE:
        raise ConfigError(f"combine must be one of {', '.join(COMBINE)}, not {combine!r}")
    return combine


def _sigma_px(
    *, downsample: float, patch_l0: float, block_px: int, sigma_um: float, mpp: float | None
) -> float:
    """Check the stitching options; the Gaussian sigma in heatmap pixels (0: no smoothing)."""
    if not (float(downsample) > 0 and float(patch_l0) > 0 and int(block_px) >= 1):
        raise ConfigError(
            f"downsample ({downsample!r}), patch_l0 ({patch_l0!r}) and block_px ({block_px!r}) "
            "must be positive"
        )
    if not sigma_um >= 0:
        raise ConfigError(f"sigma_um must be >= 0, not {sigma_um!r}")
    if sigma_um == 0:
        return 0.0
    if not mpp:
        raise ConfigError(
            "smoothing in µm needs the slide's mpp, which is unknown; set sigma_um=0 or "
            "re-tile with --slide-mpp"
        )
    return float(sigma_um) / (float(mpp) * float(downsample))


class _Grid(NamedTuple):
    """The geometry of one stitching."""

    shape: tuple[int, int]  # (rows, cols) of the heatmap
    ds: float  # level-0 px per heatmap pixel
    patch_l0: float  # patch side in level-0 px
    sigma_px: float  # Gaussian sigma in heatmap pixels (0: none)
    halo: int  # extra heatmap pixels around a block that the smoothing reaches
    tissue: tuple[np.ndarray, float] | None  # the tissue mask and its downsample
    combine: str  # one of COMBINE


_Patches = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, y, value


def _y_sorted(coords: np.ndarray, vals: np.ndarray) -> _Patches:
    """``(x, y, value)`` of the patches with a finite score, sorted by ``y``."""
    keep = np.isfinite(vals)
    coords, vals = coords[keep], vals[keep]
    order = np.argsort(coords[:, 1], kind="stable")
    return coords[order, 0], coords[order, 1], vals[order]


def _extended(grid: _Grid, span: tuple[int, int], axis: int) -> tuple[int, int]:
    """A half-open range of heatmap rows (axis 0) or columns (1) grown by the halo."""
    return max(0, span[0] - grid.halo), min(grid.shape[axis], span[1] + grid.halo)


def _band(grid: _Grid, patches: _Patches, rows: tuple[int, int]) -> _Patches:
    """The patches that reach heatmap rows ``rows`` or their halo (binary search on ``y``)."""
    xs, ys, vals = patches
    er0, er1 = _extended(grid, rows, 0)
    # patches with y < er1 * ds and y + p > er0 * ds
    lo = int(np.searchsorted(ys, er0 * grid.ds - grid.patch_l0, side="right"))
    hi = int(np.searchsorted(ys, er1 * grid.ds, side="left"))
    return xs[lo:hi], ys[lo:hi], vals[lo:hi]


def _block(
    grid: _Grid, band: _Patches, rows: tuple[int, int], cols: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Values and coverage of one block of the heatmap, or None when no patch reaches it."""
    ds, p = grid.ds, grid.patch_l0
    (r0, r1), (c0, c1) = rows, cols
    er0, er1 = _extended(grid, rows, 0)
    ec0, ec1 = _extended(grid, cols, 1)
    row_x, row_y, row_v = band
    sel = (row_x < ec1 * ds) & (row_x + p > ec0 * ds)
    if not sel.any():
        return None
    px, py = row_x[sel] / ds, row_y[sel] / ds
    box = (px - ec0, px + p / ds - ec0, py - er0, py + p / ds - er0)
    num, den = _accumulate(*box, row_v[sel], (er1 - er0, ec1 - ec0))
    inner = (slice(r0 - er0, r1 - er0), slice(c0 - ec0, c1 - ec0))
    raw = den[inner]
    if grid.combine != "mean":  # an order statistic per pixel, smoothed as a field of weight 1
        low = _kth_lowest(*box, row_v[sel], (er1 - er0, ec1 - ec0), tercile=grid.combine != "min")
        den = np.isfinite(low).astype(np.float64)
        num = np.where(den > 0, low, 0.0)
    if grid.sigma_px > 0:
        num, den = _smooth(num, grid.sigma_px), _smooth(den, grid.sigma_px)
    num, den = num[inner], den[inner]
    ok = (raw > _EPS) & (den > _EPS)
    if grid.tissue is not None:
        ok &= sample_mask(grid.tissue[0], grid.tissue[1], ds, rows, cols)
    values = np.full(raw.shape, np.nan, np.float32)
    values[ok] = num[ok] / den[ok]
    return values, np.maximum(raw, 0.0)
