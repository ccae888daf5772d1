"""Synthetic pyramidal H&E slides and cohorts with planted lesions and ground truth.

A slide is a procedural model evaluated at level-0 pixel centres (pixel ``j`` spans ``[j, j+1)``):
smooth tissue islands (thresholded multi-octave B-spline value noise), optional lumina (holes),
lymphocyte-rich regions, oriented fibrous stroma with small dark nuclei, and ``n_lesions`` compact
tumour-like regions (crowded, large, pleomorphic, vesicular nuclei with nucleoli, less stroma) whose
mean colour is close to normal tissue: they differ mostly in texture. With
``lesion_style="morphology"`` a lesion keeps the stroma and its stain and differs only in its nuclei
(small, round, about five times as crowded), with its stain per area matched to stroma. Colours come from a
Beer-Lambert stain model, ``I = I0 * exp(-(OD_H * h_rgb + OD_E * e_rgb))`` with the Macenko
reference H&E vectors, on white glass with a faint illumination gradient.

Every random quantity is a hash of ``(seed, field, integer coordinates)`` (splitmix64), so any tile
renders alone and in any order, and a nucleus near a tile border is drawn identically in both
tiles (no seams). Per-pixel noise is seeded by ``(seed, tile index)``.

File format (openslide and tiffslide both read vendor ``aperio`` and identical pixels)
-----------------------------------------------------------------------------------------
* little-endian classic TIFF; BigTIFF only when the file could exceed ~3 GiB (estimated from the
  size, tissue fraction and JPEG quality);
* page 0, level 0: tiled ``tile_px`` x ``tile_px``, JPEG, photometric YCbCr with 2x2 chroma
  subsampling (tifffile's JPEG RGB default, like scanners). Each tile is a complete JFIF stream
  (no shared JPEGTables), so a tiler can copy its bytes as a patch;
* page 1: stripped JPEG thumbnail, long side 1024 px (or the slide's size if smaller);
* pages 2...: tiled JPEG levels at downsamples 4, 16, 64 ... (size ``W // 4**k``) while the long
  side is at least 512 px;
* Aperio ImageDescription on every page, ``AppMag``, ``MPP`` and ``Filename`` on page 0.

Lower levels are 4 x 4 box means of the rendered level-0 pixels, streamed: each level holds one
tile row of pixels and spools its encoded tiles to a temporary file beside the output, except the
first level of at most 64 MiB, which is kept whole; smaller levels and the thumbnail come from it.
Bare-glass level-0 tiles reuse a few pre-encoded tiles (illumination rounded to a grey level).
Peak memory is ~150 MB for 40,000 x 30,000 px.

Ground truth
------------
The model at the centre of each ``gt_downsample`` block: tissue = inside an island and not in a
hole; lesion = tissue inside a lesion. Pen ink does not change the masks (ink on glass is not
tissue; tissue under ink stays tissue); a fold stays tissue (and lesion where it crosses one).
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import imagecodecs
import numpy as np
import tifffile

from ._synth_model import Model, build_model, glass_key, maybe_content, render_glass, render_tile
from .errors import ConfigError
from .util import atomic_path, atomic_write_json, main_module_hidden, output_dir

__all__ = [
    "COHORT_FILE",
    "LABELS_FILE",
    "LESION_PATCH_FRACTION",
    "LESION_STYLES",
    "MASKS_DIR",
    "SLIDES_DIR",
    "SLIDE_DEFAULTS",
    "SynthSlide",
    "check_cohort_options",
    "lesion_patches",
    "load_ground_truth",
    "summarize_cohort",
    "write_cohort",
    "write_slide",
]

# The layout of a cohort folder written by :func:`write_cohort`.
COHORT_FILE = "cohort.json"  #: parameters and per-slide entries; ``complete: true`` when done
LABELS_FILE = "labels.csv"  #: ``slide_id,label``
SLIDES_DIR = "slides"  #: the slides, ``<slide_id>.svs``
MASKS_DIR = "masks"  #: ground truth, ``<slide_id>_tissue.png`` and ``<slide_id>_lesion.png``
#: The values of ``lesion_style`` (:func:`write_slide`), the default first.
LESION_STYLES = ("tumour", "morphology")

_APERIO = "Aperio Image Library v12.0.15"
_MIN_LEVEL_PX = 512  # a pyramid level is written while its long side is at least this
_THUMB_PX = 1024
_KEEP_BYTES = 64 << 20  # the first level up to this size is kept whole in RAM
_COHORT_VERSION = 1
#: The per-slide options :func:`write_cohort` passes on to every :func:`write_slide` (its
#: ``**slide_options``), with their defaults. Other :func:`write_slide` arguments are set per
#: cohort (``width``, ``mpp``, ...) or per slide (``seed``, ``n_lesions``).
SLIDE_DEFAULTS: dict[str, Any] = {
    "holes": True,
    "pen_mark": False,
    "fold": False,
    "tile_px": 256,
    "jpeg_quality": 85,
    "gt_downsample": 16,
    "objective_power": None,
    "lesion_style": "tumour",
}
_INT_ARGS = {
    "width": (16, 2**31 - 1),
    "height": (16, 2**31 - 1),
    "seed": (0, 2**63 - 1),
    "n_lesions": (0, 1000),
    "tile_px": (64, 2048),
    "jpeg_quality": (1, 100),
    "gt_downsample": (1, 4096),
    "threads": (1, 256),
}
_FLOAT_ARGS = {"mpp": (0.05, 4.0), "tissue_fraction": (0.0, 1.0), "lesion_fraction": (0.0, 1.0)}


@dataclass(frozen=True, eq=False)
class SynthSlide:
    """A synthetic slide as written, with its ground truth.

    Attributes
    ----------
    path : str
        The ``.svs`` / ``.tiff`` file.
    slide_id : str
        File name without extension (also ``Filename`` in the Aperio description).
    label : int
        1 if any lesion was planted, else 0.
    width, height : int
        Level-0 size in pixels.
    mpp : float
        Level-0 micrometres per pixel.
    gt_downsample : int
        Level-0 pixels per ground-truth mask pixel.
    tissue_mask : (ceil(height / gt_downsample), ceil(width / gt_downsample)) bool ndarray
        Ground-truth tissue.
    lesion_mask : same shape, bool ndarray
        Ground-truth lesion, a subset of ``tissue_mask``.
    tissue_fraction : float
        Tissue pixels over all mask pixels.
    lesion_fraction : float
        Lesion pixels over tissue pixels (0 without tissue).
    """

    path: str
    slide_id: str
    label: int
    width: int
    height: int
    mpp: float
    gt_downsample: int
    tissue_mask: np.ndarray
    lesion_mask: np.ndarray
    tissue_fraction: float
    lesion_fraction: float


def write_slide(
    path: str | os.PathLike,
    *,
    width: int,
    height: int,
    mpp: float = 0.25,
    seed: int = 0,
    tissue_fraction: float = 0.3,
    n_lesions: int = 0,
    lesion_fraction: float = 0.03,
    tile_px: int = 256,
    jpeg_quality: int = 85,
    holes: bool = True,
    pen_mark: bool = False,
    fold: bool = False,
    gt_downsample: int = 16,
    objective_power: float | None = None,
    lesion_style: str = "tumour",
    threads: int | None = None,
) -> SynthSlide:
    """Write one synthetic Aperio-style pyramidal H&E slide and return its ground truth.

    Parameters
    ----------
    path : str or PathLike
        ``.svs``, ``.tif`` or ``.tiff``; written to a hidden temporary file beside it, then
        renamed. Missing parent folders are created.
    width, height : int
        Level-0 size in pixels (at least 16).
    mpp : float
        Level-0 micrometres per pixel (0.05 to 4); nuclei and textures scale with it.
    seed : int
        Same arguments, byte-identical file (whatever ``threads``).
    tissue_fraction : float
        Target fraction of the slide covered by tissue; 0 gives a blank slide. The measured value
        is returned.
    n_lesions : int
        Number of lesions (0: a normal slide); needs ``tissue_fraction > 0``.
    lesion_fraction : float
        Target total lesion area over tissue area, in (0, 1]; reached within ~5 % on slides whose
        ground-truth mask resolves it.
    tile_px : int
        Tile size of every level (multiple of 16, 64 to 2048).
    jpeg_quality : int
        1 to 100.
    holes : bool
        Punch small lumina (glass) into the tissue.
    pen_mark : bool
        A thick blue or green marker stroke, partly over glass and partly over tissue.
    fold : bool
        A tissue fold (darker, more saturated band) across the thickest tissue island.
    gt_downsample : int
        Level-0 pixels per ground-truth mask pixel.
    objective_power : float or None
        ``AppMag`` to record; default 40 for mpp ~0.25, 20 for ~0.5, else ``round(10 / mpp)``.
    lesion_style : {"tumour", "morphology"}
        ``"tumour"``: crowded, large, pale, vesicular nuclei with nucleoli in dense cytoplasm
        without fibres. ``"morphology"``: the lesion keeps the surrounding stroma and its stain;
        only its nuclei differ (3.6-5 um, round, about five times as crowded, paler), with the
        haematoxylin and eosin per area matched to normal stroma: in stroma its mean RGB is
        within ~3 grey levels of the same tissue without a lesion (a tumour lesion: 4-11, in red).
        Where it overlaps a lymphoid region it replaces the dense dark lymphocytes with its own
        paler nuclei, so it is lighter there.
    threads : int or None
        Threads rendering and encoding tiles; default ``min(4, os.cpu_count())``.

    Returns
    -------
    SynthSlide
        The file, label and ground truth with its measured fractions.

    Raises
    ------
    ConfigError
        An argument out of range; the message names it and the accepted range.
    """
    a = _check_slide_args(dict(locals()))  # every parameter, validated
    model, tissue, lesion = build_model(a)
    Path(a["path"]).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(a["path"]) as tmp:
        _write_svs(os.fspath(tmp), model, a)
    return _result(a["path"], a["width"], a["height"], a["mpp"], a["gt_downsample"], tissue, lesion)


def write_cohort(
    out_dir: str | os.PathLike,
    *,
    n_slides: int = 40,
    positive_fraction: float = 0.5,
    width: int = 8192,
    height: int = 6144,
    mpp: float = 0.5,
    seed: int = 0,
    lesion_fraction: float = 0.03,
    n_lesions: tuple[int, int] = (1, 4),
    tissue_fraction: float = 0.3,
    workers: int = 1,
    **slide_options: Any,
) -> list[SynthSlide]:
    """Write a labelled cohort of synthetic slides with ground truth.

    Writes ``slides/<slide_id>.svs`` (ids ``synth_000``, ``synth_001`` ...),
    ``masks/<slide_id>_tissue.png`` and ``masks/<slide_id>_lesion.png`` (8-bit 0/255 at
    ``gt_downsample``), ``labels.csv`` (``slide_id,label``, labels 0/1) and ``cohort.json``
    (parameters, ``gt_downsample``, one entry per slide) under ``out_dir``. ``cohort.json`` is
    rewritten after each slide with ``"complete": false``, and last with ``"complete": true``.
    A rerun with the same parameters skips every slide whose entry matches and whose files are
    present (the slide with its recorded size); other parameters redo every slide.

    Parameters
    ----------
    out_dir : str or PathLike
        Cohort folder (created).
    n_slides : int
        Number of slides.
    positive_fraction : float
        Fraction of slides with lesions (rounded); positives are spread by a seeded shuffle.
    width, height, mpp, lesion_fraction, tissue_fraction :
        As in :func:`write_slide`, for every slide.
    seed : int
        Cohort seed; each slide gets its own seed derived from it.
    n_lesions : (int, int)
        Inclusive range of the number of lesions of a positive slide, drawn per slide.
    workers : int
        Processes writing slides in parallel (1: in this process).
    **slide_options :
        For every :func:`write_slide`: ``holes``, ``pen_mark``, ``fold``, ``tile_px``,
        ``jpeg_quality``, ``gt_downsample``, ``objective_power``, ``lesion_style``
        (:data:`SLIDE_DEFAULTS`). Those given are recorded in ``cohort.json``
        (``parameters.slide_options``).

    Returns
    -------
    list of SynthSlide
        In slide-id order.
    """
    params = {k: v for k, v in locals().items() if k not in ("out_dir", "workers")}
    lo_hi, n_pos, opts, checked = _cohort_checks(
        n_slides=n_slides,
        positive_fraction=positive_fraction,
        width=width,
        height=height,
        mpp=mpp,
        seed=seed,
        lesion_fraction=lesion_fraction,
        n_lesions=n_lesions,
        tissue_fraction=tissue_fraction,
        workers=workers,
        slide_options=slide_options,
    )
    params.update({k: checked[k] for k in ("width", "height", "mpp", "seed")})
    params.update({k: checked[k] for k in ("tissue_fraction", "lesion_fraction")})
    params.update(n_slides=int(n_slides), positive_fraction=float(positive_fraction))
    rng = np.random.default_rng([seed, 0x5EED])
    labels = np.zeros(n_slides, np.int64)
    labels[rng.permutation(n_slides)[:n_pos]] = 1
    counts = rng.integers(lo_hi[0], lo_hi[1] + 1, size=n_slides) * labels
    seeds = np.random.SeedSequence(seed).generate_state(n_slides, np.uint64) >> np.uint64(1)
    out = Path(out_dir)
    jobs = {}
    for i in range(n_slides):
        sid = f"synth_{i:03d}"
        jobs[sid] = dict(slide_options, width=width, height=height, mpp=mpp, seed=int(seeds[i]))
        jobs[sid].update(path=os.fspath(out / SLIDES_DIR / f"{sid}.svs"), n_lesions=int(counts[i]))
        jobs[sid].update(tissue_fraction=tissue_fraction, lesion_fraction=lesion_fraction)
    params.update(n_lesions=list(lo_hi), slide_options=dict(sorted(slide_options.items())))
    gt_ds = opts["gt_downsample"]

    output_dir(out / SLIDES_DIR)
    (out / MASKS_DIR).mkdir(exist_ok=True)
    done: dict[str, SynthSlide] = {}
    entries: dict[str, dict[str, Any]] = {}
    old = _read_cohort_json(out, missing_ok=True) or {}
    if old.get("version") == _COHORT_VERSION and old.get("parameters") == params:
        for entry in old.get("slides", []):
            sid = entry.get("id")
            if sid in jobs and _entry_is_current(out, entry, jobs[sid]):
                done[sid] = _slide_from_entry(out, entry, gt_ds)
                entries[sid] = entry

    def record(slide: SynthSlide) -> None:
        done[slide.slide_id] = slide
        entries[slide.slide_id] = _save_masks_and_entry(out, slide, jobs[slide.slide_id])
        _write_cohort_json(out, params, gt_ds, entries, complete=False)

    todo = [sid for sid in jobs if sid not in done]
    if workers == 1 or len(todo) <= 1:
        for sid in todo:
            record(write_slide(**jobs[sid]))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
            with main_module_hidden():  # they start with the first submits
                futures = [pool.submit(write_slide, **jobs[sid], threads=1) for sid in todo]
            for future in as_completed(futures):
                record(future.result())
    with open(out / LABELS_FILE, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["slide_id", "label"])
        writer.writerows([sid, done[sid].label] for sid in jobs)
    _write_cohort_json(out, params, gt_ds, entries, complete=True)
    return [done[sid] for sid in jobs]


def summarize_cohort(out_dir: str | os.PathLike) -> str:
    """Return a short multi-line summary of a cohort written by :func:`write_cohort`."""
    meta = _read_cohort_json(Path(out_dir))
    slides, p = meta["slides"], meta["parameters"]
    pos = [s for s in slides if s["label"] == 1]
    tf = [s["tissue_fraction"] for s in slides] or [0.0]
    lf = [s["lesion_fraction"] for s in pos]
    state = "" if meta.get("complete") else " [incomplete]"
    lines = [
        f"cohort {os.fspath(out_dir)}: {len(slides)} slides "
        f"({len(pos)} abnormal, {len(slides) - len(pos)} normal){state}",
        f"  {p['width']} x {p['height']} px at {p['mpp']} um/px, seed {p['seed']}, "
        f"{sum(s['file_size'] for s in slides) / 1e6:.1f} MB of slides",
        f"  tissue fraction of slide: mean {np.mean(tf):.3f} ({min(tf):.3f}-{max(tf):.3f})",
    ]
    if lf:
        lines.append(
            f"  lesion fraction of tissue (abnormal): mean {np.mean(lf):.4f} "
            f"({min(lf):.4f}-{max(lf):.4f}), target {p['lesion_fraction']}"
        )
    style = p.get("slide_options", {}).get("lesion_style", LESION_STYLES[0])
    if style != LESION_STYLES[0]:
        lines.append(f"  lesion style: {style}")
    ds = meta["gt_downsample"]
    lines.append(f"  ground truth: masks/<slide_id>_{{tissue,lesion}}.png at 1/{ds}")
    return "\n".join(lines)


def load_ground_truth(
    out_dir: str | os.PathLike, slide_id: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Read the ground truth of one cohort slide.

    Returns
    -------
    tissue, lesion : (h, w) bool ndarray
        The masks, ``h = ceil(height / downsample)``, ``w = ceil(width / downsample)``.
    downsample : int
        Level-0 pixels per mask pixel.
    """
    out = Path(out_dir)
    meta = _read_cohort_json(out)
    tissue, lesion = (_read_mask(out, slide_id, kind) for kind in ("tissue", "lesion"))
    return tissue, lesion, int(meta["gt_downsample"])


