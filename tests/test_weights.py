"""Weights the way users have them (wsi_pipeline.weights), offline: torchvision weights names
from torchvision's cache, local state dict / safetensors / TorchScript files, refused pickles and
key/shape mismatch messages. Nothing is downloaded: every checkpoint is written here, in tmp_path."""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import EvilPickle, refuse_downloads

from wsi_pipeline.errors import ConfigError, TrainingError
from wsi_pipeline.features import load_encoder
from wsi_pipeline.models import get_backbone
from wsi_pipeline.weights import (
    RANDOM_INIT,
    find_weights_file,
    first_line,
    load_weights,
    read_weights_file,
    torchvision_checkpoint,
)

R18_FILE = "resnet18-f37072fd.pth"  # the file name of torchvision's ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download fails the test loudly."""
    refuse_downloads(monkeypatch)


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
    obj = {"conv.weight": torch.zeros(1), "x": EvilPickle(marker)}
    if protocol is None:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps({"x": EvilPickle(marker)}, protocol=protocol))
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


def test_first_line_is_one_short_line() -> None:
    assert first_line(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert first_line(KeyError()) == "KeyError"
    line = first_line(OSError("x" * 500), limit=20)
    assert line == "OSError: " + "x" * 17 + "..."
