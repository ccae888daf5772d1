"""Faults in a tile batch: no silent wrong result, no lost batch.

Each fault is reported in one line, gives the documented exit status, and loses nothing that was
already written: a full disk, a slide whose header claims absurd dimensions, duplicate slide ids,
odd folder entries, a store locked by another run (live or dead), two tile runs at once.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from wsi_pipeline import tile_batch
from wsi_pipeline.cli import main
from wsi_pipeline.locks import lock_path
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.store import SlideStore, is_complete
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tile_batch import MANIFEST, tile_slides


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic slides ``a``, ``b``, ``c`` (768 x 512 px)."""
    d = tmp_path_factory.mktemp("fault_slides")
    for i, name in enumerate("abc"):
        write_slide(d / f"{name}.svs", width=768, height=512, mpp=0.5, seed=30 + i)
    return d


def manifest_rows(out: Path) -> list[dict[str, str]]:
    with open(out / MANIFEST, newline="") as fh:
        return list(csv.DictReader(fh))


def leftovers(out: Path) -> list[str]:
    """Temporary and lock files left under ``out``."""
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.name.endswith((".tmp", ".lock", ".takeover"))
    )


def err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def tile(*args: str | Path) -> int:
    return main(["tile", *map(str, args), "-q", "--tile-size", "64"])


# ---------------------------------------------------------------------------------------------
# a full disk stops the batch, in one line, keeping what was written
# ---------------------------------------------------------------------------------------------
#: ``sitecustomize`` of the slide worker processes of a batch: b's store's disk is full there.
FULL_DISK_SITE = """
import errno, os, pathlib
real_write_bytes = pathlib.Path.write_bytes
def full_disk(self, data):
    if "b.zarr" in self.parts and self.name.endswith(".tmp"):
        real_write_bytes(self, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real_write_bytes(self, data)
pathlib.Path.write_bytes = full_disk
"""


