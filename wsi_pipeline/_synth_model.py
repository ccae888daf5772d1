"""The procedural model behind :mod:`wsi_pipeline.synth`: noise fields, tissue, lesions, nuclei
and the stain model, rendered tile by tile.

Every random quantity is a hash of ``(seed, field, integer coordinates)`` (splitmix64), so any tile
renders alone and in any order, and a nucleus near a tile border is drawn identically in both
tiles. Used by :mod:`wsi_pipeline.synth` only; its public names are the ones synth calls
(:class:`Model`, :func:`build_model`, :func:`maybe_content`, :func:`render_tile`,
:func:`glass_key`, :func:`render_glass`), and may change with it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, cast

import numpy as np

__all__ = ["Model", "build_model", "glass_key", "maybe_content", "render_glass", "render_tile"]

# Stain optical densities per unit stain (Macenko reference), glass, pen inks (blue, green).
_H_OD = np.array([0.5626, 0.7201, 0.4062], np.float32)
_E_OD = np.array([0.2159, 0.8012, 0.5581], np.float32)
_GLASS_OD = np.array([0.010, 0.012, 0.004], np.float32)
_PEN_OD = ((1.35, 0.80, 0.10), (1.10, 0.22, 0.95))

_EDGE_AMP = 5.0  # tissue-field penalty at the slide edge (keeps islands off the edges)
_NOISE_GAIN = 3.6  # cubic B-spline value noise of U(-1, 1) lattice values -> std ~1
_CELL_UM = 42.0  # nucleus candidate cell

# Noise field identifiers (part of every hash key).
_F_TISSUE, _F_HOLE, _F_LYMPH, _F_GRAIN, _F_BUNDLE, _F_FIBRE, _F_CHROM = 10, 20, 21, 22, 23, 24, 25
_F_PEN, _F_FOLD, _F_SLOT_FINE, _F_SLOT_COARSE, _F_LESION, _F_BG = 26, 27, 30, 31, 100, 0xB6

# Nucleus kinds, one row each: diameter um (lo, span), aspect (lo, span), 2-lobe irregularity
# (lo, span), 3-lobe span, body OD (lo, span), chromatin contrast, rim OD (lo, span).
_STROMA, _LYMPH, _TUMOUR, _MORPH = 0, 1, 2, 3
_KINDS = np.array(
    [
        [5.0, 3.0, 1.1, 0.9, 0.00, 0.05, 0.03, 1.00, 0.35, 0.15, 0.10, 0.05],
        [5.0, 2.0, 1.0, 0.15, 0.00, 0.03, 0.02, 1.45, 0.35, 0.10, 0.10, 0.05],
        [10.0, 6.0, 1.0, 0.6, 0.06, 0.12, 0.10, 0.13, 0.07, 0.90, 0.45, 0.20],
        # morphology-only lesion: small, round, crowded nuclei; body OD set so that their
        # haematoxylin per area matches normal stroma (with _MORPH_KEEP)
        [3.6, 1.4, 1.0, 0.2, 0.00, 0.03, 0.02, 0.50, 0.10, 0.15, 0.06, 0.03],
    ]
)
_MORPH_KEEP = 0.55  # fine-slot occupancy in a morphology-only lesion (stroma: 0.11)
_MORPH_EOSIN = 1.07  # eosin gain in such a lesion: its nuclei cover ~2x the area of stroma's
# Columns of a nucleus (or nucleolus) row: centre, semi-axes, angle, lobes, phases, stains.
_X, _Y, _A, _B, _ANG, _A2, _A3, _PH2, _PH3, _BODY, _CHROM, _RIM, _EOS, _COV = range(14)

# ------------------------------------------------------------------------------ hashing and noise

_U64 = np.uint64
_C1, _C2, _GOLDEN = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB), _U64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> _U64(30))) * _C1
    z = (z ^ (z >> _U64(27))) * _C2
    return z ^ (z >> _U64(31))


def _hash(*keys: Any) -> np.ndarray:
    """uint64 hash of integer keys, broadcast together (negative keys allowed)."""
    with np.errstate(over="ignore"):
        h = np.zeros(1, np.uint64)
        for key in keys:
            k = np.asarray(key)
            k = k if k.dtype == np.uint64 else k.astype(np.int64).view(np.uint64)
            h = _mix(h ^ (k + _GOLDEN))
    return h


def _uniform(h: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) from uint64 hashes."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _bweights(t: np.ndarray) -> list[np.ndarray]:
    """Cubic B-spline weights of knots -1, 0, 1, 2 for offsets ``t`` in [0, 1)."""
    t2 = t * t
    t3 = t2 * t
    s = 1 - t
    return [s * s * s / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6]


def _noise_grid(seed: int, fid: int, xs: np.ndarray, ys: np.ndarray, cell: float) -> np.ndarray:
    """Value noise (std ~1) on the grid ``ys x xs`` (ascending), lattice step ``cell``.

    Cubic B-spline interpolation of hashed lattice values in [-1, 1], separable: four gathers
    along x, then four along y. Returns ``(len(ys), len(xs))`` float64. No BLAS on purpose: its
    threads make these small products 10-100x slower on a busy 2-core machine.
    """
    fx, fy = xs / cell, ys / cell
    ix, iy = np.floor(fx), np.floor(fy)
    wx, wy = _bweights(fx - ix), _bweights(fy - iy)
    kx0, ky0 = int(ix[0]) - 1, int(iy[0]) - 1
    kx = np.arange(kx0, int(ix[-1]) + 3)
    ky = np.arange(ky0, int(iy[-1]) + 3)
    lattice = (2 * _uniform(_hash(seed, fid, ky[:, None], kx[None, :])) - 1).astype(np.float32)
    cx = ix.astype(np.int64) - kx0 - 1
    cy = iy.astype(np.int64) - ky0 - 1
    # Each sum() below adds 4 arrays, so is an array (its stub also allows the int start, 0).
    # along_x: (n_ky, nx)
    along_x = cast(np.ndarray, sum(lattice[:, cx + j] * wx[j].astype(np.float32) for j in range(4)))
    return cast(
        np.ndarray,
        sum(along_x[cy + j] * (_NOISE_GAIN * wy[j][:, None]).astype(np.float32) for j in range(4)),
    )


def _noise_points(seed: int, fid: int, x: np.ndarray, y: np.ndarray, cell: float) -> np.ndarray:
    """The noise of :func:`_noise_grid` at scattered points, summed in a fixed order.

    Only arithmetic, so a point's value never depends on which tile asked: the decisions taken
    from it (which nuclei exist, of which kind) are identical in neighbouring tiles.
    """
    fx, fy = x / cell, y / cell
    ix, iy = np.floor(fx), np.floor(fy)
    wx, wy = _bweights(fx - ix), _bweights(fy - iy)
    off = np.arange(-1, 3)
    kx = ix.astype(np.int64)[:, None, None] + off[None, None, :]
    ky = iy.astype(np.int64)[:, None, None] + off[None, :, None]
    g = 2 * _uniform(_hash(seed, fid, ky, kx)) - 1  # (n, 4, 4)
    acc = np.zeros(fx.shape)
    for i in range(4):
        for j in range(4):
            acc = acc + (wy[i] * wx[j]) * g[:, i, j]
    return _NOISE_GAIN * acc


def _soft(v: Any, width: float) -> Any:
    """Smooth 0 -> 1 ramp of ``v`` over ``[-width / 2, width / 2]`` (0.5 at 0)."""
    x = np.clip(v / width + 0.5, 0.0, 1.0)
    return x * x * (3 - 2 * x)


# ------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Model:
    """Everything needed to render any part of one slide (lengths in level-0 px)."""

    seed: int
    width: int
    height: int
    mpp: float
    tissue: bool
    holes: bool
    t_octaves: tuple[tuple[float, float], ...]  # (amplitude, cell) of the tissue field
    edge_px: float
    illum: tuple[float, float, float]  # glass brightness, x gradient, y gradient
    fib: tuple[float, float, float, float]  # fibre wavenumber, cos, sin, warp amplitude
    t_thr: float = 0.0
    t_soft: float = 1.0
    t_lip: float = 0.0  # bound on the tissue field's gradient (per px)
    hole_thr: float = 1.9
    lymph_thr: float = 1.45
    lesions: tuple[tuple[float, float, float], ...] = ()  # (cx, cy, r)
    pen: tuple | None = None  # (points (P, 2), half width, ink OD (3,))
    lesion_style: str = "tumour"  # or "morphology": other nuclei, same stroma and stain per area
    fold: tuple | None = None  # (cx, cy, ux, uy, half length, half width)

    @property
    def um(self) -> float:
        """Pixels per micrometre."""
        return 1 / self.mpp


def build_model(a: dict[str, Any]) -> tuple[Model, np.ndarray, np.ndarray]:
    """Fix the slide's random layout; return it with the ground-truth tissue and lesion masks."""
    width, height, mpp, seed, ds = a["width"], a["height"], a["mpp"], a["seed"], a["gt_downsample"]
    rng = np.random.default_rng([seed, 0x51DE])
    short = min(width, height)
    octaves = ((1.0, short / 2.2), (0.45, short / 7.7), (0.18, short / 26.4), (0.06, 100 / mpp))
    lip = sum(amp * _NOISE_GAIN * 1.5 * math.sqrt(2) / c for amp, c in octaves)
    theta, k = rng.uniform(0, math.pi), 2 * math.pi / (9.0 / mpp)
    model = Model(
        seed=seed,
        width=width,
        height=height,
        mpp=mpp,
        tissue=a["tissue_fraction"] > 0,
        holes=a["holes"],
        t_octaves=octaves,
        edge_px=0.12 * short,
        illum=(243.0, *rng.uniform(-3, 3, 2)),
        fib=(k, math.cos(theta), math.sin(theta), 0.4 * k * 160 / mpp),
        lesion_style=a["lesion_style"],
        t_lip=lip + 2 * _EDGE_AMP / (0.12 * short),
    )
    gx, gy = _gt_coords(width, ds), _gt_coords(height, ds)
    tissue = np.zeros((gy.size, gx.size), bool)
    lesion = np.zeros_like(tissue)
    if model.tissue:
        field = np.empty(tissue.shape, np.float32)
        hole = np.zeros(tissue.shape, bool)
        for sy, sx in _blocks(tissue.shape, 512):
            field[sy, sx] = _tissue_grid(model, gx[sx], gy[sy])
            if model.holes:
                hole[sy, sx] = _noise_grid(seed, _F_HOLE, gx[sx], gy[sy], 45 / mpp) > model.hole_thr
        vals = np.sort(field[~hole])
        n_target = max(1, round(a["tissue_fraction"] * field.size))  # at least one pixel
        thr = float(vals[-n_target - 1]) if n_target < vals.size else float(field.min()) - 1
        # Edge softness: ~1.5 px of the field's typical gradient where it crosses the threshold.
        px, py = np.linspace(0, width, 128), np.linspace(0, height, 128)
        coarse = _tissue_grid(model, px, py)
        grad = np.hypot(*np.gradient(coarse, py[1] - py[0], px[1] - px[0]))
        near = np.abs(coarse - thr) < np.median(grad) * 4 * (px[1] + py[1])
        soft = 1.5 * float(np.median(grad[near] if near.any() else grad))
        model = dataclasses.replace(model, t_thr=thr, t_soft=max(soft, 1e-9))
        tissue = (field > thr) & ~hole
        del field, hole, vals
        if a["n_lesions"]:
            model, lesion = _place_lesions(model, tissue, gx, gy, ds, a, rng)
    if a["pen_mark"]:
        model = dataclasses.replace(model, pen=_place_pen(model, tissue, gx, gy, rng))
    if a["fold"] and tissue.any():
        model = dataclasses.replace(model, fold=_place_fold(model, tissue, gx, gy, ds, rng))
    return model, tissue, lesion


