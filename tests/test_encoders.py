"""Pathology encoder presets (wsi_pipeline.encoders), offline, and the features command on real
stores. Nothing is downloaded: every checkpoint is written here, in tmp_path."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from helpers import EvilPickle, refuse_downloads

from wsi_pipeline import features
from wsi_pipeline.cli import main
from wsi_pipeline.encoders import (
    ENCODER_PRESETS,
    EncoderPreset,
    build_preset,
    hf_snapshot,
    list_encoders,
)
from wsi_pipeline.errors import ConfigError, TrainingError
from wsi_pipeline.features import H5_DIR, PT_DIR, load_encoder
from wsi_pipeline.models import get_backbone
from wsi_pipeline.store import COORDS, features_key
from wsi_pipeline.weights import RANDOM_INIT


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download fails the test loudly."""
    refuse_downloads(monkeypatch)


def test_unknown_names_and_missing_weights() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^unknown encoder 'unii'; known encoders: conch, h-optimus-0, phikon-v2, uni, virchow2$",
    ):
        load_encoder(encoder="unii", weights=None)
    with pytest.raises(ConfigError, match=r"^unknown backbone 'vgg'; known backbones: resnet18, "):
        load_encoder(backbone="vgg", weights="none")
    with pytest.raises(
        ConfigError,
        match=r"^backbone 'resnet18' needs weights: a torchvision weights name \(IMAGENET1K_V1, "
        r"DEFAULT\), a weights file, or 'none' for a random initialisation$",
    ):
        load_encoder(backbone="resnet18", weights=None)
    with pytest.raises(ConfigError, match=r"one of a backbone .* not both"):
        load_encoder(backbone="smallcnn", encoder="uni", weights="none")
    with pytest.raises(TrainingError, match=r"nope\.pt: no such weights file"):
        load_encoder(backbone="smallcnn", weights="nope.pt")


# ---------------------------------------------------------------------------------------------
# presets


def test_presets_carry_their_preprocessing() -> None:
    assert list_encoders() == ["conch", "h-optimus-0", "phikon-v2", "uni", "virchow2"]
    for name in list_encoders():
        p = ENCODER_PRESETS[name]
        assert p.timm_name.startswith("hf-hub:") and "/" in p.hf_repo
        assert p.dim > 0 and p.input_px in (224, 448) and p.mpp == 0.5
        assert len(p.mean) == len(p.std) == 3 and p.licence
        assert name in p.describe() and p.licence in p.describe()
    assert ENCODER_PRESETS["uni"].timm_name == "hf-hub:MahmoodLab/UNI"
    assert ENCODER_PRESETS["virchow2"].dim == 2560 and ENCODER_PRESETS["conch"].input_px == 448


def test_preset_without_timm_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(
        ConfigError,
        match=r"^encoder 'uni' needs the 'timm' package: pip install 'wsi-pipeline\[timm\]'$",
    ):
        build_preset("uni", "none")


def test_preset_not_in_the_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        TrainingError,
        match=r"^encoder uni: weights not in the Hugging Face cache \(.*hub/models--MahmoodLab--UNI\); "
        r"accept the licence at https://huggingface.co/MahmoodLab/UNI, .* or pass --weights",
    ):
        load_encoder(encoder="uni", weights=None)
    with pytest.raises(TrainingError, match=r"nowhere: no such weights file or folder"):
        build_preset("uni", tmp_path / "nowhere")


