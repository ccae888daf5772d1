"""Lock files (wsi_pipeline.locks): exclusive, named holder, stale take-over, real processes."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wsi_pipeline.errors import StoreError
from wsi_pipeline.locks import (
    StoreLocked,
    acquire,
    lock_path,
    locked,
    pid_alive,
    read_lock,
)
from wsi_pipeline.store import list_stores


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def fake_lock(store: Path, pid: int, *, host: str | None = None) -> Path:
    """A lock file of ``store`` as another process would have written it."""
    lp = lock_path(store)
    body = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started": "2024-01-01T00:00:00+00:00",
        "proc_start": None,
        "token": "other",
    }
    lp.write_text(json.dumps(body))
    return lp


def test_lock_file_sits_next_to_the_store_and_names_its_holder(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    store.mkdir()
    lp = lock_path(store)
    assert lp == tmp_path / "s.zarr.lock"
    with locked(store) as lock:
        info = read_lock(lp)
        assert info is not None and info.pid == os.getpid()
        assert info.host == socket.gethostname() and info.token == lock.info.token
        assert list_stores(tmp_path) == [store]  # the lock is never taken for a store
    assert not lp.exists()
    lock.release()  # idempotent


def test_a_live_holder_is_named_and_waited_for(tmp_path: Path, live_pid: int) -> None:
    store = tmp_path / "s.zarr"
    lp = fake_lock(store, live_pid)
    t0 = time.monotonic()
    with pytest.raises(
        StoreLocked, match=rf"^s: locked by pid {live_pid} \(another run since "
    ) as ei:
        acquire(store, wait_s=0.3, name="s")
    assert time.monotonic() - t0 >= 0.3
    assert isinstance(ei.value, StoreError) and ei.value.holder.pid == live_pid
    assert "\n" not in str(ei.value)
    assert lp.exists() and json.loads(lp.read_text())["pid"] == live_pid  # left alone
    # released while we wait: we get it
    threading.Timer(0.2, lp.unlink).start()
    with locked(store, wait_s=5) as lock:
        assert read_lock(lp).token == lock.info.token  # type: ignore[union-attr]


def test_a_lock_on_another_host_counts_as_held(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    fake_lock(store, 1, host="elsewhere.example")
    with pytest.raises(StoreLocked, match=r"locked by pid 1 on elsewhere\.example"):
        acquire(store)


def test_stale_lock_of_a_dead_process_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "s.zarr"
    pid = dead_pid()
    fake_lock(store, pid)
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.locks"), locked(store) as lock:
        assert lock.info.pid == os.getpid()
    lines = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(lines) == 1 and f"pid {pid}" in lines[0] and "no longer running" in lines[0]
    assert not lock_path(store).exists()


def test_a_reused_pid_is_not_the_holder(tmp_path: Path) -> None:
    """Our own pid, but recorded with another process start time: the holder is gone."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc: process start times cannot be compared")
    store = tmp_path / "s.zarr"
    body = {"pid": os.getpid(), "host": socket.gethostname(), "started": "x", "proc_start": 1}
    lock_path(store).write_text(json.dumps(body))
    with locked(store) as lock:
        assert lock.info.proc_start not in (None, 1)


def test_a_half_written_lock_is_held_then_stale(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    lp = lock_path(store)
    lp.write_text("")  # created, content not yet written
    with pytest.raises(StoreLocked, match="locked by an unknown process"):
        acquire(store)
    old = time.time() - 120
    os.utime(lp, (old, old))
    with locked(store):
        pass


def test_release_leaves_another_holders_lock(tmp_path: Path, live_pid: int) -> None:
    store = tmp_path / "s.zarr"
    lock = acquire(store)
    fake_lock(store, live_pid)  # e.g. someone deleted ours by hand and took it
    lock.release()
    assert read_lock(lock_path(store)).pid == live_pid  # type: ignore[union-attr]


_RACER = """
import sys, time
from wsi_pipeline.locks import acquire, StoreLocked
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    lock = acquire(sys.argv[1])
except StoreLocked:
    print("busy")
else:
    print("got")
    time.sleep(3.0)
    lock.release()
"""


def test_only_one_of_many_processes_gets_the_lock(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    start = time.time() + 4.0  # all start racing at the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(store), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["busy", "busy", "busy", "got"], outs
    assert not lock_path(store).exists()
