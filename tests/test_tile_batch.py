"""Batches of slides (wsi_pipeline.tile_batch): manifest.csv, bad inputs and duplicate ids, an
unwritable output folder, reruns and resume of a killed batch, dask workers, a store locked by
another run. The faults of a batch (full disk, absurd headers, live and dead locks, two runs at
once) are in test_faults.py; the tiling of one slide is in test_tiling.py."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import run_script

from wsi_pipeline import tile_batch
from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.locks import acquire, lock_path, read_lock
from wsi_pipeline.slide import open_slide
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.store import PATCHES, SlideStore, is_complete, open_store, store_path
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tile_batch import (
    MANIFEST,
    MANIFEST_FIELDS,
    tile_slide,
    tile_slides,
    write_manifest,
)
from wsi_pipeline.tiling import TileResult


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / MANIFEST, newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


# ---------------------------------------------------------------------------------------------
# manifest.csv, the output folder
# ---------------------------------------------------------------------------------------------
def _rows(out: Path) -> list[dict[str, str]]:
    """manifest.csv's rows in file order (its header checked)."""
    with open(out / MANIFEST, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == MANIFEST_FIELDS
        return list(reader)


def _as_read(r: TileResult) -> dict[str, str]:
    """A result's row as csv reads it back."""
    return {k: str(v) for k, v in r.row().items()}


def test_write_manifest_round_trip_and_merge(tmp_path: Path) -> None:
    """Rows come back as written, sorted by slide id; a later call replaces every row of the ids
    it names, keeps the others, and adds a ``locked`` row only for an id without one."""
    a = TileResult("a", "/in/a.svs", "failed", 0, 0.5, "/in/a.svs: empty file")
    b = TileResult("b", "/in/b.svs", "ok", 12, 1.234)
    c = TileResult("c", "/in/c.svs", "no_tissue")
    path = write_manifest(tmp_path, [b, a, c])
    assert path == tmp_path / MANIFEST
    assert _rows(tmp_path) == [_as_read(a), _as_read(b), _as_read(c)]
    assert _rows(tmp_path)[1]["seconds"] == "1.23"
    # a redone, c and d locked by another run: c keeps its row, d gets the locked one
    a2 = TileResult("a", "/in/a.svs", "ok", 7, 2.0)
    msg = "{}: locked by pid 1 (another tile run); skipped"
    c2 = TileResult("c", "/in/c.svs", "skipped", 0, 0.0, msg.format("c"), locked=True)
    d2 = TileResult("d", "/in/d.svs", "skipped", 0, 0.0, msg.format("d"), locked=True)
    write_manifest(tmp_path, [d2, c2, a2])
    assert _rows(tmp_path) == [_as_read(a2), _as_read(b), _as_read(c), _as_read(d2)]
    # two rows for one id (a duplicate in a batch): both kept, in the order given
    dup = TileResult("a", "/other/a.svs", "failed", 0, 0.0, "duplicate slide id 'a'")
    a3 = TileResult("a", "/in/a.svs", "skipped", 7, 0.1)
    write_manifest(tmp_path, [dup, a3])
    assert [(r["slide_id"], r["path"]) for r in _rows(tmp_path)] == [
        ("a", "/other/a.svs"),
        ("a", "/in/a.svs"),
        ("b", "/in/b.svs"),
        ("c", "/in/c.svs"),
        ("d", "/in/d.svs"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]  # no temporary or lock file


def test_write_manifest_keeps_rows_of_an_older_layout(tmp_path: Path) -> None:
    """Rows of a manifest missing some columns are kept, the missing ones blank."""
    (tmp_path / MANIFEST).write_text("slide_id,status\nold,ok\n,ok\n")
    b = TileResult("b", "/in/b.svs", "ok", 3, 0.25)
    write_manifest(tmp_path, [b])
    assert _rows(tmp_path) == [
        _as_read(b),
        {
            "slide_id": "old",
            "path": "",
            "status": "ok",
            "n_patches": "",
            "seconds": "",
            "error": "",
        },
    ]


def test_each_row_is_reported_and_written(synth_dir: Path, tmp_path: Path) -> None:
    seen: list[TileResult] = []
    out = tmp_path / "out"
    res = tile_slides(
        [synth_dir / "tiny.svs", synth_dir / "blank.svs"],
        out,
        spec=TilingSpec(tile_px=128),
        progress=False,
        on_result=seen.append,
    )
    assert [r.slide_id for r in res] == ["tiny", "blank"]  # the order given
    assert [(r.status, r.locked) for r in res] == [("ok", False), ("no_tissue", False)]
    assert {r.slide_id for r in seen} == {"tiny", "blank"} and len(seen) == 2
    assert _rows(out) == sorted((_as_read(r) for r in res), key=lambda r: r["slide_id"])


# ---------------------------------------------------------------------------------------------
# batches: bad input, reruns, resume
# ---------------------------------------------------------------------------------------------
def test_batch_with_bad_inputs(
    synth_dir: Path, testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(synth_dir / "neg.svs", src / "good.svs")
    shutil.copy(synth_dir / "blank.svs", src / "blank.svs")
    (src / "empty.svs").write_bytes(b"")
    (src / "notes.txt").write_text("not a slide")
    data = (synth_dir / "neg.svs").read_bytes()
    (src / "cut.svs").write_bytes(data[: len(data) // 2])
    shutil.copy(testdata / "broken/broken.svs", src / "garbage.svs")
    shutil.copy(testdata / "broken/unreadable.svs", src / "undecodable.svs")
    shutil.copy(testdata / "qptiff/small_vectra.qptiff", src / "fluo.qptiff")
    dup = tmp_path / "other"
    dup.mkdir()
    shutil.copy(synth_dir / "pos.svs", dup / "good.svs")  # same id as in/good.svs
    out = tmp_path / "out"
    code = main(["tile", str(src), str(dup / "good.svs"), "--out", str(out), "-q"])
    assert code == 1
    m = _manifest(out)
    assert m["good"]["status"] == "ok" and int(m["good"]["n_patches"]) > 0
    assert m["blank"]["status"] == "no_tissue"
    assert "empty file" in m["empty"]["error"]
    assert "truncated" in m["cut"]["error"] or "unsupported" in m["cut"]["error"]
    assert "unsupported" in m["garbage"]["error"]
    assert "cannot be decoded" in m["undecodable"]["error"]
    assert "fluorescence" in m["fluo"]["error"]
    assert "notes" not in m
    err = capsys.readouterr().err
    assert "duplicate slide id 'good'" in err
    for sid in ("empty", "cut", "garbage", "undecodable", "fluo"):
        assert m[sid]["status"] == "failed" and str(src) in m[sid]["error"]
        assert "\n" not in m[sid]["error"] and "Traceback" not in err
        assert not is_complete(out / f"{sid}.zarr")
    assert is_complete(out / "good.zarr")


def test_unwritable_output(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="output folder cannot be written"):
        tile_slides([synth_dir / "neg.svs"], blocker / "sub")
    # bad usage, as the README promises: exit 2
    assert main(["tile", str(synth_dir / "neg.svs"), "--out", str(blocker / "sub"), "-q"]) == 2
    assert "output folder cannot be written" in capsys.readouterr().err


def test_rerun_skips_overwrite_redoes(synth_dir: Path, tmp_path: Path) -> None:
    r1 = tile_slides([synth_dir / "neg.svs"], tmp_path, progress=False)[0]
    mtime = (tmp_path / "neg.zarr" / "zarr.json").stat().st_mtime_ns
    r2 = tile_slides([synth_dir / "neg.svs"], tmp_path, progress=False)[0]
    assert r2.status == "skipped" and r2.n_patches == r1.n_patches
    assert (tmp_path / "neg.zarr" / "zarr.json").stat().st_mtime_ns == mtime
    r3 = tile_slides([synth_dir / "neg.svs"], tmp_path, overwrite=True, progress=False)[0]
    assert r3.status == "ok" and r3.n_patches == r1.n_patches
    # a complete store of other tiling parameters is not reused
    r4 = tile_slides(
        [synth_dir / "neg.svs"], tmp_path, spec=TilingSpec(tile_px=128), progress=False
    )[0]
    assert r4.status == "ok" and SlideStore(tmp_path / "neg.zarr").tiling["tile_px"] == 128


def test_kill_mid_slide_then_rerun(synth_dir: Path, tmp_path: Path) -> None:
    """kill -9 while a slide is being written: nothing claims to be complete, finished slides stay,
    and a rerun finishes the job."""
    big = tmp_path / "big.svs"
    write_slide(big, width=6144, height=4096, mpp=0.5, seed=11)
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(synth_dir / "neg.svs", src / "a_first.svs")
    shutil.copy(big, src / "b_big.svs")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "wsi_pipeline",
        "tile",
        str(src),
        "--out",
        str(out),
        "-q",
        "--tile-size",
        "64",
        "--patches-per-shard",
        "8",
        "--codec",
        "zstd",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    shard_dir = out / "b_big.zarr" / PATCHES / "c"
    while time.time() < deadline and proc.poll() is None:
        # slides are tiled side by side (--workers: the cores): wait for the first to finish
        if is_complete(out / "a_first.zarr") and shard_dir.is_dir():
            if sum(1 for _ in shard_dir.iterdir()) >= 3:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "tiling finished before it could be killed; make the slide bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert is_complete(out / "a_first.zarr")
    assert not is_complete(out / "b_big.zarr")
    done_before = SlideStore(out / "a_first.zarr").n_patches
    proc2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr
    m = _manifest(out)
    assert m["a_first"]["status"] == "skipped" and int(m["a_first"]["n_patches"]) == done_before
    assert m["b_big"]["status"] == "ok" and is_complete(out / "b_big.zarr")
    st = SlideStore(out / "b_big.zarr")
    with open_slide(big) as s:
        i = st.n_patches - 1
        x, y = st.coords[i]
        assert np.array_equal(
            st.reader().read([i])[0], s.read_region((int(x), int(y)), 0, (64, 64))
        )


# ---------------------------------------------------------------------------------------------
# a store locked by another run
# ---------------------------------------------------------------------------------------------
def test_tile_slide_leaves_a_store_locked_by_another_run_alone(
    synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store whose lock is held (here by this live process) is waited for LOCK_WAIT_S, then
    skipped as locked, untouched; once released, the slide is tiled and no lock is left."""
    monkeypatch.setattr(tile_batch, "LOCK_WAIT_S", 0.3)
    out = tmp_path / "out"
    out.mkdir()
    store = store_path(out, "neg")
    spec = TilingSpec(tile_px=256)
    with acquire(store) as held:
        t0 = time.monotonic()
        r = tile_slide(synth_dir / "neg.svs", out, spec=spec)
        assert time.monotonic() - t0 >= 0.3
        assert held.path == lock_path(store) and held.path.exists()
    assert (r.status, r.locked, r.ok, r.n_patches) == ("skipped", True, True, 0)
    assert r.error == f"neg: locked by pid {os.getpid()} (another tile run); skipped"
    assert r.path == str((synth_dir / "neg.svs").absolute())
    assert not store.exists()
    r = tile_slide(synth_dir / "neg.svs", out, spec=spec)
    assert r.status == "ok" and not r.locked and is_complete(store)
    assert not lock_path(store).exists()


# ---------------------------------------------------------------------------------------------
# dask workers
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dask_local_cluster_matches_serial(synth_dir: Path, tmp_path: Path) -> None:
    slides = [
        synth_dir / "pos.svs",
        synth_dir / "neg.svs",
        synth_dir / "blank.svs",
        synth_dir / "tiny.svs",
    ]
    spec = TilingSpec(tile_px=128, patches_per_shard=32)
    serial = tile_slides(slides, tmp_path / "s", spec=spec, progress=False)
    environ = dict(os.environ)
    par = tile_slides(slides, tmp_path / "p", spec=spec, workers=2, processes=True, progress=False)
    # the cluster's nannies set OMP_NUM_THREADS=1 etc. here; they are taken back, or every later
    # subprocess (a training from the same notebook) would run one thread
    assert dict(os.environ) == environ
    assert [(r.slide_id, r.status, r.n_patches) for r in serial] == [
        (r.slide_id, r.status, r.n_patches) for r in par
    ]
    for r in serial:
        if r.n_patches:
            a = (
                SlideStore(tmp_path / "s" / f"{r.slide_id}.zarr")
                .reader()
                .read(np.arange(r.n_patches))
            )
            b = (
                SlideStore(tmp_path / "p" / f"{r.slide_id}.zarr")
                .reader()
                .read(np.arange(r.n_patches))
            )
            assert np.array_equal(a, b)


@pytest.mark.parametrize("kw", [{"mpp": 1.0}, {"codec": "zstd", "overlap_px": 64}])
def test_worker_threads_write_what_one_process_writes(
    synth_dir: Path, tmp_path: Path, kw: dict
) -> None:
    """``workers=2`` (threads of this process, each with its own tile cache) writes the same
    bytes as one at a time, on the decode/encode-bound paths (scaled decode, zstd, overlap)."""
    spec = TilingSpec(tile_px=128, patches_per_shard=8, **kw)
    one = tile_slides([synth_dir / "pos.svs"], tmp_path / "1", spec=spec, progress=False)
    two = tile_slides([synth_dir / "pos.svs"], tmp_path / "2", spec=spec, workers=2, progress=False)
    assert one[0].status == two[0].status == "ok" and one[0].n_patches == two[0].n_patches > 16
    shards = (tmp_path / "1" / "pos.zarr" / PATCHES).rglob("*")
    files = sorted(p.relative_to(tmp_path / "1") for p in shards if p.is_file())
    assert files
    for f in files:
        assert (tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes()


@pytest.mark.slow
def test_scheduler_address(synth_dir: Path, tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        code = main(
            [
                "tile",
                str(synth_dir / "neg.svs"),
                str(synth_dir / "pos.svs"),
                "--out",
                str(tmp_path),
                "--scheduler",
                c.scheduler_address,
                "-q",
            ]
        )
    assert code == 0
    assert is_complete(tmp_path / "neg.zarr") and is_complete(tmp_path / "pos.zarr")


@pytest.mark.slow
@pytest.mark.parametrize("lane", ["threads", "slide processes"])
def test_a_failing_slide_is_one_line_with_workers(
    synth_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch, lane: str
) -> None:
    """No dask 'Compute Failed' block per failure, even from worker processes; from the slide
    processes of a batch of small slides, the line their worker logs, relayed."""
    if lane == "slide processes":
        monkeypatch.setattr(tile_batch, "SLIDES_PER_PROCESS", 1)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide at all")
    args = ["tile", str(bad), str(synth_dir / "tiny.svs"), "--out", str(tmp_path / "o")]
    assert main([*args, "--workers", "2", "-q"]) == 1
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ERROR: ") and "bad.svs" in err[0], err


def test_decoded_tiles_do_not_outlive_their_slide(synth_dir: Path, tmp_path: Path) -> None:
    """The tile cache of a slide's source level (shared by the threads of a process, up to
    192 MB) is let go when the slide is finalised, and every one when a batch ends, so a
    notebook that tiled a cohort holds none of it."""
    from wsi_pipeline import tiling

    spec = TilingSpec(tile_px=128, mpp=1.0)
    plan = tiling.prepare_slide(synth_dir / "pos.svs", tmp_path / "one", spec=spec)
    assert isinstance(plan, tiling.SlidePlan)
    stats = [tiling.extract_shard(plan, s) for s in plan.todo]
    (level,) = [t for k, t in tiling._SOURCES.tiffs.items() if k[0] == plan.path]
    assert level is not None and level._cache  # decoded tiles, kept for the next shard
    assert tiling.finalize_slide(plan, stats).status == "ok"
    assert all(k[0] != plan.path for k in tiling._SOURCES.tiffs)
    rows = tile_slides(
        [synth_dir / "pos.svs", synth_dir / "neg.svs"],
        tmp_path / "b",
        spec=spec,
        workers=2,
        progress=False,
    )
    assert [r.status for r in rows] == ["ok", "ok"] and not tiling._SOURCES.tiffs


def test_a_failed_slide_keeps_its_lock_while_its_other_task_runs(
    synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """With two threads, one part of a slide fails while another part of it is still running:
    the slide's failed row is recorded at once, in one line, and its store's lock is held until
    the running part ends (a whole-shard task may be writing a shard then); the batch ends with
    no lock left."""
    from wsi_pipeline.errors import SlideError

    running, recorded = threading.Event(), threading.Event()
    real = tile_batch.shard_part
    calls: list[int] = []
    out = tmp_path / "out"
    store = store_path(out, "pos")
    held: list[bool] = []

    def part(plan, shard, p, n, meet):  # type: ignore[no-untyped-def]
        calls.append(p)
        if p == 0:  # the task still running when another part fails
            running.set()
            assert recorded.wait(30)  # the slide's failed row is in
            gone = time.monotonic() + 0.5
            while lock_path(store).exists() and time.monotonic() < gone:
                time.sleep(0.01)
            held.append(lock_path(store).exists())
            return real(plan, shard, p, n, meet)
        assert running.wait(30)
        raise SlideError("tiles cannot be decoded (test)", path=plan.path)

    def on_result(r: Any) -> None:
        recorded.set()

    monkeypatch.setattr(tile_batch, "shard_part", part)
    (r,) = tile_slides(
        [synth_dir / "pos.svs"],
        out,
        spec=TilingSpec(tile_px=128, mpp=1.0),
        workers=2,
        progress=False,
        on_result=on_result,
    )
    assert r.status == "failed" and "tiles cannot be decoded (test)" in r.error
    assert held == [True]  # the running part still had the slide's lock
    assert not lock_path(store).exists() and not is_complete(store)
    errors = [x.getMessage() for x in caplog.records if x.levelname == "ERROR"]
    assert 0 in calls and len(errors) == 1  # one line, whichever parts failed


def test_shards_extracted_in_parts_are_the_same_bytes(synth_dir: Path, tmp_path: Path) -> None:
    """A slide of fewer shards than twice the workers has each shard extracted in parts side by
    side (so every thread has work) and written whole: the very bytes of a one-shard-at-a-time
    run, copied tiles and encoded patches alike."""
    from wsi_pipeline.store import PATCHES
    from wsi_pipeline.tile_batch import _parts_per_shard

    assert _parts_per_shard(1, 2) == 2 and _parts_per_shard(3, 2) == 2
    assert _parts_per_shard(1, 3) == 4 and _parts_per_shard(2, 8) == 4
    assert _parts_per_shard(4, 2) == 2 and _parts_per_shard(1, 8) == 8
    assert _parts_per_shard(15, 2) == 2 and _parts_per_shard(16, 2) == 1
    assert _parts_per_shard(1, 1) == 1
    for spec in (TilingSpec(tile_px=128, mpp=1.0), TilingSpec(tile_px=256, overlap_px=128)):
        runs = {}
        for workers in (1, 2, 3):
            out = tmp_path / f"{spec.tile_px}_{workers}"
            (r,) = tile_slides(
                [synth_dir / "pos.svs"], out, spec=spec, workers=workers, progress=False
            )
            assert r.status == "ok"
            st = SlideStore(out / "pos.zarr")
            runs[workers] = (
                st.tiling.get("copied_source_tiles"),
                sorted(
                    (p.relative_to(st.path), p.read_bytes())
                    for p in (st.path / PATCHES / "c").rglob("*")
                    if p.is_file()
                ),
            )
        n_shards = len(runs[1][1])
        assert 0 < n_shards < 6  # so the 3-thread run split its shards into parts
        assert runs[1] == runs[2] == runs[3]


def test_copied_tiles_go_one_shard_at_a_time(
    synth_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """A slide whose patches are all its own JPEG tiles, copied, is interpreter work that
    threads only contend for: with ``workers=2`` its shards run one at a time (debug line),
    and the slide is prepared (the pool decoding half its thumbnail) and its shards run by the
    calling thread when it is alone in its batch, writing what one process writes; a resampled
    slide is not chained."""
    from wsi_pipeline.tiling import SlidePlan, extract_shard, prepare_slide

    native = TilingSpec(tile_px=256, patches_per_shard=4)
    plan = prepare_slide(synth_dir / "pos.svs", tmp_path / "plan", spec=native)
    assert isinstance(plan, SlidePlan) and plan.copies and len(plan.todo) > 2
    for i, spec in enumerate((TilingSpec(mpp=1.0), TilingSpec(tile_px=256, overlap_px=128))):
        other = prepare_slide(synth_dir / "pos.svs", tmp_path / f"plan{i}", spec=spec)
        assert isinstance(other, SlidePlan) and not other.copies  # decoded (3 in 4 with overlap)
    runs = {}
    threads: list[str] = []
    pools: list[bool] = []

    def traced(fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            if fn is prepare_slide:  # given the idle threads for its thumbnail?
                pools.append(kwargs.get("pool") is not None)
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(tile_batch, "extract_shard", traced(extract_shard))
    monkeypatch.setattr(tile_batch, "prepare_slide", traced(prepare_slide))
    for workers in (1, 2):
        with caplog.at_level("DEBUG", logger="wsi_pipeline.tile_batch"):
            caplog.clear()
            (r,) = tile_slides(
                [synth_dir / "pos.svs"], tmp_path / str(workers), spec=native, workers=workers
            )
        assert r.status == "ok"
        chained = "source tiles copied; its shards run one at a time" in caplog.text
        assert chained == (workers == 2)
        # alone in its batch: nothing to run beside it, so this thread prepares it and runs
        # its shards
        assert set(threads) == {threading.current_thread().name}
        assert pools == [workers == 2]  # and the pool's idle threads decode half its thumbnail
        threads.clear()
        pools.clear()
        st = SlideStore(tmp_path / str(workers) / "pos.zarr")
        files = (st.path / PATCHES).rglob("*")
        runs[workers] = sorted(
            (p.relative_to(st.path), p.read_bytes()) for p in files if p.is_file()
        )
    assert runs[1] == runs[2]
    # beside another slide, its shards go to the threads, one at a time
    with caplog.at_level("DEBUG", logger="wsi_pipeline.tile_batch"):
        caplog.clear()
        res = tile_slides(
            [synth_dir / "pos.svs", synth_dir / "neg.svs"], tmp_path / "two", spec=native, workers=2
        )
    assert [r.status for r in res] == ["ok", "ok"]
    assert caplog.text.count("its shards run one at a time") == 2
    assert caplog.text.count("in this thread (no other slide beside it)") <= 1
    assert any(t.startswith("wsi-tile") for t in threads)
    assert pools == [False, False]  # the threads are busy with the other slide


def test_manifest_written_in_batches_and_when_stopped(
    synth_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The manifest is rewritten at most every MANIFEST_EVERY_S seconds (each write reads and
    rewrites the whole table), and once at the end; a batch stopped half-way (here by an
    interrupt from the caller's callback) still leaves the rows of the slides it finished."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(synth_dir / "neg.svs", src / f"{name}.svs")
    writes: list[list[str]] = []

    def counted(out_dir: Any, rows: Any) -> Path:
        rows = list(rows)
        writes.append(sorted(r.slide_id for r in rows))
        return write_manifest(out_dir, rows)

    monkeypatch.setattr(tile_batch, "write_manifest", counted)
    monkeypatch.setattr(tile_batch, "MANIFEST_EVERY_S", 3600.0)
    spec = TilingSpec(tile_px=256)
    res = tile_slides([src], tmp_path / "out", spec=spec, progress=False)
    assert [r.status for r in res] == ["ok"] * 3
    assert writes == [["a", "b", "c"]]  # one write for the batch
    assert sorted(_manifest(tmp_path / "out")) == ["a", "b", "c"]

    def stop_after_two(r: TileResult) -> None:
        if len(done) == 1:
            raise KeyboardInterrupt
        done.append(r.slide_id)

    for workers in (1, 2):
        done: list[str] = []
        out = tmp_path / f"stopped{workers}"
        with pytest.raises(KeyboardInterrupt):
            tile_slides(
                [src], out, spec=spec, progress=False, workers=workers, on_result=stop_after_two
            )
        rows = _manifest(out)
        assert len(rows) == 2 and all(r["status"] == "ok" for r in rows.values()), rows
        assert all(is_complete(store_path(out, sid)) for sid in rows)
    monkeypatch.setattr(tile_batch, "MANIFEST_EVERY_S", 0.0)
    writes.clear()
    tile_slides([src], tmp_path / "each", spec=spec, progress=False)
    assert writes == [["a"], ["b"], ["c"]]  # every row at once when the interval is 0


def test_many_small_slides_are_tiled_by_processes(
    synth_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """A batch of many small slide files is tiled by worker processes, each taking whole slides
    (debug line; one for every SLIDES_PER_PROCESS slides, up to the workers): the same stores
    and rows as one process, a bad slide's one line relayed from its worker. Too few slides
    for two, or one big file, and it stays with threads."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"s{i}.svs").symlink_to(synth_dir / ("pos.svs" if i % 2 else "neg.svs"))
    (src / "bad.svs").write_bytes(b"not a slide at all")
    monkeypatch.setattr(tile_batch, "SLIDES_PER_PROCESS", 3)  # 7 slides: enough for 2
    spec = TilingSpec(tile_px=128, patches_per_shard=16)
    lane = "2 processes, each tiling whole slides"
    with caplog.at_level("DEBUG", logger="wsi_pipeline.tile_batch"):
        two = tile_slides([src], tmp_path / "2", spec=spec, workers=2, progress=False)
    assert lane in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "bad.svs" in errors[0] and "unsupported" in errors[0]
    one = tile_slides([src], tmp_path / "1", spec=spec, workers=1, progress=False)
    assert [(r.slide_id, r.status, r.n_patches, r.error) for r in two] == [
        (r.slide_id, r.status, r.n_patches, r.error) for r in one
    ]
    assert sorted(r.status for r in two) == ["failed"] + ["ok"] * 6
    assert sorted(_manifest(tmp_path / "2")) == sorted(r.slide_id for r in one)
    files = sorted(
        p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*") if p.is_file()
    )
    patches = [f for f in files if PATCHES in f.parts]
    assert len(patches) >= 6
    for f in patches:
        assert (tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes()
    assert all(is_complete(tmp_path / "2" / f"s{i}.zarr") for i in range(6))
    # a process for every SLIDES_PER_PROCESS slides, not one for each of 4 workers
    caplog.clear()
    with caplog.at_level("DEBUG", logger="wsi_pipeline.tile_batch"):
        four = tile_slides([src], tmp_path / "4", spec=spec, workers=4, progress=False)
    assert "--workers 4: 7 slide files of at most 64 MB: 2 processes" in caplog.text
    assert [r.status for r in four] == [r.status for r in one]
    # too few slides for two workers; or one file too big to count as small: threads
    for per, big in ((4, 1 << 30), (3, (synth_dir / "pos.svs").stat().st_size - 1)):
        monkeypatch.setattr(tile_batch, "SLIDES_PER_PROCESS", per)
        monkeypatch.setattr(tile_batch, "SMALL_SLIDE_BYTES", big)
        caplog.clear()
        with caplog.at_level("DEBUG", logger="wsi_pipeline.tile_batch"):
            tile_slides([src], tmp_path / f"t{per}", spec=spec, workers=2, progress=False)
        assert lane not in caplog.text and "threads in this process" in caplog.text


def test_help_and_readme_state_the_small_slide_rule() -> None:
    """``tile --help`` and the README say how many small slides a worker process gets, and the
    size of a small file, as the tiler counts them (they said 32 slides after it became 64)."""
    from click.testing import CliRunner

    from wsi_pipeline.cli import cli

    helptext = " ".join(CliRunner().invoke(cli, ["tile", "--help"]).output.split())
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    per, mb = tile_batch.SLIDES_PER_PROCESS, tile_batch.SMALL_SLIDE_BYTES >> 20
    assert f"a worker process for every {per} of them" in helptext
    assert f"each at most {mb} MB" in helptext
    assert f"one for every {per} slides up to N" in readme
    assert f"each at most {mb} MB" in readme


def _worker_threads_env(_: int) -> dict[str, str | None]:
    import os as os_

    return {k: os_.environ.get(k) for k in tile_batch.WORKER_ENV}


def test_slide_processes_start_with_one_thread_each(monkeypatch) -> None:
    """Worker processes start with OpenBLAS/OpenMP/OpenCV pinned to one thread (set before
    their libraries load), and this process's environment is put back after."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        with tile_batch._worker_environ():
            f = pool.submit(_worker_threads_env, 0)
        assert f.result() == tile_batch.WORKER_ENV
    assert dict(os.environ) == before


def test_slide_processes_do_not_rerun_an_unguarded_script(synth_dir: Path, tmp_path: Path) -> None:
    """A user's script that calls ``tile_slides`` at its top level, without an ``if __name__ ==
    "__main__":`` guard, is run once: the slide worker processes are started without it."""
    script = tmp_path / "run.py"
    script.write_text(
        "import wsi_pipeline.tile_batch as tb\n"
        "print('script ran', flush=True)\n"
        "tb.SLIDES_PER_PROCESS = 1\n"
        f"res = tb.tile_slides([{str(synth_dir / 'neg.svs')!r}, {str(synth_dir / 'tiny.svs')!r}],"
        f" {str(tmp_path / 'out')!r}, workers=2, progress=False)\n"
        "print(sorted(r.status for r in res), flush=True)\n"
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["script ran", "['ok', 'ok']"], proc.stdout + proc.stderr


def test_tiling_never_imports_zarr(synth_dir: Path, tmp_path: Path) -> None:
    """A tiling process writes, resumes and skips stores without importing zarr (a third of a
    second of every ``tile`` process and worker; ``store.create_store`` writes the bytes zarr
    would), one process or threads, native or resampled; the stores then read through zarr."""
    out = tmp_path / "out"
    slides = [str(synth_dir / "neg.svs"), str(synth_dir / "tiny.svs")]
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from wsi_pipeline.specs import TilingSpec\n"
        "from wsi_pipeline.tile_batch import tile_slides\n"
        "runs = [(1, None, True), (2, 1.0, True), (2, 1.0, False)]\n"
        "for workers, mpp, fresh in runs:\n"
        f"    res = tile_slides({slides!r}, {str(out)!r}, spec=TilingSpec(mpp=mpp),\n"
        "                      workers=workers, progress=False, overwrite=fresh)\n"
        "    print(sorted(r.status for r in res), 'zarr' in sys.modules, flush=True)\n"
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "['ok', 'ok'] False",
        "['no_tissue', 'ok'] False",  # tiny: no patch of 256 µm
        "['skipped', 'skipped'] False",
    ], proc.stdout + proc.stderr
    st = SlideStore(store_path(out, "neg"))
    through_zarr = open_store(store_path(out, "neg"))[PATCHES][0]
    assert st.n_patches > 0 and np.array_equal(st.reader().read([0])[0], through_zarr)
    assert SlideStore(store_path(out, "tiny")).n_patches == 0


def test_a_slide_worker_that_dies_leaves_its_slides_to_threads(
    synth_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """A slide worker process killed mid-batch (out of memory, a signal) stops no batch and
    hangs none: one warning line, and the slides not done are tiled by this process's threads
    (the one it was tiling resumed or redone), every store complete."""
    import multiprocessing

    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        (src / f"s{i}.svs").symlink_to(synth_dir / "pos.svs")
    monkeypatch.setattr(tile_batch, "SLIDES_PER_PROCESS", 2)
    killed: list[int] = []
    out = tmp_path / "out"

    def kill_a_worker(r: TileResult) -> None:
        """After a slide's result: SIGKILL the worker holding a slide's lock (mid-slide)."""
        holders = [info.pid for f in out.glob("*.lock") if (info := read_lock(f)) and info.pid]
        workers = {p.pid for p in multiprocessing.active_children()}
        if not killed and set(holders) & workers:
            os.kill(sorted(set(holders) & workers)[0], signal.SIGKILL)
            killed.extend(workers)

    res = tile_slides(
        [src], out, spec=TilingSpec(tile_px=128), workers=2, progress=False, on_result=kill_a_worker
    )
    assert killed
    # a slide a worker finished just before the pool broke, its result lost with it, is found
    # complete by the threads: skipped, with its patches
    assert {r.status for r in res} <= {"ok", "skipped"} and all(r.n_patches > 0 for r in res)
    assert all(is_complete(out / f"s{i}.zarr") for i in range(12))
    assert len(_manifest(out)) == 12
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "a tile worker process died" in warned[0] and "tiled in this process" in warned[0]
    # the slides they were tiling (the pool ends the other worker too): their locks, left by
    # the dead workers, taken over
    takeovers = [w for w in warned[1:] if "no longer running" in w]
    assert len(takeovers) == len(warned) - 1
    assert all(any(f"of pid {pid} " in w for pid in killed) for w in takeovers)
    assert len(warned) <= 3, warned


def _tile_in_a_daemon(src: str, out: str) -> list[str]:
    """Run in a ``multiprocessing.Pool`` worker (a daemonic process): tile a batch that would
    otherwise go to slide processes."""
    tile_batch.SLIDES_PER_PROCESS = 1
    return [r.status for r in tile_slides([src], out, workers=2, progress=False)]


def test_a_daemonic_process_tiles_small_slides_with_threads(
    synth_dir: Path, tmp_path: Path
) -> None:
    """Inside a ``multiprocessing.Pool`` worker, which may not start processes of its own, a
    batch of small slides is tiled by threads instead of failing ("daemonic processes are not
    allowed to have children")."""
    import multiprocessing

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"s{i}.svs").symlink_to(synth_dir / "neg.svs")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_tile_in_a_daemon, (str(src), str(tmp_path / "out")))
    assert got == ["ok"] * 3


def test_no_worker_processes_here_means_threads(
    synth_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """Where worker processes cannot be started (no POSIX semaphores in some sandboxes: the
    pool raises OSError), a batch of small slides is tiled by threads, with one warning line."""
    import concurrent.futures

    def no_semaphores(*args: Any, **kwargs: Any) -> Any:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_semaphores)
    monkeypatch.setattr(tile_batch, "SLIDES_PER_PROCESS", 1)
    res = tile_slides(
        [synth_dir / "neg.svs", synth_dir / "tiny.svs"], tmp_path, workers=2, progress=False
    )
    assert [r.status for r in res] == ["ok", "ok"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "cannot start tile worker processes ([Errno 38] Function not implemented); "
        "the slides are tiled by threads"
    ]


def test_two_ends_of_a_range_share_its_patches_and_meet_once() -> None:
    """Parts that share a range (:class:`~wsi_pipeline.tiling.MeetingRange`) take its patches
    from the front and the back, each once, until they meet; a shard whose range one end took
    whole is in without the other's part (it is written at once, not kept in memory until
    that part comes back); the slide's parts go out first-front, last-back, in turn."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_pipeline.tile_batch import _part_order, _shard_in
    from wsi_pipeline.tiling import MeetingRange

    meet = MeetingRange(10, 5010)

    def take(front: bool) -> list[int]:
        got: list[int] = []
        while (i := meet.take(front)) is not None:
            got.append(i)
        return got

    with ThreadPoolExecutor(2) as ex:
        front, back = ex.map(take, (True, False))
    assert front == list(range(10, 10 + len(front)))  # each end contiguous, in its order
    assert back == list(range(5009, 5009 - len(back), -1))
    assert sorted(front + back) == list(range(10, 5010))  # every patch once
    assert not meet.taken_all(front=True) or not back

    alone = MeetingRange(0, 3)
    assert [alone.take(True) for _ in range(4)] == [0, 1, 2, None]
    assert alone.taken_all(front=True) and not alone.taken_all(front=False)
    assert _shard_in([alone], {0: "front"}) and not _shard_in([alone], {1: "back"})
    split = MeetingRange(0, 4)
    assert split.take(True) == 0 and split.take(False) == 3
    assert split.take(True) == 1 and split.take(False) == 2 and split.take(True) is None
    assert not _shard_in([split], {0: "front"}) and _shard_in([split], {0: "f", 1: "b"})
    stopped = MeetingRange(0, 9)
    stopped.stop()  # the other end failed
    assert stopped.take(True) is None and stopped.take(False) is None

    assert _part_order([0, 1, 2], 2) == [(0, 0), (2, 1), (1, 0), (1, 1), (2, 0), (0, 1)]
    assert _part_order([4], 4) == [(4, 0), (4, 3), (4, 2), (4, 1)]


def test_opencv_runs_one_thread_while_tiling_threads_run(
    synth_dir: Path, tmp_path: Path, monkeypatch, request
) -> None:
    """OpenCV's own pool is pinned to one thread while the tiling threads warp patches (each
    warping over every core, they wait for each other), and given back its count after."""
    import cv2

    seen: list[int] = []
    real = tile_batch.shard_part

    def part(*args):  # type: ignore[no-untyped-def]
        seen.append(cv2.getNumThreads())
        return real(*args)

    monkeypatch.setattr(tile_batch, "shard_part", part)
    machine = cv2.getNumThreads()
    request.addfinalizer(lambda: cv2.setNumThreads(machine))
    cv2.setNumThreads(2)  # a pool of two to pin, whatever this machine's cores
    before = cv2.getNumThreads()
    assert before == 2
    (r,) = tile_slides(
        [synth_dir / "pos.svs"],
        tmp_path / "out",
        spec=TilingSpec(tile_px=128, mpp=1.0),
        workers=2,
        progress=False,
    )
    assert r.status == "ok" and seen and set(seen) == {1}
    assert cv2.getNumThreads() == before
    # and with one worker (a batch, or one slide through tile_slide): one core, not OpenCV's
    # pool spread over all of them for each warp
    real_extract = tile_batch.extract_shard

    def shard(*args):  # type: ignore[no-untyped-def]
        seen.append(cv2.getNumThreads())
        return real_extract(*args)

    monkeypatch.setattr(tile_batch, "extract_shard", shard)
    spec = TilingSpec(tile_px=128, mpp=1.0)
    seen.clear()
    (r,) = tile_slides(
        [synth_dir / "pos.svs"], tmp_path / "w1", spec=spec, workers=1, progress=False
    )
    assert r.status == "ok" and seen and set(seen) == {1} and cv2.getNumThreads() == before
    seen.clear()
    r = tile_batch.tile_slide(synth_dir / "pos.svs", tmp_path / "one", spec=spec)
    assert r.status == "ok" and seen and set(seen) == {1} and cv2.getNumThreads() == before
