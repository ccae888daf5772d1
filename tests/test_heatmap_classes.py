"""Per-class heatmaps: ``predict`` writes each patch's class probabilities (``scores/<run>-classes``)
and ``heatmap --class NAME`` draws one of them.

A real 1-epoch three-class run on the small cohort predicts real stores; nothing under test is
mocked. A store "predicted before per-class probabilities" is one whose ``-classes`` array is
removed: exactly the layout the earlier ``predict`` wrote.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import copy_run

import wsi_pipeline as wp
from wsi_pipeline import heatmap as hm
from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError, StoreError
from wsi_pipeline.pipeline import load_pipeline, run_pipeline
from wsi_pipeline.store import (
    SlideStore,
    class_scores_key,
    list_stores,
    open_store,
    score_runs,
    scores_key,
)

CLASSES = ["a", "b", "c"]
DS = 32.0  # coarse heatmaps: small files, fast


@pytest.fixture(scope="module")
def three(
    three_class: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The three-class run (``run3``) and copies of its stores, predicted by it."""
    stores, labels, run = three_class
    root = tmp_path_factory.mktemp("classes")
    d = root / "stores"
    shutil.copytree(stores, d)
    run = copy_run(run, root / "run3")
    wp.predict(d, run, root / "pred", progress=False, device="cpu")
    return {"root": root, "stores": d, "run": run, "labels": labels}


def _old_store(three: dict[str, Path], dest: Path, slide: str = "synth_001") -> Path:
    """A copy of a predicted store as the earlier ``predict`` left it (no ``-classes`` array)."""
    dest.mkdir(parents=True, exist_ok=True)
    sp = shutil.copytree(three["stores"] / f"{slide}.zarr", dest / f"{slide}.zarr")
    shutil.rmtree(sp / class_scores_key("run3"))
    return sp


# ------------------------------------------------------------------------------------ predict
def test_predict_writes_the_class_probabilities(three: dict[str, Path]) -> None:
    for sp in list_stores(three["stores"]):
        st = SlideStore(sp)
        g = st.group
        arr = g[class_scores_key("run3")]
        assert arr.attrs["complete"] is True and arr.attrs["classes"] == CLASSES
        assert arr.attrs["run"] == "run3" and arr.attrs["negative_class"] == "a"
        probs = np.asarray(arr[...])
        assert probs.dtype == np.float32 and probs.shape == (st.n_patches, 3)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        score = np.asarray(g[scores_key("run3")][...])
        np.testing.assert_allclose(score, 1.0 - probs[:, 0], atol=1e-6)  # "a" is negative
        assert score_runs(g) == ["run3"]  # run ids only: no "-classes", no "-attention"


def test_binary_runs_write_them_too(scored_batch: Path) -> None:
    st = SlideStore(scored_batch / "stores" / "synth_000.zarr")
    probs = np.asarray(st.group[class_scores_key("run")][...])
    assert probs.shape == (st.n_patches, 2)
    assert st.group[class_scores_key("run")].attrs["classes"] == ["0", "1"]
    score = np.asarray(st.group[scores_key("run")][...])
    np.testing.assert_allclose(probs[:, 1], score, atol=1e-6)
    assert score_runs(st.group) == ["run"]


# ------------------------------------------------------------------------------------ heatmap
def _tile_values(path: Path, key: str) -> np.ndarray:
    feats = json.loads(Path(path).read_text())["features"]
    return np.array([f["properties"]["measurements"][key] for f in feats], np.float32)


