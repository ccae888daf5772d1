"""``export --format wsinfer``: the TorchScript patch scorer reproduces ``predict``'s scores."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_run

from wsi_pipeline.cli import main
from wsi_pipeline.errors import TrainingError
from wsi_pipeline.prediction import predict
from wsi_pipeline.store import PatchReader, list_stores, open_store, scores_key
from wsi_pipeline.wsinfer import CONFIG, TORCHSCRIPT, export_run

#: required keys of the WSInfer model-config schema (wsinfer-zoo, model-config.schema.json)
REQUIRED = {
    "spec_version",
    "architecture",
    "num_classes",
    "patch_size_pixels",
    "spacing_um_px",
    "class_names",
    "transform",
}


def wsinfer_scores(model_dir: Path, store: Path) -> np.ndarray:
    """Per-patch ``1 - p(negative)`` the way the WSInfer extension computes it: ToTensor,
    Normalize from config.json, the TorchScript model, softmax."""
    import torch

    cfg = json.loads((model_dir / CONFIG).read_text())
    norm = next(t for t in cfg["transform"] if t["name"] == "Normalize")["arguments"]
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(model_dir / TORCHSCRIPT))
    rd = PatchReader(store)
    x = torch.from_numpy(rd.read(np.arange(rd.n))).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        # batches of 7: not the traced batch size
        p = torch.cat([torch.softmax(model((c - mean) / std), dim=1) for c in x.split(7)])
    neg = cfg["class_names"].index("0")
    return (1.0 - p[:, neg]).numpy()


@pytest.fixture()
def work(small_cohort: tuple[Path, Path], fast_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    stores, _ = small_cohort
    shutil.copytree(stores, tmp_path / "stores")
    return tmp_path / "stores", copy_run(fast_run, tmp_path / "run")


def check_reproduces(stores: Path, run: Path, tmp: Path, rid: str) -> None:
    predict(stores, run, tmp / f"pred-{rid}", run_id=rid, progress=False, device="cpu")
    model_dir = tmp / f"model-{rid}"
    export_run(run, model_dir)
    for sp in list_stores(stores)[:3]:
        want = np.asarray(open_store(sp)[scores_key(rid)][...])
        got = wsinfer_scores(model_dir, sp)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_export_reproduces_predict_scores(work: tuple[Path, Path], tmp_path: Path) -> None:
    stores, run = work
    check_reproduces(stores, run, tmp_path, "plain")
    cfg = json.loads((tmp_path / "model-plain" / CONFIG).read_text())
    assert REQUIRED <= set(cfg)
    assert cfg["spec_version"] == "1.0"
    assert cfg["patch_size_pixels"] == 64 and cfg["spacing_um_px"] == 1.0
    assert cfg["num_classes"] == len(cfg["class_names"]) == 2
    assert [t["name"] for t in cfg["transform"]] == ["Resize", "ToTensor", "Normalize"]


def test_export_carries_the_patch_calibration(work: tuple[Path, Path], tmp_path: Path) -> None:
    stores, run = work
    cal = {"method": "platt", "num_classes": 2, "negative": 0, "a": 1.7, "b": -0.4}
    (run / "calibration.json").write_text(json.dumps(cal))
    check_reproduces(stores, run, tmp_path, "platt")
    cal["patch"] = {"a": 2.5, "center": 0.3, "quantile": 0.99, "n": 10}
    (run / "calibration.json").write_text(json.dumps(cal))
    check_reproduces(stores, run, tmp_path, "patch")
    (run / "calibration.json").write_text(json.dumps({"method": "temperature", "temperature": 3.0}))
    check_reproduces(stores, run, tmp_path, "temp")


def test_export_refuses_a_run_without_spacing(fast_run: Path, tmp_path: Path) -> None:
    run = copy_run(fast_run, tmp_path / "run")
    (run / "tiling.json").write_text(json.dumps({"tile_px": 64, "level": 0, "downsample": 1.0}))
    with pytest.raises(TrainingError, match="µm/px"):
        export_run(run, tmp_path / "m")
    assert not (tmp_path / "m" / TORCHSCRIPT).exists()


def test_export_cli(fast_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(fast_run), "--format", "wsinfer", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / TORCHSCRIPT).is_file() and (tmp_path / "m" / CONFIG).is_file()
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m2")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    assert main(["export", str(fast_run), "--format", "onnx", "--out", str(tmp_path / "m3")]) == 2
