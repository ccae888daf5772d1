"""The heatmap stage: per-slide exports of a predict run's per-patch scores, and the batch run.

Everything here works from a store alone (``coords``, ``thumbnail``, ``tissue_mask`` and the
``scores/<run>`` written by ``wsi-pipeline predict``); no model and no torch. Stitching (the grid
geometry and the display modes) lives in :mod:`wsi_pipeline.stitch`, the file formats in
:mod:`wsi_pipeline.exports` (colours, TIFFs, PNG) and :mod:`wsi_pipeline.qupath` (GeoJSON), the
summary's contents in :mod:`wsi_pipeline.heatmap_summary`; this module reads the store, checks the
options, names the files, and decides whether an export is finished.

What is drawn
-------------
``which="score"``
    ``scores/<run>``: each patch's probability of abnormality, ``1 - p(negative class)``.
``which="score", class_name=NAME``
    Column ``NAME`` of ``scores/<run>-classes``: each patch's probability of that class (any of
    the run's classes, the negative one included). Stores predicted before the per-class
    probabilities were written have no such array: that slide fails with one line (rerun
    ``predict``); a name that is not one of the run's classes is a :class:`ConfigError` naming
    them, raised before any file of the batch is written.
``which="attention"``
    ``scores/<run>-attention``: the head's attention weights.

Display modes (:data:`wsi_pipeline.stitch.MODES`)
-------------------------------------------------
``"probability"``
    ``scores/<run>`` on a fixed 0..1 colour scale; the default for scores.
``"percentile"``
    Within-slide percentile ranks (0..100); colours are *not* comparable across slides. The
    default (and the only mode) for attention (``scores/<run>-attention``).

Exports of one slide (:func:`export_heatmaps`), in ``out_dir``
-------------------------------------------------------------
``<which>`` below is ``score``, ``attention``, or ``score-<class>`` for a class's probability
(the class name sanitised for file names, :func:`wsi_pipeline.util.sanitize_id`), so per-class
exports never overwrite the default ones.

Colours come from one function (:func:`wsi_pipeline.exports.overlay_lut`): the colormap
(``viridis`` by default) with an opacity that is 0 at and below ``transparent_below`` and rises
to ``alpha`` at the top of the scale, so low scores leave the H&E visible; the PNG, the overlay
TIFF and :func:`wsi_pipeline.viz.plot_heatmap` look the same.

``<id>_<which>_overlay.png``
    The heatmap over the store's thumbnail, with a colour bar and the slide's prediction.
``<id>_<which>_overlay.tif``
    The same colours and opacities as a pyramidal tiled RGBA TIFF with the slide's level-0 size
    and mpp, to lay over the slide 1:1 (:func:`wsi_pipeline.exports.write_overlay_tiff`);
    openslide and tiffslide read it.
``<id>_<which>_values.tif``
    The heatmap values themselves, float32 (NaN outside tissue), one pixel per heatmap pixel
    (``mpp * downsample`` µm); for tifffile, tiffslide and QuPath (openslide reads uint8 only).
``<id>_<which>_regions.geojson``
    Regions at or above ``threshold`` as QuPath annotations in level-0 pixel coordinates
    (:func:`wsi_pipeline.qupath.threshold_regions`).
``<id>_<which>_tiles.geojson``
    One QuPath detection per patch (its square in level-0 px) with the measurements ``score``
    (the heatmap's value), ``probability`` or ``attention`` (the stored value) and
    ``tissue_fraction``; classified when at or above ``threshold``. *Measure → Show measurement
    maps* shows the heatmap in QuPath (:func:`wsi_pipeline.qupath.write_tiles_geojson`).
``<id>_<which>_summary.json``
    Prediction, area and tissue fraction above the threshold, top-10 patches, parameters and the
    other files' names (relative to the summary); written last, so it marks a finished export
    (:func:`wsi_pipeline.heatmap_summary.slide_summary`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import __version__
from .errors import ConfigError, StoreError, WSIPipelineError, disk_full_message, is_disk_full
from .exports import (
    DEFAULT_ALPHA,
    DEFAULT_CMAP,
    check_compression,
    overlay_lut,
    render_png,
    write_overlay_tiff,
    write_pyramid_tiff,
)
from .heatmap_summary import heatmap_mpp, slide_summary
from .locks import STAGE_WAIT_S, acquire, locked
from .qupath import threshold_regions, write_tiles_geojson
from .stitch import COMBINE, MODES, check_combine, display_values, stitch_scores
from .store import (
    SlideStore,
    class_scores_key,
    find_stores,
    has_complete_array,
    score_runs,
    scores_key,
)
from .util import atomic_write_json, output_dir, sanitize_id

__all__ = [
    "WHICH",
    "check_class",
    "check_options",
    "check_scores_model",
    "current_model_id",
    "export_heatmaps",
    "heatmaps",
    "overlay_colours",
    "read_scores",
    "stitch_scores",  # lives in wsi_pipeline.stitch; re-exported for wsi_pipeline.heatmap users
    "stitch_store",
    "which_name",
]

log = logging.getLogger(__name__)

#: What a heatmap shows: ``scores/<run>`` or ``scores/<run>-attention``.
WHICH = ("score", "attention")
_DEFAULT_MODE = {"score": "probability", "attention": "percentile"}
_DEFAULT_THRESHOLD = {"probability": 0.5, "percentile": 90.0}
#: Default ``transparent_below`` of each mode: lower values leave the slide untinted.
_DEFAULT_TRANSPARENT = {"probability": 0.2, "percentile": 50.0}
_WHAT = {"score": "abnormality score", "attention": "attention weight"}
_RAW = {"score": "probability", "attention": "attention"}  # the stored value's measurement name
_CLASS = {"score": "Abnormal", "attention": "High attention"}  # QuPath class above threshold
_LEGEND = {
    "probability": "colour: per-patch abnormality probability (0-1, fixed scale, comparable "
    "across slides)",
    "percentile": "colour: within-slide percentile rank of the patch {what} (0-100; every slide "
    "spans the full colour range, so colours are not comparable across slides)",
}
_FILES = {  # file kind -> name suffix; the names are <slide_id>_<which>_<suffix>
    "png": "overlay.png",
    "tiff": "overlay.tif",
    "values_tiff": "values.tif",
    "geojson": "regions.geojson",
    "tiles_geojson": "tiles.geojson",
    "summary": "summary.json",
}
_CLASS_LEGEND = {
    "probability": "colour: per-patch probability of class {name!r} (0-1, fixed scale, "
    "comparable across slides)",
    "percentile": "colour: within-slide percentile rank of the patch probability of class "
    "{name!r} (0-100; every slide spans the full colour range, so colours are not comparable "
    "across slides)",
}
_PNG_MAX_PX = 2048
_BLOCK_PX = 1024


# --------------------------------------------------------------------------------------------
# options and inputs
# --------------------------------------------------------------------------------------------
class _UnknownClass(ConfigError):
    """A class name that is not one of the run's classes: bad usage for the whole batch (it is
    raised out of :func:`heatmaps`, not recorded per slide)."""


def check_class(class_name: str, classes: Sequence[str]) -> int:
    """The column of ``class_name`` among a run's ``classes``.

    Raises
    ------
    ConfigError
        ``class_name`` is not one of ``classes`` (the message names both).
    """
    if class_name not in classes:
        raise _UnknownClass(
            f"unknown class {class_name!r}: the run's classes are "
            f"{', '.join(repr(str(c)) for c in classes)}"
        )
    return list(classes).index(class_name)


def check_options(
    which: str,
    mode: str | None = None,
    threshold: float | None = None,
    class_name: str | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[str, float]:
    """Check what to draw and in which units; fill in the defaults.

    The one check of the heatmap options: :func:`export_heatmaps`, :func:`heatmaps`, the CLI and
    the pipeline file's ``heatmap`` section (``run --check``) all go through it.

    Parameters
    ----------
    which : {"score", "attention"}
        ``scores/<run>`` or ``scores/<run>-attention``.
    mode : {"probability", "percentile"}, optional
        Default ``"probability"`` for scores, ``"percentile"`` for attention.
    threshold : float, optional
        In the mode's units; default 0.5 (probability) or 90 (percentile).
    class_name : str, optional
        Draw this class's per-patch probability (``scores/<run>-classes``) instead of the
        abnormality score; only with ``which="score"``.
    classes : sequence of str, optional
        The run's classes, when known: ``class_name`` must be one of them.

    Returns
    -------
    mode : str
    threshold : float

    Raises
    ------
    ConfigError
        An unknown ``which`` or ``mode``, attention in probability mode, a threshold outside
        the mode's range, a ``class_name`` that is not a non-empty string, is given with
        attention, or is not one of ``classes``.
    """
    if which not in WHICH:
        raise ConfigError(f"which must be 'score' or 'attention', not {which!r}")
    if class_name is not None:
        if not isinstance(class_name, str) or not class_name:
            raise ConfigError(
                "class must be a class name (a string; quote it in a pipeline file, e.g. "
                f"'1'), not {class_name!r}"
            )
        if which == "attention":
            raise ConfigError(
                f"class {class_name!r} draws a class probability; attention has no classes "
                "(use which='score')"
            )
        if classes is not None:
            check_class(class_name, classes)
    mode = mode or _DEFAULT_MODE[which]
    if mode not in MODES:
        raise ConfigError(f"heatmap mode must be one of {sorted(MODES)}, not {mode!r}")
    if which == "attention" and mode == "probability":
        raise ConfigError("attention weights are not probabilities; use mode='percentile'")
    lo, hi = MODES[mode]
    try:
        thr = _DEFAULT_THRESHOLD[mode] if threshold is None else float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a number, not {threshold!r}") from None
    if not lo <= thr <= hi:
        raise ConfigError(f"threshold {threshold!r} is outside the {mode} range {lo:g}..{hi:g}")
    return mode, thr


def overlay_colours(
    mode: str,
    *,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    transparent_below: float | None = None,
) -> tuple[np.ndarray, float]:
    """The colours and opacities of a mode's heatmaps (:func:`wsi_pipeline.exports.overlay_lut`).

    Parameters
    ----------
    mode : {"probability", "percentile"}
    cmap : str
        Matplotlib colormap (default ``"viridis"``; ``"jet"`` on request).
    alpha : float
        Opacity at the top of the scale.
    transparent_below : float, optional
        In the mode's units; values at or below it are transparent. Default 0.2 (probability) or
        50 (percentile).

    Returns
    -------
    lut : (256, 4) uint8 ndarray
    transparent_below : float

    Raises
    ------
    ConfigError
        An unknown mode or colormap, ``alpha`` outside [0, 1], ``transparent_below`` outside
        the mode's range.
    """
    if mode not in MODES:
        raise ConfigError(f"heatmap mode must be one of {sorted(MODES)}, not {mode!r}")
    t = _DEFAULT_TRANSPARENT[mode] if transparent_below is None else float(transparent_below)
    lut = overlay_lut(cmap, value_range=MODES[mode], alpha=alpha, transparent_below=t)
    return lut, t


def _options(
    which: str,
    mode: str | None,
    threshold: float | None,
    class_name: str | None,
    *,
    sigma_um: float,
    cmap: str,
    alpha: float,
    transparent_below: float | None,
    compression: str,
    values_tiff: bool,
    mask_tissue: bool,
    combine: str,
) -> tuple[Any, dict[str, Any]]:
    """The colour table and the drawing options as recorded in a summary's ``params``, after
    checking every option (one place for :func:`export_heatmaps` and :func:`heatmaps`)."""
    lut, transparent = overlay_colours(
        check_options(which, mode, threshold, class_name)[0],
        cmap=cmap,
        alpha=alpha,
        transparent_below=transparent_below,
    )
    return lut, {
        "combine": check_combine(combine),
        "sigma_um": float(sigma_um),
        "cmap": cmap,
        "alpha": float(alpha),
        "transparent_below": float(transparent),
        "compression": check_compression(compression),
        "values_tiff": bool(values_tiff),
        "mask_tissue": bool(mask_tissue),
    }


def _missing_scores(store: SlideStore, key: str, run_id: str, which: str) -> StoreError:
    """The error for a store without scores ``key``, naming the runs it has."""
    runs = score_runs(store.group)
    if which == "attention" and run_id in runs:
        return StoreError(
            f"run {run_id!r} has no attention scores (its head has no attention); "
            "use which='score'",
            path=store.path,
        )
    have = f" (it has: {', '.join(runs)})" if runs else " (it has no scores)"
    return StoreError(
        f"no '{key}' in the store{have}; run 'wsi-pipeline predict --run {run_id}' first",
        path=store.path,
    )


def read_scores(
    store: SlideStore, run_id: str, which: str = "score", class_name: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """A run's per-patch scores and the slide's prediction, from ``scores/<run_id>``.

    Parameters
    ----------
    store : SlideStore
    run_id : str
        The predict run.
    which : {"score", "attention"}
        ``scores/<run_id>`` or ``scores/<run_id>-attention``.
    class_name : str, optional
        With ``which="score"``: that class's per-patch probability, its column of
        ``scores/<run_id>-classes``, instead of the abnormality score.

    Returns
    -------
    scores : (N,) float32 ndarray
        One value per patch of the store.
    prediction : dict
        The attributes of ``scores/<run_id>`` (``predicted``, ``abnormal_probability``,
        ``probabilities``, ``classes``, ...); empty if there are none. Its ``model_id`` is
        that of the array read (attention or class scores record their own), for
        :func:`check_scores_model`.

    Raises
    ------
    ConfigError
        An unknown ``which``, or a ``class_name`` that is not one of the run's classes.
    StoreError
        No such scores (run predict first), unfinished ones, not one per patch, or no
        per-class probabilities (a store predicted before they were written: rerun predict).
    """
    check_options(which, class_name=class_name)
    g = store.group
    if class_name is not None:
        _check_scores(store, scores_key(run_id), run_id, which)
        key = _check_class_scores(store, run_id, class_name)
        col = check_class(class_name, list(g[key].attrs.get("classes", [])))
        scores = np.asarray(g[key][:, col], dtype=np.float32)
    else:
        key = scores_key(run_id, attention=which == "attention")
        _check_scores(store, key, run_id, which)
        scores = np.asarray(g[key][...], dtype=np.float32).reshape(-1)
    if len(scores) != store.n_patches:
        raise StoreError(
            f"'{key}' has {len(scores)} values for {store.n_patches} patches; rerun "
            f"'wsi-pipeline predict --run {run_id}'",
            path=store.path,
        )
    pred_key = scores_key(run_id)  # the slide's prediction lives with the scores
    pred = dict(g[pred_key].attrs) if pred_key in g else {}
    made_by = g[key].attrs.get("model_id")
    if made_by:  # the model of the values drawn (an attention array may outlive its scores)
        pred["model_id"] = made_by
    return scores, pred


def check_scores_model(
    store: SlideStore, run_id: str, prediction: dict[str, Any], model_id: str | None
) -> None:
    """Refuse scores that another model than the run's current one wrote.

    The one check of "are these scores the run's current model's?", used by ``heatmap``, the
    batch report and the viewer: ``predict`` records :func:`wsi_pipeline.runs.model_id` of the
    run folder with the scores; when the run folder was trained again since, its model differs.

    Parameters
    ----------
    store : SlideStore
        The store (named in the message).
    run_id : str
        The predict run of ``scores/<run_id>``.
    prediction : dict
        The attributes of ``scores/<run_id>`` (:func:`read_scores`).
    model_id : str or None
        The run's current model (:func:`current_model_id`); None: not checked.

    Raises
    ------
    StoreError
        ``"<store>: 'scores/<run>' was written by another model (...) than the run's current
        one (...): the run was trained again since; rerun 'wsi-pipeline predict --run <run>'"``.
        Scores of older versions record no model and are not refused.
    """
    made_by = prediction.get("model_id")
    if model_id and made_by and made_by != model_id:  # stores of older versions record none
        raise StoreError(
            f"'{scores_key(run_id)}' was written by another model ({made_by}) than the run's "
            f"current one ({model_id}): the run was trained again since; rerun "
            f"'wsi-pipeline predict --run {run_id}'",
            path=store.path,
        )


def current_model_id(
    run_dir: str | os.PathLike | None, prediction: dict[str, Any] | None = None
) -> str | None:
    """The current model of the run whose scores are shown, for :func:`check_scores_model`.

    Parameters
    ----------
    run_dir : path or None
        The run folder, when the user named it.
    prediction : dict, optional
        The attributes of ``scores/<run_id>``: without ``run_dir``, the run folder ``predict``
        recorded there (``run_dir``) is used while it is still a folder.

    Returns
    -------
    str or None
        :func:`wsi_pipeline.runs.model_id` of that folder; None when there is none to ask (the
        scores cannot be checked).
    """
    from . import runs

    folder = run_dir if run_dir is not None else (prediction or {}).get("run_dir")
    if not folder or not Path(folder).is_dir():
        return None
    p = Path(folder).resolve()
    stats = [
        (q.stat().st_size, q.stat().st_mtime_ns)
        for q in (p / runs.MODEL, p / runs.CALIBRATION)
        if q.is_file()
    ]
    return _model_id_cached(str(p), tuple(stats))


@functools.lru_cache(maxsize=16)
def _model_id_cached(folder: str, stats: tuple[tuple[int, int], ...]) -> str:
    """:func:`wsi_pipeline.runs.model_id` of ``folder``, hashed again only when its files'
    sizes or times change (a report or viewer asks once per slide)."""
    from . import runs

    return runs.model_id(folder)


def _check_scores(store: SlideStore, key: str, run_id: str, which: str) -> None:
    """``key`` is in the store and finished, else the StoreError saying what to run."""
    if key not in store.group:
        raise _missing_scores(store, key, run_id, which)
    if not has_complete_array(store.group, key):
        raise StoreError(
            f"'{key}' is unfinished; rerun 'wsi-pipeline predict --run {run_id}'", path=store.path
        )


def _check_class_scores(store: SlideStore, run_id: str, class_name: str) -> str:
    """The key of the run's per-class probabilities, checked as :func:`_check_scores` does;
    a store predicted before they were written says to rerun predict."""
    key = class_scores_key(run_id)
    if key not in store.group:
        raise StoreError(
            f"no '{key}' in the store (predicted before per-class probabilities were written); "
            f"rerun 'wsi-pipeline predict --run {run_id}' to draw class {class_name!r}",
            path=store.path,
        )
    _check_scores(store, key, run_id, "score")
    return key


def stitch_store(
    store: SlideStore,
    values: np.ndarray,
    *,
    downsample: float | None = None,
    sigma_um: float = 0.0,
    mask_tissue: bool = True,
    block_px: int = _BLOCK_PX,
    combine: str = COMBINE[0],
) -> tuple[np.ndarray, np.ndarray]:
    """Stitch per-patch values of a store onto its heatmap grid (:func:`stitch_scores`).

    Parameters
    ----------
    store : SlideStore
    values : (N,) float ndarray
        One value per patch of the store (e.g. :func:`wsi_pipeline.stitch.display_values`).
    downsample : float, optional
        Level-0 px per heatmap pixel; default the thumbnail's.
    sigma_um : float
        Gaussian smoothing in µm (0: none; needs the slide's mpp).
    mask_tissue : bool
        Blank the heatmap outside the store's tissue mask.
    block_px : int
        Stitching block side in heatmap pixels.
    combine : {"tercile", "min", "mean"}
        How the values of overlapping patches combine (:mod:`wsi_pipeline.stitch`).

    Returns
    -------
    values : (H, W) float32 ndarray
    coverage : (H, W) float32 ndarray
        As :func:`wsi_pipeline.stitch.stitch_scores` returns them.
    """
    meta = store.meta
    mask = mask_ds = None
    if mask_tissue:
        mask = np.asarray(store.tissue_mask, dtype=bool)
        mask_ds = store.mask_downsample
    return stitch_scores(
        store.coords,
        values,
        patch_l0=float(store.tiling["patch_l0"]),
        slide_wh=(meta.width, meta.height),
        downsample=float(downsample or store.thumbnail_downsample),
        tissue_mask=mask,
        mask_downsample=mask_ds,
        sigma_um=sigma_um,
        mpp=meta.mpp,
        block_px=block_px,
        combine=combine,
    )


class _Slide(NamedTuple):
    """One slide's checked inputs: the open store, its scores and the export's parameters."""

    store: SlideStore
    scores: np.ndarray  # (N,) float32
    prediction: dict[str, Any]  # attrs of scores/<run>
    params: dict[str, Any]  # recorded in the summary; compared to skip a finished export


def _load(
    store: SlideStore,
    *,
    run_id: str,
    which: str,
    class_name: str | None,
    mode: str | None,
    threshold: float | None,
    downsample: float | None,
    options: dict[str, Any],
    model_id: str | None = None,
) -> _Slide:
    """Check one export against an open store and read its scores."""
    mode, thr = check_options(which, mode, threshold, class_name)
    if store.n_patches == 0:
        raise StoreError("no patches in the store (no tissue); nothing to draw", path=store.path)
    scores, pred = read_scores(store, run_id, which, class_name)
    check_scores_model(store, run_id, pred, model_id)
    ds = float(downsample or store.thumbnail_downsample)
    if not ds > 0:
        raise ConfigError(f"downsample must be > 0, not {downsample!r}")
    params = {
        "run": run_id,
        "which": which,
        "class": class_name,
        "mode": mode,
        "threshold": thr,
        "downsample": ds,
        **options,
        "n_patches": store.n_patches,
        "scores_sha1": hashlib.sha1(np.ascontiguousarray(scores).tobytes()).hexdigest(),
    }
    return _Slide(store, scores, pred, params)


def which_name(which: str, class_name: str | None = None) -> str:
    """What a heatmap shows, as its files name it: ``score``, ``attention``, or
    ``score-<class>`` (the class name sanitised to ``[A-Za-z0-9._-]``)."""
    return which if class_name is None else f"{which}-{sanitize_id(class_name)}"


def _file_names(
    slide_id: str, which: str, class_name: str | None = None, *, values_tiff: bool = True
) -> dict[str, str]:
    """File kind -> name of one slide's exports (``<slide_id>_<which_name>_<suffix>``)."""
    base = f"{sanitize_id(slide_id)}_{which_name(which, class_name)}"
    return {k: f"{base}_{v}" for k, v in _FILES.items() if values_tiff or k != "values_tiff"}


def _finished(slide: _Slide, folder: Path) -> dict[str, str] | None:
    """The files of a finished export with the same parameters and scores, else None."""
    p = slide.params
    summary = folder / _file_names(slide.store.slide_id, p["which"], p["class"])["summary"]
    try:
        old = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    files = {k: folder / v for k, v in old.get("files", {}).items()}
    if old.get("params") != slide.params or not all(p.is_file() for p in files.values()):
        return None
    return {k: str(v) for k, v in {**files, "summary": summary}.items()}


# --------------------------------------------------------------------------------------------
# one slide
# --------------------------------------------------------------------------------------------
def export_heatmaps(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    run_id: str,
    which: str = "score",
    class_name: str | None = None,
    mode: str | None = None,
    threshold: float | None = None,
    downsample: float | None = None,
    sigma_um: float = 0.0,
    combine: str = COMBINE[0],
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    transparent_below: float | None = None,
    compression: str = "deflate",
    values_tiff: bool = True,
    png_max_px: int = _PNG_MAX_PX,
    block_px: int = _BLOCK_PX,
    mask_tissue: bool = True,
    model_id: str | None = None,
) -> dict[str, Path]:
    """Stitch one store's scores and write the PNG, pyramidal TIFFs, GeoJSONs and summary.

    Parameters
    ----------
    store_path : path
        A complete store with ``scores/<run_id>``.
    out_dir : path
        Folder for this slide's files (created); names are ``<slide_id>_<which>_*``, with
        ``<which>`` = ``score-<class>`` for a class (:func:`which_name`).
    run_id : str
        The predict run whose scores are drawn.
    which : {"score", "attention"}
        ``scores/<run_id>`` (per-patch abnormality probability) or ``scores/<run_id>-attention``.
    class_name : str, optional
        Draw this class's per-patch probability (its column of ``scores/<run_id>-classes``)
        instead of the abnormality probability; one of the run's classes.
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
    combine : {"tercile", "min", "mean"}
        Where patches overlap: a pixel takes the lower tercile of the scores of the patches over
        it (``"tercile"``: with 4 patches the second lowest; regions at the lesion), the lowest
        (``"min"``) or their area-weighted mean (``"mean"``, smoother and wider by up to a
        patch); :mod:`wsi_pipeline.stitch`.
    cmap : str
        Matplotlib colormap: ``"viridis"`` (perceptually uniform, colour-blind safe) unless asked
        otherwise (e.g. ``"jet"``).
    alpha : float
        Opacity at the top of the colour scale.
    transparent_below : float, optional
        In the mode's units: values at or below it leave the slide untinted, above it the opacity
        rises linearly to ``alpha``. Default 0.2 (probability) or 50 (percentile).
    compression : {"deflate", "jpeg"}
        Of the overlay TIFF: RGBA (deflate), or opaque RGB over white (JPEG has no alpha).
    values_tiff : bool
        Also write the float32 values as a pyramidal TIFF.
    png_max_px : int
        Longest side of the PNG's image (the heatmap is averaged down to fit).
    block_px : int
        Stitching block side in heatmap pixels.
    mask_tissue : bool
        Blank the heatmap outside the store's tissue mask.
    model_id : str, optional
        The run's current model (:func:`wsi_pipeline.runs.model_id` of its folder): scores that
        ``predict`` recorded as made by another model (the run folder was trained again since)
        are refused, so an earlier model's scores are never drawn as this one's.

    Returns
    -------
    dict of str to Path
        ``png``, ``tiff``, ``values_tiff`` (when written), ``geojson``, ``tiles_geojson``,
        ``summary``.

    Raises
    ------
    StoreError
        An unfinished store, no ``scores/<run_id>`` (run predict first), no per-class
        probabilities for ``class_name`` (predicted before they were written: rerun predict),
        scores of another model than ``model_id``, no patches.
    ConfigError
        A bad mode, threshold, downsample, colormap, opacity or compression, or a class that is
        not one of the run's.
    """
    lut, options = _options(
        which,
        mode,
        threshold,
        class_name,
        sigma_um=sigma_um,
        cmap=cmap,
        alpha=alpha,
        transparent_below=transparent_below,
        compression=compression,
        values_tiff=values_tiff,
        mask_tissue=mask_tissue,
        combine=combine,
    )
    slide = _load(
        SlideStore(store_path),
        run_id=run_id,
        which=which,
        class_name=class_name,
        mode=mode,
        threshold=threshold,
        downsample=downsample,
        options=options,
        model_id=model_id,
    )
    return _export(slide, Path(out_dir), lut=lut, png_max_px=png_max_px, block_px=block_px)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - t0


def _export(
    slide: _Slide, out: Path, *, lut: np.ndarray, png_max_px: int, block_px: int
) -> dict[str, Path]:
    """Stitch a checked slide and write its files, the summary last."""
    p, store = slide.params, slide.store
    seconds: dict[str, float] = {}
    shown = display_values(slide.scores, mode=p["mode"])
    with _timed(seconds, "stitch"):
        values = stitch_store(  # the coverage is not kept: it is as large as the values
            store,
            shown,
            downsample=p["downsample"],
            sigma_um=p["sigma_um"],
            mask_tissue=p["mask_tissue"],
            block_px=block_px,
            combine=p["combine"],
        )[0]
    out.mkdir(parents=True, exist_ok=True)
    names = _file_names(store.slide_id, p["which"], p["class"], values_tiff=p["values_tiff"])
    paths = {k: out / v for k, v in names.items()}
    paths["summary"].unlink(missing_ok=True)  # an export stopped half-way is never "finished"
    with _timed(seconds, "tiff"):
        _write_tiffs(slide, values, paths, lut=lut)
    with _timed(seconds, "png"):
        _write_png(slide, values, store.thumbnail, paths["png"], lut=lut, max_px=png_max_px)
    with _timed(seconds, "geojson"):
        regions = threshold_regions(
            values,
            threshold=p["threshold"],
            downsample=p["downsample"],
            mpp=store.meta.mpp,
            name=_region_class(p),
        )
        atomic_write_json(paths["geojson"], regions, indent=None)
    with _timed(seconds, "tiles_geojson"):
        _write_tiles(slide, shown, paths["tiles_geojson"])
    summary = slide_summary(
        store,
        values,
        shown,
        scores=slide.scores,
        prediction=slide.prediction,
        params=p,
        legend=_legend(p),
        n_regions=len(regions["features"]),
        names=names,
    )
    summary["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
    summary["wsi_pipeline_version"] = __version__
    atomic_write_json(paths["summary"], summary, indent=1)
    return paths


def _region_class(params: dict[str, Any]) -> str:
    """The QuPath classification of what is at or above the threshold."""
    return params["class"] or _CLASS[params["which"]]


def _what(params: dict[str, Any]) -> str:
    """What the values are, in words (the colour bar's label)."""
    name = params["class"]
    return _WHAT[params["which"]] if name is None else f"probability of class {name!r}"


def _legend(params: dict[str, Any]) -> str:
    name = params["class"]
    if name is None:
        text = _LEGEND[params["mode"]].format(what=_WHAT[params["which"]])
    else:
        text = _CLASS_LEGEND[params["mode"]].format(name=name)
    return text + (
        f"; transparent at or below {params['transparent_below']:g}, opacity rising to "
        f"{params['alpha']:g} at the top"
    )


def _write_tiffs(
    slide: _Slide, values: np.ndarray, paths: dict[str, Path], *, lut: np.ndarray
) -> None:
    """The overlay TIFF (the slide's size) and, when asked for, the values TIFF (the grid's)."""
    p, store = slide.params, slide.store
    meta = store.meta
    hmpp = heatmap_mpp(meta.mpp, p["downsample"])
    what = f"{_what(p)}, {p['mode']} mode, run {p['run']}"
    write_overlay_tiff(
        paths["tiff"],
        values,
        lut=lut,
        value_range=MODES[p["mode"]],
        slide_wh=(meta.width, meta.height),
        downsample=p["downsample"],
        mpp=meta.mpp,
        compression=p["compression"],
        description=(
            f"wsi-pipeline {__version__} heatmap overlay of {store.slide_id}: {what}; "
            f"{'RGBA' if p['compression'] == 'deflate' else 'RGB over white'}, level 0 is the "
            f"slide's level 0 ({meta.width} x {meta.height} px, "
            f"{'unknown' if meta.mpp is None else f'{meta.mpp:g}'} um per pixel)"
        ),
    )
    if "values_tiff" in paths:
        write_pyramid_tiff(
            paths["values_tiff"],
            lambda r0, r1: values[r0:r1],
            values.shape,
            dtype=np.float32,
            mpp=hmpp,
            description=(
                f"wsi-pipeline {__version__} heatmap values ({p['mode']}) of {store.slide_id}: "
                f"{what}; one pixel per {p['downsample']:g} level-0 px "
                f"({'unknown' if hmpp is None else f'{hmpp:g}'} um per pixel)"
            ),
        )


def _write_png(
    slide: _Slide,
    values: np.ndarray,
    thumb: np.ndarray,
    path: Path,
    *,
    lut: np.ndarray,
    max_px: int,
) -> None:
    """The PNG overlay, titled with the slide's prediction."""
    p, pred = slide.params, slide.prediction
    name = p["class"]
    if name is None:
        shown, p_slide = "P abnormal", pred.get("abnormal_probability")
    else:
        shown, p_slide = f"P({name})", (pred.get("probabilities") or {}).get(name)
    p_txt = "?" if p_slide is None else f"{float(p_slide):.3f}"
    drawn = p["which"] if name is None else f"class {name!r} probability"
    title = (
        f"{slide.store.slide_id}: predicted {pred.get('predicted', '?')} ({shown} {p_txt}), "
        f"run {p['run']}\n{drawn} heatmap, {p['mode']} mode, threshold {p['threshold']:g}"
    )
    render_png(
        path,
        values,
        thumb,
        value_range=MODES[p["mode"]],
        threshold=p["threshold"],
        lut=lut,
        title=title,
        legend=_legend(p) + "; white outline: at or above the threshold",
        bar_label=f"{_what(p)} ({p['mode']})",
        max_px=max_px,
    )


def _write_tiles(slide: _Slide, shown: np.ndarray, path: Path) -> None:
    """One QuPath detection per patch, with the heatmap's and the stored value."""
    p, store = slide.params, slide.store
    with np.errstate(invalid="ignore"):
        above = shown >= p["threshold"]
    write_tiles_geojson(
        path,
        store.coords,
        patch_l0=float(store.tiling["patch_l0"]),
        measurements={
            "score": shown,
            _RAW[p["which"]]: slide.scores,
            "tissue_fraction": store.tissue_fraction,
        },
        classified=above,
        name=_region_class(p),
    )


# --------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------
def heatmaps(
    store_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    run_id: str,
    which: str = "score",
    class_name: str | None = None,
    mode: str | None = None,
    threshold: float | None = None,
    downsample: float | None = None,
    sigma_um: float = 0.0,
    combine: str = COMBINE[0],
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    transparent_below: float | None = None,
    compression: str = "deflate",
    values_tiff: bool = True,
    slide_ids: Sequence[str] | None = None,
    overwrite: bool = False,
    model_id: str | None = None,
) -> list[dict[str, Any]]:
    """Export heatmaps of every store in ``store_dir`` (a folder of stores, or one store:
    :func:`~wsi_pipeline.store.find_stores`) into ``out_dir/<slide_id>/``.

    Options are those of :func:`export_heatmaps` (``model_id``: a store whose scores another
    model of the run wrote fails with one line). A slide whose summary records the same
    parameters and the same scores (a hash), with all its files present, is skipped unless
    ``overwrite``. With ``class_name``, a store predicted before the per-class probabilities
    were written fails with one line (rerun predict) and the batch goes on.

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
    ConfigError
        ``store_dir`` is neither a store nor a folder holding any (one line), bad options
        (checked before any slide), or a ``class_name`` that is not one of the
        run's classes (raised at the first store that names them, before any file is written).
    """
    lut, options = _options(
        which,
        mode,
        threshold,
        class_name,
        sigma_um=sigma_um,
        cmap=cmap,
        alpha=alpha,
        transparent_below=transparent_below,
        compression=compression,
        values_tiff=values_tiff,
        mask_tissue=True,
        combine=combine,
    )
    stores = find_stores(store_dir, slide_ids=slide_ids)
    output_dir(out_dir)  # one line (bad usage) before any slide, not one failure per slide
    load = {
        "run_id": run_id,
        "which": which,
        "class_name": class_name,
        "mode": mode,
        "threshold": threshold,
        "downsample": downsample,
        "options": options,
        "model_id": model_id,
    }
    results = []
    for sp in stores:  # out_dir/<the store's name: the sanitised slide id>
        folder = Path(out_dir) / sp.stem
        try:
            results.append(_batch_row(sp, folder, load=load, lut=lut, overwrite=overwrite))
        except OSError as exc:  # a full disk (_batch_row records every other error)
            where = exc.filename or folder
            raise StoreError(disk_full_message(where, len(results), len(stores))) from exc
    results.sort(key=lambda r: r["slide_id"])
    return results


def _batch_row(
    store_path: Path, folder: Path, *, load: dict[str, Any], lut: np.ndarray, overwrite: bool
) -> dict[str, Any]:
    """Export one store of a batch; its result row (errors recorded, not raised)."""
    t0 = time.time()
    row: dict[str, Any] = {
        "slide_id": store_path.stem,
        "store": str(store_path),
        "status": "failed",
        "ok": False,
        "error": "",
        "reason": "",
        "files": {},
    }
    try:
        row.update(_export_or_skip(store_path, folder, load=load, lut=lut, overwrite=overwrite))
    except _UnknownClass:
        raise  # bad usage, the same for every slide of the run
    except OSError as exc:
        if is_disk_full(exc):
            raise  # the batch stops (heatmaps)
        msg = f"{store_path}: {exc}"
        log.error("%s", " ".join(msg.split()))
        row["error"] = " ".join(msg.split())
    except (WSIPipelineError, RuntimeError, ValueError) as exc:  # zarr codec errors
        msg = str(exc) if isinstance(exc, WSIPipelineError) else f"{store_path}: {exc}"
        if isinstance(exc, (RuntimeError, ValueError)):
            msg = f"{store_path}: cannot read its arrays ({exc}); the store is corrupt"
        log.error("%s", " ".join(msg.split()))
        row["error"] = " ".join(msg.split())
    row["seconds"] = round(time.time() - t0, 3)
    return row


def _export_or_skip(
    store_path: Path, folder: Path, *, load: dict[str, Any], lut: np.ndarray, overwrite: bool
) -> dict[str, Any]:
    """Open the store once; skip it (no patches, or already exported) or export it.

    The slide's folder is locked while its files are written, and the store while its scores
    are read (:data:`~wsi_pipeline.locks.STAGE_WAIT_S`): a second heatmap run into the same
    folder waits and then finds the export finished; a ``predict`` writing the scores is waited
    for, so a half-written array is never drawn.
    """
    store = SlideStore(store_path)
    if store.n_patches == 0:
        return {"status": "skipped", "ok": True, "reason": "no patches"}
    with locked(folder, wait_s=STAGE_WAIT_S, name=str(folder)):
        with _reading(store_path):
            slide = _load(store, **load)
        if not overwrite and (done := _finished(slide, folder)):
            return {"status": "skipped", "ok": True, "reason": "already exported", "files": done}
        paths = _export(slide, folder, lut=lut, png_max_px=_PNG_MAX_PX, block_px=_BLOCK_PX)
    return {"status": "ok", "ok": True, "files": {k: str(v) for k, v in paths.items()}}


@contextlib.contextmanager
def _reading(store_path: Path) -> Iterator[None]:
    """Hold the store's lock (:mod:`wsi_pipeline.locks`) while reading its scores, so that a
    ``predict`` writing them is waited for; a store folder where no lock file can be written
    (read-only, or full) has no writer to wait for and is read without one."""
    lock = None
    try:
        lock = acquire(store_path, wait_s=STAGE_WAIT_S, name=str(store_path))
    except OSError as exc:
        if not (is_disk_full(exc) or exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
            raise
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
