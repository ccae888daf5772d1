"""kill -9 inside ``predict`` and ``heatmap`` batches, then the rerun: nothing half-written or
stale is taken as done.

``predict`` with a run folder that was trained again is started as a real process on a copy of
the ``small_cohort`` stores (which hold the earlier model's scores) and killed once its first
store holds the new model's scores. ``heatmap`` then draws the stores scored by the new model
and refuses, one line each, those that still hold the earlier model's (or unfinished) scores;
predicting again gives exactly the scores and ``predictions.csv`` of an uninterrupted predict.
``heatmap`` killed after its first slide: the rerun exports the rest and every file equals an
uninterrupted export's (the summaries up to their timings). ``run`` of a small pipeline file
killed inside its train or heatmap stage: the rerun finishes it, and the model, predictions and
heatmaps equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import FAST, SMALL_PIPELINE, copy_run, run_cli, start_cli, wait_until

from wsi_pipeline import runs
from wsi_pipeline.cli import main
from wsi_pipeline.specs import TrainConfig
from wsi_pipeline.store import class_scores_key, open_store, scores_key
from wsi_pipeline.training import train

RID = "run"  # the run folders below are named "run": scores/run in the stores


def scores_attrs(store: Path) -> dict | None:
    """The attributes of ``scores/run`` as the store's file holds them now (None: no such
    array yet, or its metadata is being written)."""
    try:
        return json.loads((store / "scores" / RID / "zarr.json").read_text()).get("attributes")
    except (OSError, ValueError):
        return None


def all_scores(stores: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every store's arrays of the run's scores (scores, per-class, attention)."""
    keys = (scores_key(RID), class_scores_key(RID), scores_key(RID, attention=True))
    out = {}
    for sp in sorted(stores.glob("*.zarr")):
        g = open_store(sp)
        out[sp.stem] = {k: np.asarray(g[k][...]) for k in keys}
    return out


def scored_by(store: Path, model_id: str) -> bool:
    """``scores/run`` of ``store`` is finished and was written by ``model_id``."""
    a = scores_attrs(store) or {}
    return a.get("model_id") == model_id and a.get("complete") is True


def kill(proc) -> None:  # type: ignore[no-untyped-def]
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_files(got_dir: Path, want_dir: Path) -> None:
    """The same files under both folders with the same bytes (heatmap summaries: the same
    JSON but for their timings and the store's path)."""
    want = sorted(p.relative_to(want_dir) for p in want_dir.rglob("*") if p.is_file())
    got = sorted(p.relative_to(got_dir) for p in got_dir.rglob("*") if p.is_file())
    assert got == want, "a killed command left files behind or lost some"
    for rel in want:
        a, b = got_dir / rel, want_dir / rel
        if rel.name.endswith("_summary.json"):
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            for key in ("seconds", "store"):
                ja.pop(key), jb.pop(key)
            assert ja == jb, rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


@pytest.fixture()
def retrained(
    small_cohort: tuple[Path, Path], fast_run: Path, tmp_path: Path
) -> tuple[Path, Path, str, str]:
    """Stores scored by ``fast_run``'s model, and that run folder trained again with another
    seed: ``(stores, run, earlier model_id, current model_id)``."""
    stores = shutil.copytree(small_cohort[0], tmp_path / "stores")
    run = copy_run(fast_run, tmp_path / "run")
    assert main(["predict", str(stores), "--run", str(run), "-o", str(tmp_path / "p0"), "-q"]) == 0
    old = runs.model_id(run)
    train(stores, small_cohort[1], run, config=TrainConfig(**{**FAST, "seed": 1}), progress=False)
    new = runs.model_id(run)
    assert old and new and old != new
    return stores, run, old, new