#: A patch is a lesion patch when at least this fraction of its box lies in a planted lesion.
LESION_PATCH_FRACTION = 0.5


def lesion_patches(
    out_dir: str | os.PathLike, slide_id: str, coords: np.ndarray, patch_l0: float
) -> np.ndarray:
    """Which patches of one cohort slide are lesion patches (the label a patch-level score is
    judged against): at least :data:`LESION_PATCH_FRACTION` of the patch's level-0 box lies in
    the slide's planted lesions (its ground-truth mask, :func:`load_ground_truth`).

    Parameters
    ----------
    out_dir : path
        The cohort folder (:func:`write_cohort`'s ``out_dir``).
    slide_id : str
    coords : (N, 2) int ndarray
        The patches' level-0 top-left ``(x, y)`` (a store's ``coords``).
    patch_l0 : float
        A patch's side in level-0 pixels (a store's ``tiling["patch_l0"]``).

    Returns
    -------
    (N,) bool ndarray
    """
    from .tissue import rect_fractions

    _, lesion, ds = load_ground_truth(out_dir, slide_id)
    c = np.asarray(coords)
    boxes = np.c_[c, np.full(len(c), patch_l0), np.full(len(c), patch_l0)]
    return rect_fractions(lesion, boxes, downsample=ds) >= LESION_PATCH_FRACTION


