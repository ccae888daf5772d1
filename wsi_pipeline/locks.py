"""Lock files: one writer per store, per ``manifest.csv`` and per training run folder.

Where
    A store ``<out>/<slide_id>.zarr`` is locked by the file ``<out>/<slide_id>.zarr.lock``
    *next to* it, not inside: a tiler that redoes a store removes the store folder, and the lock
    must survive that. :func:`wsi_pipeline.store.list_stores` never lists it (its suffix is
    ``.lock``). ``manifest.csv`` is locked the same way (``manifest.csv.lock``) while a run
    merges its rows in. A training run folder ``<run>`` is locked by ``<run>.lock`` next to it
    (:func:`run_lock`) for the whole training, so a second ``train --out <run>`` (or a pipeline
    training into it) stops at once with one line instead of writing the same files.
    ``predict`` holds a store's lock while it writes the store's scores, and ``heatmap`` while
    it reads them; ``heatmap`` also locks each slide's output folder ``<out>/<slide_id>``
    (``<out>/<slide_id>.lock``) while it writes that slide's files. Both wait
    :data:`STAGE_WAIT_S` seconds for another holder (two runs on one folder take turns).

What
    The lock file holds one JSON object: ``pid``, ``host``, ``started`` (ISO time),
    ``proc_start`` (the process's start time in clock ticks since boot, Linux only) and a random
    ``token``. It is created atomically with ``os.open(O_CREAT | O_EXCL)``, so of two processes
    only one ever gets it; it is removed on release only if it still holds this lock's token.

Busy and stale locks
    A lock held by a live process is waited for for ``wait_s`` seconds, then :class:`StoreLocked`
    is raised (a :class:`~wsi_pipeline.errors.StoreError`; the tiler records the slide as
    ``skipped`` with the error ``"<slide>: locked by pid N (another tile run); skipped"`` and
    goes on: the other run is writing that store, so this run has nothing to do for it).
    A lock of a process that is no longer running on this host (no such pid, or the pid now
    belongs to a process started later) is stale: it is taken over, with one WARNING line.
    Take-overs are serialised by a second short-lived lock (``<lock>.takeover``, itself taken
    over after 30 s), and the stale file is removed only if it is still the one judged stale, so
    two processes can never both take over one lock. A lock held on another host cannot be
    checked from here: it counts as held (the message names the host; delete the file by hand
    if that run is gone). A lock file still being written (empty or unparsable and younger than
    30 s) counts as held by an unknown process; an older one is stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import StoreError

__all__ = [
    "LOCK_SUFFIX",
    "STAGE_WAIT_S",
    "LockInfo",
    "StoreLock",
    "StoreLocked",
    "acquire",
    "lock_path",
    "locked",
    "pid_alive",
    "read_lock",
    "run_lock",
]

log = logging.getLogger(__name__)

#: Appended to the locked path's name: ``<out>/<slide_id>.zarr`` -> ``<out>/<slide_id>.zarr.lock``.
LOCK_SUFFIX = ".lock"
_GRACE_S = 30.0  # an unparsable lock file (or a take-over lock) older than this is stale
#: Seconds ``predict`` waits for a store, and ``heatmap`` for a store or a slide's heatmap
#: folder, that another process is writing, before that slide fails with one line.
STAGE_WAIT_S = 600.0


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock (the content of a lock file).

    Attributes
    ----------
    path : str
        The lock file.
    pid : int
        Process id of the holder (0 when the file could not be read yet).
    host : str
    started : str
        ISO time the lock was taken.
    proc_start : int or None
        The holder's start time in clock ticks since boot (``/proc/<pid>/stat``), to tell a
        reused pid from the holder; None off Linux.
    token : str
    """

    path: str
    pid: int
    host: str
    started: str
    proc_start: int | None = None
    token: str = ""

    def describe(self) -> str:
        """``pid N`` (plus `` on HOST`` when held on another host)."""
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{where}" if self.pid else "an unknown process"