def test_each_class_draws_its_column(three: dict[str, Path], tmp_path: Path) -> None:
    import tifffile

    stores, out = three["stores"], tmp_path / "hm"
    default = hm.heatmaps(stores, out, run_id="run3", downsample=DS, slide_ids=["synth_004"])
    (d_row,) = default
    d_summary = Path(d_row["files"]["summary"])
    before = {k: Path(v).read_bytes() for k, v in d_row["files"].items()}
    st = SlideStore(stores / "synth_004.zarr")
    probs = np.asarray(st.group[class_scores_key("run3")][...])
    attrs = dict(st.group[scores_key("run3")].attrs)
    seen: dict[str, bytes] = {}
    for j, name in enumerate(CLASSES):
        got, pred = hm.read_scores(st, "run3", class_name=name)
        np.testing.assert_array_equal(got, probs[:, j])  # the (N, C) column, exactly
        assert pred["predicted"] == attrs["predicted"]
        (row,) = hm.heatmaps(
            stores, out, run_id="run3", class_name=name, downsample=DS, slide_ids=["synth_004"]
        )
        assert row["status"] == "ok", row
        files = {k: Path(v) for k, v in row["files"].items()}
        assert all(p.name.startswith(f"synth_004_score-{name}_") for p in files.values())
        np.testing.assert_allclose(
            _tile_values(files["tiles_geojson"], "probability"), probs[:, j], atol=1e-6
        )
        s = json.loads(files["summary"].read_text())
        assert s["class"] == name and s["params"]["class"] == name and s["which"] == "score"
        assert f"probability of class '{name}'" in s["legend"]
        assert s["prediction"]["label"] == attrs["predicted"]  # the predicted class, named
        assert s["prediction"]["label"] == max(
            attrs["probabilities"], key=attrs["probabilities"].get
        )
        assert s["prediction"]["class_probability"] == pytest.approx(attrs["probabilities"][name])
        seen[name] = tifffile.imread(files["values_tiff"], key=0).tobytes()
    assert len(set(seen.values())) == 3  # three different heatmaps
    # the default export is still there, untouched, and names no class
    assert {k: Path(v).read_bytes() for k, v in d_row["files"].items()} == before
    assert json.loads(d_summary.read_text())["class"] is None
    assert len(list((out / "synth_004").glob("*_summary.json"))) == 4
    again = hm.heatmaps(
        stores, out, run_id="run3", class_name="b", downsample=DS, slide_ids=["synth_004"]
    )
    assert again[0]["status"] == "skipped" and again[0]["reason"] == "already exported"


def test_class_names_are_sanitised_for_file_names() -> None:
    assert hm.which_name("score") == "score"
    assert hm.which_name("score", "tumour b/2") == "score-tumour_b_2"


def test_options_check() -> None:
    assert hm.check_options("score", class_name="b", classes=CLASSES) == ("probability", 0.5)
    assert hm.check_options("score", "percentile", class_name="b") == ("percentile", 90.0)
    with pytest.raises(ConfigError, match=r"unknown class 'z': the run's classes are 'a', 'b'"):
        hm.check_options("score", class_name="z", classes=CLASSES)
    with pytest.raises(ConfigError, match="attention has no classes"):
        hm.check_options("attention", class_name="a")
    with pytest.raises(ConfigError, match="class must be a class name"):
        hm.check_options("score", class_name=3)  # type: ignore[arg-type]


def test_unknown_class_is_refused_before_any_file(three: dict[str, Path], tmp_path: Path) -> None:
    stores = three["stores"]
    with pytest.raises(ConfigError, match=r"unknown class 'zebra': the run's classes are 'a', "):
        hm.heatmaps(stores, tmp_path / "never", run_id="run3", class_name="zebra")
    with pytest.raises(ConfigError, match=r"unknown class 'zebra'"):
        hm.read_scores(SlideStore(stores / "synth_000.zarr"), "run3", class_name="zebra")
    assert not any((tmp_path / "never").rglob("*"))  # the folder is checked first; no file in it


