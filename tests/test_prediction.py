"""Slide predictions and per-patch scores from a trained run (wsi_pipeline.prediction)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import add_blank_store, copy_run, tile_cohort_slide

from wsi_pipeline import prediction
from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError, TrainingError
from wsi_pipeline.prediction import Prediction, predict, read_predictions, write_predictions
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.store import SlideStore, scores_key


def test_predict_outputs_and_errors(
    small_cohort: tuple[Path, Path], fast_run: Path, tmp_path: Path
) -> None:
    stores, labels_csv = small_cohort
    d = tmp_path / "stores"
    shutil.copytree(stores, d)
    run = copy_run(fast_run, tmp_path / "run")  # trained like train(d, labels_csv, run, FAST)
    # a store tiled differently, and one without patches
    tile_cohort_slide(labels_csv, "synth_000", tmp_path / "other", TilingSpec(tile_px=64, mpp=2.0))
    shutil.copytree(tmp_path / "other" / "synth_000.zarr", d / "odd.zarr")
    zarr.open_group(str(d / "odd.zarr"), mode="r+").attrs["slide_id"] = "odd"
    add_blank_store(d, tmp_path)
    code = main(["predict", str(d), "--run", str(run), "--out", str(tmp_path / "pred"), "-q"])
    assert code == 1  # the mismatched store is an error
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {*(f"synth_{i:03d}" for i in range(8)), "odd", "blank"}
    assert "tiled at 2 mpp, the run was trained at 1 mpp" in rows["odd"]["error"]
    assert rows["blank"]["probability"] == "" and "no patches" in rows["blank"]["error"]
    r0 = rows["synth_000"]
    assert abs(float(r0["p_0"]) + float(r0["p_1"]) - 1) < 1e-5
    assert r0["predicted_label"] in ("0", "1") and r0["run_id"] == "run"
    st = SlideStore(d / "synth_000.zarr")
    scores = np.asarray(st.group[scores_key("run")][...])
    att = np.asarray(st.group[scores_key("run", attention=True)][...])
    assert scores.shape == (st.n_patches,) and ((scores >= 0) & (scores <= 1)).all()
    assert abs(att.sum() - 1) < 1e-4
    with pytest.raises(TrainingError, match="no such run folder"):
        predict(d, tmp_path / "nope", tmp_path / "p2")
    cfg = json.loads((run / "config.json").read_text())
    cfg["run_version"] = 99
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TrainingError, match="run format 99"):
        predict(d, run, tmp_path / "p2")


def test_predict_opens_each_store_once(
    small_cohort: tuple[Path, Path], fast_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores, _ = small_cohort
    d = tmp_path / "stores"
    shutil.copytree(stores, d)
    opened: dict[str, int] = {}
    real = prediction.open_store

    def counting(path, **kw):
        opened[Path(path).name] = opened.get(Path(path).name, 0) + 1
        return real(path, **kw)

    monkeypatch.setattr(prediction, "open_store", counting)
    rows = predict(d, fast_run, tmp_path / "pred", run_id="once", progress=False)
    assert len(rows) == 8 and all(r.ok and r.n_patches > 0 for r in rows)
    assert opened == {f"synth_{i:03d}.zarr": 1 for i in range(8)}
    st = SlideStore(d / "synth_003.zarr")
    attrs = dict(st.group[scores_key("once")].attrs)
    assert attrs["run"] == "once" and attrs["run_dir"] == str(fast_run)
    assert attrs["predicted"] == max(attrs["probabilities"], key=attrs["probabilities"].get)


def test_predict_only_some_slides(
    small_cohort: tuple[Path, Path], fast_run: Path, tmp_path: Path
) -> None:
    stores, _ = small_cohort
    d = tmp_path / "stores"
    shutil.copytree(stores, d)
    with pytest.raises(ConfigError, match=r"no store for slide id\(s\) 'nope'"):
        predict(d, fast_run, tmp_path / "pred", slide_ids=["synth_001", "nope"], progress=False)
    rows = predict(
        d,
        fast_run,
        tmp_path / "pred",
        slide_ids=["synth_001"],
        run_id="only",
        progress=False,
    )
    assert [r.slide_id for r in rows] == ["synth_001"] and rows[0].run_id == "only"
    # one store named by its path: that store (a store is no folder of stores)
    one = predict(d / "synth_003.zarr", fast_run, tmp_path / "one", run_id="one", progress=False)
    assert [(r.slide_id, r.ok) for r in one] == [("synth_003", True)]
    assert scores_key("only") in zarr.open_group(str(d / "synth_001.zarr"), mode="r")
    assert scores_key("only") not in zarr.open_group(str(d / "synth_000.zarr"), mode="r")
    # an unfinished store is an error row, not a crash
    zarr.open_group(str(d / "synth_002.zarr"), mode="r+").attrs["complete"] = False
    rows = predict(d, fast_run, tmp_path / "pred", slide_ids=["synth_002"], progress=False)
    assert not rows[0].ok and "store is unfinished; rerun 'wsi-pipeline tile'" in rows[0].error


def test_write_predictions(tmp_path: Path) -> None:
    rows = [
        Prediction("b", {"normal": 0.25, "tumour": 0.75}, "tumour", 10, "r"),
        Prediction("a", run_id="r", error="no patches in the store (no tissue)"),
    ]
    out = write_predictions(tmp_path / "predictions.csv", rows, ["normal", "tumour"])
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]  # no temporary file left
    with open(out) as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0]) == [
        "slide_id",
        "p_normal",
        "p_tumour",
        "probability",
        "predicted_label",
        "n_patches",
        "run_id",
        "error",
    ]
    assert got[0]["probability"] == "0.750000" and got[0]["predicted_label"] == "tumour"
    assert got[1]["p_normal"] == "" and got[1]["probability"] == ""
    assert rows[1].ok and not Prediction("c", error="unfinished").ok
    assert read_predictions(out) == got
    assert read_predictions(tmp_path / "none.csv") == []
