"""Notebook helpers that return matplotlib figures: tiling QC, patch galleries, heatmap overlays.

They read only the stores (no torch), so they work on any machine that can see the outputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .exports import DEFAULT_ALPHA, DEFAULT_CMAP
from .store import SlideStore

__all__ = ["plot_heatmap", "plot_patches", "plot_tiling"]


def _store(store: SlideStore | str | os.PathLike) -> SlideStore:
    return store if isinstance(store, SlideStore) else SlideStore(store)


def _figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def plot_tiling(store: SlideStore | str | os.PathLike, *, max_boxes: int = 5000) -> Any:
    """The thumbnail with the tissue mask outlined and the kept patches drawn as boxes.

    Parameters
    ----------
    store : SlideStore or path
    max_boxes : int
        Draw at most this many patch outlines (a random subset beyond that).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.collections import PolyCollection

    st = _store(store)
    thumb = st.thumbnail
    ds = st.thumbnail_downsample
    mask = st.tissue_mask
    fig, ax = _figure((8, 8 * thumb.shape[0] / max(thumb.shape[1], 1) + 0.6))
    ax.imshow(thumb)
    ax.contour(mask.astype(float), levels=[0.5], colors=["lime"], linewidths=0.8)
    coords = st.coords
    if len(coords) > max_boxes:
        coords = coords[np.random.default_rng(0).choice(len(coords), max_boxes, replace=False)]
    p = float(st.tiling["patch_l0"]) / ds
    boxes = [
        [(x / ds, y / ds), (x / ds + p, y / ds), (x / ds + p, y / ds + p), (x / ds, y / ds + p)]
        for x, y in coords
    ]
    ax.add_collection(PolyCollection(boxes, facecolors="none", edgecolors="yellow", linewidths=0.4))
    mpp = st.tiling.get("mpp")
    res = f"{mpp:g} µm/px" if mpp else f"level {st.tiling.get('level')}"
    ax.set_title(
        f"{st.slide_id}: {st.n_patches} patches of {st.tiling['tile_px']} px at {res}; "
        f"tissue {mask.mean():.0%} of the slide",
        fontsize=9,
    )
    ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_patches(
    store: SlideStore | str | os.PathLike,
    *,
    n: int = 16,
    by: str = "random",
    run_id: str | None = None,
    indices: Sequence[int] | None = None,
    seed: int = 0,
) -> Any:
    """A gallery of patches: random, or the top-scoring ones of a run.

    Parameters
    ----------
    store : SlideStore or path
    n : int
        Number of patches.
    by : {"random", "score", "attention"}
        Which patches: a seeded random sample, or the highest ``scores/<run_id>`` (or its
        attention).
    run_id : str, optional
        Needed for ``by="score"`` / ``"attention"``.
    indices : sequence of int, optional
        Show exactly these patches.
    seed : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    st = _store(store)
    values = None
    if indices is None:
        indices, values = _choose(st, n=n, by=by, run_id=run_id, seed=seed)
    indices = [int(i) for i in indices]
    patches = st.reader().read(indices) if indices else np.zeros((0, 1, 1, 3), np.uint8)
    cols = int(np.ceil(np.sqrt(max(1, len(indices)))))
    rows = int(np.ceil(len(indices) / cols)) or 1
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1.8 * cols, 1.9 * rows))
    for k, (i, p) in enumerate(zip(indices, patches)):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(p)
        label = f"#{i}" if values is None else f"#{i} {values[i]:.3g}"
        ax.set_title(label, fontsize=7)
        ax.set_axis_off()
    fig.suptitle(f"{st.slide_id}: {by} patches", fontsize=9)
    fig.tight_layout()
    return fig


def _choose(
    st: SlideStore, *, n: int, by: str, run_id: str | None, seed: int
) -> tuple[list[int], np.ndarray | None]:
    """Indices of ``n`` patches (a seeded sample, or the top scores) and the scores if used."""
    from .heatmap import read_scores

    if by == "random":
        k = min(n, st.n_patches)
        picked = np.sort(np.random.default_rng(seed).choice(st.n_patches, k, replace=False))
        return [int(i) for i in picked], None
    if by in ("score", "attention"):
        if run_id is None:
            raise ValueError("run_id is needed to show top-scoring patches")
        values = read_scores(st, run_id, by)[0]
        return [int(i) for i in np.argsort(-values, kind="stable")[:n]], values
    raise ValueError(f"by must be 'random', 'score' or 'attention', not {by!r}")


def plot_heatmap(
    store: SlideStore | str | os.PathLike,
    *,
    run_id: str,
    which: str = "score",
    mode: str | None = None,
    sigma_um: float = 0.0,
    alpha: float = DEFAULT_ALPHA,
    cmap: str = DEFAULT_CMAP,
    transparent_below: float | None = None,
) -> Any:
    """The stitched heatmap of a run over the thumbnail, with a colour bar.

    Drawn with the colours and opacities of the exported PNG and overlay TIFF
    (:func:`wsi_pipeline.heatmap.overlay_colours`): transparent at and below
    ``transparent_below``, so low scores leave the slide visible.

    Parameters
    ----------
    store : SlideStore or path
    run_id : str
        ``scores/<run_id>`` in the store (written by ``predict``).
    which : {"score", "attention"}
    mode : {"probability", "percentile"}, optional
        Per-patch probabilities on a fixed 0..1 scale, or within-slide percentiles (0..100).
        Default: probability for scores, percentile for attention.
    sigma_um : float
        Gaussian smoothing in µm.
    alpha, cmap, transparent_below :
        Opacity at the top of the scale, colour map and the value (mode units) at or below which
        the overlay is transparent (default 0.2 for probabilities, 50 for percentiles).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import ListedColormap

    from .heatmap import check_options, overlay_colours, read_scores, stitch_store
    from .stitch import MODES, display_values

    st = _store(store)
    mode, _ = check_options(which, mode)
    lut, _ = overlay_colours(mode, cmap=cmap, alpha=alpha, transparent_below=transparent_below)
    scores, pred = read_scores(st, run_id, which)
    heat, _ = stitch_store(st, display_values(scores, mode=mode), sigma_um=sigma_um)
    thumb = st.thumbnail
    fig, ax = _figure((8, 8 * thumb.shape[0] / max(thumb.shape[1], 1) + 0.6))
    ax.imshow(thumb)
    colours = ListedColormap(lut / 255.0).with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    vmin, vmax = MODES[mode]
    im = ax.imshow(
        np.ma.masked_invalid(heat[: thumb.shape[0], : thumb.shape[1]]),
        cmap=colours,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
    )
    fig.colorbar(
        im,
        ax=ax,
        fraction=0.035,
        pad=0.02,
        label="abnormality probability" if mode == "probability" else "within-slide percentile",
    )
    p = pred.get("abnormal_probability")
    ax.set_title(
        f"{st.slide_id} — {which} ({mode}); predicted {pred.get('predicted')}"
        + (f", p(abnormal) = {p:.2f}" if p is not None else ""),
        fontsize=9,
    )
    ax.set_axis_off()
    fig.tight_layout()
    return fig
