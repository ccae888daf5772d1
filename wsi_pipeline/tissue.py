"""Tissue masks from the thumbnail, and tissue fractions of rectangles.

The default mask is a saturation/Otsu mask (tissue is coloured, glass is not), with
morphological clean-up and hole filling whose sizes are given in µm², so one setting works at any
thumbnail scale. Pen ink (saturated blue/green) and very dark debris/folds are excluded unless
switched off. A user mask (PNG, or GeoJSON polygons in level-0 pixels) may replace it.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .specs import MaskSpec
from .util import input_file

__all__ = ["load_dependencies", "load_user_mask", "rect_fractions", "rgb_to_hsv", "tissue_mask"]

# hue range (0..1) of blue/green marker ink; H&E and DAB hues lie outside it
_PEN_HUE = (0.22, 0.69)
_PEN_MIN_SAT = 0.45
_DARK_MAX_VALUE = 0.25  # value (0..1) below which a pixel is debris, ink or a thick fold
_BLUR_UM = 8.0  # Gaussian blur of the saturation image, in µm
_SAT_CAP = 0.15  # Otsu's saturation threshold is never above this
_OD_MARGIN = 0.07  # optical density above the brightest 2% (the glass) that counts as tissue


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation and value in 0..1 (float32) of an ``(H, W, 3)`` uint8 image."""
    r, g, b, mx, delta, sat = _sat_val(rgb)
    return _hue(r, g, b, mx, delta), sat, mx


def _sat_val(rgb: np.ndarray) -> tuple[np.ndarray, ...]:
    """Channels ``r, g, b`` in 0..1, value (their maximum), ``delta`` (max - min) and
    saturation, float32, of an ``(..., 3)`` uint8 image."""
    # per channel: reductions over the last axis of an (H, W, 3) array are several times slower
    r, g, b = (rgb[..., c].astype(np.float32) / np.float32(255.0) for c in range(3))
    mx = _channel_max(r, g, b)
    delta = mx - np.minimum(np.minimum(r, g), b)
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0).astype(np.float32)
    return r, g, b, mx, delta, sat


