"""Small helpers every module may import: safe ids, atomic file writes, JSON, RGB resize.

It imports nothing from the package but :mod:`wsi_pipeline.errors`, so every room may use it
without an import cycle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_path",
    "default_workers",
    "input_file",
    "json_ready",
    "output_dir",
    "progress_bar",
    "resize_rgb",
    "sample_mask",
    "sanitize_id",
    "save_torch",
    "torchscript_quiet",
]


def sanitize_id(name: str) -> str:
    """Make ``name`` safe as a single path component (letters, digits, ``._-``).

    Parameters
    ----------
    name : str
        A slide or run id as given by a user, a file name or a labels file.

    Returns
    -------
    str
        Never empty, never ``.`` or ``..``, never containing a path separator.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    return safe or "slide"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    A reader never sees a half-written file: either the old file (or none) or the new one.
    On an exception the temporary file is removed and ``path`` is left as it was; an
    ``OSError`` that names no file (a failed ``write``, e.g. a full disk) or only the temporary
    one is given ``path`` as its ``filename``, so its one line says which file could not be
    written.

    Examples
    --------
    >>> with atomic_path(out / "model.pt") as tmp:  # doctest: +SKIP
    ...     np.save(tmp, array)
    """
    p = Path(path)
    remove_dead_temporaries(p)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, p)
    except OSError as exc:
        if exc.filename in (None, str(tmp)):
            exc.filename = str(p)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of ``obj`` to ``path`` through :func:`atomic_path`, byte-reproducible.

    ``torch.save`` to a file name names the archive inside after that name, here the temporary
    one (with a pid): the same weights would give other bytes on every run, and
    :func:`wsi_pipeline.runs.model_id`, a hash of ``model.pt``, another model. Saved through an
    open file, the archive is always named ``archive``.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def remove_dead_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` next to ``path`` whose process is gone.

    A process killed while writing ``path`` leaves ``.<name>.<pid>.<thread>.tmp`` behind; the
    next write of ``path`` (a rerun) removes it, so nothing of the killed run stays. Files of a
    process that still runs (or of a pid now reused) are left alone.

    Returns
    -------
    list of Path
        The files removed.
    """
    from .locks import pid_alive

    p = Path(path)
    pattern = re.compile(rf"\.{re.escape(p.name)}\.(\d+)\.\d+\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(p.parent):
            m = pattern.fullmatch(entry.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (with its parents) and check that files can be written.

    The one check every command makes before writing: an output folder under a regular file, on a
    read-only file system or without permission is bad usage (exit status 2), reported in one line.

    Raises
    ------
    ConfigError
        ``"<path>: output folder cannot be written (<reason>)"``.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        check_output_path(out)  # a file in the way: say which
        raise ConfigError(
            f"output folder cannot be written ({exc.strerror or exc})", path=out
        ) from exc
    return out


def check_output_path(path: str | os.PathLike) -> Path:
    """The part of :func:`output_dir`'s check that creates nothing (``run --check``): no regular
    file stands where the output folder or one of its parents must be.

    Raises
    ------
    ConfigError
        ``"<path>: output folder cannot be written (<file> is a file, not a folder)"``.
    """
    out = Path(path)
    blocker = _file_in_the_way(out)
    if blocker is not None:
        reason = "it is" if blocker == out else f"{blocker} is"
        raise ConfigError(
            f"output folder cannot be written ({reason} a file, not a folder)", path=out
        )
    return out


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing one of ``path`` and its parents when it is not a folder (a regular
    file where a folder must be), else None."""
    for q in (path, *path.parents):
        if q.exists():
            return None if q.is_dir() else q
    return None


def input_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` when it is a regular file that can be read: the one check of a file the user names.

    Parameters
    ----------
    path : str or os.PathLike
        The file (a labels file, a pipeline or options file, a mask file).
    what : str
        What the file is, for the message (``"labels file"``).

    Returns
    -------
    Path

    Raises
    ------
    ConfigError
        ``"<path>: <what> not found"``, ``"<path>: is a folder, not a <what>"`` or
        ``"<path>: <what> cannot be read (<reason>)"`` (bad usage, exit status 2).
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"is a folder, not a {what}", path=p)
    if not p.is_file():
        raise ConfigError(f"{what} not found", path=p)
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} cannot be read ({exc.strerror or exc})", path=p) from exc
    return p


def json_ready(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays and paths made JSON types, and NaN/inf as ``None``.

    JSON has no NaN: a missing metric is written as ``null`` (strict JSON readers reject ``NaN``).
    """
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (see :func:`json_ready`) to ``path`` atomically."""
    text = json.dumps(json_ready(obj), indent=indent, allow_nan=False)
    return atomic_write_text(path, text + "\n")


#: The filters of :func:`resize_rgb`, by the names of Pillow's ``Image.Resampling`` ("linear":
#: OpenCV's bilinear warp).
_FILTERS = {"lanczos": "LANCZOS", "area": "BOX", "bicubic": "BICUBIC", "linear": "BILINEAR"}
RESAMPLE = tuple(_FILTERS)


def resize_rgb(
    arr: np.ndarray,
    size_wh: tuple[int, int],
    *,
    resample: str = "lanczos",
    src_box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Resample an ``(H, W, 3)`` uint8 image to ``size_wh`` with one good-quality filter.

    Integer shrink factors of the whole image use exact box averaging (``PIL.Image.reduce``;
    by 2, OpenCV's area resize, which gives the same pixels);
    other factors the ``resample`` filter (Pillow's, which widen with the shrink factor, so all
    of them low-pass filter when shrinking). Equal sizes return the input; with ``"linear"``, a
    ``src_box`` on the pixel grid at the output's size returns that box of the input (a view).

    Parameters
    ----------
    arr : (H, W, 3) uint8 ndarray
    size_wh : (int, int)
        Output ``(width, height)``.
    resample : {"lanczos", "area", "bicubic", "linear"}
        Lanczos (3 lobes; ~2.6 ms for 528 -> 256 px), area averaging (no ringing; thumbnails),
        bicubic (~1.5x cheaper than Lanczos: for the small factors left after a DCT-domain
        decode has done the shrinking) or linear: OpenCV's bilinear warp, which does not
        low-pass filter (only for factors near 1, e.g. 253.3 -> 256 px; 0.05 ms a 256-px
        patch, Pillow's bicubic 0.65-0.87 ms, its bilinear 0.65; on a slower day 0.18, 1.6-1.8
        and 1.1-1.3 ms).
    src_box : (float, float, float, float), optional
        The rectangle ``(x0, y0, x1, y1)`` of ``arr``, in (fractional) pixels, that is
        resampled; default all of it.

    Returns
    -------
    (height, width, 3) uint8 ndarray
    """
    if resample not in _FILTERS:
        raise ValueError(f"resample must be one of {RESAMPLE}, not {resample!r}")
    w, h = int(size_wh[0]), int(size_wh[1])
    if resample == "linear":
        return _warp_linear(arr, (w, h), src_box or (0, 0, arr.shape[1], arr.shape[0]))
    whole = src_box is None or src_box == (0, 0, arr.shape[1], arr.shape[0])
    if whole and arr.shape[1] == w and arr.shape[0] == h:
        return arr  # before importing Pillow: every patch of the overlap path comes here
    from PIL import Image

    filt = Image.Resampling[_FILTERS[resample]]
    if not whole:
        img = Image.fromarray(np.ascontiguousarray(arr))
        return np.asarray(img.resize((w, h), filt, box=src_box))
    fx, fy = arr.shape[1] / w, arr.shape[0] / h
    if fx == fy == 2:  # OpenCV's 2x2 mean rounds like Pillow's reduce: the same pixels, 10x faster
        import cv2

        return cv2.resize(np.ascontiguousarray(arr), (w, h), interpolation=cv2.INTER_AREA)
    img = Image.fromarray(np.ascontiguousarray(arr))
    if fx == fy and fx >= 1 and float(fx).is_integer():
        out = img.reduce(int(fx))
    else:
        out = img.resize((w, h), filt)
    return np.asarray(out)


def _warp_linear(
    arr: np.ndarray, size_wh: tuple[int, int], box: tuple[float, float, float, float]
) -> np.ndarray:
    """Bilinear resample of ``box`` of ``arr`` to ``size_wh`` (OpenCV's ``warpAffine``; output
    pixel centres land where Pillow's ``resize(..., box=box)`` puts them, edges replicated)."""
    import cv2

    w, h = size_wh
    rx, ry = (box[2] - box[0]) / w, (box[3] - box[1]) / h
    x0, y0 = int(box[0]), int(box[1])
    if (
        rx == ry == 1
        and (x0, y0) == box[:2]
        and 0 <= x0 <= arr.shape[1] - w
        and 0 <= y0 <= arr.shape[0] - h
    ):
        # the box lies inside, on the pixel grid at the same size (a patch of a 0.25 um/px
        # scan decoded at 1/2 for 0.5 um/px): the warp would return its pixels (75 us a
        # 256-px patch)
        return arr[y0 : y0 + h, x0 : x0 + w]
    # OpenCV puts pixel centres on integers, Pillow on halves
    m = np.array([[rx, 0, box[0] + 0.5 * rx - 0.5], [0, ry, box[1] + 0.5 * ry - 0.5]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    # rows of a larger image (a view into a band of tiles) are warped where they lie by an
    # OpenCV pinned to one thread (tiling threads): a copy would hand the interpreter over to
    # the other threads once more a patch. OpenCV's own threads warp a copy faster (31 + 3
    # against 44 us a 256-px patch, 2 threads).
    src = arr if rows_whole(arr) and cv2.getNumThreads() == 1 else np.ascontiguousarray(arr)
    return cv2.warpAffine(src, m, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)


def rows_whole(arr: np.ndarray) -> bool:
    """Whether ``arr``'s rows are whole rows of packed pixels, one stride apart: a view of a
    box of a larger image, which OpenCV and libjpeg-turbo take as it is (the row stride as
    the pitch), with no copy made contiguous first."""
    return arr.strides[-1] == arr.itemsize and (
        arr.ndim == 2 or arr.strides[1] == arr.shape[2] * arr.itemsize
    )


def sample_mask(
    mask: np.ndarray, mask_ds: float, ds: float, rows: tuple[int, int], cols: tuple[int, int]
) -> np.ndarray:
    """Nearest-neighbour sample of a mask (at ``mask_ds``) at the centres of heatmap pixels.

    Parameters
    ----------
    mask : (h, w) ndarray
        A mask whose pixels are ``mask_ds`` level-0 px wide.
    mask_ds, ds : float
        Level-0 px per mask pixel and per output pixel.
    rows, cols : (int, int)
        Half-open ranges of output rows and columns to sample.

    Returns
    -------
    (rows[1] - rows[0], cols[1] - cols[0]) ndarray of ``mask.dtype``
    """
    mh, mw = mask.shape
    r = np.clip(((np.arange(*rows) + 0.5) * ds / mask_ds).astype(np.int64), 0, mh - 1)
    c = np.clip(((np.arange(*cols) + 0.5) * ds / mask_ds).astype(np.int64), 0, mw - 1)
    return mask[r[:, None], c[None, :]]


#: TorchScript's own deprecation warnings (torch 2.x: ``torch.jit.load``, ``save``, ``trace``
#: and ``trace_method``), the only warnings :func:`torchscript_quiet` hides.
_TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"
_WARNINGS_LOCK = threading.RLock()  # a block inside another of the same thread is fine


@contextlib.contextmanager
def torchscript_quiet() -> Iterator[None]:
    """Within it, TorchScript's deprecation warnings are not shown (its files are what QuPath
    and WSInfer load), every other warning is.

    ``warnings.catch_warnings`` saves and restores the process's filter list; two such blocks
    in two threads that overlap restore each other's lists and can leave the process with a
    filter it never asked for. The blocks of this package take a lock, so they never overlap
    one another, and the filter they add is this one message, not ``"ignore"`` for all.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHSCRIPT_DEPRECATED, category=FutureWarning)
        yield


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """Within it, processes are spawned without the caller's ``__main__`` module: they run only
    this package's functions, so a user's script that tiles slides or writes a synthetic cohort
    with worker processes, without an ``if __name__ == "__main__":`` guard, is not run again in
    each (which would fail, starting processes while bootstrapping). ``multiprocessing`` reads
    ``__spec__`` and ``__file__`` as a process starts."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    try:
        if "__spec__" in saved:
            main.__spec__ = None
        if "__file__" in saved:
            del main.__file__
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def default_workers() -> int:
    """The cores this process may run on (the default of ``--workers``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def progress_bar(*args: Any, progress: bool = True, **kwargs: Any) -> Any:
    """A tqdm progress bar: ``tqdm.auto``'s in a Jupyter kernel (a widget), ``tqdm.std``'s
    elsewhere -- the one ``tqdm.auto`` picks there, without its import of asyncio (~25 ms of
    every CLI process). With ``progress`` it shows where tqdm can draw it (not when output is
    not a terminal); without, never. The other arguments are tqdm's."""
    if "ipykernel.zmqshell" in sys.modules or "IPython.utils._process_emscripten" in sys.modules:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(*args, disable=None if progress else True, **kwargs)