def _gt_coords(n: int, ds: int) -> np.ndarray:
    """Level-0 centre of each ground-truth pixel's block (the last block may be partial)."""
    start = np.arange(math.ceil(n / ds)) * ds
    return (start + np.minimum(start + ds, n)) / 2.0


def _blocks(shape: tuple[int, int], step: int) -> Iterator[tuple[slice, slice]]:
    for y in range(0, shape[0], step):
        for x in range(0, shape[1], step):
            yield slice(y, y + step), slice(x, x + step)


def _tissue_grid(m: Model, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    f = sum(
        amp * _noise_grid(m.seed, _F_TISSUE + i, xs, ys, c)
        for i, (amp, c) in enumerate(m.t_octaves)
    )
    d = np.minimum(np.minimum(ys, m.height - ys)[:, None], np.minimum(xs, m.width - xs)[None, :])
    return f - _EDGE_AMP * np.clip(1 - d / m.edge_px, 0, None) ** 2


def _tissue_points(m: Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    f = np.zeros(x.shape)
    for i, (amp, c) in enumerate(m.t_octaves):
        f = f + amp * _noise_points(m.seed, _F_TISSUE + i, x, y, c)
    d = np.minimum(np.minimum(y, m.height - y), np.minimum(x, m.width - x))
    return f - _EDGE_AMP * np.clip(1 - d / m.edge_px, 0, None) ** 2


def _in_tissue(m: Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ground-truth tissue at points (the same decision as the masks, up to rounding)."""
    tis = _tissue_points(m, x, y) > m.t_thr
    if m.holes:
        tis &= _noise_points(m.seed, _F_HOLE, x, y, 45 * m.um) <= m.hole_thr
    return tis


def _lesion_grid(m: Model, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Lesion distance on a grid: < 1 inside a lesion, ``inf`` far from all."""
    d = np.full((ys.size, xs.size), np.inf)
    for i, (cx, cy, r) in enumerate(m.lesions):
        x0, x1 = np.searchsorted(xs, [cx - 2.2 * r, cx + 2.2 * r])
        y0, y1 = np.searchsorted(ys, [cy - 2.2 * r, cy + 2.2 * r])
        if x0 < x1 and y0 < y1:
            u, v = (xs[x0:x1] - cx) / r, (ys[y0:y1] - cy) / r
            di = np.sqrt(u[None, :] ** 2 + v[:, None] ** 2)
            di += 0.3 * _noise_grid(m.seed, _F_LESION + i, u, v, 0.6)  # irregular outline
            np.minimum(d[y0:y1, x0:x1], di, out=d[y0:y1, x0:x1])
    return d


def _lesion_points(m: Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = np.full(x.shape, np.inf)
    for i, (cx, cy, r) in enumerate(m.lesions):
        near = (np.abs(x - cx) < 2.2 * r) & (np.abs(y - cy) < 2.2 * r)
        if near.any():
            u, v = (x[near] - cx) / r, (y[near] - cy) / r
            di = np.sqrt(u * u + v * v) + 0.3 * _noise_points(m.seed, _F_LESION + i, u, v, 0.6)
            d[near] = np.minimum(d[near], di)
    return d


def _lesion_mask(m: Model, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Lesion membership on the ground-truth grid, evaluated only around each lesion."""
    mask = np.zeros((gy.size, gx.size), bool)
    for cx, cy, r in m.lesions:
        x0, x1 = np.searchsorted(gx, [cx - 2.2 * r, cx + 2.2 * r])
        y0, y1 = np.searchsorted(gy, [cy - 2.2 * r, cy + 2.2 * r])
        if x0 < x1 and y0 < y1:
            mask[y0:y1, x0:x1] |= _lesion_grid(m, gx[x0:x1], gy[y0:y1]) < 1
    return mask


def _place_lesions(
    m: Model,
    tissue: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
    ds: int,
    a: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[Model, np.ndarray]:
    """Put lesions deep in tissue, then scale them until they cover ``lesion_fraction`` of it."""
    from scipy import ndimage

    sub = max(1, math.ceil(math.sqrt(tissue.size / 1e6)))
    dist = ndimage.distance_transform_edt(tissue[::sub, ::sub]) * (sub * ds)
    n_tissue, target = int(tissue.sum()), a["lesion_fraction"]
    radii = np.sqrt(rng.dirichlet(np.full(a["n_lesions"], 3.0)) * target * n_tissue / math.pi) * ds
    cy, cx = np.nonzero(dist > 0)
    px, py = gx[cx * sub], gy[cy * sub]
    centres: list[tuple[float, float]] = []
    for r in radii:
        ok = dist[cy, cx] >= min(0.8 * r, 0.8 * dist.max())
        for x, y in centres:
            ok &= np.hypot(px - x, py - y) > 1.5 * r
        pick = rng.choice(np.flatnonzero(ok)) if ok.any() else int(np.argmax(dist[cy, cx]))
        centres.append((float(px[pick]), float(py[pick])))
    lesion = np.zeros_like(tissue)
    for _ in range(12):
        lesions = tuple((x, y, float(r)) for (x, y), r in zip(centres, radii))
        m = dataclasses.replace(m, lesions=lesions)
        lesion = _lesion_mask(m, gx, gy) & tissue
        frac = lesion.sum() / n_tissue
        if lesion.any() and abs(frac / target - 1) < 0.04:
            break
        radii = radii * float(np.clip(math.sqrt(target / max(frac, 1e-9)), 0.7, 1.6))
    return m, lesion


def _place_pen(
    m: Model, tissue: np.ndarray, gx: np.ndarray, gy: np.ndarray, rng: np.random.Generator
) -> tuple:
    """A quadratic-Bezier marker stroke from glass into, and past, tissue."""
    w, h = m.width, m.height
    if tissue.any():
        ty, tx = np.nonzero(tissue)
        i = rng.integers(ty.size)
        p1 = np.array([gx[tx[i]], gy[ty[i]]])
        by, bx = np.nonzero(~tissue)
        far = np.hypot(gx[bx] - p1[0], gy[by] - p1[1]) > 0.25 * min(w, h)
        j = rng.choice(np.flatnonzero(far)) if far.any() else rng.integers(by.size)
        p0 = np.array([gx[bx[j]], gy[by[j]]])
    else:
        p0, p1 = rng.uniform(0.2, 0.8, (2, 2)) * (w, h)
    p2 = p1 + 0.4 * (p1 - p0)
    ctrl = (p0 + p2) / 2 + rng.uniform(-0.2, 0.2) * np.array([p0[1] - p2[1], p2[0] - p0[0]])
    t = np.linspace(0, 1, 48)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * ctrl + t * t * p2
    half = min(400 * m.um, 0.03 * min(w, h))
    return pts, float(half), np.array(_PEN_OD[int(rng.integers(2))], np.float32)


def _place_fold(
    m: Model, tissue: np.ndarray, gx: np.ndarray, gy: np.ndarray, ds: int, rng: np.random.Generator
) -> tuple:
    """A band across the thickest tissue island."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(tissue) * ds
    cy, cx = np.nonzero(dist >= 0.6 * dist.max())
    i, ang = rng.integers(cy.size), rng.uniform(0, math.pi)
    half_w = float(np.clip(0.2 * dist.max(), 30 * m.um, 300 * m.um))
    return gx[cx[i]], gy[cy[i]], math.cos(ang), math.sin(ang), 1.5 * float(dist.max()), half_w


# ------------------------------------------------------------------------------------ rendering


def maybe_content(m: Model, x0: int, y0: int, size: int) -> bool:
    """False only if the tile surely shows bare glass (no tissue, no pen)."""
    if m.pen is not None:
        pts, half, _ = m.pen
        lo, hi = pts.min(0) - 1.2 * half - 4, pts.max(0) + 1.2 * half + 4
        if lo[0] < x0 + size and hi[0] > x0 and lo[1] < y0 + size and hi[1] > y0:
            return True
    if not m.tissue:
        return False
    step = size / 16
    xs, ys = x0 + np.arange(17) * step, y0 + np.arange(17) * step
    return bool(_tissue_grid(m, xs, ys).max() > m.t_thr - m.t_soft - m.t_lip * step)


def render_tile(
    m: Model, x0: int, y0: int, size: int, rng: np.random.Generator
) -> np.ndarray | None:
    """Level-0 RGB ``(size, size, 3)`` uint8 of the tile at ``(x0, y0)``; None for bare glass."""
    f32 = np.float32
    xs = x0 + 0.5 + np.arange(size, dtype=np.float64)
    ys = y0 + 0.5 + np.arange(size, dtype=np.float64)
    pen = _pen_alpha(m, xs, ys) if m.pen is not None else None
    ta = None
    if m.tissue:
        ta = _soft(_tissue_grid(m, xs, ys) - m.t_thr, m.t_soft).astype(f32)
        if m.holes:
            hole = _noise_grid(m.seed, _F_HOLE, xs, ys, 45 * m.um) - m.hole_thr
            ta *= 1 - _soft(hole, 4.0 / (45 * m.um)).astype(f32)
        ta = ta if ta.any() else None
    if ta is None and pen is None:
        return None
    noise = (rng.random((size, size, 5), dtype=f32) - 0.5) * math.sqrt(12)  # unit variance
    od = np.zeros((size, size, 3), f32)
    if ta is not None:
        h, e = _stain(m, xs, ys, x0, y0, size)
        h = ta * (h + 0.02 * noise[..., 3])
        e = ta * (e + 0.02 * noise[..., 4])
        od += h[..., None] * _H_OD + e[..., None] * _E_OD
    if pen is not None:
        assert m.pen is not None  # pen alpha exists only for a model with a pen
        od += pen[..., None] * m.pen[2]
    od += _GLASS_OD
    base, gx, gy = m.illum
    i0 = (base + gx * (xs / m.width - 0.5))[None, :] + (gy * (ys / m.height - 0.5))[:, None]
    rgb = i0.astype(f32)[..., None] * np.exp(-od) + 1.3 * noise[..., :3]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def glass_key(m: Model, index: int, x0: int, y0: int, size: int) -> tuple[int, int]:
    """Which pre-rendered bare-glass tile stands in for tile ``index`` at ``(x0, y0)``.

    Returns
    -------
    (int, int)
        The tile's grey level (the illumination at its centre, rounded) and one of 4 variants.
    """
    base, gx, gy = m.illum
    grey = round(
        base + gx * ((x0 + size / 2) / m.width - 0.5) + gy * ((y0 + size / 2) / m.height - 0.5)
    )
    return grey, int(_hash(m.seed, _F_BG, index)[0] % 4)


def render_glass(m: Model, key: tuple[int, int], size: int) -> np.ndarray:
    """The bare-glass tile ``key`` (from :func:`glass_key`): ``(size, size, 3)`` uint8."""
    grey = key[0]
    noise = np.random.default_rng([m.seed, _F_BG, *key]).normal(0, 1.3, (size, size, 3))
    return np.clip(grey * np.exp(-_GLASS_OD) + noise + 0.5, 0, 255).astype(np.uint8)


def _stain(
    m: Model, xs: np.ndarray, ys: np.ndarray, x0: int, y0: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin optical densities, each ``(size, size)`` float32, of the tissue."""
    f32, um = np.float32, m.um
    grain = _noise_grid(m.seed, _F_GRAIN, xs, ys, 2.0 * um)
    bundle = _noise_grid(m.seed, _F_BUNDLE, xs, ys, 22 * um)
    # Stroma: collagen with wavy, broken pale clefts along a slowly turning direction.
    k, cos, sin, warp = m.fib
    phase = k * (cos * xs[None, :] + sin * ys[:, None])
    phase += warp * _noise_grid(m.seed, _F_FIBRE, xs, ys, 160 * um)
    phase += 1.2 * _noise_grid(m.seed, _F_FIBRE + 1, xs, ys, 5 * um)
    cleft = _soft(np.sin(phase).astype(f32) - 0.72, 0.35)
    presence = _soft(_noise_grid(m.seed, _F_FIBRE + 2, xs, ys, 12 * um) + 0.3, 1.2)
    e = 0.58 * (1 + 0.15 * bundle) * (1 + 0.06 * grain) * (1 - 0.55 * cleft * presence)
    e *= 0.6 + 0.4 * _soft(bundle + 1.3, 0.8)  # loose, paler stroma between bundles
    h = 0.08 * (1 + 0.2 * grain)
    # Lymphoid regions: scant cytoplasm between dense small nuclei.
    lymph = _noise_grid(m.seed, _F_LYMPH, xs, ys, 120 * um) - m.lymph_thr
    la = _soft(lymph, 0.35).astype(f32)
    e += la * (0.36 * (1 + 0.08 * grain) - e)
    h += la * (0.10 - h)
    if m.lesions:
        d = _lesion_grid(m, xs, ys)
        if np.isfinite(d).any():
            les = _soft(1 - d, 6 * um / min(r for *_, r in m.lesions)).astype(f32)
            if m.lesion_style == "morphology":  # same stroma; offset its nuclei's coverage
                e *= 1 + les * (_MORPH_EOSIN - 1)
            else:  # tumour: no fibres, denser cytoplasm between crowded pale nuclei
                e += les * (0.63 * (1 + 0.10 * grain) - e)
                h += les * (0.02 - h)
    nuc = _nuclei(m, x0, y0, size)
    if nuc is not None:
        chrom = 0.5 * _noise_grid(m.seed, _F_CHROM, xs, ys, 1.1 * um)
        hn, cov, en = _draw_nuclei(nuc, x0, y0, size, chrom)
        e = e * (1 - 0.7 * cov) + en
        h = h + hn
    fa = _fold_alpha(m, xs, ys) if m.fold is not None else None
    if fa is not None:  # two layers of tissue, more eosin
        h, e = h * (1 + 0.8 * fa), e * (1 + 1.1 * fa)
    return h.astype(f32), e.astype(f32)


def _pen_alpha(m: Model, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
    assert m.pen is not None  # called only for a model with a pen
    pts, half, _ = m.pen
    pad = 1.2 * half + 4
    dist = None
    for p, q in pairwise(pts):
        lo, hi = np.minimum(p, q) - pad, np.maximum(p, q) + pad
        if hi[0] < xs[0] or lo[0] > xs[-1] or hi[1] < ys[0] or lo[1] > ys[-1]:
            continue
        pq, dx, dy = q - p, xs[None, :] - p[0], ys[:, None] - p[1]
        t = np.clip((dx * pq[0] + dy * pq[1]) / max(pq @ pq, 1e-9), 0, 1)
        d = np.hypot(dx - t * pq[0], dy - t * pq[1])
        dist = d if dist is None else np.minimum(dist, d)
    if dist is None:
        return None
    wobble = _noise_grid(m.seed, _F_PEN, xs, ys, 2 * half)
    alpha = _soft(half * (1 + 0.06 * wobble) - dist, 3.0) * (0.85 + 0.1 * wobble)
    return alpha.astype(np.float32) if alpha.any() else None


def _fold_alpha(m: Model, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
    assert m.fold is not None  # called only for a model with a fold
    cx, cy, ux, uy, half_len, half_w = m.fold
    reach = half_len + 2 * half_w
    if xs[-1] < cx - reach or xs[0] > cx + reach or ys[-1] < cy - reach or ys[0] > cy + reach:
        return None
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    along, across = dx * ux + dy * uy, dy * ux - dx * uy
    wobble = _noise_grid(m.seed, _F_FOLD, xs, ys, 3 * half_w)
    alpha = _soft(half_w * (1 + 0.25 * wobble) - np.abs(across), 3.0)
    alpha *= _soft(half_len - np.abs(along), half_w)
    return alpha.astype(np.float32) if alpha.any() else None


def _nuclei(m: Model, x0: int, y0: int, size: int) -> np.ndarray | None:
    """Nuclei and nucleoli whose extent may touch the tile: ``(n, 14)`` rows (columns ``_X`` ...).

    Candidates sit on jittered slots of ``_CELL_UM`` cells: 6 x 6 small slots (stroma and
    lymphocyte nuclei, and the nuclei of a morphology-only lesion) and 4 x 4 large slots (tumour).
    Everything about a candidate is a hash of ``(seed, cell, slot)`` and the model at its centre,
    never of the tile.
    """
    margin, c = math.ceil(17 * m.um + 2), _CELL_UM * m.um
    lo_x, hi_x, lo_y, hi_y = x0 - margin, x0 + size + margin, y0 - margin, y0 + size + margin
    cxs = np.arange(math.floor(lo_x / c), math.floor(hi_x / c) + 1)
    cys = np.arange(math.floor(lo_y / c), math.floor(hi_y / c) + 1)
    parts = []
    for n, fid in ((6, _F_SLOT_FINE), (4, _F_SLOT_COARSE)):
        grid = np.meshgrid(cys, cxs, np.arange(n), np.arange(n), indexing="ij")
        gy, gx, sy, sx = (g.ravel() for g in grid)
        key = _hash(m.seed, fid, gx, gy, sy * n + sx)
        u = _uniform(_hash(key[:, None], np.arange(18)[None, :]))  # (n_slots, 18)
        x = (gx + (sx + 0.5 + 0.8 * (u[:, 0] - 0.5)) / n) * c
        y = (gy + (sy + 0.5 + 0.8 * (u[:, 1] - 0.5)) / n) * c
        ok = (x > lo_x) & (x < hi_x) & (y > lo_y) & (y < hi_y)
        x, y, u = x[ok], y[ok], u[ok]
        if not x.size:
            continue
        tis = _in_tissue(m, x, y)
        les = _lesion_points(m, x, y) < 1 if m.lesions else np.zeros(x.shape, bool)
        morph = m.lesion_style == "morphology"
        if n == 6:
            lymph = _noise_points(m.seed, _F_LYMPH, x, y, 120 * m.um) - m.lymph_thr
            la = _soft(lymph, 0.35)
            keep = tis & ~les & (u[:, 2] < 0.11 + 0.64 * la)
            kind = np.where(u[:, 2] < 0.64 * la, _LYMPH, _STROMA)
            if morph:
                keep |= tis & les & (u[:, 2] < _MORPH_KEEP)
                kind = np.where(les, _MORPH, kind)
        else:
            keep = tis & les & (u[:, 2] < 0.65) & (not morph)
            kind = np.full(x.shape, _TUMOUR)
        parts.append((x[keep], y[keep], u[keep], kind[keep]))
    if not parts:
        return None
    x, y, u, kind = (np.concatenate(p) for p in zip(*parts))
    if not len(x):
        return None
    p = _KINDS[kind]
    giant = np.where((kind == _TUMOUR) & (u[:, 4] < 0.07), 1.3, 1.0)
    r = (p[:, 0] + p[:, 1] * u[:, 3]) * giant / 2 * m.um
    asp = np.sqrt(p[:, 2] + p[:, 3] * u[:, 5])
    nuc = np.zeros((x.size, 14))
    nuc[:, [_X, _Y, _A, _B]] = np.stack([x, y, r * asp, r / asp], 1)
    nuc[:, [_ANG, _PH2, _PH3]] = np.pi * u[:, [6, 9, 10]] * (1, 2, 2)
    nuc[:, _A2], nuc[:, _A3] = p[:, 4] + p[:, 5] * u[:, 7], p[:, 6] * u[:, 8]
    nuc[:, _BODY], nuc[:, _CHROM] = p[:, 7] + p[:, 8] * u[:, 11], p[:, 9]
    nuc[:, _RIM], nuc[:, _COV] = p[:, 10] + p[:, 11] * u[:, 12], 1.0
    t = np.flatnonzero(kind == _TUMOUR)
    if not t.size:
        return nuc
    # Nucleoli: one per tumour nucleus, a second one in about a third of them.
    two = t[u[t, 16] < 0.35]
    idx = np.concatenate([t, two])
    phi = 2 * np.pi * np.concatenate([u[t, 14], u[two, 14] + 0.35 + 0.3 * u[two, 17]])
    off = 0.45 * np.concatenate([u[t, 15], 1 - u[two, 15]])
    lx, ly = off * nuc[idx, _A] * np.cos(phi), off * nuc[idx, _B] * np.sin(phi)
    ca, sa = np.cos(nuc[idx, _ANG]), np.sin(nuc[idx, _ANG])
    extra = np.zeros((idx.size, 14))
    extra[:, _X], extra[:, _Y] = x[idx] + lx * ca - ly * sa, y[idx] + lx * sa + ly * ca
    extra[:, _A] = extra[:, _B] = (0.8 + 0.6 * np.concatenate([u[t, 13], 0.6 * u[two, 13]])) * m.um
    extra[:, _BODY], extra[:, _EOS] = 0.9, 0.35
    return np.concatenate([nuc, extra])


def _draw_nuclei(
    nuc: np.ndarray, x0: int, y0: int, size: int, chrom: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise nuclei into the tile.

    Returns haematoxylin OD, coverage (0..1) and eosin OD, each ``(size, size)`` float32. Nuclei
    are drawn in buckets of similar size, each as an ``(n, K, K)`` stack of pixel offsets.
    """
    f32, n_px = np.float32, size * size
    half = np.ceil(nuc[:, _A] * (1 + nuc[:, _A2] + nuc[:, _A3]) + 1.5).astype(np.int64)
    touch = (nuc[:, _X] + half >= x0) & (nuc[:, _X] - half < x0 + size)
    touch &= (nuc[:, _Y] + half >= y0) & (nuc[:, _Y] - half < y0 + size)
    bucket = (half + 3) // 4 * 4
    hn, cov, en = np.zeros(n_px), np.zeros(n_px), np.zeros(n_px)
    chrom = chrom.ravel()
    for hb in np.unique(bucket[touch]):
        p = nuc[touch & (bucket == hb)]
        q = {k: p[:, k, None, None] for k in (_A, _B, _A2, _A3)}
        ang, ph2, ph3 = (p[:, k, None, None] for k in (_ANG, _PH2, _PH3))
        o = np.arange(-hb, hb + 1)
        px = np.floor(p[:, _X]).astype(np.int64)[:, None] + o  # (n, K) columns
        py = np.floor(p[:, _Y]).astype(np.int64)[:, None] + o  # (n, K) rows
        dx = (px + 0.5 - p[:, _X, None]).astype(f32)[:, None, :]
        dy = (py + 0.5 - p[:, _Y, None]).astype(f32)[:, :, None]
        un = (dx * np.cos(ang) + dy * np.sin(ang)) / q[_A]
        vn = (dy * np.cos(ang) - dx * np.sin(ang)) / q[_B]
        rho = np.sqrt(un * un + vn * vn) + 1e-6
        cs, sn = un / rho, vn / rho
        lobes = q[_A2] * ((cs * cs - sn * sn) * np.cos(ph2) - 2 * cs * sn * np.sin(ph2))
        lobes += q[_A3] * (
            cs * (4 * cs * cs - 3) * np.cos(ph3) - sn * (3 - 4 * sn * sn) * np.sin(ph3)
        )
        s = rho / (1 + lobes)  # 1 on the (irregular) boundary
        alpha = np.clip((1 - s) * np.sqrt(q[_A] * q[_B]) + 0.5, 0, 1)
        inside = ((px >= x0) & (px < x0 + size))[:, None, :] & (alpha > 0)
        inside &= ((py >= y0) & (py < y0 + size))[:, :, None]
        if not inside.any():
            continue
        flat = ((py - y0)[:, :, None] * size + (px - x0)[:, None, :])[inside]
        which = np.broadcast_to(np.arange(len(p))[:, None, None], inside.shape)[inside]
        w, s = alpha[inside], s[inside]
        body, chr_, rim, eos, cw = (p[which, k] for k in (_BODY, _CHROM, _RIM, _EOS, _COV))
        od = body * (1 + chr_ * chrom[flat]) + rim * np.clip(1 - ((s - 0.88) / 0.12) ** 2, 0, 1)
        hn += np.bincount(flat, np.maximum(od, 0) * w, n_px)
        cov += np.bincount(flat, cw * w, n_px)
        en += np.bincount(flat, eos * w, n_px)
    shape = (size, size)
    return (
        hn.reshape(shape).astype(f32),
        np.minimum(cov, 1).reshape(shape).astype(f32),
        en.reshape(shape).astype(f32),
    )
