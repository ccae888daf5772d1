"""Pathology encoder presets, offline: what ``--encoder`` means, and the :class:`Encoder` it gives.

Pathology foundation-model **presets** (:func:`list_encoders`: ``uni``, ``conch``, ``virchow2``,
``h-optimus-0``, ``phikon-v2``) carry their architecture, preprocessing (input size, mean/std,
intended mpp), licence note and Hugging Face name (:class:`EncoderPreset`). Their weights come
from the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``; read as files, with ``HF_HUB_OFFLINE=1`` while the library builds
the model), from a local folder or file given as ``weights``, or ``"none"``. timm builds the
timm presets (``pip install 'wsi-pipeline[timm]'``). Nothing is ever downloaded.

Weights files are read and checked by :mod:`wsi_pipeline.weights` (refused pickles, key and
shape mismatches, one-line errors); this room says which file and which architecture.
:func:`wsi_pipeline.features.load_encoder` puts a backbone or a preset and its weights together
into an :class:`Encoder`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, TrainingError
from .weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NO_WEIGHTS,
    RANDOM_INIT,
    TIMM_HINT,
    find_weights_file,
    first_line,
    fit_state_dict,
    read_weights_file,
    require_package,
)

__all__ = [
    "CONCH_HINT",
    "ENCODER_PRESETS",
    "Encoder",
    "EncoderPreset",
    "build_preset",
    "encoder_preset",
    "hf_cache_dir",
    "hf_snapshot",
    "list_encoders",
]

_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

#: what to install for the CONCH preset
CONCH_HINT = "pip install git+https://github.com/Mahmoodlab/CONCH.git"
_TRANSFORMERS_HINT = "pip install transformers"


# ---------------------------------------------------------------------------------------------
# presets


@dataclass(frozen=True)
class EncoderPreset:
    """A pathology foundation model: how to build it, feed it and where its weights come from.

    Attributes
    ----------
    name : str
        ``--encoder`` name.
    hf_repo : str
        Hugging Face repository (``org/name``); ``timm_name`` is ``hf-hub:<hf_repo>``.
    library : {"timm", "conch", "transformers"}
        What builds the architecture.
    arch : str
        timm architecture name, CONCH model config, or ``""`` (transformers: ``config.json``).
    dim : int
        Embedding size ``D``.
    input_px : int
        Side of the square input the model expects; patches are resized to it.
    mean, std : tuple of 3 float
        Per-channel normalisation of ``[0, 1]`` RGB input.
    mpp : float
        Resolution the model was trained at (µm per pixel); stores tiled otherwise get a warning.
    interpolation : {"bilinear", "bicubic"}
        Resizing of patches to ``input_px``.
    licence : str
        Licence note (read the model card before use).
    pooling : {"model", "cls+mean"}
        ``model``: the module's output is the embedding; ``cls+mean``: class token concatenated
        with the mean of the patch tokens after ``prefix_tokens`` (class + register) tokens.
    prefix_tokens : int
    arch_kwargs : dict
        Keyword arguments of ``timm.create_model``; strings ``"timm.x.Y"``/``"torch.x.Y"`` under
        ``mlp_layer``/``act_layer`` name classes.
    files : tuple of str
        Weights file names in the repository, tried in order.
    """

    name: str
    hf_repo: str
    library: str
    arch: str
    dim: int
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float
    interpolation: str
    licence: str
    pooling: str = "model"
    prefix_tokens: int = 1
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ("pytorch_model.bin",)

    @property
    def timm_name(self) -> str:
        """``hf-hub:<org>/<name>``, the name timm knows the model by."""
        return f"hf-hub:{self.hf_repo}"

    @property
    def install_hint(self) -> str:
        """What to install to build this preset."""
        return {"timm": TIMM_HINT, "conch": CONCH_HINT}.get(self.library, _TRANSFORMERS_HINT)

    def describe(self) -> str:
        """One line: name, Hugging Face name, size, preprocessing and licence."""
        return (
            f"{self.name}: {self.timm_name} ({self.library} {self.arch or 'AutoModel'}), D={self.dim}, "
            f"{self.input_px} px at {self.mpp:g} mpp, mean {self.mean} std {self.std}; "
            f"licence: {self.licence}"
        )


_NC_GATED = "CC-BY-NC-ND-4.0, gated (accept the terms on the model page); non-commercial research"

#: the presets, by ``--encoder`` name
ENCODER_PRESETS: dict[str, EncoderPreset] = {
    p.name: p
    for p in (
        EncoderPreset(
            name="uni",
            hf_repo="MahmoodLab/UNI",
            library="timm",
            arch="vit_large_patch16_224",
            dim=1024,
            input_px=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=0.5,
            interpolation="bilinear",
            licence=_NC_GATED,
            arch_kwargs={
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1e-5,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
        ),
        EncoderPreset(
            name="conch",
            hf_repo="MahmoodLab/CONCH",
            library="conch",
            arch="conch_ViT-B-16",
            dim=512,
            input_px=448,
            mean=_OPENAI_CLIP_MEAN,
            std=_OPENAI_CLIP_STD,
            mpp=0.5,
            interpolation="bicubic",
            licence=_NC_GATED,
        ),
        EncoderPreset(
            name="virchow2",
            hf_repo="paige-ai/Virchow2",
            library="timm",
            arch="vit_huge_patch14_224",
            dim=2560,
            input_px=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=0.5,
            interpolation="bicubic",
            licence=_NC_GATED,
            pooling="cls+mean",
            prefix_tokens=5,
            arch_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "reg_tokens": 4,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": "timm.layers.SwiGLUPacked",
                "act_layer": "torch.nn.SiLU",
            },
            files=("pytorch_model.bin", "model.safetensors"),
        ),
        EncoderPreset(
            name="h-optimus-0",
            hf_repo="bioptimus/H-optimus-0",
            library="timm",
            arch="vit_giant_patch14_reg4_dinov2",
            dim=1536,
            input_px=224,
            mean=_HOPTIMUS_MEAN,
            std=_HOPTIMUS_STD,
            mpp=0.5,
            interpolation="bilinear",
            licence="Apache-2.0 (gated: accept the terms on the model page)",
            arch_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "global_pool": "token",
                "dynamic_img_size": False,
            },
            files=("pytorch_model.bin", "model.safetensors"),
        ),
        EncoderPreset(
            name="phikon-v2",
            hf_repo="owkin/phikon-v2",
            library="transformers",
            arch="",
            dim=1024,
            input_px=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=0.5,
            interpolation="bilinear",
            licence="Owkin non-commercial licence (see the model card)",
            files=("model.safetensors", "pytorch_model.bin"),
        ),
    )
}


def list_encoders() -> list[str]:
    """Names of the encoder presets, sorted."""
    return sorted(ENCODER_PRESETS)


def encoder_preset(name: str) -> EncoderPreset:
    """The preset ``name``.

    Raises
    ------
    ConfigError
        Unknown name (lists the known ones).
    """
    try:
        return ENCODER_PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown encoder {name!r}; known encoders: {', '.join(list_encoders())}"
        ) from None


@dataclass(frozen=True)
class Encoder:
    """A frozen patch encoder, its weights label and the preprocessing it expects.

    Attributes
    ----------
    name : str
        Backbone or preset name; features are stored as ``features/<name>-<sha12>``.
    module : torch.nn.Module
        Maps normalised float patches ``(N, 3, S, S)`` to embeddings ``(N, dim)``.
    dim : int
    weights : str
        Where the weights came from: a torchvision weights name, a file path, a Hugging Face
        cache folder, or :data:`RANDOM_INIT`.
    mean, std : tuple of 3 float
        Normalisation of ``[0, 1]`` RGB.
    input_px : int or None
        Patches are resized to ``input_px`` (None: used as tiled).
    interpolation : str
    mpp : float or None
        Resolution the encoder was trained at, when known.
    licence : str or None
    preset : str or None
        The preset name (``--encoder``), None for a registered backbone.
    """

    name: str
    module: Any
    dim: int
    weights: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_px: int | None = None
    interpolation: str = "bilinear"
    mpp: float | None = None
    licence: str | None = None
    preset: str | None = None

    @property
    def random_init(self) -> bool:
        """Whether the weights are a random initialisation."""
        return self.weights == RANDOM_INIT

    def attrs(self) -> dict[str, Any]:
        """JSON-ready description, for the attributes of ``features/<extractor>``."""
        return {
            "backbone": self.name,
            "encoder": self.preset,
            "weights": self.weights,
            "dim": self.dim,
            "normalization": f"x/255, mean {list(self.mean)}, std {list(self.std)}",
            "input_px": self.input_px,
            "interpolation": self.interpolation if self.input_px else None,
            "mpp": self.mpp,
            "licence": self.licence,
        }


# ---------------------------------------------------------------------------------------------
# the Hugging Face cache, read as files


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        home = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hf_snapshot(repo: str, *, cache: str | os.PathLike | None = None) -> Path | None:
    """The cached snapshot folder of model repository ``repo`` (``org/name``), or None.

    The cache layout is ``models--<org>--<name>/snapshots/<commit>/``, the commit read from
    ``refs/main`` (else the newest snapshot). The repository name matches case-insensitively
    (``MahmoodLab/UNI`` and ``MahmoodLab/uni`` are one repository on the hub).
    """
    root = Path(cache) if cache is not None else hf_cache_dir()
    want = "models--" + repo.replace("/", "--")
    try:
        candidates = [p for p in root.iterdir() if p.name.lower() == want.lower() and p.is_dir()]
    except OSError:
        return None
    for repo_dir in sorted(candidates, key=lambda p: p.name != want):
        ref = repo_dir / "refs" / "main"
        if ref.is_file():
            snap = repo_dir / "snapshots" / ref.read_text().strip()
            if snap.is_dir():
                return snap
        snaps = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
        if snaps:
            return max(snaps, key=lambda p: p.stat().st_mtime)
    return None


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` (and transformers' twin) while a library builds a model."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in old})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# building a preset


class _ClsMeanPool(nn.Module):
    """Class token concatenated with the mean of the patch tokens (Virchow's embedding)."""

    def __init__(self, model: nn.Module, prefix_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.prefix_tokens = prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.model(x)  # (N, L, C)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix_tokens :].mean(1)], dim=-1)


class _ConchImage(nn.Module):
    """CONCH's image embedding (before the contrastive projection, not normalised)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


class _ClsToken(nn.Module):
    """The class token of a Hugging Face transformers vision model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]


def _resolve_class(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(("timm.", "torch.")):
        mod, _, attr = value.rpartition(".")
        return getattr(importlib.import_module(mod), attr)
    return value


def _empty_timm_model(timm: Any, arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """A timm model whose weights are about to be loaded: built on the meta device (no random
    init of a billion parameters) when every tensor of it is in its state dict, else as usual."""
    try:
        with torch.device("meta"):
            model: nn.Module = timm.create_model(arch, pretrained=False, **kwargs)
        every = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        if every == set(model.state_dict()):
            return model.to_empty(device="cpu")
    except Exception:  # an init step that needs real tensors: build it the usual way
        pass
    built: nn.Module = timm.create_model(arch, pretrained=False, **kwargs)
    return built


def _timm_module(preset: EncoderPreset, file: Path | None) -> nn.Module:
    timm = require_package("timm", what=f"encoder {preset.name!r}", hint=TIMM_HINT)
    kwargs = {k: _resolve_class(v) for k, v in preset.arch_kwargs.items()}
    with _hf_offline():
        if file is None:
            model: nn.Module = timm.create_model(preset.arch, pretrained=False, **kwargs)
        else:
            state = read_weights_file(file)
            model = _empty_timm_model(timm, preset.arch, kwargs)
            model = fit_state_dict(model, state, path=file)
    if preset.pooling == "cls+mean":
        return _ClsMeanPool(model, preset.prefix_tokens)
    return model


def _conch_module(preset: EncoderPreset, file: Path | None) -> nn.Module:
    conch = require_package(
        "conch.open_clip_custom", what=f"encoder {preset.name!r}", hint=preset.install_hint
    )
    if file is None:
        raise ConfigError(
            f"encoder {preset.name!r}: --weights none is not supported (CONCH is built from its "
            "checkpoint); pass the weights file"
        )
    read_weights_file(file)  # refuse a pickle that would run code before CONCH opens it
    with _hf_offline():
        model, _ = conch.create_model_from_pretrained(preset.arch, checkpoint_path=str(file))
    return _ConchImage(model)


def _transformers_module(preset: EncoderPreset, file: Path | None) -> nn.Module:
    transformers = require_package(
        "transformers", what=f"encoder {preset.name!r}", hint=preset.install_hint
    )
    if file is None:
        raise ConfigError(
            f"encoder {preset.name!r}: --weights none is not supported (its architecture comes "
            "from config.json next to the weights); pass the model folder"
        )
    if not (file.parent / "config.json").is_file():
        raise TrainingError(
            f"no config.json next to the weights; pass the folder of {preset.hf_repo}",
            path=file.parent,
        )
    if file.suffix != ".safetensors":
        read_weights_file(file)  # refuse a pickle that would run code before transformers does
    with _hf_offline():
        try:
            model = transformers.AutoModel.from_pretrained(str(file.parent), local_files_only=True)
        except Exception as exc:
            raise TrainingError(
                f"cannot build {preset.name}: {first_line(exc)}", path=file.parent
            ) from None
    return _ClsToken(model)


def build_preset(name: str, weights: str | os.PathLike | None = None) -> tuple[nn.Module, int, str]:
    """Build the encoder preset ``name`` with its weights, offline.

    Parameters
    ----------
    name : str
        One of :func:`list_encoders`.
    weights : str, path-like or None
        None: the preset's files in the local Hugging Face cache; a local folder or file; or
        ``"none"`` for a random init (timm presets).

    Returns
    -------
    module : torch.nn.Module
        Maps normalised ``(N, 3, input_px, input_px)`` float to ``(N, D)``; in training mode.
    dim : int
    weights : str
        The file used (or :data:`RANDOM_INIT`).

    Raises
    ------
    ConfigError
        Unknown preset; the library that builds it is not installed (one line saying what to
        ``pip install``).
    TrainingError
        Weights not in the cache, not found, unreadable, refused or of another architecture.
    """
    preset = encoder_preset(name)
    builder = {"timm": _timm_module, "conch": _conch_module}.get(
        preset.library, _transformers_module
    )
    file: Path | None
    if weights is None:
        snap = hf_snapshot(preset.hf_repo)
        if snap is None or not any((snap / f).is_file() for f in preset.files):
            where = hf_cache_dir() / ("models--" + preset.hf_repo.replace("/", "--"))
            raise TrainingError(
                f"encoder {name}: weights not in the Hugging Face cache ({where}); accept the "
                f"licence at https://huggingface.co/{preset.hf_repo}, run "
                f"'huggingface-cli download {preset.hf_repo}' where there is network and copy "
                "the cache here (or set HF_HOME), or pass --weights <folder or file>"
            )
        file = find_weights_file(snap, preset.files)
    elif os.fspath(weights).strip().lower() == NO_WEIGHTS:
        file = None
    else:
        path = Path(weights).expanduser()
        if not path.exists():
            raise TrainingError("no such weights file or folder", path=path)
        file = find_weights_file(path, preset.files) if path.is_dir() else path
    module = builder(preset, file)
    return module, preset.dim, RANDOM_INIT if file is None else str(file.absolute())
