"""Running the tiling steps of :mod:`wsi_pipeline.tiling`: one slide under its store's lock, or a
batch of slides with its ``manifest.csv``.

:func:`tile_slide` tiles one slide in this process. :func:`tile_slides` runs a batch: serially in
this process (``workers=1``), with ``workers`` threads of this process, or with dask.distributed (a
``LocalCluster`` of worker processes, or an existing cluster given by address); with threads or
dask, across slides (up to twice as many slides as workers prepared ahead) and within large
slides (one task per shard), by one driver (:func:`_drive`); a batch of many small slide files
(:func:`_slide_processes`) by worker processes instead, each tiling whole slides
(:func:`_run_slide_processes`).
It writes ``manifest.csv`` (:func:`write_manifest`) with the rows of the slides finished since
its last write, at most every :data:`MANIFEST_EVERY_S` seconds, and at the end of the batch or
when it stops (an error, an interrupt). A complete store is its slide's proof of being tiled: a
row lost to a kill is that of a store the next run finds complete (``skipped``) or redoes.

What a batch does with trouble (each reported in one line; see README "Exit status"):

- a bad slide (unreadable, truncated, undecodable, fluorescence, a header claiming far more
  pixels than the file can hold), a duplicate slide id, a dangling symbolic link named like a
  slide: that slide's own ``failed`` row in ``manifest.csv``; the batch goes on (exit 1);
- a slide whose store another tile run holds locked (:mod:`wsi_pipeline.locks`, the lock file
  ``<out>/<slide_id>.zarr.lock``): waited for :data:`LOCK_WAIT_S` seconds, then ``skipped``
  with ``"<slide>: locked by pid N (another tile run); skipped"`` (that run writes the store and
  its manifest row, so this is not a failure); a stale lock of a process that is gone is taken
  over;
- a folder named like a slide (``x.svs/``) or a hidden file named like one (``.x.svs``): one
  WARNING line each (not slides; a folder is searched inside);
- a full disk (``ENOSPC``/``EDQUOT``): the batch stops at once with
  ``TilingError("disk full writing <path>; stopped after N of M slides")``; stores and manifest
  rows already written stay, the unfinished store is resumed by the next run, and no temporary
  file is left.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import TilingError, WSIPipelineError, disk_full_message, is_disk_full
from .locks import StoreLock, StoreLocked, acquire, locked
from .slide import SLIDE_SUFFIXES, find_slides, slide_id_from_path
from .specs import TilingSpec
from .store import store_path
from .tiling import (
    MeetingRange,
    SlidePlan,
    TileResult,
    extract_shard,
    finalize_slide,
    meeting_ranges,
    prepare_slide,
    release_sources,
    shard_part,
    write_shard_parts,
)
from .util import atomic_path, main_module_hidden, output_dir, progress_bar

__all__ = [
    "LOCK_WAIT_S",
    "MANIFEST",
    "MANIFEST_FIELDS",
    "WORKER_ENV",
    "tile_slide",
    "tile_slides",
    "write_manifest",
]

log = logging.getLogger(__name__)

#: File name of the batch's per-slide status table, in the output folder beside the stores.
MANIFEST = "manifest.csv"
#: Its columns.
MANIFEST_FIELDS = ("slide_id", "path", "status", "n_patches", "seconds", "error")
#: Seconds a batch waits for a slide whose store another run holds locked before skipping it.
LOCK_WAIT_S = 2.0
#: Seconds between a batch's writes of the manifest (and at its end, or when it stops): each
#: write reads and rewrites the whole table (6 ms at 2,000 rows, a third of a small slide's
#: fixed cost), so a row per slide would grow quadratically with the cohort.
MANIFEST_EVERY_S = 1.0


# --------------------------------------------------------------------------------------------
# one slide, under its store's lock
# --------------------------------------------------------------------------------------------
def tile_slide(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    spec: TilingSpec | None = None,
    slide_id: str | None = None,
    slide_mpp: float | None = None,
    overwrite: bool = False,
    backend: str = "auto",
    on_shard: Callable[[SlidePlan, dict[str, int]], None] | None = None,
) -> TileResult:
    """Tile one slide into ``out_dir/<slide_id>.zarr`` in this thread (OpenCV too:
    :func:`one_opencv_thread`), holding the store's lock.

    ``on_shard`` is called with the slide's plan and each shard's counts (``copied``,
    ``encoded``, ``bytes``) as the shard is written (a progress bar).

    Returns
    -------
    TileResult
        ``skipped`` with ``locked=True`` and the reason in ``error`` when another run holds the
        store's lock (after waiting :data:`LOCK_WAIT_S` seconds).

    Raises
    ------
    WSIPipelineError
        For a bad slide or parameters (the batch runner records these instead).
    """
    spec = spec or TilingSpec()
    t0 = time.time()
    sid = slide_id or slide_id_from_path(path)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock_slide(out_dir, sid)
    except StoreLocked as exc:
        return _locked_result(sid, path, exc, t0)
    with lock, one_opencv_thread():
        plan = prepare_slide(
            path,
            out_dir,
            spec=spec,
            slide_id=sid,
            slide_mpp=slide_mpp,
            overwrite=overwrite,
            backend=backend,
        )
        if isinstance(plan, TileResult):
            return plan
        return _extract_all(plan, None if on_shard is None else functools.partial(on_shard, plan))


def _lock_slide(out_dir: str | os.PathLike, slide_id: str) -> StoreLock:
    """The lock of the slide's store (waits :data:`LOCK_WAIT_S`; raises StoreLocked)."""
    return acquire(store_path(out_dir, slide_id), wait_s=LOCK_WAIT_S, name=slide_id)


