"""The run folder (wsi_pipeline.runs): id rule, reading, the done/resume/fresh check, writers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import FAST, copy_run, read_strict_json

from wsi_pipeline import runs
from wsi_pipeline.errors import TrainingError
from wsi_pipeline.specs import TilingSpec, TrainConfig, fold_config
from wsi_pipeline.training import train


def test_run_id_sanitises(tmp_path: Path) -> None:
    assert runs.run_id(tmp_path / "my run") == "my_run"
    assert runs.run_id(tmp_path / "r", "exp 1/../x") == "exp_1_.._x"
    assert runs.run_id(tmp_path / "r", "../..") == "_"
    assert runs.run_id(tmp_path / "r", "..") == "slide"  # never empty, "." or ".."
    assert runs.run_id(tmp_path / "a" / ".." / "b") == "b"  # the resolved folder's name
    for rid in ("a/b", "../x", "x\\y", " "):
        out = runs.run_id(tmp_path, rid)
        assert "/" not in out and "\\" not in out and out not in ("", ".", "..")


def test_load_run_reads_a_complete_run(fast_run: Path) -> None:
    r = runs.load_run(fast_run)
    assert r["dir"] == fast_run and r["train_config"] == TrainConfig(**FAST)
    assert r["labels"]["classes"] == ["0", "1"] and r["tiling"]["tile_px"] == 64
    assert r["config"]["run_version"] == runs.RUN_VERSION
    assert r["calibration"]["method"] in ("platt", "none")


def test_load_run_refuses_missing_and_old_runs(fast_run: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no such run folder; run 'wsi-pipeline train' first"):
        runs.load_run(tmp_path / "nope")
    for name in (runs.MODEL, runs.CONFIG, runs.LABELS):
        r = copy_run(fast_run, tmp_path / f"without_{name}")
        (r / name).unlink()
        with pytest.raises(TrainingError, match=rf"not a complete run \(no {name}\); train again"):
            runs.load_run(r)
    old = copy_run(fast_run, tmp_path / "old")
    cfg = json.loads((old / runs.CONFIG).read_text())
    cfg["run_version"] = 0
    (old / runs.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(TrainingError, match=r"run format 0 .* is not readable by .*; train again"):
        runs.load_run(old)
    del cfg["run_version"]
    (old / runs.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(TrainingError, match="run format None"):
        runs.load_run(old)
    bad = copy_run(fast_run, tmp_path / "bad")
    (bad / runs.TILING).write_text("{not json")
    with pytest.raises(TrainingError, match=r"tiling\.json: unreadable"):
        runs.load_run(bad)
    cfg = json.loads((fast_run / runs.CONFIG).read_text())
    cfg["train"]["mode"] = "nope"
    (bad / runs.TILING).write_text((fast_run / runs.TILING).read_text())
    (bad / runs.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(TrainingError, match="incompatible training config"):
        runs.load_run(bad)


def test_run_state_on_real_runs(
    fast_run: Path, small_cohort: tuple[Path, Path], tmp_path: Path
) -> None:

    cfg = TrainConfig(**FAST)
    assert runs.run_state(fast_run, cfg) == "done"
    assert runs.run_state(fast_run, TrainConfig(**{**FAST, "lr": 2e-3})) == "fresh"
    assert runs.run_state(tmp_path / "nope", cfg) == "fresh"
    # an unfinished run with its checkpoint: resume
    stores, labels_csv = small_cohort
    part = tmp_path / "part"
    train(stores, labels_csv, part, config=cfg, stop_after=1, progress=False)
    assert not json.loads((part / runs.METRICS).read_text())["finished"]
    assert runs.run_state(part, cfg) == "resume"
    assert runs.run_state(part, TrainConfig(**{**FAST, "seed": 1})) == "fresh"
    (part / runs.METRICS).unlink()  # killed before the first metrics: the checkpoint decides
    assert runs.run_state(part, cfg) == "resume"
    (part / runs.CHECKPOINT).unlink()
    assert runs.run_state(part, cfg) == "fresh"
    # a finished run whose model is gone is not done
    gone = copy_run(fast_run, tmp_path / "gone")
    (gone / runs.MODEL).unlink()
    assert runs.run_state(gone, cfg) == "resume"


def test_check_resumable(fast_run: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(**FAST)
    runs.check_resumable(fast_run, cfg)
    with pytest.raises(
        TrainingError, match=r"cannot resume with a different config \(changed: lr, seed\)"
    ):
        runs.check_resumable(fast_run, TrainConfig(**{**FAST, "lr": 2e-3, "seed": 9}))
    with pytest.raises(TrainingError, match=r"nothing to resume \(no checkpoint\.pt\)"):
        runs.check_resumable(tmp_path, cfg)
    r = copy_run(fast_run, tmp_path / "r")
    (r / runs.CONFIG).unlink()
    with pytest.raises(TrainingError, match=r"changed: .*epochs.*lr"):
        runs.check_resumable(r, cfg)


def test_writers_and_readers(tmp_path: Path) -> None:
    cfg = TrainConfig(**FAST)
    runs.write_run_start(
        tmp_path,
        config={"run_version": runs.RUN_VERSION, "train": cfg.to_dict()},
        tiling={"tile_px": 64, "mpp": 1.0, "downsample": 2.0},
        labels={"classes": ["normal", "tumour"], "labels_csv": "l.csv", "skipped_no_patches": []},
        splits=[("b", "tumour", "train"), ("a", "normal", "val")],
    )
    assert (
        tmp_path / runs.SPLITS
    ).read_text() == "slide_id,label,split\nb,tumour,train\na,normal,val\n"
    assert runs.read_splits(tmp_path)["a"] == {"slide_id": "a", "label": "normal", "split": "val"}
    assert runs.read_classes(tmp_path) == ["normal", "tumour"]
    assert json.loads((tmp_path / runs.TILING).read_text())["tile_px"] == 64
    assert runs.read_metrics(tmp_path) is None
    history = [{"epoch": 0, "train_loss": 0.5, "val_auc": float("nan")}]
    m = runs.write_metrics(
        tmp_path,
        history,
        {"epoch": -1, "auc": -1.0, "loss": math.inf},
        {"auc": 0.75, "n": 2, "logits": [[0, 1]]},
        {"a": "val", "b": "train", "c": "train"},
        cfg,
    )
    assert m["best_epoch"] is None and m["best_val_auc"] is None and not m["finished"]
    assert m["best_val_auc_reason"] == "no epoch finished"
    assert m["warnings"] == [] and "stalled" not in m and "calibration" not in m
    assert m["history"][0]["val_auc"] is None  # what is returned holds no NaN either
    assert m["splits"] == {"val": 1, "train": 2} and m["test"] == {"auc": 0.75, "n": 2}
    saved = runs.read_metrics(tmp_path)
    assert saved["history"][0]["val_auc"] is None  # strict JSON: NaN is null
    assert saved["model"] == cfg.model and saved["mode"] == "e2e"
    runs.write_calibration(tmp_path, {"method": "none", "num_classes": 2})
    assert json.loads((tmp_path / runs.CALIBRATION).read_text())["method"] == "none"
    cv = runs.write_cv_metrics(tmp_path / "cv", [0.5, None, 1.0])
    assert cv["folds"] == 3 and cv["val_auc_mean"] == 0.75 and cv["val_auc_std"] == 0.25
    assert json.loads((tmp_path / "cv" / runs.CV_METRICS).read_text())["val_auc"][1] is None
    assert runs.read_cv_metrics(tmp_path / "cv") == {**cv, "val_auc": [0.5, None, 1.0]}
    assert runs.read_cv_metrics(tmp_path) is None
    empty = runs.write_cv_metrics(tmp_path / "cv0", [None])
    assert empty["val_auc_mean"] is None and empty["val_auc_std"] is None  # never NaN
    assert empty["val_auc_reason"] == "no fold has a validation AUC"
    assert json.loads((tmp_path / "cv0" / runs.CV_METRICS).read_text())["val_auc_mean"] is None
    assert runs.fold_dir(tmp_path, 2) == tmp_path / "fold_2"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files
    with pytest.raises(TrainingError, match=r"labels\.json: unreadable"):
        runs.read_classes(tmp_path / "cv")


def test_write_metrics_null_with_reason(tmp_path: Path) -> None:
    """A missing metric is null with its reason; warnings, stalled and calibration are kept."""
    history = [
        {"epoch": 0, "train_loss": 0.7, "val_loss": 0.69, "val_auc": math.nan},
        {"epoch": 1, "train_loss": 0.69, "val_loss": 0.68, "val_auc": math.nan},
    ]
    for h in history:
        h["val_auc_reason"] = "validation set has a single class ('0')"
    cal = {"method": "none", "skipped": "no validation slides", "val": None}
    m = runs.write_metrics(
        tmp_path,
        history,
        {"epoch": 1, "auc": -1.0, "loss": 0.68, "by": "val_loss"},
        {"auc": math.nan, "auc_reason": "test set has a single class ('1')", "n": 1},
        {"a": "val", "b": "train", "c": "test"},
        TrainConfig(**FAST),
        finished=True,
        warnings=["w1", "w2"],
        stalled=True,
        calibration=cal,
    )
    saved = read_strict_json(tmp_path / runs.METRICS)
    assert saved == m
    assert m["best_epoch"] == 2 and m["best_epoch_by"] == "val_loss"
    assert m["best_val_auc"] is None
    assert m["best_val_auc_reason"] == "validation set has a single class ('0')"
    assert m["test"] == {"auc": None, "auc_reason": "test set has a single class ('1')", "n": 1}
    assert m["warnings"] == ["w1", "w2"] and m["stalled"] is True and m["calibration"] == cal


def _finished_run(run_dir: Path, config: TrainConfig) -> None:
    """What run_state reads of a finished run: config.json, metrics.json and model.pt."""
    run_dir.mkdir(parents=True)
    record = {"run_version": runs.RUN_VERSION, "train": config.to_dict()}
    runs.write_run_start(run_dir, config=record, tiling={}, labels={}, splits=[])
    best = {"epoch": 0, "auc": 0.5, "loss": 1.0}
    runs.write_metrics(run_dir, [], best, None, {}, config, finished=True)
    (run_dir / runs.MODEL).write_bytes(b"")


def test_cv_state(tmp_path: Path) -> None:
    cfg = TrainConfig(**FAST)
    assert runs.cv_state(tmp_path / "cv", cfg, 2) == "fresh"
    for k in range(2):
        _finished_run(runs.fold_dir(tmp_path / "cv", k), fold_config(cfg, folds=2, fold=k))
    assert runs.cv_state(tmp_path / "cv", cfg, 2) == "resume"  # no cv_metrics.json yet
    runs.write_cv_metrics(tmp_path / "cv", [0.5, 0.5])
    assert runs.cv_state(tmp_path / "cv", cfg, 2) == "done"
    assert runs.cv_state(tmp_path / "cv", TrainConfig(**{**FAST, "lr": 2e-3}), 2) == "fresh"
    # one fold done, the other not started: resume; with a checkpoint of another config there,
    # every fold starts over
    part = tmp_path / "part"
    _finished_run(runs.fold_dir(part, 0), fold_config(cfg, folds=2, fold=0))
    assert runs.cv_state(part, cfg, 2) == "resume"
    _finished_run(runs.fold_dir(part, 1), cfg)
    (runs.fold_dir(part, 1) / runs.CHECKPOINT).write_bytes(b"")
    assert runs.cv_state(part, cfg, 2) == "fresh"


def test_an_unfinished_run_is_refused_unless_asked(
    small_cohort: tuple[Path, Path], tmp_path: Path, fast_run: Path
) -> None:
    stores, labels_csv = small_cohort
    part = tmp_path / "part"
    train(stores, labels_csv, part, config=TrainConfig(**FAST), stop_after=1, progress=False)
    assert not runs.is_finished(part) and runs.is_finished(fast_run)
    with pytest.raises(TrainingError, match=r"training has not finished .*--resume"):
        runs.load_run(part)
    assert runs.load_run(part, allow_unfinished=True)["dir"] == part
    from wsi_pipeline.cli import main

    assert main(["predict", str(stores), "--run", str(part), "--out", str(tmp_path / "p")]) == 1
    assert not (tmp_path / "p" / runs.PREDICTIONS).exists()
    args = ["predict", str(stores), "--run", str(part), "--out", str(tmp_path / "p2")]
    assert main([*args, "--allow-unfinished", "-q"]) == 0


def test_a_retrain_never_leaves_the_old_model_looking_finished(
    small_cohort: tuple[Path, Path], tmp_path: Path, fast_run: Path
) -> None:
    """A finished run retrained with another config and stopped before its first epoch ends
    (as a kill would) is neither 'done' nor resumable from the old checkpoint."""
    stores, labels_csv = small_cohort
    run = copy_run(fast_run, tmp_path / "run")
    new = TrainConfig(**{**FAST, "lr": 2e-3})
    assert runs.run_state(run, new) == "fresh"
    train(stores, labels_csv, run, config=new, stop_after=0, progress=False)
    assert not (run / runs.MODEL).exists() and not (run / runs.CHECKPOINT).exists()
    assert runs.run_state(run, new) == "fresh" and not runs.is_finished(run)
    with pytest.raises(TrainingError, match="not a complete run"):
        runs.load_run(run)


def test_resume_refuses_changed_labels_splits_classes_tiling_and_bad_checkpoints(
    small_cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    """One line naming what changed; never a traceback, never a silent resume."""
    from helpers import tile_cohort_slide, write_labels

    from wsi_pipeline.data import read_labels

    stores, labels_csv = small_cohort
    cfg = TrainConfig(**FAST)
    part = tmp_path / "part"
    train(stores, labels_csv, part, config=cfg, stop_after=1, progress=False)
    rows = [(r.slide_id, r.label) for r in read_labels(labels_csv).rows]

    def resume(labels: Path, store_dir: Path = stores) -> None:
        train(store_dir, labels, part, config=cfg, resume=True, stop_after=1, progress=False)

    flipped = write_labels(tmp_path / "flip.csv", [(s, "1" if y == "0" else "0") for s, y in rows])
    with pytest.raises(TrainingError, match=r"cannot resume: labels changed for 8 slide"):
        resume(flipped)
    three = write_labels(tmp_path / "three.csv", [(s, str(i % 3)) for i, (s, _) in enumerate(rows)])
    with pytest.raises(
        TrainingError, match=r"cannot resume: the classes changed \(0, 1 -> 0, 1, 2\)"
    ):
        resume(three)
    retiled = tmp_path / "retiled"
    for sid, _ in rows:
        tile_cohort_slide(labels_csv, sid, retiled, TilingSpec(tile_px=64, mpp=2.0))
    with pytest.raises(TrainingError, match=r"cannot resume: the stores were re-tiled"):
        resume(labels_csv, retiled)
    assert json.loads((part / runs.TILING).read_text())["mpp"] == 1.0  # tiling.json untouched
    # a truncated checkpoint
    ck = part / runs.CHECKPOINT
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    with pytest.raises(TrainingError, match=r"cannot resume from this checkpoint") as ei:
        resume(labels_csv)
    assert "miniz" not in str(ei.value)  # the reason's first sentence only