def test_cli_class(
    three: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stores, run = three["stores"], three["run"]
    base = ["heatmap", str(stores), "--run", str(run), "--downsample", "32", "-q"]
    out = tmp_path / "cli"
    assert main([*base, "--out", str(out), "--class", "c", "--slide", "synth_002"]) == 0
    assert (out / "synth_002" / "synth_002_score-c_overlay.png").is_file()
    assert "heatmaps for 1 of 1 slide(s)" in capsys.readouterr().out
    # unknown: one line naming the class and the run's classes, exit 2 (bad usage)
    assert main([*base, "--out", str(tmp_path / "x"), "--class", "zebra"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown class 'zebra': the run's classes are 'a', 'b', 'c'"], err
    # the same from the stores alone (the run folder is not here)
    gone = ["heatmap", str(stores), "--run", str(tmp_path / "elsewhere"), "--run-id", "run3"]
    assert main([*gone, "--out", str(tmp_path / "x"), "--class", "zebra", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown class 'zebra'" in err[0], err
    assert not any((tmp_path / "x").rglob("*"))  # the folder is checked first; no file in it
    assert main(["heatmap", "--help"]) == 0
    assert "--class NAME" in capsys.readouterr().out


def test_old_stores_say_rerun_predict(
    three: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stores = tmp_path / "stores"
    old = _old_store(three, stores, "synth_001")
    _old_store(three, stores, "synth_005")
    shutil.copytree(three["stores"] / "synth_002.zarr", stores / "synth_002.zarr")
    with pytest.raises(StoreError, match=r"predicted before per-class probabilities"):
        hm.read_scores(SlideStore(old), "run3", class_name="a")
    rows = {
        r["slide_id"]: r
        for r in hm.heatmaps(stores, tmp_path / "o", run_id="run3", class_name="b", downsample=DS)
    }
    assert rows["synth_002"]["status"] == "ok"
    for sid in ("synth_001", "synth_005"):
        assert rows[sid]["status"] == "failed"
        assert re.search(
            rf"{sid}\.zarr: no 'scores/run3-classes' in the store \(predicted before per-class "
            r"probabilities were written\); rerun 'wsi-pipeline predict --run run3' to draw "
            r"class 'b'",
            rows[sid]["error"],
        ), rows[sid]["error"]
    # the default heatmap of an old store still works
    assert hm.heatmaps(
        stores, tmp_path / "d", run_id="run3", downsample=DS, slide_ids=["synth_001"]
    )[0]["ok"]
    # the CLI: one ERROR line per old slide, the batch goes on, exit 1
    capsys.readouterr()  # the API's own log lines above
    args = ["heatmap", str(stores), "--run", str(three["run"]), "--out", str(tmp_path / "c")]
    assert main([*args, "--class", "b", "--downsample", "32", "-q"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and all("rerun 'wsi-pipeline predict --run run3'" in e for e in err), err
    assert "heatmaps for 1 of 3 slide(s)" in captured.out
    assert (tmp_path / "c" / "synth_002" / "synth_002_score-b_summary.json").is_file()


# ----------------------------------------------------------------------------------- pipeline
def _pipeline(tmp_path: Path, three: dict[str, Path], heatmap: dict[str, Any]) -> Path:
    data = {
        "out": str(tmp_path / "out"),
        "run": str(three["run"]),
        "stages": ["predict", "heatmap"],
        "predict": {"device": "cpu"},
        "heatmap": heatmap,
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_pipeline_class(
    three: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _pipeline(tmp_path, three, {"class_name": "zebra"})
    assert main(["run", str(bad), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(
        r"'heatmap': unknown class 'zebra': the run's classes are 'a', 'b', 'c'", err[0]
    ), err
    assert not (tmp_path / "out").exists()
    shutil.copytree(
        three["stores"] / "synth_003.zarr", tmp_path / "out" / "stores" / "synth_003.zarr"
    )
    path = _pipeline(tmp_path, three, {"class_name": "c", "downsample": DS})
    assert main(["run", str(path), "--check"]) == 0
    report = run_pipeline(load_pipeline(path), progress=False)
    assert [s["status"] for s in report["stages"]] == ["ran", "ran"] and not report["failed"]
    (png,) = report["stages"][1]["png"]
    assert png.endswith("synth_003_score-c_overlay.png")
    # a store whose scores were written before per-class probabilities is predicted again
    store = tmp_path / "out" / "stores" / "synth_003.zarr"
    shutil.rmtree(store / class_scores_key("run3"))
    report = run_pipeline(load_pipeline(path), progress=False)
    assert report["stages"][0]["status"] == "ran" and not report["failed"]
    assert open_store(store)[class_scores_key("run3")].attrs["complete"] is True