def _hue(
    r: np.ndarray, g: np.ndarray, b: np.ndarray, mx: np.ndarray, delta: np.ndarray
) -> np.ndarray:
    """Hue in 0..1 (float32), elementwise, from :func:`_sat_val`'s arrays (any subset of
    their elements gives the same values for it)."""
    safe = np.maximum(delta, 1e-6)
    hue = np.where(
        mx == r,
        ((g - b) / safe) % 6.0,
        np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return np.where(delta > 0, hue / 6.0, 0.0).astype(np.float32)


def load_dependencies() -> None:
    """Import what :func:`tissue_mask` imports lazily and build its lookup tables
    (:func:`_tables`). Call it before threads mask slides side by side: two threads making the
    first import at once can find a half-initialised module (as scikit-image's lazily loaded
    ``skimage.filters``, which the mask used: ``partially initialized module``)."""
    import cv2

    _ = (cv2.sepFilter2D, _tables())


def _blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an ``(H, W, 3)`` uint8 image over its two spatial axes, rounded to
    uint8: the kernel and mirrored edges of ``scipy.ndimage.gaussian_filter`` (4 sigma,
    ``mode="reflect"``), run by OpenCV in float and rounded to the nearest grey level (1.3
    against 7 ms a 1,250 x 938 thumbnail for the float image and its rounding)."""
    import cv2

    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    src = np.ascontiguousarray(rgb, dtype=np.uint8)
    return cv2.sepFilter2D(src, cv2.CV_8U, k, k, borderType=cv2.BORDER_REFLECT)


def _morph(mask: np.ndarray, op: str, shape: str = "square", iterations: int = 1) -> np.ndarray:
    """Binary erosion or dilation of a bool mask by a 3 x 3 square or cross, outside the image
    counting as background (``scipy.ndimage.binary_erosion`` / ``binary_dilation``, by OpenCV)."""
    import cv2

    kernel = cv2.getStructuringElement(
        cv2.MORPH_RECT if shape == "square" else cv2.MORPH_CROSS, (3, 3)
    )
    fn = cv2.erode if op == "erode" else cv2.dilate
    out = fn(
        np.ascontiguousarray(mask).view(np.uint8),
        kernel,
        iterations=iterations,
        borderType=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return out.view(bool)


def _open3(mask: np.ndarray) -> np.ndarray:
    """Binary opening by a 3 x 3 square, outside the image counting as background (the same
    as ``ndi.binary_opening(mask, np.ones((3, 3)))``)."""
    return _morph(_morph(mask, "erode"), "dilate")


def _remove_small(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` without its 4-connected components of at most ``max_size`` pixels (the same as
    ``skimage.morphology.remove_small_objects(mask, max_size=max_size)``, by OpenCV's
    labelling and a count of each label: 1.0 against 4.9 ms a 1,250 x 938 mask, without
    scikit-image's lazily loaded ``morphology`` module)."""
    import cv2

    n, found = cv2.connectedComponents(
        np.ascontiguousarray(mask).view(np.uint8), connectivity=4, ltype=cv2.CV_32S
    )
    labels = np.asarray(found, np.int32)
    small = _counts(labels, n) <= max_size
    small[0] = False  # the background
    if not small.any():
        return mask.copy()
    return mask & ~small.take(labels)


def _counts(values: np.ndarray, n: int) -> np.ndarray:
    """How many of ``values`` (integers in ``[0, n)``) are each of ``0 .. n - 1`` (int64):
    ``np.bincount(values.ravel(), minlength=n)``, by OpenCV's histogram of uint16 values where
    it counts exactly (up to 65,536 values, images of at most 2**24 pixels), 3-4x faster."""
    if n > 65536 or values.size > 2**24:
        return np.bincount(values.ravel(), minlength=n)
    import cv2

    u16 = values if values.dtype == np.uint16 else values.astype(np.uint16)
    hist = cv2.calcHist([np.ascontiguousarray(u16)], [0], None, [n], [0, n])
    return hist.ravel().astype(np.int64)


def _channel_max(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The largest of three channels, elementwise (``rgb.max(axis=2)``, ~8x faster)."""
    return np.maximum(np.maximum(r, g), b)


def _max_min_code(rgb: np.ndarray) -> np.ndarray:
    """``256 * max + min`` of the three channels of an ``(H, W, 3)`` uint8 image (uint16)."""
    import cv2

    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    mx, mn = cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)
    # (min, max) byte pairs read as one little-endian uint16 each
    return cv2.merge([mn, mx]).view("<u2").reshape(mx.shape)


def _od_percentile(max_counts: np.ndarray, q: float) -> float:
    """``np.percentile(od, q)`` (linear interpolation) of the optical density
    ``-log((max + 1) / 256)`` of pixels counted by their largest channel (``max_counts``, 256),
    without an image of it: the density falls as ``max`` rises, so its k-th smallest value is
    that of the k-th largest ``max``."""
    od = _od_table()[::-1]  # rising
    cum = np.cumsum(max_counts[::-1])
    n = int(cum[-1])
    pos = q / 100.0 * (n - 1)
    i = int(np.floor(pos))
    a, b = od[np.searchsorted(cum, [i, min(i + 1, n - 1)], side="right")]
    return float(a + (pos - i) * (b - a))


def _pen_hue(rgb: np.ndarray) -> np.ndarray:
    """Whether each pixel of an ``(H, W, 3)`` uint8 image has the hue of blue/green marker ink
    (:data:`_PEN_HUE`), from OpenCV's 8-bit hue (256 steps a turn; within 1/256 of the float
    hue: 8 against 50 ms for the million saturated pixels of a 2,048 x 1,645 H&E thumbnail)."""
    import cv2

    hsv = np.asarray(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV_FULL), np.uint8)
    hue = hsv[..., 0]
    steps = np.arange(256) / 256.0
    return ((steps >= _PEN_HUE[0]) & (steps <= _PEN_HUE[1])).take(hue)


@functools.cache
def _od_table() -> np.ndarray:
    """The optical density ``-log((max + 1) / 256)`` of each largest channel (float32, 256)."""
    return -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """:func:`_sat_val`'s saturation of every ``256 * max + min`` (float32, 65,536), and whether
    a pixel of largest channel ``max`` is dark (value below ``_DARK_MAX_VALUE``; bool, 256):
    the same numbers as computing them pixel by pixel, 2-3x faster."""
    mx, mn = np.divmod(np.arange(65536), 256)
    _, _, _, val, _, sat = _sat_val(np.stack([mx, mn, mn], axis=-1).astype(np.uint8))
    sat = np.where(mn > mx, 0.0, sat).astype(np.float32)  # codes no pixel has
    return sat, val[::256] < _DARK_MAX_VALUE


def _otsu_of_counts(counts: np.ndarray, sat_table: np.ndarray, size: int) -> float:
    """Otsu's threshold of the saturation image ``sat_table[code]`` of ``size`` pixels, from
    the counts of each code (65,536; scikit-image's ``threshold_otsu``, 256 bins over its range:
    the same histogram as from every pixel); 1.0 for an image of one value or of 16 pixels or
    fewer."""
    present = np.flatnonzero(counts)
    values = sat_table[present]
    if size <= 16 or values.min() == values.max():
        return 1.0
    hist, edges = np.histogram(values, bins=256, weights=counts[present])
    return _otsu(hist, (edges[:-1] + edges[1:]) / 2.0)


def _otsu(counts: np.ndarray, centers: np.ndarray) -> float:
    """Otsu's threshold of a histogram (``counts`` at bin ``centers``): scikit-image's
    ``threshold_otsu(hist=(counts, centers))``, the same arithmetic (float32 counts), without
    importing it: its ``scipy.ndimage`` import took 0.13 s of every ``tile`` process's start."""
    nz = np.flatnonzero(counts > 0)
    counts = np.asarray(counts[nz[0] : nz[-1] + 1], np.float32)  # empty end bins trimmed
    centers = centers[nz[0] : nz[-1] + 1]
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centers) / weight1
    mean2 = (np.cumsum((counts * centers)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centers[np.argmax(variance12)])


def _um2_to_px(um2: float, mpp: float | None, shape: tuple[int, int], frac: float) -> int:
    """An area in µm² as thumbnail pixels; without an mpp, ``frac`` of the thumbnail area."""
    if mpp is None:
        return max(1, int(frac * shape[0] * shape[1]))
    return max(1, round(um2 / (mpp * mpp)))


def tissue_mask(
    thumb: np.ndarray,
    *,
    mpp: float | None = None,
    spec: MaskSpec | None = None,
) -> np.ndarray:
    """Tissue mask of a thumbnail.

    Parameters
    ----------
    thumb : (H, W, 3) uint8 ndarray
        RGB thumbnail of the whole slide.
    mpp : float, optional
        µm per thumbnail pixel; sizes in ``spec`` are in µm² and need it. Without it, objects
        smaller than 0.02% and holes smaller than 0.005% of the thumbnail are cleaned up.
    spec : MaskSpec, optional
        Parameters (defaults: :class:`~wsi_pipeline.specs.MaskSpec`). ``method="user"`` is
        handled by the caller with :func:`load_user_mask`.

    Returns
    -------
    (H, W) bool ndarray
        True on tissue.
    """
    spec = spec or MaskSpec()
    if thumb.ndim != 3 or thumb.shape[2] < 3:
        raise ConfigError(f"thumbnail must be (H, W, 3) RGB, not shape {thumb.shape}")
    # smooth over a few cells first, so tissue is one region and single nuclei are no "ink",
    # whatever the thumbnail's scale
    sigma = 1.0 if mpp is None else max(1.0, _BLUR_UM / mpp)
    rgb = _blur(thumb[..., :3], sigma)
    # every test below but the ink's hue depends on a pixel's largest and smallest channel
    # alone: decided once per (max, min) code in a table, then looked up
    code = _max_min_code(rgb)
    counts = _counts(code, 65536)
    sat_table, dark_table = _tables()
    # coloured: Otsu on saturation, kept between a floor (blank glass is never tissue) and a cap
    # (a crop that is all tissue must not be split in two by Otsu)
    otsu = _otsu_of_counts(counts, sat_table, code.size)
    table = sat_table > float(np.clip(otsu, spec.min_saturation, _SAT_CAP))
    # or clearly darker than the glass (pale, unsaturated stains such as IHC counterstain)
    od_floor = _od_percentile(counts.reshape(256, 256).sum(axis=1), 2)
    table |= np.repeat(_od_table() > od_floor + _OD_MARGIN, 256)
    dark = np.repeat(dark_table, 256) if spec.remove_dark else np.zeros(65536, bool)
    mask = (table & ~dark).take(code)
    excluded = dark.take(code) if spec.remove_dark else np.zeros_like(mask)
    pen_codes = sat_table >= _PEN_MIN_SAT
    if spec.remove_pen and pen_codes[counts > 0].any():  # ink: saturated, of a blue/green hue
        pen = pen_codes.take(code) & _pen_hue(rgb)
        excluded |= _morph(pen, "dilate", "cross", iterations=2)
        mask &= ~excluded
    mask = _open3(mask)
    hole_px = _um2_to_px(spec.max_hole_um2, mpp, mask.shape, 5e-5)
    obj_px = _um2_to_px(spec.min_object_um2, mpp, mask.shape, 2e-4)
    mask = ~_remove_small(~mask, hole_px)  # fill the holes (skimage's remove_small_holes)
    mask &= ~excluded  # hole filling must not bring ink back
    mask = _remove_small(mask, obj_px)
    return mask.astype(bool)


def load_user_mask(
    path: str | os.PathLike, *, shape: tuple[int, int], downsample: float
) -> np.ndarray:
    """A user-supplied tissue mask at thumbnail resolution.

    Parameters
    ----------
    path : path
        PNG/TIFF image (non-zero = tissue; scaled to ``shape`` with nearest neighbour), or a
        ``.geojson``/``.json`` file of Polygon/MultiPolygon features in level-0 pixels.
    shape : (int, int)
        ``(H, W)`` of the thumbnail.
    downsample : float
        Level-0 pixels per thumbnail pixel.

    Returns
    -------
    (H, W) bool ndarray
    """
    p = input_file(path, "user mask file")
    if p.suffix.lower() in (".geojson", ".json"):
        return _rasterize_geojson(p, shape, downsample)
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"{p}: user mask is not a readable image ({exc})") from exc
    arr = np.asarray(img.convert("L").resize((shape[1], shape[0]), Image.Resampling.NEAREST))
    return arr > 0