class StoreLocked(StoreError):
    """The path is locked by another live process (``holder`` says which)."""

    def __init__(self, message: str, *, holder: LockInfo) -> None:
        super().__init__(message)
        self.holder = holder


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: ``path`` with :data:`LOCK_SUFFIX` appended to its name."""
    p = Path(path)
    return p.with_name(p.name + LOCK_SUFFIX)


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """True when process ``pid`` runs on this host (and, when ``proc_start`` is given and can
    be checked, is the same process that started then, not a later one that reused the pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    if proc_start is not None:
        now = _proc_start(pid)
        if now is not None and now != proc_start:
            return False
    return True


def read_lock(path: str | os.PathLike) -> LockInfo | None:
    """The holder recorded in lock file ``path`` (pid 0 when unreadable), or None if there is
    no such file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    try:
        d: dict[str, Any] = json.loads(text)
        return LockInfo(
            path=str(p),
            pid=int(d["pid"]),
            host=str(d["host"]),
            started=str(d["started"]),
            proc_start=None if d.get("proc_start") is None else int(d["proc_start"]),
            token=str(d.get("token", "")),
        )
    except (ValueError, KeyError, TypeError):
        return LockInfo(path=str(p), pid=0, host="?", started="?")


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _is_stale(info: LockInfo) -> bool:
    if info.pid == 0:  # being written, or garbage
        return _age_s(Path(info.path)) > _GRACE_S
    if info.host != socket.gethostname():
        return False  # cannot tell: counts as held
    return not pid_alive(info.pid, info.proc_start)


class StoreLock:
    """A lock held by this process; release it with :meth:`release` (or use ``with``).

    Attributes
    ----------
    path : Path
        The lock file.
    info : LockInfo
        What it holds.
    """

    def __init__(self, path: Path, info: LockInfo) -> None:
        self.path = path
        self.info = info
        self.held = True

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"StoreLock({str(self.path)!r}, pid={self.info.pid})"

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (idempotent)."""
        if not self.held:
            return
        self.held = False
        now = read_lock(self.path)
        if now is not None and now.token == self.info.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _create(path: Path) -> LockInfo | None:
    """Create ``path`` exclusively with this process's record; None if it exists."""
    pid = os.getpid()
    info = LockInfo(
        path=str(path),
        pid=pid,
        host=socket.gethostname(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        proc_start=_proc_start(pid),
        token=secrets.token_hex(8),
    )
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    try:
        body = {k: getattr(info, k) for k in ("pid", "host", "started", "proc_start", "token")}
        os.write(fd, (json.dumps(body) + "\n").encode())
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a full disk names the lock file
        raise
    os.close(fd)
    return info


def _take_over(path: Path, stale: LockInfo) -> bool:
    """Remove the stale lock ``path`` if it is still the one judged stale (serialised by a
    take-over lock); False when another process is taking it over right now."""
    guard = path.with_name(path.name + ".takeover")
    if _create(guard) is None:
        if _age_s(guard) <= _GRACE_S:
            return False
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()  # left by a process that died mid take-over
        if _create(guard) is None:
            return False
    try:
        now = read_lock(path)
        if now is not None and now == stale:
            log.warning(
                "%s: taking over the lock of %s from %s (that process is no longer running)",
                path,
                stale.describe(),
                stale.started,
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    finally:
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()
    return True


def acquire(
    path: str | os.PathLike, *, wait_s: float = 0.0, poll_s: float = 0.05, name: str | None = None
) -> StoreLock:
    """Lock ``path`` (a store, ``manifest.csv``, ...) for this process.

    Parameters
    ----------
    path : path
        What to lock; the lock file is :func:`lock_path` of it (its folder must exist).
    wait_s : float
        How long to wait for a lock held by another live process.
    poll_s : float
        How often to look again while waiting.
    name : str, optional
        How to name ``path`` in the message (e.g. the slide id); default the path.

    Returns
    -------
    StoreLock

    Raises
    ------
    StoreLocked
        Still held by another live process after ``wait_s``: one line,
        ``"<name>: locked by pid N (another run since <time>)"``.
    """
    lp = lock_path(path)
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        info = _create(lp)
        if info is not None:
            return StoreLock(lp, info)
        holder = read_lock(lp)
        if holder is None:
            continue  # released meanwhile
        if _is_stale(holder):
            if not _take_over(lp, holder):
                time.sleep(poll_s)
            continue
        if time.monotonic() >= deadline:
            raise StoreLocked(
                f"{name or path}: locked by {holder.describe()} (another run since "
                f"{holder.started}; lock file {lp})",
                holder=holder,
            )
        time.sleep(poll_s)


@contextlib.contextmanager
def locked(
    path: str | os.PathLike, *, wait_s: float = 0.0, name: str | None = None
) -> Iterator[StoreLock]:
    """``with locked(store):`` — :func:`acquire`, released on leaving the block."""
    lock = acquire(path, wait_s=wait_s, name=name)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[StoreLock | None]:
    """``with run_lock(run):`` -- hold ``<run>.lock`` while training into the run folder ``run``.

    Under ``torchrun`` only rank 0 takes it (the other ranks get None).

    Raises
    ------
    StoreLocked
        Another live process is training into ``run``: one line naming it, the holder and the
        lock file (a lock of a dead process is taken over, see :func:`acquire`).
    """
    from .util import output_dir

    if os.environ.get("RANK", "0") not in ("", "0"):  # torchrun: rank 0 holds it for all
        yield None
        return
    p = Path(run_dir)
    output_dir(p.parent)  # one line when it cannot be a folder
    try:
        lock = acquire(p)
    except StoreLocked as exc:
        h = exc.holder
        raise StoreLocked(
            f"{p}: another training is writing this run folder ({h.describe()} since "
            f"{h.started}; lock file {lock_path(p)}); wait for it to end or train into another "
            "--out",
            holder=h,
        ) from None
    try:
        yield lock
    finally:
        lock.release()
