"""Faults around ``predict``'s scores: another model's scores in ``report`` and ``view``, two
``predict`` (and two ``heatmap``) processes on one folder, and a full disk.

Everything runs on copies of the ``small_cohort`` stores and the ``fast_run`` run: real stores,
real processes. The full-disk tests write onto a real, small tmpfs (mounted here when the tests
run as root; skipped, saying why, otherwise) and fill it to a few pages from the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import copy_run, wait_until

from wsi_pipeline import runs
from wsi_pipeline.cli import main
from wsi_pipeline.locks import acquire
from wsi_pipeline.prediction import read_predictions
from wsi_pipeline.report import write_report
from wsi_pipeline.store import (
    class_scores_key,
    has_complete_array,
    open_store,
    remove_scores,
    scores_key,
)
from wsi_pipeline.viewer import make_server

RID = "run"  # the run folders below are named "run": scores/run in the stores
ROOT = Path(__file__).resolve().parents[1]
IDS = [f"synth_{i:03d}" for i in range(8)]


def leftovers(folder: Path) -> list[str]:
    """Temporary and lock files left under ``folder``."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.endswith((".tmp", ".partial", ".lock", ".takeover"))
    )


def scores(stores: Path, rid: str = RID) -> dict[str, np.ndarray]:
    """``scores/<rid>`` of every store that has finished ones."""
    out = {}
    for sp in sorted(stores.glob("*.zarr")):
        g = open_store(sp)
        if has_complete_array(g, scores_key(rid)):
            out[sp.stem] = np.asarray(g[scores_key(rid)][...])
    return out


