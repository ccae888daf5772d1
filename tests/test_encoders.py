"""Encoder weights the way users have them (wsi_pipeline.encoders), offline, and the features
command on real stores. Nothing is downloaded: every checkpoint is written here, in tmp_path."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
import zarr

from wsi_pipeline import features
from wsi_pipeline.cli import main
from wsi_pipeline.encoders import (
    ENCODER_PRESETS,
    RANDOM_INIT,
    EncoderPreset,
    build_preset,
    find_weights_file,
    hf_snapshot,
    list_encoders,
    load_weights,
    read_weights_file,
    torchvision_checkpoint,
)
from wsi_pipeline.errors import ConfigError, TrainingError
from wsi_pipeline.features import H5_DIR, PT_DIR, load_encoder
from wsi_pipeline.models import get_backbone
from wsi_pipeline.store import COORDS, features_key

R18_FILE = "resnet18-f37072fd.pth"  # the file name of torchvision's ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME; torchvision's cache is ``<it>/hub/checkpoints``."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    """A seeded random resnet18 state dict (with its fc), standing in for ImageNet weights."""
    torch.manual_seed(11)
    model = torchvision.models.resnet18(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tensors(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    keys = [k for k in state if not k.startswith("fc.")]
    assert keys and set(keys) == set(own)
    for k in keys:
        torch.testing.assert_close(own[k], state[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------
# torchvision weights names, from torchvision's cache


def test_torchvision_name_loads_the_cached_file(
    torch_home: Path, r18_state: dict[str, torch.Tensor]
) -> None:
    weights = torchvision.models.get_model_weights("resnet18")["IMAGENET1K_V1"]
    assert os.path.basename(weights.url) == R18_FILE
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(r18_state, cache / R18_FILE)

    module, dim = get_backbone("resnet18", weights="IMAGENET1K_V1")
    assert dim == 512
    assert_same_tensors(module, r18_state)
    for spec in ("DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        assert_same_tensors(get_backbone("resnet18", weights=spec)[0], r18_state)
    assert torchvision_checkpoint("resnet18", "DEFAULT") == (
        cache / R18_FILE,
        "ResNet18_Weights.IMAGENET1K_V1",
    )
    enc = load_encoder(backbone="resnet18", weights="IMAGENET1K_V1")
    assert enc.weights == "ResNet18_Weights.IMAGENET1K_V1" and not enc.random_init
    assert_same_tensors(enc.module, r18_state)


def test_torchvision_name_not_in_cache(torch_home: Path) -> None:
    path = torch_home / "hub" / "checkpoints" / R18_FILE
    msg = (
        f"resnet18 IMAGENET1K_V1: weights not in the cache; put {R18_FILE} at {path} "
        f"(from https://download.pytorch.org/models/{R18_FILE}) or pass a local file"
    )
    with pytest.raises(TrainingError) as info:
        get_backbone("resnet18", weights="IMAGENET1K_V1")
    assert str(info.value) == msg
    assert not path.exists()


@pytest.mark.parametrize(
    ("backbone", "weights", "match"),
    [
        (
            "resnet50",
            "IMAGENET1K_V3",
            r"^resnet50: unknown weights 'IMAGENET1K_V3'; valid: IMAGENET1K_V1, IMAGENET1K_V2, "
            r"DEFAULT, none, or a weights file \(.pt/.pth/.bin, .safetensors, TorchScript\) or folder$",
        ),
        (
            "smallcnn",
            "IMAGENET1K_V1",
            r"^smallcnn: unknown weights 'IMAGENET1K_V1'; valid: none, or a weights file",
        ),
    ],
)
def test_unknown_weights_name_lists_valid_ones(backbone: str, weights: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_backbone(backbone, weights=weights)


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
# local files


def test_random_init_only_when_asked() -> None:
    enc = load_encoder(backbone="smallcnn", weights="none", seed=5)
    again = load_encoder(backbone="smallcnn", weights="NONE", seed=5)
    assert enc.weights == RANDOM_INIT and enc.random_init
    assert_same_tensors(again.module, enc.module.state_dict())
    assert enc.attrs()["weights"] == "random-init"


def test_local_state_dict_files(tmp_path: Path, r18_state: dict[str, torch.Tensor]) -> None:
    for name in ("w.pt", "w.pth", "pytorch_model.bin"):
        torch.save({"state_dict": r18_state, "epoch": 1}, tmp_path / name)
        enc = load_encoder(backbone="resnet18", weights=tmp_path / name)
        assert enc.weights == str((tmp_path / name).absolute())
        assert_same_tensors(enc.module, r18_state)
    # a folder holding one weights file (a downloaded model repository)
    folder = tmp_path / "repo"
    folder.mkdir()
    torch.save(r18_state, folder / "pytorch_model.bin")
    assert find_weights_file(folder) == folder / "pytorch_model.bin"
    assert_same_tensors(get_backbone("resnet18", weights=folder)[0], r18_state)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript is deprecated upstream
def test_torchscript_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source, _ = get_backbone("smallcnn", weights="none")
    path = tmp_path / "encoder.ts"
    torch.jit.save(torch.jit.script(source.eval()), str(path))
    state = read_weights_file(path)
    assert set(state) == set(source.state_dict())
    module, _ = get_backbone("smallcnn", weights=path)
    assert_same_tensors(module, source.state_dict())


def test_safetensors_file(tmp_path: Path, r18_state: dict[str, torch.Tensor]) -> None:
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    st.save_file({k: v.contiguous() for k, v in r18_state.items()}, str(path))
    assert_same_tensors(get_backbone("resnet18", weights=path)[0], r18_state)


def test_safetensors_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails
    with pytest.raises(
        ConfigError,
        match=r"^reading a \.safetensors file needs the 'safetensors\.torch' package: "
        r"pip install 'wsi-pipeline\[timm\]'$",
    ):
        read_weights_file(path)


def test_weights_of_another_architecture(
    tmp_path: Path, r18_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "r18.pt"
    torch.save(r18_state, path)
    with pytest.raises(TrainingError) as info:
        load_encoder(backbone="resnet50", weights=path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: weights do not fit backbone ResNet: ")
    assert "missing key(s) (layer1.0.conv3.weight" in msg
    assert (
        "shape mismatch(es) (layer1.0.conv1.weight file (64, 64, 3, 3) vs model (64, 64, 1, 1)"
        in msg
    )


class _Evil:
    """Unpickling this runs a shell command (touches a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("protocol", "why"),
    [
        (None, r"it would import (posix|os|nt)\.system"),  # torch.save
        (2, r"it would import (posix|os|nt)\.system"),  # a plain pickle
        (4, r"pickle instruction \d+ is not allowed"),
    ],
)
def test_pickle_that_runs_code_is_refused(tmp_path: Path, protocol: int | None, why: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"conv.weight": torch.zeros(1), "x": _Evil(marker)}
    if protocol is None:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=protocol))
    with (
        pytest.warns() if protocol == 4 else contextlib.nullcontext(),
        pytest.raises(
            TrainingError, match=rf"evil\.pt: not a weights-only torch file, refused \({why}; "
        ) as info,
    ):
        get_backbone("smallcnn", weights=path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n" * 20)
    with pytest.raises(TrainingError, match=r"notes\.pt: cannot read weights file: "):
        load_encoder(backbone="smallcnn", weights=path)


def test_load_weights_returns_its_label(tmp_path: Path) -> None:
    module, _ = get_backbone("smallcnn")
    assert load_weights(module, "none") == RANDOM_INIT
    path = tmp_path / "s.pt"
    torch.save(module.state_dict(), path)
    assert load_weights(get_backbone("smallcnn")[0], path) == str(path.absolute())


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
    torch.save({"x": _Evil(marker)}, path)
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