@pytest.mark.parametrize("workers", ["1", "2", "2 slide processes"])
def test_disk_full_stops_the_batch_and_keeps_what_was_written(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str, monkeypatch
) -> None:
    """One process tiles slide after slide: a is kept, c never started. With 2 workers slides
    are tiled side by side (by threads, or by worker processes when the batch is many small
    slides), so a and c may be unfinished when b's disk fills: whatever was finished is kept,
    nothing unfinished claims to be complete, and the next run resumes."""
    out = tmp_path / "out"
    real_write_bytes = pathlib.Path.write_bytes
    processes = workers == "2 slide processes"
    if processes:  # the worker processes' disk is full too (and they write every store)
        monkeypatch.setattr(tile_batch, "SLIDES_PER_PROCESS", 1)
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(FULL_DISK_SITE)
        path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        monkeypatch.setenv("PYTHONPATH", path)
        workers = "2"

    def full_disk(self: Path, data: bytes) -> int:
        """The filesystem of b's store is full: half the bytes land, then ENOSPC (what a
        real full disk does to a write); everything else writes normally."""
        in_store = any(part.endswith(".zarr") for part in self.parts)
        assert not (processes and in_store), "the worker processes write the stores"
        if "b.zarr" in self.parts and self.name.endswith(".tmp"):
            real_write_bytes(self, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_bytes(self, data)

    with mock.patch.object(pathlib.Path, "write_bytes", full_disk):
        code = tile(slides, "--out", out, "--workers", workers)
    monkeypatch.delenv("PYTHONPATH", raising=False)  # room again for the run below
    assert code == 1
    rows = {r["slide_id"]: r for r in manifest_rows(out)}
    finished = [s for s in "ac" if s in rows and rows[s]["status"] == "ok"]
    assert err_lines(capsys) == [
        f"error: disk full writing {out / 'b.zarr'}; stopped after {len(finished)} of 3 slides"
    ]
    if workers == "1":
        assert finished == ["a"]
        assert "c" not in rows and not (out / "c.zarr").exists()  # never started
    assert all(is_complete(out / f"{s}.zarr") for s in finished)  # kept
    assert all(not is_complete(out / f"{s}.zarr") for s in "ac" if s not in finished)
    assert rows["b"]["status"] == "failed" and "disk full" in rows["b"]["error"]
    assert not is_complete(out / "b.zarr")
    assert leftovers(out) == []  # no half-written temporary file, no lock
    # with room again, the next run finishes the job: finished slides kept, the others done
    n = {s: SlideStore(out / f"{s}.zarr").n_patches for s in finished}
    assert tile(slides, "--out", out, "--workers", workers) == 0
    rows = {r["slide_id"]: r for r in manifest_rows(out)}
    for s in "abc":
        if s in n:
            assert rows[s]["status"] == "skipped" and int(rows[s]["n_patches"]) == n[s]
        else:
            assert rows[s]["status"] == "ok"
    assert all(is_complete(out / f"{s}.zarr") for s in "abc") and leftovers(out) == []


def test_disk_full_creating_a_lone_slides_store_while_its_patches_are_read(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """With two threads, a slide alone in the batch has its patches read by the pool while this
    thread writes its store: a full disk there stops the batch in one line, as anywhere else,
    with no store claiming to be complete and no lock or temporary file left; with room again
    the rerun tiles it."""
    import builtins
    import threading

    from wsi_pipeline import store as store_mod

    started: list[str] = []
    reading = threading.Event()
    real_part = tile_batch.shard_part

    def part(plan, *args):  # type: ignore[no-untyped-def]
        started.append(plan.slide_id)
        reading.set()
        return real_part(plan, *args)

    def full_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if "w" in mode and "b.zarr" in str(file):
            # the disk fills once a pool thread reads its patches (without the wait, this
            # thread could reach its store's first write before a pool thread got to run)
            reading.wait(timeout=10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(tile_batch, "shard_part", part)
    monkeypatch.setattr(store_mod, "open", full_open, raising=False)
    out = tmp_path / "out"
    assert tile(slides / "b.svs", "--out", out, "--workers", "2", "--mpp", "1.0") == 1
    assert started and set(started) == {"b"}  # its patches were being read already
    assert err_lines(capsys) == [
        f"error: disk full writing {out / 'b.zarr'}; stopped after 0 of 1 slides"
    ]
    assert not is_complete(out / "b.zarr") and leftovers(out) == []
    monkeypatch.undo()
    assert tile(slides / "b.svs", "--out", out, "--workers", "2", "--mpp", "1.0") == 0
    assert is_complete(out / "b.zarr") and leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# per-slide faults: one line and one row each; the batch goes on
# ---------------------------------------------------------------------------------------------
def write_absurd_tiff(path: Path) -> None:
    """A ~330 KB tiled TIFF claiming 100,000 x 100,000 px: four real tiles, the rest missing."""
    import tifffile

    tile_px = 512
    n_tiles = (-(-100_000 // tile_px)) ** 2
    real = np.full((tile_px, tile_px, 3), 230, np.uint8)
    tifffile.imwrite(
        path,
        (real if i < 4 else None for i in range(n_tiles)),
        shape=(100_000, 100_000, 3),
        dtype="uint8",
        tile=(tile_px, tile_px),
        photometric="rgb",
        compression="jpeg",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )


def test_absurd_dimensions_fail_that_slide_quickly(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_absurd_tiff(src / "huge.tif")
    assert (src / "huge.tif").stat().st_size < 1_000_000
    os.symlink(slides / "a.svs", src / "a.svs")
    out = tmp_path / "out"
    t0 = time.monotonic()
    assert tile(src, "--out", out) == 1
    assert time.monotonic() - t0 < 60  # decoding its "thumbnail" would take hours
    lines = [line for line in err_lines(capsys) if "huge" in line]
    assert len(lines) == 1 and "claims 100000 x 100000 px in a file of" in lines[0]
    assert "corrupt or forged header" in lines[0]
    rows = {r["slide_id"]: r for r in manifest_rows(out)}
    assert rows["huge"]["status"] == "failed" and rows["huge"]["error"] in lines[0]
    assert rows["a"]["status"] == "ok" and not (out / "huge.zarr").exists()


def test_each_duplicate_id_keeps_its_own_failure_row(slides: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(slides / "b.svs", other / "a.svs")  # another slide with the id 'a'
    out = tmp_path / "out"
    for run in range(2):  # the rerun keeps both rows too
        assert tile(slides / "a.svs", other / "a.svs", "--out", out) == 1
        rows = [r for r in manifest_rows(out) if r["slide_id"] == "a"]
        assert [r["status"] for r in rows] == ["failed", "skipped" if run else "ok"]
        assert rows[0]["path"] == str(other / "a.svs")
        assert "duplicate slide id 'a'" in rows[0]["error"]
        assert rows[1]["path"] == str(slides / "a.svs")


def test_odd_entries_are_reported_one_line_each(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    (src / "x.svs").mkdir(parents=True)  # a folder named like a slide ...
    os.symlink(slides / "a.svs", src / "x.svs" / "inner.svs")  # ... searched inside
    os.symlink(src / "nowhere.svs", src / "gone.svs")  # dangling
    os.symlink(slides / "b.svs", src / "..svs")  # hidden
    os.symlink(slides / "c.svs", src / "good.svs")
    out = tmp_path / "out"
    assert tile(src, "--out", out) == 1  # the dangling link is a missing slide
    err = err_lines(capsys)
    for needle, n in (("gone.svs", 1), ("x.svs:", 1), ("..svs", 1)):
        assert sum(needle in line for line in err) == n, (needle, err)
    assert any("dangling symbolic link" in line and "gone.svs" in line for line in err)
    assert any("a folder named like a slide file" in line for line in err)
    assert any("hidden file named like a slide; skipped" in line for line in err)
    rows = {r["slide_id"]: r for r in manifest_rows(out)}
    assert rows["gone"]["status"] == "failed" and "nowhere.svs" in rows["gone"]["error"]
    assert rows["inner"]["status"] == rows["good"]["status"] == "ok"
    assert set(rows) == {"gone", "inner", "good"}


# ---------------------------------------------------------------------------------------------
# locks: another run's store is left alone; a dead run's lock is taken over
# ---------------------------------------------------------------------------------------------


def other_runs_lock(store: Path, pid: int) -> Path:
    lp = lock_path(store)
    body = {"pid": pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00+00:00"}
    lp.write_text(json.dumps(body))
    return lp


def test_a_store_locked_by_a_live_run_is_skipped(
    slides: Path, tmp_path: Path, live_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lp = other_runs_lock(out / "b.zarr", live_pid)
    assert tile(slides, "--out", out) == 0  # not a failure: the other run does b
    msg = f"b: locked by pid {live_pid} (another tile run); skipped"
    assert [line for line in err_lines(capsys) if "locked" in line] == [f"WARNING: {msg}"]
    rows = {r["slide_id"]: r for r in manifest_rows(out)}
    assert rows["b"]["status"] == "skipped" and rows["b"]["error"] == msg
    assert rows["a"]["status"] == rows["c"]["status"] == "ok"
    assert not (out / "b.zarr").exists() and lp.exists()  # the other run's lock untouched
    # that run finishes b and writes its row: a later locked row never replaces it
    lp.unlink()
    tile_slides([slides / "b.svs"], out, spec=TilingSpec(tile_px=64), progress=False)
    other_runs_lock(out / "b.zarr", live_pid)
    assert tile(slides, "--out", out) == 0
    assert {r["slide_id"]: r["status"] for r in manifest_rows(out)}["b"] == "ok"


def test_a_dead_runs_lock_is_taken_over(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "out"
    out.mkdir()
    other_runs_lock(out / "a.zarr", proc.pid)
    assert tile(slides / "a.svs", "--out", out) == 0
    lines = [line for line in err_lines(capsys) if "taking over" in line]
    assert len(lines) == 1 and f"pid {proc.pid}" in lines[0]
    assert is_complete(out / "a.zarr") and leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# two real tile runs on one output folder
# ---------------------------------------------------------------------------------------------
def test_two_concurrent_tile_runs_share_the_work(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):  # each takes a few seconds, so the runs meet on locked stores
        write_slide(src / f"s{i}.svs", width=4096, height=3072, mpp=0.5, seed=40 + i)
    opts = ["-q", "--tile-size", "64", "--codec", "zstd", "--patches-per-shard", "32"]
    ref = tmp_path / "ref"
    assert main(["tile", str(src), "--out", str(ref), *opts]) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_pipeline", "tile", str(src), "--out", str(out), *opts]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    deadline = time.time() + 300
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if (out / MANIFEST).is_file():  # at every moment: no row claims ok for an unfinished store
            for r in manifest_rows(out):
                if r["status"] == "ok":
                    assert is_complete(out / f"{r['slide_id']}.zarr"), r
        time.sleep(0.05)
    results = [(p.wait(timeout=10), *p.communicate()) for p in procs]
    for code, _, err in results:
        assert code == 0, err  # documented: a slide the other run holds is skipped, not failed
        for line in err.splitlines():
            assert "locked by pid" in line and line.endswith("(another tile run); skipped"), err
    rows = manifest_rows(out)
    assert sorted(r["slide_id"] for r in rows) == ["s0", "s1", "s2"]
    # "ok" from the run that tiled it, or "skipped" (already complete) from the other one
    assert all(r["status"] in ("ok", "skipped") and not r["error"] for r in rows), rows
    assert leftovers(out) == []
    for i, r in enumerate(rows):
        a, b = SlideStore(out / f"s{i}.zarr"), SlideStore(ref / f"s{i}.zarr")
        assert int(r["n_patches"]) == a.n_patches == b.n_patches > 0
        assert np.array_equal(a.coords, b.coords)
        assert np.array_equal(a.thumbnail, b.thumbnail) and a.thumbnail.any()
        assert np.array_equal(a.tissue_mask, b.tissue_mask)
        idx = np.arange(0, a.n_patches, 7)
        assert np.array_equal(a.reader().read(idx), b.reader().read(idx))
