"""Self-supervised pretraining (wsi_pipeline.pretrain) on real stores: a few real SimCLR steps,
resume equal to an uninterrupted run, and the weights it writes used by ``train
--backbone-weights`` and ``features --weights``."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError, TrainingError
from wsi_pipeline.models import get_backbone
from wsi_pipeline.pretrain import CHECKPOINT, TENSORBOARD, augment, nt_xent, pretrain
from wsi_pipeline.specs import PretrainConfig
from wsi_pipeline.store import features_key
from wsi_pipeline.weights import read_weights_file

#: a few real steps: 2 epochs of 2 batches of 16 patches, 32-px views
TINY = PretrainConfig(
    epochs=2, batch_size=16, patches_per_epoch=32, crop_px=32, device="cpu", proj_dim=16
)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return read_weights_file(path)


@pytest.fixture(scope="module")
def pretrained(small_cohort: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The weights of an uninterrupted TINY run on the small cohort."""
    out = tmp_path_factory.mktemp("pretrain") / "w.pt"
    res = pretrain([small_cohort[0]], out, TINY)
    assert res.weights == out and res.epochs_done == 2
    return out


def test_augment_views(synth_slide: Path) -> None:
    x = torch.rand(6, 3, 64, 64)
    cfg = replace(TINY, crop_px=48)
    a = augment(x, torch.Generator().manual_seed(1), cfg)
    b = augment(x, torch.Generator().manual_seed(1), cfg)
    c = augment(x, torch.Generator().manual_seed(2), cfg)
    assert a.shape == (6, 3, 48, 48) and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b)  # the generator decides everything
    assert not torch.allclose(a, c)
    # without crops, jitter and blur a view is a flip/rotation of the patch: same pixels
    plain = replace(
        TINY, crop_px=None, crop_scale=(1.0, 1.0), stain_jitter=0.0, color_jitter=0.0, blur_p=0.0
    )
    square = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = augment(square, g, plain)
        for i in range(4):
            d4 = [
                torch.rot90(t, k, (1, 2)) for t in (square[i], square[i].flip(2)) for k in range(4)
            ]
            assert min(float((v[i] - t).abs().max()) for t in d4) < 1e-5
    # stain jitter moves colour but keeps white white
    white = torch.ones(2, 3, 16, 16)
    stained = augment(white, torch.Generator().manual_seed(0), replace(plain, stain_jitter=0.2))
    assert float((stained - 1).abs().max()) < 0.25


def test_nt_xent_prefers_matching_views() -> None:
    z = torch.randn(8, 16)
    assert nt_xent(z, z, 0.2) < nt_xent(z, torch.randn(8, 16), 0.2)