def _fake_snapshot(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """The layout ``huggingface-cli download`` leaves: refs/main -> snapshots/<commit>/."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_hf_snapshot_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = _fake_snapshot(tmp_path / "hub", "MahmoodLab/UNI", {"pytorch_model.bin": b"x"})
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hf_snapshot("MahmoodLab/UNI") == snap
    assert hf_snapshot("MahmoodLab/uni") == snap  # one repository on the hub, any case
    assert hf_snapshot("paige-ai/Virchow2") is None


TINY = EncoderPreset(
    name="tiny",
    hf_repo="test/tiny-vit",
    library="timm",
    arch="vit_tiny_patch16_224",
    dim=192 * 2,
    input_px=32,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    mpp=0.5,
    interpolation="bicubic",
    licence="test",
    pooling="cls+mean",
    prefix_tokens=3,
    arch_kwargs={
        "img_size": 32,
        "num_classes": 0,
        "reg_tokens": 2,
        "global_pool": "",
        "depth": 2,
        "mlp_layer": "timm.layers.SwiGLUPacked",
        "act_layer": "torch.nn.SiLU",
    },
)


def test_timm_preset_from_the_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")
    monkeypatch.setitem(ENCODER_PRESETS, "tiny", TINY)
    # the preset names its layer classes as strings; the reference model is built here with the
    # classes themselves, so the loader matches it only if it resolves those names to them
    kwargs = {
        **TINY.arch_kwargs,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
    }
    torch.manual_seed(2)
    source = timm.create_model(TINY.arch, pretrained=False, **kwargs).eval()
    cache = tmp_path / "hub"
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    _fake_snapshot(cache, TINY.hf_repo, {"pytorch_model.bin": path.read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    enc = load_encoder(encoder="tiny", weights=None)
    assert enc.input_px == 32 and enc.mean == (0.5, 0.5, 0.5) and enc.preset == "tiny"
    assert "models--test--tiny-vit" in enc.weights
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = source(x)
        want = torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], dim=-1)
        torch.testing.assert_close(enc.module(x), want)
    assert want.shape == (3, enc.dim)
    # a local file, a random init (the class names resolved without weights too), and a file
    # of another architecture
    assert build_preset("tiny", path)[2] == str(path.absolute())
    fresh, dim, label = build_preset("tiny", "none")
    assert label == RANDOM_INIT and dim == enc.dim
    with torch.no_grad():
        assert fresh.eval()(x).shape == (3, dim)
    shapes = [tuple(v.shape) for v in source.state_dict().values()]
    assert [tuple(v.shape) for v in fresh.state_dict().values()] == shapes  # SwiGLU-packed MLPs
    torch.save(get_backbone("smallcnn")[0].state_dict(), tmp_path / "small.pt")
    with pytest.raises(TrainingError, match=r"small\.pt: weights do not fit backbone Vision"):
        build_preset("tiny", tmp_path / "small.pt")


# ---------------------------------------------------------------------------------------------
# the features command on real stores


@pytest.fixture
def store(tiled_store: Path, tmp_path: Path) -> Path:
    """A copy of the real tiled store (the command writes into it)."""
    dest = tmp_path / "stores" / tiled_store.name
    shutil.copytree(tiled_store, dest)
    return dest


def _n_patches(store: Path) -> int:
    return int(zarr.open_group(str(store), mode="r")[COORDS].shape[0])


def test_features_command_computes_once_and_labels_random_init(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    real = features.embed_store

    def counting(sp, net, **kw):
        calls.append(Path(sp).name)
        return real(sp, net, **kw)

    monkeypatch.setattr(features, "embed_store", counting)
    args = ["features", str(store.parent), "--backbone", "smallcnn", "--weights", "none"]
    args += ["--device", "cpu", "--batch-size", "7"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "features from a randomly initialised backbone" in err
    assert "1 computed" in out and "weights random-init" in out
    name = out.split("features/")[1].split(" ")[0]
    arr = zarr.open_group(str(store), mode="r")[features_key(name)]
    assert arr.shape == (_n_patches(store), 128) and arr.attrs["complete"] is True
    assert arr.attrs["weights"] == "random-init" and arr.attrs["backbone"] == "smallcnn"
    assert calls == [store.name]
    assert main(args) == 0  # again: skipped, nothing embedded
    assert "1 skipped" in capsys.readouterr().out and calls == [store.name]


def test_features_command_exports_h5_and_pt(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    args = ["features", str(store), "--backbone", "smallcnn", "--weights", "none", "-q"]
    assert main([*args, "--device", "cpu", "--export-h5", str(out)]) == 0
    name = capsys.readouterr().out.split("features/")[1].split(" ")[0]
    g = zarr.open_group(str(store), mode="r")
    n = _n_patches(store)
    with h5py.File(out / H5_DIR / "s.h5", "r") as f:
        assert f["features"].shape == (n, 128) and f["features"].dtype == np.float32
        assert f["coords"].shape == (n, 2)
        np.testing.assert_array_equal(f["coords"][...], g[COORDS][...])
        np.testing.assert_array_equal(
            f["features"][...], np.asarray(g[features_key(name)][...], np.float32)
        )
        assert f["coords"].attrs["patch_size"] == 64 and f.attrs["extractor"] == name
    pt = torch.load(out / PT_DIR / "s.pt", weights_only=True)
    assert isinstance(pt, torch.Tensor) and pt.shape == (n, 128) and pt.dtype == torch.float32


def test_features_command_an_unfinished_store_fails_alone(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = store.parent / "bad.zarr"
    shutil.copytree(store, bad)
    zarr.open_group(str(bad), mode="r+").attrs["complete"] = False
    args = ["features", str(store.parent), "--backbone", "smallcnn", "--weights", "none"]
    assert main([*args, "--device", "cpu", "-q"]) == 1
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {bad}: store is unfinished (no complete: true); rerun 'wsi-pipeline tile'"
    ]
    assert "1 computed, 1 failed" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backbone", "resnet18"], "backbone 'resnet18' needs weights"),
        (["--backbone", "smallcnn", "--encoder", "uni"], "not both"),
        (["--encoder", "unii"], "unknown encoder 'unii'; known encoders: conch, h-optimus-0"),
        (
            ["--backbone", "resnet18", "--weights", "IMAGENET1K_V9"],
            "valid: IMAGENET1K_V1, DEFAULT, none",
        ),
    ],
)
def test_features_command_usage_errors(
    store: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["features", str(store), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_features_command_refuses_a_malicious_pickle(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    torch.save({"x": EvilPickle(marker)}, path)
    assert main(["features", str(store), "--backbone", "smallcnn", "--weights", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a weights-only torch file, refused" in err and len(err.splitlines()) == 1
    assert not marker.exists()
    assert features_key("x") not in zarr.open_group(str(store), mode="r")


def test_import_h5_round_trip(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    base = ["features", str(store), "-q", "--device", "cpu"]
    assert (
        main([*base, "--backbone", "smallcnn", "--weights", "none", "--export-h5", str(out)]) == 0
    )
    name = capsys.readouterr().out.split("features/")[1].split(" ")[0]
    assert main([*base, "--import-h5", str(out), "--name", "trident-smallcnn"]) == 0
    assert "1 imported" in capsys.readouterr().out
    g = zarr.open_group(str(store), mode="r")
    np.testing.assert_array_equal(
        g[features_key("trident-smallcnn")][...], g[features_key(name)][...]
    )
    assert g[features_key("trident-smallcnn")].attrs["imported_from"].endswith("s.h5")
    # coords of another tiling: that slide fails
    with h5py.File(out / H5_DIR / "s.h5", "r+") as f:
        f["coords"][0] = f["coords"][0] + 1
    assert main([*base, "--import-h5", str(out), "--name", "other"]) == 1
    assert "coords differ from the store's" in capsys.readouterr().err


def test_phikon_v2_preset_from_the_hf_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The phikon-v2 build path (transformers' DINOv2, from config.json + model.safetensors in
    the Hugging Face cache layout) on a tiny DINOv2 of random weights written here. The preset is
    the real one except its output width (the real model is 1024 wide)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    import dataclasses

    preset = dataclasses.replace(ENCODER_PRESETS["phikon-v2"], dim=32, input_px=32)
    monkeypatch.setitem(ENCODER_PRESETS, "phikon-v2", preset)
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(3)
    source = transformers.Dinov2Model(config).eval()
    cache = tmp_path / "hub"
    snap = _fake_snapshot(cache, "owkin/phikon-v2", {})
    source.save_pretrained(str(snap))
    assert (snap / "model.safetensors").is_file() and (snap / "config.json").is_file()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    enc = load_encoder(encoder="phikon-v2", weights=None)
    assert enc.preset == "phikon-v2" and enc.weights == str(snap / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = source(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(enc.module.eval()(x), want)
    assert want.shape == (2, enc.dim)
    # the folder itself, and the refusals: no config.json, --weights none
    assert build_preset("phikon-v2", snap)[2] == str(snap / "model.safetensors")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(snap / "model.safetensors", lone / "model.safetensors")
    with pytest.raises(TrainingError, match=r"lone: no config\.json next to the weights; pass"):
        build_preset("phikon-v2", lone)
    with pytest.raises(ConfigError, match=r"--weights none is not supported"):
        build_preset("phikon-v2", "none")


_FAKE_CONCH = '''
"""Stand-in for MahmoodLab's ``conch`` package (GitHub only): the two calls wsi-pipeline makes,
on a tiny image tower read with torch.load like the real one."""
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Conv2d(3, 8, 8, stride=8)
        self.proj = nn.Linear(8, 4)

    def encode_image(self, x, proj_contrast=True, normalize=True):
        h = self.trunk(x).mean((2, 3))
        h = self.proj(h) if proj_contrast else h
        return nn.functional.normalize(h, dim=-1) if normalize else h


def create_model_from_pretrained(arch, checkpoint_path):
    assert arch == "conch_ViT-B-16", arch
    model = Tiny()
    model.load_state_dict(torch.load(checkpoint_path, map_location="cpu", weights_only=True))
    return model, None
'''


def test_conch_preset_build_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conch build path up to the CONCH library: the checkpoint is found in the Hugging Face
    cache, a pickle that would run code is refused before CONCH opens it, and the embedding is
    ``encode_image(proj_contrast=False, normalize=False)``. The real CONCH package is published
    only on GitHub (MahmoodLab/CONCH; PyPI has an unofficial fork), so a stand-in package with
    the same two entry points is written here and its real architecture is not exercised."""
    pkg = tmp_path / "site" / "conch"
    (pkg / "open_clip_custom").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "open_clip_custom" / "__init__.py").write_text(_FAKE_CONCH)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for mod in ("conch", "conch.open_clip_custom"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    import importlib

    fake = importlib.import_module("conch.open_clip_custom")
    torch.manual_seed(4)
    source = fake.Tiny().eval()
    cache = tmp_path / "hub"
    ckpt = tmp_path / "pytorch_model.bin"
    torch.save(source.state_dict(), ckpt)
    snap = _fake_snapshot(cache, "MahmoodLab/CONCH", {"pytorch_model.bin": ckpt.read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    enc = load_encoder(encoder="conch", weights=None)
    assert enc.preset == "conch" and enc.input_px == 448 and enc.interpolation == "bicubic"
    assert enc.weights == str(snap / "pytorch_model.bin")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            enc.module(x), source.encode_image(x, proj_contrast=False, normalize=False)
        )
    with pytest.raises(ConfigError, match=r"conch.*--weights none is not supported"):
        build_preset("conch", "none")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    torch.save({"x": EvilPickle(marker)}, evil)
    with pytest.raises(TrainingError, match=r"not a weights-only torch file, refused"):
        build_preset("conch", evil)
    assert not marker.exists()


def test_features_under_torchrun_shard_the_slides(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """torchrun's RANK/WORLD_SIZE split the slides: each rank embeds its own share, alone."""
    other = store.parent / "t.zarr"
    shutil.copytree(store, other)
    args = ["features", str(store.parent), "--backbone", "smallcnn", "--weights", "none"]
    args += ["--device", "cpu", "-q"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0
    assert "1 computed" in capsys.readouterr().out
    name = next(iter(zarr.open_group(str(other), mode="r")["features"].array_keys()))
    assert features_key(name) not in zarr.open_group(str(store), mode="r")  # rank 0's slide
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0 and "1 computed" in capsys.readouterr().out
    assert features_key(name) in zarr.open_group(str(store), mode="r")