def _locked_result(sid: str, path: str | os.PathLike, exc: StoreLocked, t0: float) -> TileResult:
    msg = f"{sid}: locked by {exc.holder.describe()} (another tile run); skipped"
    log.warning("%s", msg)
    return TileResult(
        sid, str(Path(path).absolute()), "skipped", 0, time.time() - t0, msg, locked=True
    )


def _extract_all(
    plan: SlidePlan, on_shard: Callable[[dict[str, int]], None] | None = None
) -> TileResult:
    """Extract every unfinished shard of ``plan`` in this process, then finalise the store;
    ``on_shard`` gets each shard's counts (``copied``, ``encoded``) as it is written."""
    stats = []
    for s in plan.todo:
        stats.append(extract_shard(plan, s))
        if on_shard is not None:
            on_shard(stats[-1])
    return finalize_slide(plan, stats)


#: Environment of dask worker processes: one OpenCV/BLAS/OpenMP thread each (the workers are the
#: parallelism; nested thread pools only contend for the same cores).
WORKER_ENV = {
    "OPENCV_FOR_THREADS_NUM": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


@contextlib.contextmanager
def one_opencv_thread() -> Iterator[None]:
    """OpenCV's own thread pool pinned to one thread while this process tiles (its count given
    back after), as in a worker process (:data:`WORKER_ENV`).

    The patch warp and the mask's blur and morphology would otherwise spread each call over
    every core. With tiling threads, each warping over both cores waits for the other's share
    (a 256-px patch warp 66 us a thread, against 56 us pinned; warp and encode scale 1.66x in two
    threads, 1.95x pinned). With ``--workers 1`` it bought nothing and cost CPU: 1.0 µm/px from
    a 0.2527 µm/px scan took 0.61-0.66 s either way on 2 cores, but 1.06-1.18 s of CPU
    unpinned (0.28-0.37 s of it in the kernel, OpenCV's workers waking) against 0.50-0.66 s
    pinned; on a cluster node running one ``--workers 1`` job per core, every job's OpenCV
    would spread over all of them. The mask loses nothing (9.1 against 9.3 ms a 1,250 x 938
    thumbnail).
    """
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
def write_manifest(out_dir: str | os.PathLike, rows: Iterable[TileResult]) -> Path:
    """Merge ``rows`` into ``out_dir/manifest.csv``: atomically, under the manifest's lock (so
    two runs on one folder never lose each other's rows).

    The rows given for a slide id replace all old rows of that id (so two files with one id in a
    batch each keep their own row); rows of other slide ids are kept. A ``locked`` row (another
    run owns that slide) is added only when the manifest has no row for its id.
    """
    path = Path(out_dir) / MANIFEST
    new = list(rows)
    with locked(path, wait_s=60.0, name=str(path)):
        old: list[dict[str, Any]] = []
        if path.is_file():
            try:
                with open(path, newline="") as fh:
                    old = [
                        {k: r.get(k) or "" for k in MANIFEST_FIELDS}
                        for r in csv.DictReader(fh)
                        if r.get("slide_id")
                    ]
            except (OSError, csv.Error):
                old = []
        replaced = {r.slide_id for r in new if not r.locked}
        merged = [r for r in old if r["slide_id"] not in replaced]
        have = {r["slide_id"] for r in merged}
        merged += [r.row() for r in new if not (r.locked and r.slide_id in have)]
        merged.sort(key=lambda r: r["slide_id"])  # stable: a slide's rows keep their order
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
            w.writeheader()
            w.writerows(merged)
    return path


class _DiskFull(Exception):
    """The disk filled up while writing ``path`` (for the slide ``sid`` at ``slide``): the batch
    stops."""

    def __init__(self, path: str | os.PathLike, sid: str, slide: str | os.PathLike) -> None:
        super().__init__(str(path))
        self.path = str(path)
        self.sid = sid
        self.slide = str(Path(slide).absolute())

    def __reduce__(self) -> tuple[Any, tuple[str, str, str]]:  # raised in a worker process
        return (_DiskFull, (self.path, self.sid, self.slide))


def _failure(sid: str, path: str, exc: BaseException, t0: float, debug: bool) -> TileResult:
    if isinstance(exc, WSIPipelineError):
        msg = str(exc)
    else:
        msg = f"{path}: internal error {type(exc).__name__}: {' '.join(str(exc).split())}"
        if debug:
            log.error("%s", "".join(traceback.format_exception(exc)))
    log.error("%s", msg)
    return TileResult(sid, path, "failed", 0, time.time() - t0, msg)


def _failed_or_stop(
    exc: Exception, out: Path, sid: str, path: str | os.PathLike, t0: float, debug: bool
) -> TileResult:
    """The ``failed`` row of a slide tiled in one piece that raised ``exc``; a full disk is
    raised instead (:class:`_DiskFull`), which stops the batch."""
    if is_disk_full(exc):
        raise _DiskFull(store_path(out, sid), sid, path) from exc
    return _failure(sid, str(Path(path).absolute()), exc, t0, debug)


def _assign_ids(slides: Sequence[Path]) -> tuple[list[tuple[str, Path]], list[TileResult]]:
    """Slide ids for a batch; later slides whose id is taken fail with a clear reason."""
    seen: dict[str, Path] = {}
    jobs: list[tuple[str, Path]] = []
    dupes: list[TileResult] = []
    for p in slides:
        sid = slide_id_from_path(p)
        if sid in seen:
            msg = (
                f"{p.absolute()}: duplicate slide id {sid!r} (already used by "
                f"{seen[sid].absolute()}); rename one of the files"
            )
            log.error("%s", msg)
            dupes.append(TileResult(sid, str(p.absolute()), "failed", 0, 0.0, msg))
            continue
        seen[sid] = p
        jobs.append((sid, p))
    return jobs, dupes


def _odd_entries(paths: Sequence[str | os.PathLike], found: Sequence[Path]) -> list[TileResult]:
    """Report what a folder holds that looks like a slide but is not one of ``found``.

    A dangling symbolic link named like a slide becomes a ``failed`` row (the slide is missing);
    a folder named like a slide (``x.svs/``, searched inside) and a hidden file named like one
    (``.x.svs``, ``..svs``) get one WARNING line each. Entries inside hidden folders are left
    alone, as by :func:`wsi_pipeline.slide.find_slides`.
    """
    seen = {Path(p).absolute() for p in found}
    failed: list[TileResult] = []
    for raw in paths:
        root = Path(raw)
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root).parts
            name = f.name.lower()
            if any(part.startswith(".") for part in rel[:-1]) or f.absolute() in seen:
                continue
            if not name.endswith(SLIDE_SUFFIXES) and not name.endswith(".dcm"):
                continue
            if f.is_symlink() and not f.exists():
                msg = (
                    f"{f.absolute()}: dangling symbolic link (its target "
                    f"{os.readlink(f)} does not exist); not tiled"
                )
                log.error("%s", msg)
                failed.append(
                    TileResult(slide_id_from_path(f), str(f.absolute()), "failed", 0, 0.0, msg)
                )
            elif f.is_dir():
                log.warning(
                    "%s: a folder named like a slide file, not a slide; searched inside it", f
                )
            elif f.name.startswith("."):
                log.warning(
                    "%s: hidden file named like a slide; skipped (rename it without the "
                    "leading '.' to tile it)",
                    f,
                )
    return failed


