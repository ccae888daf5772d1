"""Synthetic pyramidal H&E slides and cohorts with planted lesions and ground truth.

A slide is a procedural model evaluated at level-0 pixel centres (pixel ``j`` spans ``[j, j+1)``):
smooth tissue islands (thresholded multi-octave B-spline value noise), optional lumina (holes),
lymphocyte-rich regions, oriented fibrous stroma with small dark nuclei, and ``n_lesions`` compact
tumour-like regions (crowded, large, pleomorphic, vesicular nuclei with nucleoli, less stroma) whose
mean colour is close to normal tissue: they differ mostly in texture. Colours come from a
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
import dataclasses
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
from itertools import pairwise
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

from .errors import ConfigError

__all__ = ["SynthSlide", "load_ground_truth", "summarize_cohort", "write_cohort", "write_slide"]

# Stain optical densities per unit stain (Macenko reference), glass, pen inks (blue, green).
_H_OD = np.array([0.5626, 0.7201, 0.4062], np.float32)
_E_OD = np.array([0.2159, 0.8012, 0.5581], np.float32)
_GLASS_OD = np.array([0.010, 0.012, 0.004], np.float32)
_PEN_OD = ((1.35, 0.80, 0.10), (1.10, 0.22, 0.95))
_APERIO = "Aperio Image Library v12.0.15"
_MIN_LEVEL_PX = 512  # a pyramid level is written while its long side is at least this
_THUMB_PX = 1024
_KEEP_BYTES = 64 << 20  # the first level up to this size is kept whole in RAM
_EDGE_AMP = 5.0  # tissue-field penalty at the slide edge (keeps islands off the edges)
_NOISE_GAIN = 3.6  # cubic B-spline value noise of U(-1, 1) lattice values -> std ~1
_CELL_UM = 42.0  # nucleus candidate cell
_COHORT_VERSION = 1
_SLIDE_DEFAULTS = {
    "holes": True,
    "pen_mark": False,
    "fold": False,
    "tile_px": 256,
    "jpeg_quality": 85,
    "gt_downsample": 16,
    "objective_power": None,
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

# Noise field identifiers (part of every hash key).
_F_TISSUE, _F_HOLE, _F_LYMPH, _F_GRAIN, _F_BUNDLE, _F_FIBRE, _F_CHROM = 10, 20, 21, 22, 23, 24, 25
_F_PEN, _F_FOLD, _F_SLOT_FINE, _F_SLOT_COARSE, _F_LESION, _F_BG = 26, 27, 30, 31, 100, 0xB6

# Nucleus kinds, one row each: diameter um (lo, span), aspect (lo, span), 2-lobe irregularity
# (lo, span), 3-lobe span, body OD (lo, span), chromatin contrast, rim OD (lo, span).
_STROMA, _LYMPH, _TUMOUR = 0, 1, 2
_KINDS = np.array(
    [
        [5.0, 3.0, 1.1, 0.9, 0.00, 0.05, 0.03, 1.00, 0.35, 0.15, 0.10, 0.05],
        [5.0, 2.0, 1.0, 0.15, 0.00, 0.03, 0.02, 1.45, 0.35, 0.10, 0.10, 0.05],
        [10.0, 6.0, 1.0, 0.6, 0.06, 0.12, 0.10, 0.13, 0.07, 0.90, 0.45, 0.20],
    ]
)
# Columns of a nucleus (or nucleolus) row: centre, semi-axes, angle, lobes, phases, stains.
_X, _Y, _A, _B, _ANG, _A2, _A3, _PH2, _PH3, _BODY, _CHROM, _RIM, _EOS, _COV = range(14)


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
    threads: int | None = None,
) -> SynthSlide:
    """Write one synthetic Aperio-style pyramidal H&E slide and return its ground truth.

    Parameters
    ----------
    path : str or PathLike
        ``.svs``, ``.tif`` or ``.tiff``; written as ``<path>.partial``, then renamed. Missing
        parent folders are created.
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
    model, tissue, lesion = _build_model(a)
    Path(a["path"]).parent.mkdir(parents=True, exist_ok=True)
    partial = a["path"] + ".partial"
    try:
        _write_svs(partial, model, a)
        os.replace(partial, a["path"])
    finally:
        if os.path.exists(partial):
            os.remove(partial)
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
        ``jpeg_quality``, ``gt_downsample``, ``objective_power``.

    Returns
    -------
    list of SynthSlide
        In slide-id order.
    """
    params = {k: v for k, v in locals().items() if k not in ("out_dir", "workers")}
    _check_int("n_slides", n_slides, 1, 100_000)
    _check_float("positive_fraction", positive_fraction, 0.0, 1.0)
    _check_int("workers", workers, 1, 256)
    lo_hi = tuple(n_lesions) if isinstance(n_lesions, (tuple, list)) else ()
    if len(lo_hi) != 2 or not all(type(v) is int for v in lo_hi) or not 1 <= lo_hi[0] <= lo_hi[1]:
        raise ConfigError(
            f"n_lesions must be a (min, max) pair, 1 <= min <= max, got {n_lesions!r}"
        )
    unknown = sorted(set(slide_options) - set(_SLIDE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown slide option(s) {unknown}; accepted: {list(_SLIDE_DEFAULTS)}")
    n_pos = round(n_slides * positive_fraction)
    if n_pos and tissue_fraction == 0:
        raise ConfigError("positive slides need tissue, but tissue_fraction is 0")
    opts = {**_SLIDE_DEFAULTS, **slide_options}
    common = dict(
        opts, width=width, height=height, mpp=mpp, seed=seed, tissue_fraction=tissue_fraction
    )
    common.update(lesion_fraction=lesion_fraction, n_lesions=lo_hi[1] if n_pos else 0, threads=1)
    checked = _check_slide_args({**common, "path": "x.svs"})  # before writing anything
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
        jobs[sid].update(path=os.fspath(out / "slides" / f"{sid}.svs"), n_lesions=int(counts[i]))
        jobs[sid].update(tissue_fraction=tissue_fraction, lesion_fraction=lesion_fraction)
    params.update(n_lesions=list(lo_hi), slide_options=dict(sorted(slide_options.items())))
    gt_ds = opts["gt_downsample"]

    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
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
            futures = [pool.submit(write_slide, **jobs[sid], threads=1) for sid in todo]
            for future in as_completed(futures):
                record(future.result())
    with open(out / "labels.csv", "w", newline="") as fh:
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


def _read_cohort_json(out: Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    path = out / "cohort.json"
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
    (out / "cohort.json.partial").write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(out / "cohort.json.partial", out / "cohort.json")


def _read_mask(out: Path, slide_id: str, kind: str) -> np.ndarray:
    from PIL import Image

    png = out / "masks" / f"{slide_id}_{kind}.png"
    if not png.is_file():
        raise ConfigError(f"{png}: no {kind} mask for slide {slide_id!r} in this cohort")
    with Image.open(png) as im:
        return np.asarray(im) > 127


def _save_masks_and_entry(out: Path, slide: SynthSlide, job: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    for kind, mask in (("tissue", slide.tissue_mask), ("lesion", slide.lesion_mask)):
        png = out / "masks" / f"{slide.slide_id}_{kind}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(png)
    return {
        "id": slide.slide_id,
        "label": slide.label,
        "path": f"slides/{slide.slide_id}.svs",
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
    masks = [out / "masks" / f"{entry['id']}_{k}.png" for k in ("tissue", "lesion")]
    same = entry.get("seed") == job["seed"] and entry.get("n_lesions") == job["n_lesions"]
    present = slide.is_file() and os.path.getsize(slide) == entry.get("file_size")
    return same and present and all(m.is_file() for m in masks)


def _slide_from_entry(out: Path, entry: dict[str, Any], gt_ds: int) -> SynthSlide:
    tissue, lesion = (_read_mask(out, entry["id"], kind) for kind in ("tissue", "lesion"))
    path = os.fspath(out / entry["path"])
    return _result(path, entry["width"], entry["height"], entry["mpp"], gt_ds, tissue, lesion)


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
    along_x = sum(lattice[:, cx + j] * wx[j].astype(np.float32) for j in range(4))  # (n_ky, nx)
    return sum(
        along_x[cy + j] * (_NOISE_GAIN * wy[j][:, None]).astype(np.float32) for j in range(4)
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
class _Model:
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
    fold: tuple | None = None  # (cx, cy, ux, uy, half length, half width)

    @property
    def um(self) -> float:
        """Pixels per micrometre."""
        return 1 / self.mpp


def _build_model(a: dict[str, Any]) -> tuple[_Model, np.ndarray, np.ndarray]:
    """Fix the slide's random layout; return it with the ground-truth tissue and lesion masks."""
    width, height, mpp, seed, ds = a["width"], a["height"], a["mpp"], a["seed"], a["gt_downsample"]
    rng = np.random.default_rng([seed, 0x51DE])
    short = min(width, height)
    octaves = ((1.0, short / 2.2), (0.45, short / 7.7), (0.18, short / 26.4), (0.06, 100 / mpp))
    lip = sum(amp * _NOISE_GAIN * 1.5 * math.sqrt(2) / c for amp, c in octaves)
    theta, k = rng.uniform(0, math.pi), 2 * math.pi / (9.0 / mpp)
    model = _Model(
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


def _tissue_grid(m: _Model, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    f = sum(
        amp * _noise_grid(m.seed, _F_TISSUE + i, xs, ys, c)
        for i, (amp, c) in enumerate(m.t_octaves)
    )
    d = np.minimum(np.minimum(ys, m.height - ys)[:, None], np.minimum(xs, m.width - xs)[None, :])
    return f - _EDGE_AMP * np.clip(1 - d / m.edge_px, 0, None) ** 2


def _tissue_points(m: _Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    f = np.zeros(x.shape)
    for i, (amp, c) in enumerate(m.t_octaves):
        f = f + amp * _noise_points(m.seed, _F_TISSUE + i, x, y, c)
    d = np.minimum(np.minimum(y, m.height - y), np.minimum(x, m.width - x))
    return f - _EDGE_AMP * np.clip(1 - d / m.edge_px, 0, None) ** 2


def _in_tissue(m: _Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ground-truth tissue at points (the same decision as the masks, up to rounding)."""
    tis = _tissue_points(m, x, y) > m.t_thr
    if m.holes:
        tis &= _noise_points(m.seed, _F_HOLE, x, y, 45 * m.um) <= m.hole_thr
    return tis


def _lesion_grid(m: _Model, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
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


def _lesion_points(m: _Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = np.full(x.shape, np.inf)
    for i, (cx, cy, r) in enumerate(m.lesions):
        near = (np.abs(x - cx) < 2.2 * r) & (np.abs(y - cy) < 2.2 * r)
        if near.any():
            u, v = (x[near] - cx) / r, (y[near] - cy) / r
            di = np.sqrt(u * u + v * v) + 0.3 * _noise_points(m.seed, _F_LESION + i, u, v, 0.6)
            d[near] = np.minimum(d[near], di)
    return d


def _lesion_mask(m: _Model, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Lesion membership on the ground-truth grid, evaluated only around each lesion."""
    mask = np.zeros((gy.size, gx.size), bool)
    for cx, cy, r in m.lesions:
        x0, x1 = np.searchsorted(gx, [cx - 2.2 * r, cx + 2.2 * r])
        y0, y1 = np.searchsorted(gy, [cy - 2.2 * r, cy + 2.2 * r])
        if x0 < x1 and y0 < y1:
            mask[y0:y1, x0:x1] |= _lesion_grid(m, gx[x0:x1], gy[y0:y1]) < 1
    return mask


def _place_lesions(
    m: _Model,
    tissue: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
    ds: int,
    a: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[_Model, np.ndarray]:
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
    m: _Model, tissue: np.ndarray, gx: np.ndarray, gy: np.ndarray, rng: np.random.Generator
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
    m: _Model, tissue: np.ndarray, gx: np.ndarray, gy: np.ndarray, ds: int, rng: np.random.Generator
) -> tuple:
    """A band across the thickest tissue island."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(tissue) * ds
    cy, cx = np.nonzero(dist >= 0.6 * dist.max())
    i, ang = rng.integers(cy.size), rng.uniform(0, math.pi)
    half_w = float(np.clip(0.2 * dist.max(), 30 * m.um, 300 * m.um))
    return gx[cx[i]], gy[cy[i]], math.cos(ang), math.sin(ang), 1.5 * float(dist.max()), half_w


# ------------------------------------------------------------------------------------ rendering


def _maybe_content(m: _Model, x0: int, y0: int, size: int) -> bool:
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


def _render_tile(
    m: _Model, x0: int, y0: int, size: int, rng: np.random.Generator
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
        od += pen[..., None] * m.pen[2]
    od += _GLASS_OD
    base, gx, gy = m.illum
    i0 = (base + gx * (xs / m.width - 0.5))[None, :] + (gy * (ys / m.height - 0.5))[:, None]
    rgb = i0.astype(f32)[..., None] * np.exp(-od) + 1.3 * noise[..., :3]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _stain(
    m: _Model, xs: np.ndarray, ys: np.ndarray, x0: int, y0: int, size: int
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
    if m.lesions:  # tumour: no fibres, denser cytoplasm between crowded pale nuclei
        d = _lesion_grid(m, xs, ys)
        if np.isfinite(d).any():
            les = _soft(1 - d, 6 * um / min(r for *_, r in m.lesions)).astype(f32)
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


def _pen_alpha(m: _Model, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
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


def _fold_alpha(m: _Model, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
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


def _nuclei(m: _Model, x0: int, y0: int, size: int) -> np.ndarray | None:
    """Nuclei and nucleoli whose extent may touch the tile: ``(n, 14)`` rows (columns ``_X`` ...).

    Candidates sit on jittered slots of ``_CELL_UM`` cells: 6 x 6 small slots (stroma and
    lymphocyte nuclei) and 4 x 4 large slots (tumour). Everything about a candidate is a hash of
    ``(seed, cell, slot)`` and the model at its centre, never of the tile.
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
        if n == 6:
            lymph = _noise_points(m.seed, _F_LYMPH, x, y, 120 * m.um) - m.lymph_thr
            la = _soft(lymph, 0.35)
            keep = tis & ~les & (u[:, 2] < 0.11 + 0.64 * la)
            kind = np.where(u[:, 2] < 0.64 * la, _LYMPH, _STROMA)
        else:
            keep = tis & les & (u[:, 2] < 0.65)
            kind = np.full(x.shape, _TUMOUR)
        parts.append((x[keep], y[keep], u[keep], kind[keep]))
    x, y, u, kind = (np.concatenate(p) for p in zip(*parts)) if parts else ([],) * 4
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


# --------------------------------------------------------------------------------- file writing


def _encode(tile: np.ndarray, quality: int) -> bytes:
    """One complete JFIF stream, YCbCr 4:2:0, as tifffile would encode a JPEG RGB tile."""
    return imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
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


def _write_svs(path: str, m: _Model, a: dict[str, Any]) -> None:
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
        if _maybe_content(m, x0, y0, t):
            tile = _render_tile(m, x0, y0, t, np.random.default_rng([m.seed, 0x711E, index]))
        if tile is not None:
            return _encode(tile, q), tile if keep == 0 else _box4(tile)
        base, gx, gy = m.illum  # bare glass: one of 4 pre-encoded tiles per grey level
        grey = round(base + gx * ((x0 + t / 2) / w - 0.5) + gy * ((y0 + t / 2) / h - 0.5))
        key = (grey, int(_hash(m.seed, _F_BG, index)[0] % 4))
        with lock:
            if key not in glass:
                noise = np.random.default_rng([m.seed, _F_BG, *key]).normal(0, 1.3, (t, t, 3))
                tile = np.clip(grey * np.exp(-_GLASS_OD) + noise + 0.5, 0, 255).astype(np.uint8)
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
    common = dict(photometric="rgb", compression="jpeg", subsampling=(2, 2), metadata=None)
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
            arrays = {keep: sinks[keep].array}
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