def _rasterize_geojson(p: Path, shape: tuple[int, int], downsample: float) -> np.ndarray:
    from skimage.draw import polygon as draw_polygon

    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: user mask is not valid JSON ({exc})") from exc
    feats = doc.get("features", [doc] if doc.get("type") == "Feature" else [])
    if doc.get("type") in ("Polygon", "MultiPolygon"):
        feats = [{"geometry": doc}]
    mask = np.zeros(shape, bool)
    n = 0
    for f in feats:
        geom = (f or {}).get("geometry") or {}
        polys = (
            [geom.get("coordinates", [])]
            if geom.get("type") == "Polygon"
            else geom.get("coordinates", [])
            if geom.get("type") == "MultiPolygon"
            else []
        )
        for rings in polys:
            for k, ring in enumerate(rings):
                xy = np.asarray(ring, float) / downsample
                if xy.ndim != 2 or len(xy) < 3:
                    continue
                rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=shape)
                mask[rr, cc] = k == 0  # the first ring is the outline, later rings are holes
                n += 1
    if n == 0:
        raise ConfigError(f"{p}: no Polygon or MultiPolygon geometry in the GeoJSON mask")
    return mask


def rect_fractions(mask: np.ndarray, rects_xywh: np.ndarray, *, downsample: float) -> np.ndarray:
    """Fraction of each level-0 rectangle covered by the mask (exact area integral).

    The mask is taken as piecewise constant over its pixels; a rectangle's coverage is the
    integral of the mask over it divided by its area, computed from a summed-area table with
    bilinear interpolation, which is exact for fractional pixel boundaries. Parts of a rectangle
    outside the mask count as background.

    Parameters
    ----------
    mask : (h, w) bool ndarray
        Tissue mask.
    rects_xywh : (N, 4) ndarray
        Level-0 ``x, y, width, height`` of each rectangle.
    downsample : float
        Level-0 pixels per mask pixel.

    Returns
    -------
    (N,) float32 ndarray
    """
    rects = np.asarray(rects_xywh, dtype=np.float64).reshape(-1, 4)
    if len(rects) == 0 or mask.size == 0:
        return np.zeros(len(rects), np.float32)
    import cv2

    h, w = mask.shape
    # the summed-area table, (h + 1, w + 1) with a zero first row and column (OpenCV's: exact
    # counts, 8x faster than two numpy cumsums)
    sat = cv2.integral(np.ascontiguousarray(mask, dtype=np.uint8), sdepth=cv2.CV_32S)

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
        y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - x0, y - y0
        s00 = sat[y0, x0]
        s01 = sat[y0, x0 + 1]
        s10 = sat[y0 + 1, x0]
        s11 = sat[y0 + 1, x0 + 1]
        return s00 * (1 - fx) * (1 - fy) + s01 * fx * (1 - fy) + s10 * (1 - fx) * fy + s11 * fx * fy

    x0 = rects[:, 0] / downsample
    y0 = rects[:, 1] / downsample
    x1 = (rects[:, 0] + rects[:, 2]) / downsample
    y1 = (rects[:, 1] + rects[:, 3]) / downsample
    total = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    area = (x1 - x0) * (y1 - y0)
    return np.clip(total / np.maximum(area, 1e-12), 0.0, 1.0).astype(np.float32)