def tile_slides(
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    spec: TilingSpec | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    processes: bool = False,
    overwrite: bool = False,
    slide_mpp: float | None = None,
    backend: str = "auto",
    progress: bool = True,
    debug: bool = False,
    on_result: Callable[[TileResult], None] | None = None,
) -> list[TileResult]:
    """Tile a batch of slide files; one failure never stops the others.

    Parameters
    ----------
    slides : sequence of path
        Slide files and/or folders (searched with :func:`wsi_pipeline.slide.find_slides`).
    out_dir : path
        Output folder: ``<slide_id>.zarr`` stores and ``manifest.csv``.
    spec : TilingSpec
    workers : int
        Threads of this process tiling slides and their shards side by side (1: one slide, one
        shard at a time); for a batch of small slide files (each at most
        :data:`SMALL_SLIDE_BYTES`), a process for every :data:`SLIDES_PER_PROCESS` of them, up
        to ``workers``, each tiling whole slides (a small slide's fixed cost is interpreter
        work, which threads take turns at; the processes start without re-running the caller's
        ``__main__``); with ``processes`` the worker processes of a dask ``LocalCluster``
        instead.
    scheduler : str, optional
        Address of a running dask.distributed scheduler (its workers must see the same files).
    processes : bool
        Start a dask ``LocalCluster`` of ``workers`` processes (one BLAS/OpenMP thread each,
        :data:`WORKER_ENV`) instead of threads; its start-up and shutdown (~0.9 s on 2 cores,
        imports included) and the scheduler's round trips per task are only earned by large
        decode/encode-bound batches (``benchmarks/bench_tiling.py`` measures them against one
        process).
    overwrite : bool
        Redo complete stores.
    slide_mpp : float, optional
        The slides' level-0 mpp, for files without one.
    backend, progress, debug, on_result
        Reader backend; show progress bars; log tracebacks of internal errors; callback per row.

    Each slide's store is locked while it is tiled (:mod:`wsi_pipeline.locks`), so two runs on
    one output folder share the work: a slide locked by the other run is ``skipped`` (see the
    module docstring for every failure mode).

    Returns
    -------
    list of TileResult
        One per slide (also written to ``manifest.csv``).

    Raises
    ------
    ConfigError
        When ``out_dir`` cannot be written (:func:`wsi_pipeline.util.output_dir`).
    TilingError
        When the disk fills up:
        ``"disk full writing <path>; stopped after N of M slides"`` (what was written stays).
    """
    spec = spec or TilingSpec()
    out = output_dir(out_dir)
    files, skipped = find_slides(list(slides))
    for p, why in skipped:
        log.info("skipping %s: %s", p, why)
    jobs, results = _assign_ids(files)
    results += _odd_entries(slides, files)
    total = len(jobs) + len(results)

    unsaved: set[str] = set()  # slide ids whose rows the manifest does not have yet
    saved = [time.monotonic()]

    def save() -> None:
        if unsaved:
            write_manifest(out, [x for x in results if x.slide_id in unsaved])
            unsaved.clear()
        saved[0] = time.monotonic()

    def record(r: TileResult) -> None:
        results.append(r)
        unsaved.add(r.slide_id)
        if time.monotonic() - saved[0] >= MANIFEST_EVERY_S:
            save()
        if on_result is not None:
            on_result(r)

    try:
        if results:
            write_manifest(out, results)
        args = (jobs, out, spec, overwrite, slide_mpp, backend, progress, debug, record)
        local = scheduler is None and not processes
        n = _slide_processes(jobs, workers) if local and workers > 1 else 0
        if local and workers <= 1:
            _run_serial(*args)
        elif n:
            log.debug(
                "--workers %d: %d slide files of at most %d MB: %d processes, each tiling whole "
                "slides (their fixed cost is interpreter work, which threads would take turns at)",
                workers,
                len(jobs),
                SMALL_SLIDE_BYTES >> 20,
                n,
            )
            _run_slide_processes(*args, n)
        elif local:
            log.debug(
                "--workers %d: slides and their shards tiled by %d threads in this process (no "
                "process cluster to start)",
                workers,
                workers,
            )
            _run_threads(*args, workers)
        else:
            _run_dask(*args, workers, scheduler)
        save()
    except (_DiskFull, OSError) as exc:
        if isinstance(exc, OSError) and not is_disk_full(exc):
            raise
        where = exc.path if isinstance(exc, _DiskFull) else exc.filename or out
        msg = disk_full_message(where, len(results), total)
        with contextlib.suppress(OSError, WSIPipelineError):  # the rows so far, if there is room
            save()
        if isinstance(exc, _DiskFull):  # its row, if there is still room for it
            row = TileResult(exc.sid, exc.slide, "failed", 0, 0.0, msg)
            with contextlib.suppress(OSError, WSIPipelineError):
                write_manifest(out, [*(r for r in results if r.slide_id == exc.sid), row])
        raise TilingError(msg) from exc
    finally:
        release_sources()  # no slide's decoded tiles outlive the batch in this process
        if unsaved:  # stopped (an interrupt, an error): the rows of the slides done so far
            with contextlib.suppress(Exception):
                save()
    order = {sid: i for i, (sid, _) in enumerate(jobs)}
    return sorted(results, key=lambda r: order.get(r.slide_id, -1))


