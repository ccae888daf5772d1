"""Pipeline files: validation before any work, an end-to-end run, and skipping on a rerun."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import SMALL_PIPELINE as SMALL

from wsi_pipeline import runs
from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.pipeline import REPORT, load_pipeline, run_pipeline
from wsi_pipeline.specs import fold_config, tiling_from_options, train_config_from_options

ROOT = Path(__file__).resolve().parents[1]


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
        ({"synth": {"lesion_style": 1}}, r"'synth\.lesion_style' must be str"),
        ({"stages": ["tile", "paint"]}, r"'stages' must be a list"),
        # values are checked by the specs when the file is loaded, as the command line does
        ({"tile": {"tile_size": 4}}, r"tile: tile size must be between 8 and 4096 px, not 4"),
        ({"tile": {"mpp": 1.0, "level": 1}}, r"tile: give one target resolution.*not both"),
        ({"tile": {"workers": 0}}, r"tile: workers must be >= 1, not 0"),
        ({"train": {"precision": "half"}}, r"train: precision must be 'amp' or 'fp32'"),
        ({"train": {"workers": 0, "num_workers": 1}}, r"'num_workers' and 'workers' set the same"),
        ({"train": {"folds": 1}}, r"train: folds must be >= 2"),
        (
            {"train": {"folds": 2}},
            r"'train\.folds' trains 2 fold runs .* 'stages: \[tile, train\]'",
        ),
        ({"evaluate": {"labels": "x.csv", "bogus": 1}}, r"unknown key 'evaluate\.bogus'"),
        ({"evaluate": {"labels": "x.csv", "n_boot": "many"}}, r"'evaluate\.n_boot' must be int"),
        ({"evaluate": {"labels": "x.csv", "n_boot": 5}}, r"evaluate: n_boot must be .* >= 100"),
        ({"evaluate": {"device": "cpu"}}, r"'evaluate\.labels' .* is required"),
        ({"evaluate": {"labels": "nowhere.csv"}}, r"'evaluate\.labels': nowhere.csv does not"),
    ],
)
def test_validation_names_the_key(tmp_path: Path, patch: dict, message: str) -> None:
    data = {**SMALL, "out": str(tmp_path / "out"), **patch}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        load_pipeline(_write(tmp_path, data))
    assert not (tmp_path / "out").exists()  # nothing ran


def test_synth_section_takes_slide_options(tmp_path: Path) -> None:
    synth = {**SMALL["synth"], "lesion_style": "morphology", "pen_mark": True}
    p = load_pipeline(_write(tmp_path, {**SMALL, "out": str(tmp_path / "o"), "synth": synth}))
    assert p.synth == synth


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
    import torch
    import torchvision

    weights = tmp_path / "resnet50_weights.pth"  # --check loads the template's backbone weights
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    for name in ("cohort_template.yaml", "predict_new_slides.yaml"):
        text = (ROOT / "pipelines" / name).read_text()
        text = text.replace("/data/slides", str(slides)).replace("/data/new_slides", str(slides))
        text = text.replace("/data/labels.csv", str(labels))
        text = text.replace("/models/resnet50_weights.pth", str(weights))
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
    assert Path(report["html"]).resolve() == (out / "report.html").resolve()  # the QC page
    assert "P abnormal" in (out / "report.html").read_text()
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


def test_train_options_are_built_once_with_the_cli_names(tmp_path: Path) -> None:
    data = {**SMALL, "out": str(tmp_path / "o")}
    data["train"] = {**SMALL["train"], "precision": "fp32", "folds": 3}
    data["stages"] = ["synth", "tile", "train"]
    p = load_pipeline(_write(tmp_path, data))
    config, folds = train_config_from_options(data["train"])
    assert p.train_config == config and p.folds == folds == 3
    assert config.amp is False and config.folds is None  # folds: cross-validation, not a split
    assert p.tiling == tiling_from_options(SMALL["tile"])[0]
    assert p.tiling.mpp == 1.0 and p.tiling.level is None


def test_train_folds_like_train_folds_command(
    small_cohort: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train: {folds: 2}`` cross-validates as ``train --folds 2`` does, and skips when done."""
    stores, labels = small_cohort
    out = tmp_path / "out"
    shutil.copytree(stores, out / "stores")
    train = {"epochs": 2, "max_patches": 8, "workers": 0, "folds": 2}
    data = {"out": str(out), "labels": str(labels), "stages": ["train"], "train": train}
    path = _write(tmp_path, data)
    report = run_pipeline(path, progress=False)
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [("train", "ran")]
    cv = json.loads((out / "run" / runs.CV_METRICS).read_text())
    assert cv["folds"] == 2 and len(cv["val_auc"]) == 2
    config, _ = train_config_from_options(train)
    for k in range(2):
        fold = runs.fold_dir(out / "run", k)
        assert (fold / runs.MODEL).is_file()
        saved = json.loads((fold / runs.CONFIG).read_text())["train"]
        assert saved == fold_config(config, folds=2, fold=k).to_dict()
    assert report["summary"]["folds"] == 2
    assert report["summary"]["cv_val_auc_mean"] == cv["val_auc_mean"]
    strict = json.loads((out / REPORT).read_text(), parse_constant=_no_nan)
    assert strict["summary"]["folds"] == 2
    # a rerun skips the finished folds; the command line prints the cross-validation AUC
    assert main(["run", str(path), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "train    skipped" in printed and "2-fold validation AUC" in printed


def _no_nan(name: str) -> None:
    raise AssertionError(f"report.json is not strict JSON: {name}")


def test_evaluate_stage_then_skip(
    small_cohort: tuple[Path, Path], fast_run: Path, tmp_path: Path
) -> None:
    """``evaluate:`` scores a labelled cohort with the run, as ``wsi-pipeline evaluate`` does."""
    stores, labels = small_cohort
    shutil.copytree(stores, tmp_path / "ext")
    out = tmp_path / "out"
    section = {"labels": str(labels), "stores": str(tmp_path / "ext"), "n_boot": 200}
    data = {"out": str(out), "run": str(fast_run), "stages": ["evaluate"], "evaluate": section}
    path = _write(tmp_path, data)
    p = load_pipeline(path)
    assert p.stages == ("evaluate",) and p.evaluate_stores == tmp_path / "ext"
    report = run_pipeline(p, progress=False)
    (stage,) = report["stages"]
    assert stage["stage"] == "evaluate" and stage["status"] == "ran" and stage["n"] == 8
    ev = json.loads((out / "evaluation" / "evaluation.json").read_text(), parse_constant=_no_nan)
    assert ev["bootstrap"]["n_boot"] == 200 and ev["run_id"] == "run"
    assert stage["auc"] == ev["metrics"]["auc"]["value"]
    assert report["summary"]["evaluation_n"] == 8 and not report["failed"]
    again = run_pipeline(path, progress=False)
    assert [s["status"] for s in again["stages"]] == ["skipped"]
    # other options: evaluated again
    section["seed"] = 1
    third = run_pipeline(_write(tmp_path, data), progress=False)
    assert [s["status"] for s in third["stages"]] == ["ran"]


@pytest.mark.parametrize(
    ("synth", "message"),
    [
        ({"n_slides": -3}, r"'synth': n_slides must be between 1 and"),
        ({"lesion_style": "tumor"}, r"'synth': lesion_style must be one of tumour, morphology"),
        ({"width": 0}, r"'synth': width must be between"),
    ],
)
def test_check_validates_synth_values_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], synth: dict, message: str
) -> None:
    """`run --check` calls the code write_cohort runs: 'valid' never precedes a failing run."""
    base = {**SMALL, "out": str(tmp_path / "o")}
    bad = _write(tmp_path, {**base, "synth": {**base["synth"], **synth}}, "bad.yaml")
    assert main(["run", str(bad), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("heatmap", "message"),
    [
        ({"mode": "bogus"}, r"'heatmap': heatmap mode must be one of"),
        ({"threshold": "high"}, r"'heatmap': threshold must be a number, not 'high'"),
        ({"which": "attention", "mode": "probability"}, r"attention weights are not probab"),
        ({"combine": "max"}, r"'heatmap': combine must be one of tercile, min, mean, not 'max'"),
        ({"model_id": "abc"}, r"heatmap.*model_id"),
    ],
)
def test_check_validates_heatmap_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], heatmap: dict, message: str
) -> None:
    bad = _write(tmp_path, {**SMALL, "out": str(tmp_path / "o"), "heatmap": heatmap}, "bad.yaml")
    assert main(["run", str(bad), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"model": "nosuch"}, r"train: unknown model 'nosuch'; known models: .*abmil"),
        ("train", {"backbone": "nosuch"}, r"train: unknown backbone 'nosuch'; known backbones"),
        (
            "train",
            {"mode": "features", "backbone": "nosuch"},
            r"train: .*unknown backbone 'nosuch'",
        ),
        ("train", {"backbone_weights": "MISSING.pt"}, r"train: .*MISSING\.pt"),
        ("predict", {"device": "tpu"}, r"predict\.device: device must be auto, cpu, cuda"),
    ],
)
def test_check_builds_the_model_and_device_the_stages_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, values: dict, message: str
) -> None:
    """`run --check` builds the model (weights loaded) and resolves the device by the stages'
    own code, so 'valid' never precedes a train or predict stage that fails on them."""
    if "backbone_weights" in values:
        values = {"backbone_weights": str(tmp_path / values["backbone_weights"])}
    data = {**SMALL, "out": str(tmp_path / "o")}
    data[section] = {**data.get(section, {}), **values}
    bad = _write(tmp_path, data, "bad.yaml")
    assert main(["run", str(bad), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "o").exists()
    good = _write(tmp_path, {**SMALL, "out": str(tmp_path / "o")}, "good.yaml")
    assert main(["run", str(good), "--check"]) == 0


PRETRAIN = {"epochs": 1, "batch_size": 16, "patches_per_epoch": 64, "device": "cpu"}


def test_pretrain_stage_feeds_train_then_skips(tmp_path: Path) -> None:
    """A ``pretrain:`` section runs SimCLR on the stores' patches before training, and the train
    stage starts its backbone from those weights; a rerun skips both; new pretrain options make
    new weights and train again."""
    data = {**SMALL, "out": str(tmp_path / "out"), "pretrain": PRETRAIN}
    data["stages"] = ["synth", "tile", "pretrain", "train"]
    path = _write(tmp_path, data)
    report = run_pipeline(path, progress=False)
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [
        ("synth", "ran"),
        ("tile", "ran"),
        ("pretrain", "ran"),
        ("train", "ran"),
    ]
    weights = tmp_path / "out" / "pretrain" / "backbone.pt"
    made = json.loads(weights.with_name("backbone.pt.json").read_text())
    assert made["epochs"] == 1 and made["config"]["batch_size"] == 16
    saved = json.loads((tmp_path / "out" / "run" / runs.CONFIG).read_text())
    assert saved["train"]["backbone_weights"] == str(weights)
    again = run_pipeline(path, progress=False)
    assert [s["status"] for s in again["stages"]] == ["skipped"] * 4
    # other pretrain options: the weights are made again, and the model trained again on them
    _write(tmp_path, {**data, "pretrain": {**PRETRAIN, "lr": 1e-3}})
    third = run_pipeline(path, progress=False)
    assert {s["stage"]: s["status"] for s in third["stages"]} == {
        "synth": "skipped",
        "tile": "skipped",
        "pretrain": "ran",
        "train": "ran",
    }


@pytest.mark.parametrize(
    ("pretrain", "train", "message"),
    [
        ({"epochs": 0}, {}, r"pretrain: epochs must be >= 1"),
        ({"backbone": "nosuch"}, {}, r"pretrain: .*unknown backbone 'nosuch'"),
        ({"epochz": 1}, {}, r"unknown key 'pretrain\.epochz'"),
        (
            {"backbone": "resnet18"},
            {},
            r"'pretrain\.backbone' \(resnet18\) must be 'train\.backbone'",
        ),
        ({}, {"backbone_weights": "w.pt"}, r"'train\.backbone_weights' and a 'pretrain' section"),
    ],
)
def test_check_validates_the_pretrain_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pretrain: dict, train: dict, message: str
) -> None:
    (tmp_path / "w.pt").write_bytes(b"")
    data = {**SMALL, "out": str(tmp_path / "o"), "pretrain": pretrain}
    data["train"] = {**SMALL["train"], **train}
    assert main(["run", str(_write(tmp_path, data, "bad.yaml")), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