# ------------------------------------------------------------------------ arguments, cohort files


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return int(value)


def _check_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return float(value)


def check_cohort_options(**options: Any) -> None:
    """Validate :func:`write_cohort`'s keyword options without writing anything.

    The same checks ``write_cohort`` makes before its first file (used by ``run --check``).

    Raises
    ------
    ConfigError
        An unknown option or a value out of range, in one line.
    """
    import inspect

    try:
        bound = inspect.signature(write_cohort).bind("cohort", **options)
    except TypeError as exc:
        raise ConfigError(f"synth options: {exc}") from None
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("out_dir")
    _cohort_checks(**args)


def _cohort_checks(
    *,
    n_slides: int,
    positive_fraction: float,
    width: int,
    height: int,
    mpp: float,
    seed: int,
    lesion_fraction: float,
    n_lesions: tuple[int, int],
    tissue_fraction: float,
    workers: int,
    slide_options: dict[str, Any],
) -> tuple[tuple[int, ...], int, dict[str, Any], dict[str, Any]]:
    """:func:`write_cohort`'s checks: the lesion-count range, the number of positive slides,
    the slide options with their defaults, and the checked arguments of one slide."""
    _check_int("n_slides", n_slides, 1, 100_000)
    _check_float("positive_fraction", positive_fraction, 0.0, 1.0)
    _check_int("workers", workers, 1, 256)
    lo_hi = tuple(n_lesions) if isinstance(n_lesions, (tuple, list)) else ()
    if len(lo_hi) != 2 or not all(type(v) is int for v in lo_hi) or not 1 <= lo_hi[0] <= lo_hi[1]:
        raise ConfigError(
            f"n_lesions must be a (min, max) pair, 1 <= min <= max, got {n_lesions!r}"
        )
    unknown = sorted(set(slide_options) - set(SLIDE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown slide option(s) {unknown}; accepted: {list(SLIDE_DEFAULTS)}")
    n_pos = round(n_slides * positive_fraction)
    if n_pos and tissue_fraction == 0:
        raise ConfigError("positive slides need tissue, but tissue_fraction is 0")
    opts = {**SLIDE_DEFAULTS, **slide_options}
    common = dict(
        opts, width=width, height=height, mpp=mpp, seed=seed, tissue_fraction=tissue_fraction
    )
    common.update(lesion_fraction=lesion_fraction, n_lesions=lo_hi[1] if n_pos else 0, threads=1)
    checked = _check_slide_args({**common, "path": "x.svs"})  # before writing anything
    return lo_hi, n_pos, opts, checked


def _check_slide_args(kw: dict[str, Any]) -> dict[str, Any]:
    """Validate :func:`write_slide`'s arguments; return them as plain Python values."""
    a = {"path": os.fspath(kw["path"])}
    if Path(a["path"]).suffix.lower() not in (".svs", ".tif", ".tiff"):
        raise ConfigError(f"slide path must end in .svs, .tif or .tiff, got {a['path']!r}")
    if kw.get("threads") is None:
        kw = {**kw, "threads": min(4, os.cpu_count() or 1)}
    a.update({k: _check_int(k, kw[k], *lo_hi) for k, lo_hi in _INT_ARGS.items()})
    a.update({k: _check_float(k, kw[k], *lo_hi) for k, lo_hi in _FLOAT_ARGS.items()})
    a.update({k: bool(kw[k]) for k in ("holes", "pen_mark", "fold")})
    if kw["lesion_style"] not in LESION_STYLES:
        raise ConfigError(
            f"lesion_style must be one of {', '.join(LESION_STYLES)}, got {kw['lesion_style']!r}"
        )
    a["lesion_style"] = str(kw["lesion_style"])
    power = kw["objective_power"]
    a["objective_power"] = (
        None if power is None else _check_float("objective_power", power, 0.1, 1e3)
    )
    if a["tile_px"] % 16:
        raise ConfigError(f"tile_px must be a multiple of 16, got {a['tile_px']}")
    ds = a["gt_downsample"]
    if math.ceil(a["width"] / ds) * math.ceil(a["height"] / ds) > 2**27:
        raise ConfigError(
            f"gt_downsample={ds} makes a ground-truth mask over 2**27 pixels for a {a['width']} x "
            f"{a['height']} slide; use a larger gt_downsample"
        )
    if a["n_lesions"] and not a["tissue_fraction"]:
        raise ConfigError(f"n_lesions={a['n_lesions']} needs tissue, but tissue_fraction is 0")
    if a["n_lesions"] and not a["lesion_fraction"]:
        raise ConfigError(f"n_lesions={a['n_lesions']} needs lesion_fraction > 0")
    return a


def _app_mag(mpp: float, objective_power: float | None) -> float:
    if objective_power is not None:
        return objective_power
    for nominal, mag in ((0.25, 40.0), (0.5, 20.0)):
        if abs(mpp / nominal - 1) < 0.1:
            return mag
    return float(max(1, round(10 / mpp)))


def _result(
    path: str, width: int, height: int, mpp: float, ds: int, tissue: np.ndarray, lesion: np.ndarray
) -> SynthSlide:
    n_tissue = int(tissue.sum())
    return SynthSlide(
        path=path,
        slide_id=Path(path).stem,
        label=int(lesion.any()),
        width=width,
        height=height,
        mpp=mpp,
        gt_downsample=ds,
        tissue_mask=tissue,
        lesion_mask=lesion,
        tissue_fraction=float(tissue.mean()),
        lesion_fraction=float(lesion.sum() / n_tissue) if n_tissue else 0.0,
    )


@overload
def _read_cohort_json(out: Path, *, missing_ok: Literal[False] = ...) -> dict[str, Any]: ...
@overload
def _read_cohort_json(out: Path, *, missing_ok: bool) -> dict[str, Any] | None: ...
def _read_cohort_json(out: Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    path = out / COHORT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        if missing_ok:
            return None
        raise ConfigError(f"{path}: cannot read the cohort file ({exc}); run write_cohort") from exc


def _write_cohort_json(
    out: Path, params: dict, gt_ds: int, entries: dict, *, complete: bool
) -> None:
    meta = {"version": _COHORT_VERSION, "generator": "wsi_pipeline.synth", "parameters": params}
    meta.update(gt_downsample=gt_ds, slides=[entries[k] for k in sorted(entries)])
    meta["complete"] = complete
    atomic_write_json(out / COHORT_FILE, meta, indent=1)


def _mask_path(out: Path, slide_id: str, kind: str) -> Path:
    """The ground-truth mask file of a slide in a cohort; ``kind`` is "tissue" or "lesion"."""
    return out / MASKS_DIR / f"{slide_id}_{kind}.png"


def _read_mask(out: Path, slide_id: str, kind: str) -> np.ndarray:
    from PIL import Image

    png = _mask_path(out, slide_id, kind)
    if not png.is_file():
        raise ConfigError(f"{png}: no {kind} mask for slide {slide_id!r} in this cohort")
    with Image.open(png) as im:
        return np.asarray(im) > 127


def _save_masks_and_entry(out: Path, slide: SynthSlide, job: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    for kind, mask in (("tissue", slide.tissue_mask), ("lesion", slide.lesion_mask)):
        png = _mask_path(out, slide.slide_id, kind)
        Image.fromarray(mask.astype(np.uint8) * 255).save(png)
    return {
        "id": slide.slide_id,
        "label": slide.label,
        "path": f"{SLIDES_DIR}/{slide.slide_id}.svs",
        "file_size": os.path.getsize(slide.path),
        "width": slide.width,
        "height": slide.height,
        "mpp": slide.mpp,
        "seed": job["seed"],
        "n_lesions": job["n_lesions"],
        "tissue_fraction": slide.tissue_fraction,
        "lesion_fraction": slide.lesion_fraction,
    }


def _entry_is_current(out: Path, entry: dict[str, Any], job: dict[str, Any]) -> bool:
    slide = out / str(entry.get("path"))
    masks = [_mask_path(out, entry["id"], k) for k in ("tissue", "lesion")]
    same = entry.get("seed") == job["seed"] and entry.get("n_lesions") == job["n_lesions"]
    present = slide.is_file() and os.path.getsize(slide) == entry.get("file_size")
    return same and present and all(m.is_file() for m in masks)


def _slide_from_entry(out: Path, entry: dict[str, Any], gt_ds: int) -> SynthSlide:
    tissue, lesion = (_read_mask(out, entry["id"], kind) for kind in ("tissue", "lesion"))
    path = os.fspath(out / entry["path"])
    return _result(path, entry["width"], entry["height"], entry["mpp"], gt_ds, tissue, lesion)


# ----------------------------------------------------------------------------------- file writing


def _encode(tile: np.ndarray, quality: int) -> bytes:
    """One complete JFIF stream, YCbCr 4:2:0, as tifffile would encode a JPEG RGB tile."""
    return bytes(
        imagecodecs.jpeg8_encode(
            tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
        )
    )


def _box4(a: np.ndarray) -> np.ndarray:
    """4 x 4 mean of ``(H, W, 3)`` uint8 (``H``, ``W`` cropped to multiples of 4)."""
    h, w = a.shape[0] // 4 * 4, a.shape[1] // 4 * 4
    a = a[:h, :w].astype(np.uint16)
    rows = a[0::4] + a[1::4] + a[2::4] + a[3::4]
    s = rows[:, 0::4] + rows[:, 1::4] + rows[:, 2::4] + rows[:, 3::4]
    return ((s + 8) >> 4).astype(np.uint8)


def _array_tiles(a: np.ndarray, tile_px: int, quality: int) -> Iterator[bytes]:
    """Encoded tiles of an image, row by row; edge tiles padded by repeating the last pixels."""
    t = tile_px
    for y in range(0, a.shape[0], t):
        for x in range(0, a.shape[1], t):
            tile = a[y : y + t, x : x + t]
            pad = ((0, t - tile.shape[0]), (0, t - tile.shape[1]), (0, 0))
            yield _encode(np.ascontiguousarray(np.pad(tile, pad, mode="edge")), quality)


class _LevelSink:
    """The rows of one pyramid level, top to bottom: kept whole, or JPEG-tiled a tile row at a time
    into a spool file (the rows then go on, 4x smaller, to the next level's sink)."""

    def __init__(
        self, width: int, height: int, tile_px: int, quality: int, *, keep: bool, spool_dir: str
    ):
        self.width, self.height, self.tile_px, self.quality = width, height, tile_px, quality
        self.child: _LevelSink | None = None
        self.rows = self.fill = 0
        self.sizes: list[int] = []
        self.array = np.empty((height, width, 3), np.uint8) if keep else None
        self.spool = None if keep else tempfile.TemporaryFile(dir=spool_dir, prefix=".synth-")
        if not keep:
            self.buf = np.empty((tile_px, math.ceil(width / tile_px) * tile_px, 3), np.uint8)

    def add_rows(self, rows: np.ndarray) -> None:
        rows = rows[: self.height - self.rows, : self.width]
        if self.array is not None:
            self.array[self.rows : self.rows + len(rows)] = rows
            self.rows += len(rows)
            return
        while len(rows):
            n = min(len(rows), self.tile_px - self.fill)
            self.buf[self.fill : self.fill + n, : self.width] = rows[:n]
            self.fill, self.rows, rows = self.fill + n, self.rows + n, rows[n:]
            if self.fill == self.tile_px:
                self._flush()

    def finish(self) -> None:
        if self.array is None and self.fill:
            self._flush()
        if self.child is not None:
            self.child.finish()

    def _flush(self) -> None:
        n, buf, t = self.fill, self.buf, self.tile_px
        buf[:n, self.width :] = buf[:n, self.width - 1 : self.width]
        buf[n:] = buf[n - 1 : n]
        assert self.spool is not None  # only a streamed (not kept) level flushes
        for x in range(0, buf.shape[1], t):
            data = _encode(np.ascontiguousarray(buf[:, x : x + t]), self.quality)
            self.sizes.append(self.spool.write(data))
        if self.child is not None:
            self.child.add_rows(_box4(buf[: n // 4 * 4, : self.width]))
        self.fill = 0

    def tiles(self) -> Iterator[bytes]:
        if self.array is not None:
            yield from _array_tiles(self.array, self.tile_px, self.quality)
            return
        assert self.spool is not None  # a level not kept whole is spooled
        self.spool.seek(0)
        for size in self.sizes:
            yield self.spool.read(size)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, in order, with a bounded look-ahead."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _write_svs(path: str, m: Model, a: dict[str, Any]) -> None:
    w, h, t, q = m.width, m.height, a["tile_px"], a["jpeg_quality"]
    dims = [(w, h)]
    while max(w // 4 ** len(dims), h // 4 ** len(dims)) >= _MIN_LEVEL_PX:
        dims.append((w // 4 ** len(dims), h // 4 ** len(dims)))
    # Keep whole the first level >= 1 that fits in _KEEP_BYTES and is at least thumbnail-sized
    # (level 0 only for small slides): the thumbnail and smaller levels are computed from it.
    need = min(_THUMB_PX, max(w, h))
    fits = [
        k for k, (lw, lh) in enumerate(dims) if lw * lh * 3 <= _KEEP_BYTES and max(lw, lh) >= need
    ]
    keep = next((k for k in fits if k >= 1), fits[0] if fits else len(dims) - 1)
    # Level 0 goes straight to the file; levels 1 .. keep-1 are streamed; level `keep` is kept.
    spool_dir = os.path.dirname(os.path.abspath(path))
    sinks = {
        k: _LevelSink(*dims[k], t, q, keep=k == keep, spool_dir=spool_dir)
        for k in range(min(1, keep), keep + 1)
    }
    for k in range(1, keep):
        sinks[k].child = sinks[k + 1]
    ntx, nty = math.ceil(w / t), math.ceil(h / t)
    bw = t if keep == 0 else t // 4  # what a level-0 tile contributes to the first sink
    glass: dict[tuple[int, int], tuple[bytes, np.ndarray]] = {}
    lock = threading.Lock()

    def job(index: int) -> tuple[bytes, np.ndarray]:
        x0, y0 = index % ntx * t, index // ntx * t
        tile = None
        if maybe_content(m, x0, y0, t):
            tile = render_tile(m, x0, y0, t, np.random.default_rng([m.seed, 0x711E, index]))
        if tile is not None:
            return _encode(tile, q), tile if keep == 0 else _box4(tile)
        key = glass_key(m, index, x0, y0, t)  # bare glass: one of 4 pre-encoded tiles per grey
        with lock:
            if key not in glass:
                tile = render_glass(m, key, t)
                glass[key] = (_encode(tile, q), tile if keep == 0 else _box4(tile))
            return glass[key]

    def level0() -> Iterator[bytes]:
        strip = np.empty((bw, ntx * bw, 3), np.uint8)
        for index, (data, pixels) in enumerate(_ordered_map(job, range(ntx * nty), a["threads"])):
            c = index % ntx
            strip[:, c * bw : (c + 1) * bw] = pixels
            if c == ntx - 1:
                sinks[min(1, keep)].add_rows(strip)
            yield data

    props = f"|AppMag = {_app_mag(m.mpp, a['objective_power']):g}|MPP = {m.mpp!r}"
    props += f"|Filename = {Path(a['path']).stem}|ScanScope ID = SYNTH"
    head = f"{_APERIO} \r\n{w}x{h} ({t}x{t})"
    common: dict[str, Any] = dict(
        photometric="rgb", compression="jpeg", subsampling=(2, 2), metadata=None
    )
    common.update(resolution=(1e4 / m.mpp,) * 2, resolutionunit="CENTIMETER", software=False)
    per_px = 0.05 + 0.25 * a["tissue_fraction"] if q <= 90 else 0.2 + a["tissue_fraction"]
    bigtiff = w * h * per_px > 3 * 2**30  # bytes per pixel measured: 0.1-0.2 at q85, <0.9 at q100
    try:
        with tifffile.TiffWriter(path, bigtiff=bigtiff, byteorder="<") as tw:
            tiled = dict(dtype=np.uint8, tile=(t, t), **common)
            tw.write(
                level0(), shape=(h, w, 3), description=f"{head} JPEG/RGB Q={q}{props}", **tiled
            )
            if keep > 0:
                sinks[1].finish()
            kept = sinks[keep].array
            assert kept is not None  # the sink of level `keep` keeps its rows whole
            arrays: dict[int, np.ndarray] = {keep: kept}
            for k in range(keep + 1, len(dims)):
                arrays[k] = _box4(arrays[k - 1])[: dims[k][1], : dims[k][0]]
            thumb = _thumbnail(arrays[keep], w, h)
            desc = f"{_APERIO} \n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - {props}"
            rps = math.ceil(thumb.shape[0] / 16) * 16  # one strip
            tw.write(
                thumb, rowsperstrip=rps, compressionargs={"level": 90}, description=desc, **common
            )
            for k, (lw, lh) in enumerate(dims[1:], start=1):
                tiles = sinks[k].tiles() if k < keep else _array_tiles(arrays[k], t, q)
                desc = f"{head} -> {lw}x{lh} JPEG/RGB Q={q}{props}"
                tw.write(tiles, shape=(lh, lw, 3), description=desc, **tiled)
    finally:
        for sink in sinks.values():
            sink.close()


def _thumbnail(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-resampled thumbnail with long side ``_THUMB_PX`` (or the slide's size if smaller)."""
    from PIL import Image

    scale = max(1.0, max(width, height) / _THUMB_PX)
    size = (max(1, round(width / scale)), max(1, round(height / scale)))
    if (a.shape[1], a.shape[0]) == size:
        return np.ascontiguousarray(a)
    return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BOX))