def _bars(progress: bool, n_slides: int) -> tuple[Any, Any]:
    slides_bar = progress_bar(
        total=n_slides, desc="slides", unit="slide", progress=progress, position=0
    )
    patch_bar = progress_bar(
        total=0,
        desc="patches",
        unit="patch",
        progress=progress,
        position=1,
        leave=False,
    )
    return slides_bar, patch_bar


@one_opencv_thread()
def _run_serial(jobs, out, spec, overwrite, slide_mpp, backend, progress, debug, record) -> None:
    """Tile the batch in this thread, one slide and one shard at a time (OpenCV too:
    :func:`one_opencv_thread`), each by :func:`tile_slide`."""
    slides_bar, patch_bar = _bars(progress, len(jobs))
    shown = [""]  # the slide the patch bar counts

    def on_shard(plan: SlidePlan, counts: dict[str, int]) -> None:
        if shown[0] != plan.slide_id:
            shown[0] = plan.slide_id
            patch_bar.reset(total=plan.n_patches)
            patch_bar.set_description(plan.slide_id)
        patch_bar.update(counts["copied"] + counts["encoded"])

    try:
        for sid, path in jobs:
            record(_tile_one(sid, path, out, spec, overwrite, slide_mpp, backend, debug, on_shard))
            slides_bar.update(1)
    finally:
        patch_bar.close()
        slides_bar.close()


#: A batch of small slide files (:data:`SMALL_SLIDE_BYTES`) gets a worker process for every
#: this many of its slides, up to ``workers`` (:func:`_run_slide_processes`). Measured on 2
#: cores with 4,000 x 3,000 px slides (level 0 and 0.5 mpp): two threads tile them 1.4-1.7x
#: as fast as one, two processes up to 1.6-2.0x, but starting them costs 0.4-0.6 s, so they
#: pass the threads only from ~130 slides (64: threads 1.57x, processes 1.42x; 200: 1.48x
#: and 1.59x at level 0, 1.71x and 2.03x at 0.5 mpp).
SLIDES_PER_PROCESS = 64
#: The largest slide file counted small (a 4,000 x 3,000 px slide is ~1.2 MB, a 40,000 x 30,000
#: one ~300 MB): a slide's fixed cost (open, thumbnail, mask, store, finalise: ~17 ms, mostly
#: interpreter work) is then most of its time, and it has at most a few shards to split.
SMALL_SLIDE_BYTES = 64 << 20


