"""Training from slide labels (wsi_pipeline.training), on real stores: the loop, resume of a
run, and what a run writes. The optimizer and checkpoint on their own: test_checkpoint.py; the
warnings, missing AUCs and calibration on their own: test_train_report.py."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import FAST, read_strict_json, tile_cohort_slide, write_labels

from wsi_pipeline import runs
from wsi_pipeline.checkpoint import TrainState
from wsi_pipeline.cli import main
from wsi_pipeline.data import read_labels
from wsi_pipeline.errors import TrainingError
from wsi_pipeline.prediction import predict
from wsi_pipeline.specs import TilingSpec, TrainConfig
from wsi_pipeline.store import features_key
from wsi_pipeline.training import (
    epoch_order,
    setup_training,
    start_state,
    steps_per_epoch,
    train,
    train_one_epoch,
)

#: Features mode on cached features: a few seconds a run (on a copy of the stores).
FEATURES = {
    "mode": "features",
    "backbone": "smallcnn",
    "num_workers": 0,
    "patience": 20,
    "warmup_epochs": 0,
}


@pytest.fixture(scope="module")
def feature_stores(
    small_cohort: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of ``small_cohort``'s stores (features-mode runs cache features in them)."""
    d = tmp_path_factory.mktemp("feature_stores") / "stores"
    shutil.copytree(small_cohort[0], d)
    return d


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def test_train_refuses_bad_inputs_before_starting(
    small_cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    stores, labels_csv = small_cohort
    ids = [r.slide_id for r in read_labels(labels_csv).rows]
    cfg = TrainConfig(**FAST)
    with pytest.raises(TrainingError, match=r"'nope': no store nope\.zarr"):
        train(
            stores,
            write_labels(tmp_path / "d.csv", [(ids[0], 0), ("nope", 1)]),
            tmp_path / "r",
            config=cfg,
        )
    one_class = write_labels(
        tmp_path / "e.csv", [(i, 0, "train") for i in ids[:4]] + [(ids[4], 1, "val")]
    )
    with pytest.raises(TrainingError, match="training split has a single class"):
        train(stores, one_class, tmp_path / "r", config=cfg)
    # an unfinished store, and stores tiled differently
    bad = tmp_path / "stores"
    shutil.copytree(stores, bad)
    zarr.open_group(str(bad / f"{ids[0]}.zarr"), mode="r+").attrs["complete"] = False
    with pytest.raises(TrainingError, match=r"'synth_000': store synth_000\.zarr is unfinished"):
        train(bad, labels_csv, tmp_path / "r", config=cfg)
    shutil.rmtree(bad / f"{ids[0]}.zarr")
    tile_cohort_slide(labels_csv, ids[0], bad, TilingSpec(tile_px=96, mpp=1.0))
    with pytest.raises(TrainingError, match=r"tile size 64 px, .synth_000. was tiled on 96 px"):
        train(bad, labels_csv, tmp_path / "r", config=cfg)
    assert not (tmp_path / "r").exists()  # nothing started


# ---------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------
def test_train_writes_a_complete_run(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    stores, labels_csv = small_cohort
    run = tmp_path / "run"
    m = train(stores, labels_csv, run, config=TrainConfig(**FAST), progress=False)
    for f in (
        "model.pt",
        "checkpoint.pt",
        "config.json",
        "tiling.json",
        "labels.json",
        "splits.csv",
        "metrics.json",
        "calibration.json",
        "curves.png",
        "roc.png",
    ):
        assert (run / f).is_file(), f
    assert any((run / "tensorboard").iterdir())
    assert m["finished"] and m["epochs_run"] == 2 and len(m["history"]) == 2
    assert {"train_loss", "val_loss", "val_auc", "lr"} <= set(m["history"][0])
    assert json.loads((run / "tiling.json").read_text())["tile_px"] == 64
    state = torch.load(run / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_resume_is_bit_for_bit(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    stores, labels_csv = small_cohort
    cfg = TrainConfig(epochs=3, max_patches=12, num_workers=1, patience=10, seed=5)
    train(stores, labels_csv, tmp_path / "straight", config=cfg, progress=False)
    train(stores, labels_csv, tmp_path / "split", config=cfg, stop_after=1, progress=False)
    assert not json.loads((tmp_path / "split" / "metrics.json").read_text())["finished"]
    with pytest.raises(TrainingError, match="different config"):
        train(
            stores,
            labels_csv,
            tmp_path / "split",
            config=TrainConfig(**{**cfg.to_dict(), "lr": 2e-3}),
            resume=True,
            progress=False,
        )
    train(stores, labels_csv, tmp_path / "split", config=cfg, resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ha = json.loads(a["history"])
    hb = json.loads(b["history"])
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_training_steps(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    """The steps of ``train`` on their own: set-up, a fresh state, one epoch, the resume check."""
    from wsi_pipeline.data import make_splits, resolve_stores
    from wsi_pipeline.distributed import Distributed

    stores, labels_csv = small_cohort
    labels = read_labels(labels_csv)
    found, _ = resolve_stores(stores, labels)
    splits = make_splits(labels, list(found))
    cfg = TrainConfig(**FAST)
    setup = setup_training(cfg, tmp_path / "run", labels, found, splits, Distributed())
    assert setup.device.type in ("cpu", "cuda") and setup.ddp_model is setup.model
    assert sum(len(b) for b in setup.bags.values()) == 8
    assert list(setup.targets) == list(found)  # store order, every slide in a split
    assert setup.record["run_version"] == runs.RUN_VERSION and setup.record["num_classes"] == 2
    with pytest.raises(TrainingError, match=r"nothing to resume \(no checkpoint\.pt\)"):
        start_state(setup, resume=True)
    state = start_state(setup, resume=False)
    assert state == TrainState() and state.next_epoch == 0
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    rec = train_one_epoch(setup, 0, progress=False)
    assert rec["epoch"] == 0 and np.isfinite(rec["train_loss"]) and rec["lr"] > 0
    after = setup.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_steps_take_several_slides_of_both_classes() -> None:
    """With ``slides_per_step`` > 1 and the balanced sampler every step holds the classes in
    equal numbers (the minority class repeated), whole steps only, the same on every call."""
    targets = [0] * 7 + [1] * 3
    order = epoch_order(range(10), targets, balance="sampler", seed=3, epoch=1, world=1, per_step=4)
    assert len(order) == 8 == 4 * steps_per_epoch(10, TrainConfig(slides_per_step=4))
    for k in range(0, len(order), 4):
        assert sorted(targets[i] for i in order[k : k + 4]) == [0, 0, 1, 1]
    assert order == epoch_order(
        range(10), targets, balance="sampler", seed=3, epoch=1, world=1, per_step=4
    )
    assert order != epoch_order(
        range(10), targets, balance="sampler", seed=3, epoch=2, world=1, per_step=4
    )
    # two ranks: each gets whole steps
    assert (
        len(epoch_order(range(10), targets, balance="none", seed=0, epoch=0, world=2, per_step=2))
        == 8
    )
    assert steps_per_epoch(3, TrainConfig(slides_per_step=4)) == 1  # fewer bags than a step
    assert steps_per_epoch(24, TrainConfig(slides_per_step=1)) == 24


# ---------------------------------------------------------------------------------------------
# honest results in a run: no NaN, missing metrics with a reason, stalled runs
# ---------------------------------------------------------------------------------------------
def test_no_validation_rows(
    feature_stores: Path, small_cohort: tuple[Path, Path], tmp_path: Path, logged
) -> None:
    """No validation slides: a warning at the start, training runs, null metrics with a reason
    and never NaN, in the file or in what train returns."""
    run = tmp_path / "noval"
    cfg = TrainConfig(**FEATURES, epochs=2, lr=1e-3, val_fraction=0.0)
    m = train(feature_stores, small_cohort[1], run, config=cfg, progress=False)
    assert m["finished"] and m["splits"] == {"train": 6, "test": 2}
    first = next(r for r in logged.records if r.levelno == logging.WARNING)
    assert first.getMessage().startswith("no validation slides: the best epoch is chosen by")
    saved = read_strict_json(run / "metrics.json")
    json.dumps(m, allow_nan=False)  # what train returns holds no NaN either
    assert saved == m
    assert m["best_val_auc"] is None and m["best_val_auc_reason"] == "no validation slides"
    assert m["best_epoch_by"] == "train_loss"
    for h in m["history"]:
        assert h["val_auc"] is None and h["val_auc_reason"] == "no validation slides"
    assert m["calibration"]["val"] is None
    assert m["calibration"]["val_reason"] == "no validation slides"
    assert m["calibration"]["test"]["n"] == 2
    assert read_strict_json(run / "calibration.json")["skipped"] == "no validation slides"
    assert m["warnings"][0].startswith("no validation slides")


def test_single_class_validation_set_from_the_cli(
    feature_stores: Path,
    small_cohort: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A validation (and test) set of one class: warned, trained, null AUCs with reasons, the
    best epoch chosen by the validation loss, and a CLI line without NaN."""
    labels = read_labels(small_cohort[1])
    by = {c: [r.slide_id for r in labels.rows if r.label == c] for c in ("0", "1")}
    rows = [(s, 0, "train") for s in by["0"][:2]] + [(s, 1, "train") for s in by["1"][:2]]
    rows += [(s, 0, "val") for s in by["0"][2:]] + [(by["1"][2], 1, "test")]
    lab = write_labels(tmp_path / "one_class_val.csv", rows)
    out = tmp_path / "run"
    args = ["train", str(feature_stores), "--labels", str(lab), "--out", str(out), "-q"]
    args += ["--mode", "features", "--backbone", "smallcnn", "--epochs", "2", "--workers", "0"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "WARNING: validation set has a single class ('0'): there is no validation AUC" in (
        printed.err
    )
    assert "nan" not in printed.out.lower()
    assert "best validation AUC n/a (validation set has a single class ('0'))" in printed.out
    assert "test AUC n/a (n=1, test set has a single class ('1'))" in printed.out
    m = read_strict_json(out / "metrics.json")
    assert m["best_val_auc"] is None and m["best_epoch_by"] == "val_loss"
    assert m["best_val_auc_reason"] == "validation set has a single class ('0')"
    for h in m["history"]:
        assert h["val_auc"] is None and math.isfinite(h["val_loss"])
        assert h["val_auc_reason"] == "validation set has a single class ('0')"
    assert m["test"]["auc"] is None
    assert m["test"]["auc_reason"] == "test set has a single class ('1')"
    assert read_strict_json(out / "calibration.json")["skipped"] == (
        "2 validation slides of class '0', 0 of class '1' (need >= 5 of each class)"
    )


def test_stalled_run_says_so_and_a_learning_run_does_not(
    feature_stores: Path, small_cohort: tuple[Path, Path], tmp_path: Path, logged
) -> None:
    labels_csv = small_cohort[1]
    cfg = TrainConfig(**FEATURES, epochs=2, lr=1e-7)
    m = train(feature_stores, labels_csv, tmp_path / "stalled", config=cfg, progress=False)
    assert m["stalled"] is True
    w = [x for x in m["warnings"] if x.startswith("train loss did not move from chance")]
    assert len(w) == 1 and "(ln 2 = 0.693) after 2 epochs" in w[0]
    assert any(r.getMessage() == w[0] and r.levelno == logging.WARNING for r in logged.records)
    assert read_strict_json(tmp_path / "stalled" / "metrics.json")["stalled"] is True
    logged.clear()
    cfg = TrainConfig(**FEATURES, epochs=10, lr=1e-2, instance_weight=0.0)
    m = train(feature_stores, labels_csv, tmp_path / "learns", config=cfg, progress=False)
    assert m["history"][-1]["train_loss"] < 0.3  # it learns (the 4 training slides, at least)
    assert m["stalled"] is False
    assert not any("chance" in x for x in m["warnings"])
    assert "did not move from chance" not in logged.text


def test_features_mode_and_predict(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    stores, labels_csv = small_cohort
    d = tmp_path / "stores"
    shutil.copytree(stores, d)
    run = tmp_path / "frun"
    cfg = TrainConfig(mode="features", backbone="smallcnn", epochs=3, num_workers=0)
    m = train(d, labels_csv, run, config=cfg, progress=False)
    assert m["finished"] and (run / "extractor.pt").is_file()
    name = json.loads((run / "config.json").read_text())["extractor"]
    g = zarr.open_group(str(next(d.glob("*.zarr"))), mode="r")
    assert g[features_key(name)].attrs["complete"] is True
    assert g[features_key(name)].shape[1] == 128
    rows = predict(d, run, tmp_path / "pred", progress=False)
    assert len(rows) == 8 and all(r.ok for r in rows)


def test_multiclass_with_names(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    stores, labels_csv = small_cohort
    ids = [r.slide_id for r in read_labels(labels_csv).rows]
    names = ["tumour_b", "normal", "tumour_a", "normal"] * 2
    lab = write_labels(tmp_path / "multi.csv", list(zip(ids, names)))
    run = tmp_path / "run"
    m = train(
        stores,
        lab,
        run,
        config=TrainConfig(
            epochs=1, max_patches=8, num_workers=0, val_fraction=0.25, test_fraction=0.0
        ),
        progress=False,
    )
    assert m["finished"]
    assert json.loads((run / "labels.json").read_text())["classes"] == [
        "normal",
        "tumour_a",
        "tumour_b",
    ]
    predict(stores, run, tmp_path / "pred", progress=False)
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    r = rows[0]
    p = [float(r[f"p_{c}"]) for c in ("normal", "tumour_a", "tumour_b")]
    assert abs(sum(p) - 1) < 1e-5
    assert abs(float(r["probability"]) - (1 - p[0])) < 1e-5  # abnormal = not "normal"
    assert r["predicted_label"] in ("normal", "tumour_a", "tumour_b")


def test_kfold(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    stores, labels_csv = small_cohort
    code = main(
        [
            "train",
            str(stores),
            "--labels",
            str(labels_csv),
            "--out",
            str(tmp_path / "cv"),
            "--folds",
            "2",
            "--epochs",
            "1",
            "--max-patches",
            "8",
            "--workers",
            "0",
            "-q",
        ]
    )
    assert code == 0
    cv = json.loads((tmp_path / "cv" / "cv_metrics.json").read_text())
    assert cv["folds"] == 2 and len(cv["val_auc"]) == 2
    assert (tmp_path / "cv" / "fold_1" / "model.pt").is_file()


@pytest.mark.slow
def test_ddp_two_processes_gloo(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    stores, labels_csv = small_cohort
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "wsi_pipeline",
        "train",
        str(stores),
        "--labels",
        str(labels_csv),
        "--out",
        str(tmp_path / "ddp"),
        "--epochs",
        "2",
        "--max-patches",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
        "-q",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["finished"] and m["epochs_run"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_channels_last(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    stores, labels_csv = small_cohort
    m = train(
        stores,
        labels_csv,
        tmp_path / "gpu",
        config=TrainConfig(device="cuda", amp=True, channels_last=True, epochs=2, max_patches=16),
        progress=False,
    )
    assert m["finished"]
    rows = predict(stores, tmp_path / "gpu", tmp_path / "pred", device="cuda", progress=False)
    assert all(r.ok for r in rows)