def test_pretrain_writes_weights_logs_and_checkpoint(pretrained: Path) -> None:
    work = pretrained.with_name(pretrained.name + ".pretrain")
    assert (work / CHECKPOINT).is_file() and any((work / TENSORBOARD).iterdir())
    history = json.loads((work / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
    meta = json.loads(pretrained.with_name("w.pt.json").read_text())
    assert meta["method"] == "simclr" and meta["backbone"] == "smallcnn" and meta["epochs"] == 2
    state = _state(pretrained)
    fresh, _ = get_backbone("smallcnn")
    assert state.keys() == fresh.state_dict().keys()
    # the backbone learned something: not the random init of the same seed
    torch.manual_seed(TINY.seed)
    init, _ = get_backbone("smallcnn")
    assert any(not torch.equal(v, init.state_dict()[k]) for k, v in state.items())
    ck = torch.load(work / CHECKPOINT, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch"} <= set(ck)


def test_resume_equals_uninterrupted(
    small_cohort: tuple[Path, Path], pretrained: Path, tmp_path: Path
) -> None:
    out = tmp_path / "w.pt"
    first = pretrain([small_cohort[0]], out, TINY, stop_after=1)
    assert first.weights is None and first.epochs_done == 1 and not out.exists()
    with pytest.raises(ConfigError, match=r"checkpoint is already here; pass --resume"):
        pretrain([small_cohort[0]], out, TINY)
    with pytest.raises(ConfigError, match=r"cannot resume: option\(s\) lr differ"):
        pretrain([small_cohort[0]], out, replace(TINY, lr=1e-2), resume=True)
    torch.manual_seed(1234)  # the global RNG is the checkpoint's again on resume
    second = pretrain([small_cohort[0]], out, TINY, resume=True)
    assert second.weights == out and second.epochs_done == 2
    a, b = _state(pretrained), _state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)

    def losses(p: Path) -> list[float]:
        history = p.with_name(p.name + ".pretrain") / "history.json"
        return [h["loss"] for h in json.loads(history.read_text())]

    assert losses(out) == losses(pretrained)


def test_bad_checkpoint_and_no_patches(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "w.pt"
    pretrain([small_cohort[0]], out, TINY, stop_after=1)
    (tmp_path / "w.pt.pretrain" / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match=r"checkpoint\.pt: cannot resume from this checkpoint"):
        pretrain([small_cohort[0]], out, TINY, resume=True)
    with pytest.raises(ConfigError, match=r"too few patches \(\d+\) for one batch of 100000"):
        pretrain(
            [small_cohort[0]],
            tmp_path / "x.pt",
            replace(TINY, batch_size=100_000, patches_per_epoch=None),
        )
    with pytest.raises(ConfigError, match=r"unknown backbone 'vgg'"):
        pretrain([small_cohort[0]], tmp_path / "y.pt", replace(TINY, backbone="vgg"))


def test_weights_load_in_train_and_features(
    small_cohort: tuple[Path, Path],
    pretrained: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stores = tmp_path / "stores"
    shutil.copytree(small_cohort[0], stores)
    run = tmp_path / "run"
    args = ["train", str(stores), "--labels", str(small_cohort[1]), "--out", str(run), "-q"]
    args += ["--backbone-weights", str(pretrained), "--epochs", "1", "--max-patches", "8"]
    assert main([*args, "--mode", "features"]) == 0
    assert (
        main(
            [
                "features",
                str(stores),
                "--backbone",
                "smallcnn",
                "--weights",
                str(pretrained),
                "--device",
                "cpu",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    name = out.split("features/")[1].split(" ")[0]
    store = sorted(stores.glob("*.zarr"))[0]
    arr = zarr.open_group(str(store), mode="r")[features_key(name)]
    assert arr.attrs["weights"] == str(pretrained.absolute()) and arr.attrs["complete"] is True
    # the features are the pretrained backbone's, not a random init's
    net, _ = get_backbone("smallcnn", weights=pretrained)
    from wsi_pipeline.models.backbones import PatchNormalize
    from wsi_pipeline.store import PatchReader

    x = torch.from_numpy(PatchReader(store).read([0, 1])).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = net.eval()(PatchNormalize()(x)).numpy()
    np.testing.assert_allclose(np.asarray(arr[:2], np.float32), want, rtol=2e-2, atol=2e-2)


def test_pretrain_command(
    small_cohort: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.pt"
    args = ["pretrain", str(small_cohort[0]), "--out", str(out), "--epochs", "2"]
    args += [
        "--batch-size",
        "16",
        "--patches-per-epoch",
        "32",
        "--crop-px",
        "32",
        "--device",
        "cpu",
    ]
    assert main([*args, "--stop-after", "1"]) == 0
    assert "stopped after epoch 1 of 2" in capsys.readouterr().out and not out.exists()
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "pretrained smallcnn (2 epochs" in capsys.readouterr().out and out.is_file()
    assert (
        main(["pretrain", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    )  # bad usage: no such store or folder
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_an_unfinished_store_is_skipped_with_one_line(
    small_cohort: tuple[Path, Path], tmp_path: Path, logged: pytest.LogCaptureFixture
) -> None:
    stores = tmp_path / "stores"
    shutil.copytree(small_cohort[0], stores)
    bad = sorted(stores.glob("*.zarr"))[0]
    zarr.open_group(str(bad), mode="r+").attrs["complete"] = False
    res = pretrain([stores], tmp_path / "w.pt", replace(TINY, epochs=1))
    assert res.weights is not None
    lines = [r.getMessage() for r in logged.records if "skipping" in r.getMessage()]
    assert len(lines) == 1 and str(bad) in lines[0] and "unfinished" in lines[0]


@pytest.mark.slow
def test_ddp_two_processes_gloo(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m wsi_pipeline pretrain`` on the CPU (gloo): the batches
    of each epoch are split over the ranks, rank 0 alone writes the weights and the work
    folder, and the weights load into the backbone."""
    import subprocess
    import sys

    out = tmp_path / "ddp.pt"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "wsi_pipeline"]
    cmd += ["pretrain", str(small_cohort[0]), "--out", str(out), "--epochs", "2", "-q"]
    cmd += ["--batch-size", "16", "--patches-per-epoch", "64", "--crop-px", "32"]
    cmd += ["--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    made = json.loads(out.with_name(out.name + ".json").read_text())
    assert made["epochs"] == 2
    history = json.loads((out.with_name(out.name + ".pretrain") / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1] and all(np.isfinite(h["loss"]) for h in history)
    net, _ = get_backbone("smallcnn")
    net.load_state_dict(_state(out))  # the backbone's own keys and shapes


def test_pretrain_state(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    """What the pipeline's pretrain stage asks: fresh, then resume after an interrupted run
    (same options and stores), done once the weights are written; other options: fresh."""
    from wsi_pipeline.features import find_stores
    from wsi_pipeline.pretrain import pretrain_state

    out, stores = tmp_path / "w.pt", find_stores([small_cohort[0]])
    assert pretrain_state(out, TINY, stores) == "fresh"
    pretrain([small_cohort[0]], out, TINY, stop_after=1)
    assert pretrain_state(out, TINY, stores) == "resume"
    assert pretrain_state(out, replace(TINY, lr=1e-3), stores) == "fresh"
    pretrain([small_cohort[0]], out, TINY, resume=True)
    assert pretrain_state(out, TINY, stores) == "done"
    assert pretrain_state(out, TINY, stores[:-1]) != "done"