def _slide_processes(jobs: Sequence[tuple[str, Path]], workers: int) -> int:
    """How many worker processes, each taking whole slides, tile a batch faster than threads:
    one per :data:`SLIDES_PER_PROCESS` slides, at most ``workers``, when every file is small
    (:data:`SMALL_SLIDE_BYTES`); 0 (threads) when a file is not, or cannot be read, or when this
    process may not have children (a daemonic one: a ``multiprocessing.Pool`` worker)."""
    import multiprocessing as mp

    n = min(workers, len(jobs) // SLIDES_PER_PROCESS)
    if n < 2 or mp.current_process().daemon:
        return 0
    try:
        return n if all(Path(p).stat().st_size <= SMALL_SLIDE_BYTES for _, p in jobs) else 0
    except OSError:  # a slide that cannot be read: its one-line failure comes from the threads
        return 0


def _run_slide_processes(
    jobs, out, spec, overwrite, slide_mpp, backend, progress, debug, record, workers
) -> None:
    """Tile the batch with ``workers`` processes, each taking whole slides
    (:func:`_tile_one`); this process records the results (manifest, callback) and
    relays the workers' log lines. The workers are spawned (no copy of this process's threads)
    without re-importing the caller's ``__main__``
    (:func:`~wsi_pipeline.util.main_module_hidden`), each with one OpenCV/BLAS/OpenMP thread
    (:data:`WORKER_ENV`) and no interrupt of its own. On a full disk
    or an interrupt the slides not started are cancelled and those being tiled finish theirs.
    A worker that dies (killed, out of memory) leaves the slides not yet done to the threads of
    this process (one warning line); the slide it was tiling is resumed or redone there. Where
    no worker process can be started, the threads tile the batch (one warning line)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    from logging.handlers import QueueListener

    ctx = mp.get_context("spawn")
    try:  # no POSIX semaphores here (some sandboxes): threads, as before
        queue = ctx.Queue()
        pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_process_init, initargs=(queue, _log_level())
        )
    except (OSError, NotImplementedError, ImportError) as exc:
        log.warning(
            "cannot start tile worker processes (%s); the slides are tiled by threads",
            " ".join(str(exc).split()) or type(exc).__name__,
        )
        _run_threads(
            jobs, out, spec, overwrite, slide_mpp, backend, progress, debug, record, workers
        )
        return
    slides_bar, patch_bar = _bars(progress, len(jobs))
    listener = QueueListener(queue, _Relay())
    listener.start()
    done: set[str] = set()
    broken = None
    try:
        with pool:
            try:
                with main_module_hidden(), _worker_environ():  # they start with the first submits
                    futures = [
                        pool.submit(
                            _tile_one,
                            sid,
                            path,
                            out,
                            spec,
                            overwrite,
                            slide_mpp,
                            backend,
                            debug,
                        )
                        for sid, path in jobs
                    ]
                try:
                    for f in as_completed(futures):
                        try:
                            res = f.result()
                        except BrokenProcessPool as exc:
                            broken = exc
                            break
                        done.add(res.slide_id)
                        record(res)
                        slides_bar.update(1)
                        patch_bar.update(res.n_patches)
                except BaseException:  # stopped: the slides being tiled finish, with their rows
                    for f in futures:
                        f.cancel()
                    for f in futures:
                        if not f.cancelled() and f.exception() is None:
                            res = f.result()
                            if res.slide_id not in done:
                                record(res)
                    raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        listener.stop()
        patch_bar.close()
        slides_bar.close()
    if broken is not None:
        left = [(sid, path) for sid, path in jobs if sid not in done]
        log.warning(
            "a tile worker process died (%s); the %d slides not done are tiled in this process",
            " ".join(str(broken).split()) or type(broken).__name__,
            len(left),
        )
        _run_threads(
            left, out, spec, overwrite, slide_mpp, backend, progress, debug, record, workers
        )


@contextlib.contextmanager
def _worker_environ() -> Iterator[None]:
    """Within it, processes start with one OpenCV/BLAS/OpenMP thread (:data:`WORKER_ENV`, read
    by those libraries as they load in the new process); this process's environment is put back
    after."""
    environ = dict(os.environ)
    os.environ.update(WORKER_ENV)
    try:
        yield
    finally:
        _restore_environ(environ)


def _log_level() -> int:
    """The most verbose level any of this package's loggers logs at (what a worker process
    sends; :class:`_Relay` filters again by logger)."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "wsi_pipeline"]
    return min(logging.getLogger(n).getEffectiveLevel() for n in ["wsi_pipeline", *names])


def _process_init(queue: Any, level: int) -> None:
    """A slide worker process (started with one thread for OpenCV and the maths libraries,
    :func:`_worker_environ`): its log records sent to the batch's process (:class:`_Relay`),
    and no interrupt of its own (the batch's process stops it: a store being written is left
    unfinished, which the next run resumes)."""
    import signal
    from logging.handlers import QueueHandler

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    root = logging.getLogger()
    root.handlers[:] = [QueueHandler(queue)]
    logging.getLogger("wsi_pipeline").setLevel(level)


