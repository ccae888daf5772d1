"""Pipeline files: validation before any work, an end-to-end run, and skipping on a rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.pipeline import load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "name": "small",
    "synth": {
        "n_slides": 8,
        "width": 1536,
        "height": 1024,
        "mpp": 0.5,
        "seed": 21,
        "lesion_fraction": 0.05,
    },
    "tile": {"mpp": 1.0, "tile_size": 64, "overlap": 32},
    "train": {"epochs": 2, "max_patches": 16, "num_workers": 0},
    "predict": {"device": "cpu"},
    "heatmap": {"which": "score", "mode": "probability", "threshold": 0.5},
}


def _write(tmp_path: Path, data: dict, name: str = "p.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"outt": "x"}, r"unknown key 'outt'"),
        ({"tile": {"tile_sz": 64}}, r"unknown key 'tile\.tile_sz'"),
        ({"tile": {"mpp": "fast"}}, r"'tile\.mpp' must be .*number.*not str"),
        ({"tile": {"workers": True}}, r"'tile\.workers' must be int, not bool"),
        ({"train": {"epochs": "ten"}}, r"'train\.epochs' must be int"),
        ({"train": {"lr": -1.0}}, r"train: lr must be > 0"),
        ({"synth": None, "slides": "nowhere/slides"}, r"'slides': nowhere/slides does not exist"),
        ({"heatmap": {"colour": "red"}}, r"unknown key 'heatmap\.colour'"),
        ({"stages": ["tile", "paint"]}, r"'stages' must be a list"),
    ],
)
def test_validation_names_the_key(tmp_path: Path, patch: dict, message: str) -> None:
    data = {**SMALL, "out": str(tmp_path / "out"), **patch}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        load_pipeline(_write(tmp_path, data))
    assert not (tmp_path / "out").exists()  # nothing ran


def test_missing_out_run_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"'out' .* is required"):
        load_pipeline(_write(tmp_path, {"slides": str(tmp_path)}))
    no_run = {"out": str(tmp_path / "o"), "slides": str(tmp_path), "stages": ["tile", "predict"]}
    with pytest.raises(ConfigError, match=r"'run' .* is required when there is no train stage"):
        load_pipeline(_write(tmp_path, no_run))
    good = _write(tmp_path, {**SMALL, "out": str(tmp_path / "o")})
    assert main(["run", str(good), "--check"]) == 0
    assert "valid; stages synth, tile, train, predict, heatmap" in capsys.readouterr().out
    bad = _write(tmp_path, {**SMALL, "out": str(tmp_path / "o"), "tile": {"bogus": 1}}, "b.yaml")
    assert main(["run", str(bad), "--check"]) == 2
    assert "unknown key 'tile.bogus'" in capsys.readouterr().err


def test_shipped_pipelines_validate(tmp_path: Path) -> None:
    demo = load_pipeline(ROOT / "pipelines" / "demo.yaml")
    assert demo.stages == ("synth", "tile", "train", "predict", "heatmap")
    slides = tmp_path / "slides"
    slides.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"")
    for name in ("cohort_template.yaml", "predict_new_slides.yaml"):
        text = (ROOT / "pipelines" / name).read_text()
        text = text.replace("/data/slides", str(slides)).replace("/data/new_slides", str(slides))
        text = text.replace("/data/labels.csv", str(labels))
        text = text.replace("/data/runs/my-cohort/run", str(run)).replace(
            "/data/runs", str(tmp_path)
        )
        p = tmp_path / name
        p.write_text(text)
        load_pipeline(p)


def test_run_end_to_end_then_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {**SMALL, "out": "out"})
    report = run_pipeline(path, progress=False)
    assert [s["stage"] for s in report["stages"]] == [
        "synth",
        "tile",
        "train",
        "predict",
        "heatmap",
    ]
    assert all(s["status"] == "ran" for s in report["stages"]), report["stages"]
    assert not report["failed"]
    out = tmp_path / "out"
    assert (out / "report.json").is_file() and (out / "run" / "model.pt").is_file()
    assert (out / "predictions" / "predictions.csv").is_file()
    pngs = report["stages"][-1]["png"]
    assert len(pngs) == 8 and all(Path(p).is_file() for p in pngs)
    assert "held_out_auc" in report["summary"]
    again = run_pipeline(path, progress=False)
    assert [s["status"] for s in again["stages"]] == ["skipped"] * 5, again["stages"]
    # a half-finished training resumes instead of starting over
    m = json.loads((out / "run" / "metrics.json").read_text())
    m["finished"] = False
    (out / "run" / "metrics.json").write_text(json.dumps(m))
    third = run_pipeline(path, progress=False)
    assert {s["stage"]: s["status"] for s in third["stages"]}["train"] == "resumed"
    shutil.rmtree(out / "heatmaps")
    assert main(["run", str(path), "-q"]) == 0