def finished(store: Path, rid: str = RID) -> bool:
    """``scores/<rid>`` of ``store`` is marked complete (read from its file as it is now)."""
    try:
        attrs = json.loads((store / "scores" / rid / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        return False
    return attrs.get("complete") is True


def cli(*args: str | Path) -> subprocess.Popen:
    """``python -m wsi_pipeline ARGS -q`` in its own process (text output kept)."""
    return subprocess.Popen(
        [sys.executable, "-m", "wsi_pipeline", *map(str, args), "-q"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture()
def predicted(small_cohort: tuple[Path, Path], fast_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A pipeline-like folder ``out`` (``stores/``, ``predictions/predictions.csv``) predicted by
    a copy of ``fast_run`` at ``tmp_path/run``: ``(out, run)``."""
    out = tmp_path / "out"
    stores = shutil.copytree(small_cohort[0], out / "stores")
    run = copy_run(fast_run, tmp_path / RID)
    assert main(["predict", str(stores), "--run", str(run), "-o", str(out / "predictions")]) == 0
    return out, run


@pytest.fixture(scope="module")
def reference(
    small_cohort: tuple[Path, Path], fast_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An uninterrupted, lone predict and heatmap of the small cohort by ``fast_run``:
    ``root`` with ``stores/``, ``pred/predictions.csv`` and ``hm/``."""
    root = tmp_path_factory.mktemp("reference")
    stores = shutil.copytree(small_cohort[0], root / "stores")
    assert main(["predict", str(stores), "--run", str(fast_run), "-o", str(root / "pred")]) == 0
    assert main(["heatmap", str(stores), "--run", str(fast_run), "-o", str(root / "hm")]) == 0
    return root


def retrain(run: Path) -> None:
    """Another model in the run folder, as a retrain leaves it (other weights in model.pt)."""
    state = torch.load(run / runs.MODEL, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 0.05
    torch.save(state, run / runs.MODEL)


# ---------------------------------------------------------------------------------------------
# report and view: scores of an earlier model of the run are not drawn
# ---------------------------------------------------------------------------------------------
def test_report_does_not_draw_an_earlier_models_scores(
    predicted: tuple[Path, Path], tmp_path: Path
) -> None:
    out, run = predicted
    page = write_report(out, run_dir=run, dest=tmp_path / "before.html").read_text()
    assert page.count('alt="heatmap: P abnormal') == 8  # the current model's: drawn
    retrain(run)
    # the run named (--run), and the run folder predict recorded with the scores (no --run)
    for extra in (["--run", str(run)], []):
        dest = tmp_path / "after.html"
        assert main(["report", str(out), "--dest", str(dest), *extra]) == 0
        page = dest.read_text()
        assert 'alt="heatmap:' not in page and "top-scoring patches" not in page
        assert page.count("was written by another model") == 8
        assert page.count("rerun &#x27;wsi-pipeline predict --run run&#x27;") == 8
        assert page.count("prediction: none") == 8  # nor the earlier model's prediction
        assert "predicted: 0 of 8 slide(s)" in page


def test_view_does_not_overlay_an_earlier_models_scores(
    predicted: tuple[Path, Path], tmp_path: Path
) -> None:
    out, run = predicted
    osd = tmp_path / "osd"  # the page's script is not under test here: a stand-in file
    osd.mkdir()
    (osd / "openseadragon.min.js").write_text("// stand-in\n")

    def fetch(run_dir: Path | None, path: str) -> tuple[int, str]:
        srv = make_server(
            [out / "stores"], slide_ids=["synth_000"], run_id=RID, run_dir=run_dir, osd_dir=osd
        )
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        host, port = srv.server_address[:2]
        try:
            with urllib.request.urlopen(f"http://{host!s}:{port}{path}", timeout=60) as r:
                return r.status, r.read().decode("latin-1")
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        finally:
            srv.shutdown()
            srv.server_close()

    assert fetch(run, "/heatmap/synth_000.png")[0] == 200  # the current model's: shown
    retrain(run)
    for run_dir in (run, None):  # --run, or the run folder recorded with the scores
        status, page = fetch(run_dir, "/slide/synth_000")
        assert status == 200 and "HAS_HEAT=false" in page
        assert "was written by another model" in page and "predict --run run" in page
        assert fetch(run_dir, "/heatmap/synth_000.png")[0] == 404
        assert fetch(run_dir, "/regions/synth_000.geojson")[0] == 404


def test_heatmap_does_not_draw_an_earlier_models_attention(
    predicted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attention weights are checked as scores are, by the model that wrote them: a stale
    ``-attention`` array next to the current model's scores (an earlier model's, left by a
    predict of another head), or alone where the scores were removed, is refused in one line,
    and the current model's is drawn."""
    from wsi_pipeline.store import write_scores

    out, run = predicted
    stores = out / "stores"
    made_by = {"synth_000": "0123456789abcdef", "synth_001": runs.model_id(run)}
    made_by["synth_002"] = "feedbeef00000000"
    for sid, model in made_by.items():
        g = open_store(stores / f"{sid}.zarr", mode="r+")
        n = int(g["coords"].shape[0])
        attn = np.full(n, 1.0 / n, np.float32)
        write_scores(g, RID, attn, {"run": RID, "model_id": model}, attention=True)
    del open_store(stores / "synth_002.zarr", mode="r+")[scores_key(RID)]  # attention left
    hm = tmp_path / "hm"
    argv = ["heatmap", str(stores), "--run", str(run), "-o", str(hm), "--which", "attention"]
    assert main([*argv, *(a for sid in made_by for a in ("--slide", sid))]) == 1
    assert (hm / "synth_001" / "synth_001_attention_overlay.png").is_file()
    assert sorted(p.name for p in hm.iterdir()) == ["synth_001"]
    err = [ln for ln in capsys.readouterr().err.splitlines() if "ERROR" in ln]
    assert len(err) == 2 and all("was written by another model" in ln for ln in err)
    assert "synth_000.zarr" in err[0] and "synth_002.zarr" in err[1]


def test_predict_leaves_no_earlier_models_array_behind(
    predicted: tuple[Path, Path], small_cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    """A predict replaces every array of its run in a store: the attention array an earlier
    model with attention (``fast_run``'s abmil) wrote is removed when the run folder, trained
    again with a head without attention (top-k), predicts the store again."""
    from helpers import FAST

    from wsi_pipeline.specs import TrainConfig
    from wsi_pipeline.training import train

    out, run = predicted
    store = out / "stores" / "synth_000.zarr"
    assert scores_key(RID, attention=True) in open_store(store)  # abmil's
    cfg = TrainConfig(**{**FAST, "model": "topk"})
    train(out / "stores", small_cohort[1], run, config=cfg, progress=False)
    argv = ["predict", str(out / "stores"), "--run", str(run), "-o", str(tmp_path / "again")]
    assert main([*argv, "--slide", "synth_000", "-q"]) == 0
    g = open_store(store)
    assert scores_key(RID, attention=True) not in g
    assert g[scores_key(RID)].attrs["model_id"] == runs.model_id(run)


def test_a_rerun_clears_what_a_killed_predict_left_half_written(
    predicted: tuple[Path, Path], tmp_path: Path
) -> None:
    """A predict killed between zarr-python's write of a key and its rename leaves
    ``<key>.<hex>.partial`` files in the store (bench_faults.py found two after a kill). zarr
    never reads them; the next predict of the store, holding its lock, removes them and writes
    the same scores."""
    out, run = predicted
    store = out / "stores" / "synth_004.zarr"
    before = scores(out / "stores")["synth_004"]
    litter = [store / "zarr.964207fa6b344bb5a452cf743e88049d.partial"]
    litter.append(store / "scores" / "zarr.1456db2cf1a5410e80b9e8d46b3cb4ef.partial")
    for f in litter:
        f.write_bytes(b'{"zarr_format": 3, "node_type": "gr')  # cut short
    argv = ["predict", str(out / "stores"), "--run", str(run), "-o", str(tmp_path / "again")]
    assert main([*argv, "--slide", "synth_004", "-q"]) == 0
    assert leftovers(out / "stores") == []
    np.testing.assert_array_equal(scores(out / "stores")["synth_004"], before)


# ---------------------------------------------------------------------------------------------
# two predict / heatmap processes on one folder
# ---------------------------------------------------------------------------------------------
def test_two_predicts_wait_for_each_others_stores(
    small_cohort: tuple[Path, Path], fast_run: Path, reference: Path, tmp_path: Path
) -> None:
    """Two real ``predict`` processes on the same stores and output folder, while a third
    writer (this test, through the same lock) holds the last store: neither writes that store
    while it is held, both finish once it is released, and the stores and predictions.csv are
    those of a lone predict."""
    stores = shutil.copytree(small_cohort[0], tmp_path / "stores")
    pred = tmp_path / "pred"
    held = stores / "synth_007.zarr"
    remove_scores(open_store(held, mode="r+"), RID)  # none yet, whatever the fixture holds
    lock = acquire(held)
    try:
        procs = [cli("predict", stores, "--run", fast_run, "-o", pred) for _ in range(2)]
        before = stores / "synth_006.zarr"
        for p in procs:
            wait_until(lambda: finished(before), p, "the 7th store's scores")
        time.sleep(2.0)
        assert all(p.poll() is None for p in procs), "a predict did not wait for the lock"
        assert not (held / "scores" / RID).exists(), "a store was written under another's lock"
    finally:
        lock.release()
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert "Traceback" not in err and not err.strip(), err
    want = scores(reference / "stores")
    got = scores(stores)
    assert got.keys() == want.keys() == set(IDS)
    for sid in IDS:
        np.testing.assert_allclose(got[sid], want[sid], atol=1e-5, err_msg=sid)
        g = open_store(stores / f"{sid}.zarr")
        assert has_complete_array(g, class_scores_key(RID))
    rows = read_predictions(pred / runs.PREDICTIONS)
    ref = {r["slide_id"]: r for r in read_predictions(reference / "pred" / runs.PREDICTIONS)}
    assert [r["slide_id"] for r in rows] == IDS
    for r in rows:
        assert (
            r["error"] == ""
            and abs(float(r["probability"]) - float(ref[r["slide_id"]]["probability"])) < 1e-5
        )
    assert leftovers(stores) == [] and leftovers(pred) == []


def test_two_heatmaps_take_turns_on_a_slide(
    reference: Path, fast_run: Path, tmp_path: Path
) -> None:
    """Two real ``heatmap`` processes into one folder, while the last slide's folder is held:
    nothing is written there while it is held, both finish, and every file is a lone run's."""
    stores = reference / "stores"
    out = tmp_path / "hm"
    out.mkdir()
    lock = acquire(out / "synth_007")
    try:
        procs = [cli("heatmap", stores, "--run", fast_run, "-o", out) for _ in range(2)]
        last = out / "synth_006" / "synth_006_score_summary.json"
        for p in procs:
            wait_until(last.exists, p, "the 7th slide's summary")
        time.sleep(2.0)
        assert all(p.poll() is None for p in procs), "a heatmap did not wait for the lock"
        assert not (out / "synth_007").exists(), "a folder was written under another's lock"
    finally:
        lock.release()
    for p in procs:
        stdout, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert "Traceback" not in err and not err.strip(), err
        assert "heatmaps for 8 of 8 slide(s)" in stdout
    assert leftovers(out) == [] and leftovers(stores) == []
    want_dir = reference / "hm"
    want = sorted(p.relative_to(want_dir) for p in want_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == want
    for rel in want:
        if rel.name.endswith("_summary.json"):
            a, b = (json.loads((d / rel).read_text()) for d in (out, want_dir))
            assert a["params"] == b["params"] and a["files"] == b["files"], rel
        else:
            assert (out / rel).read_bytes() == (want_dir / rel).read_bytes(), rel


# ---------------------------------------------------------------------------------------------
# a full disk: a real small tmpfs
# ---------------------------------------------------------------------------------------------
PAGE = 4096


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs mounted at ``tmp_path/disk`` (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    """Fill ``disk`` but ``leave_bytes`` (rounded to pages)."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    assert free > leave_bytes
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * (free - leave_bytes))


def err_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.strip()]


def test_disk_full_during_predict(
    small_cohort: tuple[Path, Path],
    fast_run: Path,
    reference: Path,
    small_disk: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The disk fills up in the middle of the stores: one line naming the store and "disk
    full", exit 1; the stores before keep the new scores, the earlier run's scores stay in every
    store, the store being written has none of the new run (not half of them), no temporary or
    lock file is left, predictions.csv is whole; with room again, a rerun finishes."""
    stores = shutil.copytree(small_cohort[0], small_disk / "stores")
    pred = small_disk / "pred"
    assert main(["predict", str(stores), "--run", str(fast_run), "-o", str(pred), "-q"]) == 0
    csv_before = (pred / runs.PREDICTIONS).read_bytes()
    earlier = scores(stores)
    capsys.readouterr()
    # scores of another run id need new room: ~6 pages a store, and a page for its lock
    fill(small_disk, 20 * PAGE)
    args = ["predict", str(stores), "--run", str(fast_run), "-o", str(pred), "--run-id", "other"]
    assert main([*args, "-q"]) == 1
    lines = err_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    done = scores(stores, "other")
    k = len(done)
    assert 0 < k < 8, k
    assert list(done) == IDS[:k]
    stopped = stores / f"{IDS[k]}.zarr"
    assert lines[0].startswith(f"error: disk full writing {stopped}")
    assert lines[0].endswith(f"; stopped after {k} of 8 slides")
    for sid in IDS[k:]:
        g = open_store(stores / f"{sid}.zarr")
        assert not any(key.startswith("other") for key in g["scores"].array_keys()), sid
    for sid in IDS[:k]:
        np.testing.assert_allclose(done[sid], earlier[sid], atol=1e-5)
    now = scores(stores)
    assert now.keys() == earlier.keys() and all(np.array_equal(now[s], earlier[s]) for s in now)
    assert leftovers(small_disk) == []
    csv_now = (pred / runs.PREDICTIONS).read_bytes()
    if csv_now != csv_before:  # rewritten: whole, with every slide
        rows = read_predictions(pred / runs.PREDICTIONS)
        assert [r["slide_id"] for r in rows] == IDS
        assert all(r["probability"] for r in rows[:k])
        assert all("disk full" in r["error"] for r in rows[k:])
    (small_disk / "filler").unlink()
    assert main([*args, "-q"]) == 0
    assert scores(stores, "other").keys() == set(IDS)


def test_disk_full_during_heatmap(
    reference: Path, fast_run: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The heatmap folder's disk fills up at the third slide: one line naming the file being
    written and "disk full", exit 1; the slides before are whole, the one being written has no
    summary (not finished), no temporary or lock file is left; a rerun with room finishes."""
    want_dir = reference / "hm"
    per_slide = max(
        sum(-(-p.stat().st_size // PAGE) * PAGE for p in d.iterdir()) for d in want_dir.iterdir()
    )
    out = small_disk / "hm"
    out.mkdir()
    fill(small_disk, int(2.5 * per_slide))
    args = ["heatmap", str(reference / "stores"), "--run", str(fast_run), "-o", str(out), "-q"]
    assert main(args) == 1
    lines = err_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: disk full writing {out / 'synth_002'}/synth_002_score_")
    assert lines[0].endswith("; stopped after 2 of 8 slides")
    assert leftovers(small_disk) == [] and leftovers(reference / "stores") == []
    for sid in IDS[:2]:
        for f in (want_dir / sid).iterdir():
            if not f.name.endswith("_summary.json"):
                assert (out / sid / f.name).read_bytes() == f.read_bytes(), f.name
        assert (out / sid / f"{sid}_score_summary.json").is_file()
    assert not (out / "synth_002" / "synth_002_score_summary.json").exists()
    assert not any((out / sid).exists() for sid in IDS[3:])
    (small_disk / "filler").unlink()
    assert main(args) == 0
    assert all((out / s / f"{s}_score_summary.json").is_file() for s in IDS)