class _Relay(logging.Handler):
    """Hands a worker process's log records to this process's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _tile_one(
    sid: str,
    path: Path,
    out: Path,
    spec: TilingSpec,
    overwrite: bool,
    slide_mpp: float | None,
    backend: str,
    debug: bool,
    on_shard: Callable[[SlidePlan, dict[str, int]], None] | None = None,
) -> TileResult:
    """One slide of a batch by :func:`tile_slide`, in this thread (:func:`_run_serial`) or in a
    worker process (:func:`_run_slide_processes`): its result, or its ``failed`` row; a full
    disk is raised (:class:`_DiskFull`), which stops the batch. Its decoded tiles are let go
    after."""
    t0 = time.time()
    try:
        return tile_slide(
            path,
            out,
            spec=spec,
            slide_id=sid,
            slide_mpp=slide_mpp,
            overwrite=overwrite,
            backend=backend,
            on_shard=on_shard,
        )
    except Exception as exc:
        return _failed_or_stop(exc, out, sid, path, t0, debug)
    finally:
        release_sources()


def _run_threads(
    jobs, out, spec, overwrite, slide_mpp, backend, progress, debug, record, workers
) -> None:
    """Tile the batch with ``workers`` threads of this process (:class:`_ThreadClient`)."""
    with _ThreadClient(workers) as client:
        _drive(
            client, jobs, out, spec, overwrite, slide_mpp, backend, progress, debug, record, workers
        )


def _run_dask(
    jobs, out, spec, overwrite, slide_mpp, backend, progress, debug, record, workers, scheduler
) -> None:
    from distributed import Client, LocalCluster

    cluster = None
    environ = dict(os.environ)  # distributed's nannies set OMP_NUM_THREADS=1 etc. in it
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env=WORKER_ENV,
            silence_logs=logging.ERROR if debug else logging.CRITICAL,  # failures: one line each
        )
        client = Client(cluster)
    try:
        _drive(
            client, jobs, out, spec, overwrite, slide_mpp, backend, progress, debug, record, workers
        )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        _restore_environ(environ)


def _restore_environ(environ: dict[str, str]) -> None:
    """Put this process's environment back as it was: starting a ``LocalCluster`` leaves
    ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ``OPENBLAS_NUM_THREADS=1`` and
    ``MALLOC_TRIM_THRESHOLD_`` in it (distributed's ``nanny.pre-spawn-environ``), and every
    later subprocess (a training started from the same notebook) would run one thread."""
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    for key, value in environ.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _parts_per_shard(n_shards: int, workers: int) -> int:
    """Parts each shard of a slide is extracted in, side by side, by threads: 1 for one worker
    or a slide of many shards (8 per worker or more: a whole shard a task); for a slide of
    fewer, two for each of its ranges (:func:`~wsi_pipeline.tiling.meeting_ranges`), which are
    as many as give every two workers one (at most 4 a shard): one part takes the range's
    patches from the front, the other from the back, until they meet, so that the threads
    finish the slide together (:func:`_part_order`)."""
    if workers <= 1 or n_shards >= 8 * workers:
        return 1
    return 2 * min(4, max(1, -(-workers // (2 * max(1, n_shards)))))


def _part_order(todo: Sequence[int], n: int) -> list[tuple[int, int]]:
    """``(shard, part)`` in the order the ``n`` parts of each shard of ``todo`` are submitted
    (the threads take them in turn): the front part of the slide's first range
    (:func:`~wsi_pipeline.tiling.meeting_ranges`), the back part of its last, the front of the
    second, the back of the one before the last, ... Two threads walk the slide from its two
    ends, each through neighbouring patches (the tiles of one range's edge are still cached for
    the next), and meet once; a thread left without a range of its own joins one being
    extracted, from its other end."""
    ranges = [(s, k) for s in todo for k in range(n // 2)]
    order: list[tuple[int, int]] = []
    for (s, k), (t, j) in zip(ranges, reversed(ranges)):
        order += [(s, 2 * k), (t, 2 * j + 1)]
    return order


def _shard_in(meets: Sequence[MeetingRange], got: dict[int, Any]) -> bool:
    """Whether every patch of a shard is in ``got`` (its parts come back, by part number):
    each of its ``meets`` has both its parts back, or one that took all of it."""
    return all(
        (2 * k in got and 2 * k + 1 in got)
        or (2 * k in got and m.taken_all(front=True))
        or (2 * k + 1 in got and m.taken_all(front=False))
        for k, m in enumerate(meets)
    )


#: Tasks of at least this dask priority run at once in the driver thread under
#: :class:`_ThreadClient`: a shard's write from its parts (15), a slide's finalisation (20),
#: the prepare and copied shards of a slide alone in the batch (nothing to run beside them).
INLINE_PRIORITY = 15


#: The interpreter's thread switch interval while :class:`_ThreadClient` runs (Python's
#: default: 5 ms): a thread woken by zarr's event loop or a finished task waits at most this
#: long for one that holds the interpreter in Python code (a small slide's fixed cost is mostly
#: that; restored after the batch).
SWITCH_INTERVAL_S = 0.001


class _ThreadClient:
    """The part of a dask ``Client`` that :func:`_drive` uses, over a thread pool of this
    process: ``submit``, ``as_completed`` with ``add``, ``scheduler_info``.

    Tasks run in submission order (dask's ``key`` and ``pure`` are ignored), except that a task
    of ``priority`` >= :data:`INLINE_PRIORITY` runs at once in the calling thread: a shard is
    written as soon as its last part is in (behind the queued parts its bytes would pile up in
    memory: 1.2 GB on the zstd path), and a finished slide is marked complete without waiting
    behind the shards of the slides after it."""

    def __init__(self, workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from .tissue import load_dependencies

        load_dependencies()  # before threads make the first (lazy) imports side by side
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="wsi-tile")
        for _ in range(workers):  # started now, not when the first slide's thumbnail needs one
            self.pool.submit(time.sleep, 0.001)

    def __enter__(self) -> _ThreadClient:
        self.pinned = contextlib.ExitStack()
        self.pinned.enter_context(one_opencv_thread())  # as in a worker process
        self.switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self.switch, SWITCH_INTERVAL_S))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.pool.shutdown(wait=True, cancel_futures=True)
        finally:
            sys.setswitchinterval(self.switch)
            self.pinned.close()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from concurrent.futures import Future

        kwargs.pop("key", None)
        kwargs.pop("pure", None)
        if kwargs.pop("priority", 0) < INLINE_PRIORITY:
            return self.pool.submit(fn, *args, **kwargs)
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def scheduler_info(self) -> dict[str, Any]:
        return {"workers": dict.fromkeys(range(self.workers))}

    @staticmethod
    def as_completed() -> _Completed:
        return _Completed()


class _Completed:
    """``distributed.as_completed`` for ``concurrent.futures``: futures may be added while it
    is iterated; it ends when every added future has been yielded."""

    def __init__(self) -> None:
        import queue

        self.done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.waiting = 0

    def add(self, future: Any) -> None:
        self.waiting += 1
        future.add_done_callback(self.done.put)

    def __iter__(self) -> Iterator[Any]:
        while self.waiting:
            future = self.done.get()
            self.waiting -= 1
            yield future


def _drive(
    client, jobs, out, spec, overwrite, slide_mpp, backend, progress, debug, record, workers=2
) -> None:
    """Tile the batch through ``client``: a dask ``Client`` or a :class:`_ThreadClient`.

    Up to twice as many slides as workers are prepared ahead; each prepared slide's shards are
    submitted as tasks, and its store is finalised when the last is written. With threads, the
    shards of a slide of few of them are extracted in parts side by side
    (:func:`_parts_per_shard`), each written whole when its last part is in; a slide whose
    patches are all copied source tiles (``plan.copies``) has its shards run one at a time,
    since threads would only contend for the interpreter (debug log). A slide with no other
    slide beside it (being tiled or left to tile) is prepared, and its copied shards run, by this
    thread, the pool's idle threads decoding half of its thumbnail. The driver (this thread) holds each slide's store lock and records its result."""
    slides_bar, patch_bar = _bars(progress, len(jobs))
    locks: dict[str, StoreLock] = {}  # held by this (the driver) process while a slide is tiled

    def unlock(sid: str) -> None:
        lock = locks.pop(sid, None)
        if lock is not None:
            lock.release()

    def done(r: TileResult, release: bool = True) -> None:
        try:
            record(r)
        finally:
            if release:
                unlock(r.slide_id)

    try:
        window = max(2, 2 * len(client.scheduler_info().get("workers", {})) or 2 * workers)
        pending = list(jobs)
        meta: dict[Any, tuple] = {}  # future -> (kind, sid, path, t0, plan)
        state: dict[str, dict] = {}  # sid -> {"plan", "left", "stats"}
        threads = isinstance(client, _ThreadClient)
        if threads:  # no import of distributed (a quarter of a second) on this path
            ac = client.as_completed()
        else:
            from distributed import as_completed

            ac = as_completed()
        split = workers if threads else 1  # dask: no parts (their chunks would travel twice)

        def alone() -> bool:
            """Nothing to run beside a slide's next task (threads): no other slide is being
            tiled or left to tile, so this thread runs it (no handoff to the pool)."""
            return threads and not pending and not state and not meta

        def submit_prepares() -> None:
            while pending and sum(1 for v in meta.values() if v[0] == "prep") + len(state) < window:
                sid, path = pending.pop(0)
                try:
                    locks[sid] = _lock_slide(out, sid)
                except StoreLocked as exc:
                    done(_locked_result(sid, path, exc, time.time()))
                    slides_bar.update(1)
                    continue
                lone = alone()
                t0 = time.time()
                apath = str(Path(path).absolute())
                f = client.submit(
                    prepare_slide,
                    path,
                    out,
                    spec=spec,
                    slide_id=sid,
                    slide_mpp=slide_mpp,
                    overwrite=overwrite,
                    backend=backend,
                    # the pool's idle threads decode half of its thumbnail, then start on its
                    # patches while this thread writes its store
                    pool=client.pool if lone else None,
                    on_plan=(lambda p, sid=sid, a=apath, t=t0: start(sid, a, t, p, early=True))
                    if lone
                    else None,
                    key=f"prepare-{sid}-{time.time_ns()}",
                    pure=False,
                    # a lone slide of copied tiles is then tiled as by one process
                    priority=INLINE_PRIORITY if lone else 0,
                )
                meta[f] = ("prep", sid, apath, t0, None)
                ac.add(f)

        def start(sid: str, path: str, t0: float, plan: SlidePlan, early: bool = False) -> None:
            """Submit the shards of a prepared slide. ``early``: from inside the prepare of a
            lone slide (:func:`prepare_slide`'s ``on_plan``), before its store is written, and
            only when its shards go in parts (this thread writes each shard once its parts are
            in, after the prepare returns; a whole-shard task would write it itself)."""
            # copied tiles are interpreter work: threads would only contend for the GIL, so
            # such a slide's shards go one at a time (other slides in parallel)
            chain = threads and split > 1 and plan.copies
            n = 1 if chain else _parts_per_shard(len(plan.todo), split)
            if early and (chain or n == 1):
                return
            inline = chain and alone()
            if chain:
                log.debug(
                    "%s: source tiles copied; its shards run one at a time%s",
                    sid,
                    " in this thread (no other slide beside it)" if inline else "",
                )
            if not threads:  # a dask task reads its patches' coords from the store
                plan = dataclasses.replace(plan, coords=None)
            todo = list(plan.todo)
            state[sid] = {
                "plan": plan,
                "left": len(todo),
                "stats": [],
                "parts": {s: {} for s in todo},  # shard -> {part: its chunks}, until written
                "meets": {s: meeting_ranges(plan, s, n) for s in todo} if n > 1 else {},
                "queue": todo[1:] if chain else [],
                "priority": INLINE_PRIORITY if inline else 10,
            }
            if n > 1:
                for s, p in _part_order(todo, n):
                    meet = state[sid]["meets"][s][p // 2]
                    submit(sid, path, t0, shard_part, (plan, s, p, n, meet), ("part", (s, p, n)))
            else:
                for s in todo[:1] if chain else todo:
                    submit(sid, path, t0, extract_shard, (plan, s), ("shard", None))
            if not plan.todo:
                g = client.submit(finalize_slide, plan, [], priority=20, pure=False)
                meta[g] = ("final", sid, path, t0, plan)
                ac.add(g)

        def submit(sid: str, path: str, t0: float, fn: Callable, args: tuple, kind: tuple) -> None:
            """Submit one task of a slide's shards (a whole shard or a part of one)."""
            g = client.submit(
                fn,
                *args,
                priority=state[sid]["priority"],
                pure=False,
                key=f"{kind[0]}-{sid}-{args[1]}-{time.time_ns()}",
            )
            meta[g] = (kind[0], sid, path, t0, kind[1])
            ac.add(g)

        submit_prepares()
        for f in ac:
            entry = meta.pop(f, None)
            if entry is None:  # a task of a slide that failed, cancelled or finished since
                continue
            kind, sid, path, t0, where = entry
            if kind == "orphan":  # the last task of a failed slide still running lets it go
                if not any(v[0] == "orphan" and v[1] == sid for v in meta.values()):
                    unlock(sid)
                continue
            try:
                res = f.result()
            except Exception as exc:
                running = False  # a task of this slide still runs in a thread of this process
                if state.pop(sid, None) is not None:
                    for g, v in list(meta.items()):
                        if v[1] == sid:
                            if not g.cancel() and threads and not g.done():
                                meta[g] = ("orphan", *v[1:])  # may be writing a shard
                                running = True
                            else:
                                meta.pop(g)
                if is_disk_full(exc):
                    for g, v in list(meta.items()):  # slides already finalised keep their rows
                        if v[0] == "final" and g.done() and g.exception() is None:
                            done(g.result())
                    raise _DiskFull(store_path(out, sid), sid, path) from exc
                # its store's lock is held until those tasks end: one may be writing a shard
                done(_failure(sid, path, exc, t0, debug), release=not running)
                slides_bar.update(1)
                submit_prepares()
                continue
            if kind == "prep":
                if isinstance(res, TileResult):
                    done(res)
                    slides_bar.update(1)
                else:
                    patch_bar.total += res.n_patches
                    patch_bar.refresh()
                    if sid not in state:  # not started from inside its prepare
                        start(sid, path, t0, res)
            elif kind == "part":  # all patches of a shard in: write it
                st = state.get(sid)
                if st is None:
                    continue
                s, p, n = where
                got = st["parts"].get(s)
                if got is None:  # written: the other end of its ranges had taken them all
                    continue
                got[p] = res
                if _shard_in(st["meets"][s], got):
                    del st["parts"][s]
                    g = client.submit(
                        write_shard_parts,
                        st["plan"],
                        s,
                        [got.get(i, ([], 0)) for i in range(n)],
                        priority=15,
                        pure=False,
                    )
                    meta[g] = ("shard", sid, path, t0, None)
                    ac.add(g)
            elif kind == "shard":
                st = state.get(sid)
                if st is None:
                    continue
                st["stats"].append(res)
                st["left"] -= 1
                if st["queue"]:
                    submit(
                        sid,
                        path,
                        t0,
                        extract_shard,
                        (st["plan"], st["queue"].pop(0)),
                        ("shard", None),
                    )
                patch_bar.update(res["copied"] + res["encoded"])
                if st["left"] == 0:
                    g = client.submit(
                        finalize_slide, st["plan"], st["stats"], priority=20, pure=False
                    )
                    meta[g] = ("final", sid, path, t0, st["plan"])
                    ac.add(g)
            else:
                state.pop(sid, None)
                done(res)
                slides_bar.update(1)
            submit_prepares()
    finally:
        for lock in locks.values():
            lock.release()
        patch_bar.close()
        slides_bar.close()