def test_kill9_predict_then_no_heatmap_of_an_earlier_model(
    retrained: tuple[Path, Path, str, str],
    small_cohort: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stores, run, old, new = retrained
    pred = tmp_path / "pred"
    first = stores / "synth_000.zarr"
    proc = start_cli(["predict", str(stores), "--run", str(run), "-o", str(pred), "-q"])
    try:
        wait_until(lambda: scored_by(first, new), proc, "the first store's new scores")
    finally:
        kill(proc)
    assert not (pred / runs.PREDICTIONS).exists(), "predict finished before it was killed"
    stale = [sp.stem for sp in sorted(stores.glob("*.zarr")) if not scored_by(sp, new)]
    assert stale, "every store was scored before the kill"
    capsys.readouterr()

    # heatmap right after the kill: the new model's slides are drawn, the others refused
    args = ["heatmap", str(stores), "--run", str(run), "-o", str(tmp_path / "hm"), "-q"]
    assert main(args) == 1
    err = capsys.readouterr()
    assert "Traceback" not in err.err
    lines = [x for x in err.err.splitlines() if x.startswith("ERROR")]
    assert len(lines) == len(stale), lines
    for sid, line in zip(stale, lines):
        assert f"{sid}.zarr" in line
        assert ("another model" in line and old in line) or "unfinished" in line, line
    assert f"heatmaps for {8 - len(stale)} of 8 slide(s)" in err.out
    assert not any((tmp_path / "hm" / s).exists() for s in stale)

    # predicting again: exactly an uninterrupted predict's scores and table
    assert main(["predict", str(stores), "--run", str(run), "-o", str(pred), "-q"]) == 0
    clean = shutil.copytree(small_cohort[0], tmp_path / "clean")
    assert main(["predict", str(clean), "--run", str(run), "-o", str(tmp_path / "pc"), "-q"]) == 0
    got, want = all_scores(stores), all_scores(clean)
    assert got.keys() == want.keys()
    for sid in want:
        for k in want[sid]:
            np.testing.assert_array_equal(got[sid][k], want[sid][k], err_msg=f"{sid} {k}")
    assert (pred / runs.PREDICTIONS).read_text() == (tmp_path / "pc" / runs.PREDICTIONS).read_text()
    assert all(scored_by(sp, new) for sp in stores.glob("*.zarr"))
    assert main(args) == 0


def test_kill9_heatmap_then_rerun_finishes_the_batch(
    small_cohort: tuple[Path, Path],
    fast_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stores = shutil.copytree(small_cohort[0], tmp_path / "stores")
    assert (
        main(["predict", str(stores), "--run", str(fast_run), "-o", str(tmp_path / "p"), "-q"]) == 0
    )
    out, clean = tmp_path / "hm", tmp_path / "clean"
    # full-resolution heatmaps, so that each slide takes long enough to be killed in between
    args = ["heatmap", str(stores), "--run", str(fast_run), "--downsample", "1", "-q"]
    summary = out / "synth_000" / "synth_000_score_summary.json"
    proc = start_cli([*args, "-o", str(out)])
    try:
        wait_until(summary.exists, proc, "the first slide's summary")
    finally:
        kill(proc)
    assert not (out / "synth_007" / "synth_007_score_summary.json").exists(), "not killed"
    capsys.readouterr()
    assert main([*args, "-o", str(out)]) == 0
    assert main([*args, "-o", str(clean)]) == 0
    assert "heatmaps for 8 of 8 slide(s)" in capsys.readouterr().out
    assert_same_files(out, clean)


@pytest.fixture(scope="module")
def clean_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of an uninterrupted run of the small pipeline file (its own process,
    like the killed one and its rerun: the same torch state in all three)."""
    out = tmp_path_factory.mktemp("clean_pipeline") / "out"
    path = out.parent / "p.yaml"
    path.write_text(yaml.safe_dump({**SMALL_PIPELINE, "out": str(out)}))
    done = run_cli(["run", str(path), "-q"])
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("stage", ["train", "heatmap"])
def test_kill9_run_then_rerun_equals_an_uninterrupted_run(
    clean_pipeline: Path, tmp_path: Path, stage: str
) -> None:
    out = tmp_path / "out"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**SMALL_PIPELINE, "out": str(out)}))
    reached = {  # inside the stage: its first file written
        "train": lambda: (out / "run" / runs.CHECKPOINT).exists(),
        "heatmap": lambda: any((out / "heatmaps").glob("*/*_summary.json")),
    }[stage]
    proc = start_cli(["run", str(path), "-q"])
    try:
        wait_until(reached, proc, f"the {stage} stage's first file")
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    again = run_cli(["run", str(path), "-q"])
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    report = json.loads((out / "report.json").read_text())
    assert not report["failed"]
    got = torch.load(out / "run" / runs.MODEL, weights_only=True)
    want = torch.load(clean_pipeline / "run" / runs.MODEL, weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    pred = out / "predictions" / runs.PREDICTIONS
    assert pred.read_text() == (clean_pipeline / "predictions" / runs.PREDICTIONS).read_text()
    assert_same_files(out / "heatmaps", clean_pipeline / "heatmaps")
