"""Encoder weights, the way users have them, offline: what ``--weights`` and ``--encoder`` mean.

The one place that turns a weights *spec* into tensors in a module. Nothing is ever downloaded.

``weights`` for a registered backbone (``smallcnn``, ``resnet18``, ``resnet50``; see
:func:`load_weights`):

- a **torchvision weights name** (``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ``DEFAULT``, or
  ``ResNet50_Weights.IMAGENET1K_V2``) for a torchvision backbone: resolved with torchvision's own
  weights API and read from torchvision's cache, ``torch.hub.get_dir()/checkpoints/<file name of
  the weights' url>`` (``$TORCH_HOME/hub/checkpoints``). When the file is not there, an error says
  where to put it;
- a **local file**: a state dict ``.pt``/``.pth``/``.bin`` (read with
  ``torch.load(weights_only=True)``: a pickle that would import anything but tensors and plain
  containers, i.e. run code, is refused), a ``.safetensors`` file, or a TorchScript archive (its
  tensors are used, not its code); or a folder holding one such file;
- ``"none"``: random initialisation, asked for explicitly (features from it are labelled
  :data:`RANDOM_INIT`).

Pathology foundation-model **presets** (:func:`list_encoders`: ``uni``, ``conch``, ``virchow2``,
``h-optimus-0``, ``phikon-v2``) carry their architecture, preprocessing (input size, mean/std,
intended mpp), licence note and Hugging Face name (:class:`EncoderPreset`). Their weights come
from the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``; read as files, with ``HF_HUB_OFFLINE=1`` while the library builds
the model), from a local folder or file given as ``weights``, or ``"none"``. timm builds the
timm presets (``pip install 'wsi-pipeline[timm]'``).

Every problem is one line: an unknown name lists the valid ones, a file of another architecture
names the first differing keys and shapes, a refused pickle says so.

This room sits below :mod:`wsi_pipeline.models` (``get_backbone(weights=...)`` calls
:func:`load_weights`); :func:`wsi_pipeline.features.load_encoder` puts a backbone or a preset and
its weights together into an :class:`Encoder`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from .errors import ConfigError, TrainingError

__all__ = [
    "CONCH_HINT",
    "ENCODER_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NO_WEIGHTS",
    "RANDOM_INIT",
    "TIMM_HINT",
    "Encoder",
    "EncoderPreset",
    "build_preset",
    "encoder_preset",
    "find_weights_file",
    "fit_state_dict",
    "hf_cache_dir",
    "hf_snapshot",
    "list_encoders",
    "load_weights",
    "load_weights_file",
    "read_weights_file",
    "torchvision_checkpoint",
    "torchvision_weight_names",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

#: the ``weights`` value that asks for a random initialisation
NO_WEIGHTS = "none"
#: how features of a randomly initialised encoder are labelled (store attrs ``weights``)
RANDOM_INIT = "random-init"
#: what to install for the timm presets and for ``.safetensors`` files
TIMM_HINT = "pip install 'wsi-pipeline[timm]'"
#: what to install for the CONCH preset
CONCH_HINT = "pip install git+https://github.com/Mahmoodlab/CONCH.git"
_TRANSFORMERS_HINT = "pip install transformers"

#: file names tried, in order, inside a weights folder (after a preset's own)
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".ts", ".jit", ".torchscript")


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
# reading weights files


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _require(module: str, *, what: str, hint: str) -> Any:
    """``import module``, or a one-line :class:`ConfigError` saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the {module!r} package: {hint}") from None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def find_weights_file(folder: str | os.PathLike, names: Sequence[str] = ()) -> Path:
    """The weights file inside ``folder`` (a downloaded model repository or snapshot).

    Tries ``names`` first, then ``model.safetensors``, ``pytorch_model.bin``, ``model.pt``,
    ``model.pth``, then a single ``*.safetensors``/``*.bin``/``*.pt``/``*.pth`` file.

    Raises
    ------
    TrainingError
        No such file, or several candidates.
    """
    folder = Path(folder)
    for n in (*names, *_FOLDER_FILES):
        if (folder / n).is_file():
            return folder / n
    found = sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    )
    if len(found) == 1:
        return found[0]
    if found:
        raise TrainingError(
            f"several weights files ({', '.join(p.name for p in found[:4])}); pass one of them",
            path=folder,
        )
    tried = ", ".join(dict.fromkeys((*names, *_FOLDER_FILES)))
    raise TrainingError(f"no weights file in this folder (looked for {tried})", path=folder)


def _refused_global(exc: BaseException) -> str:
    """What the weights-only unpickler refused, in a few words."""
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it would import {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return f"pickle instruction {m.group(1)} is not allowed"
    return "it holds objects other than tensors and plain containers"


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TrainingError(
            f"not a weights-only torch file, refused ({_refused_global(exc)}; only tensors and "
            "plain containers are loaded, so a file that would run code is never opened; "
            "re-save it as a state dict or .safetensors)",
            path=path,
        ) from None
    except Exception as exc:  # corrupt zip, truncated file, garbage bytes ...
        raise TrainingError(f"cannot read weights file: {_first_line(exc)}", path=path) from None


def _read_safetensors(path: Path) -> Any:
    st = _require("safetensors.torch", what="reading a .safetensors file", hint=TIMM_HINT)
    try:
        return st.load_file(str(path), device="cpu")
    except Exception as exc:
        raise TrainingError(
            f"cannot read safetensors file: {_first_line(exc)}", path=path
        ) from None


def _read_torchscript(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise TrainingError(
            f"cannot read TorchScript file: {_first_line(exc)}", path=path
        ) from None
    return dict(module.state_dict())


def read_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in a weights file (or in the one weights file of a folder).

    Parameters
    ----------
    path : str or path-like
        ``.safetensors``; a TorchScript archive (its tensors only); anything else is read with
        ``torch.load(map_location="cpu", weights_only=True)``. Checkpoints holding the state dict
        under ``"state_dict"`` or ``"model"`` (possibly nested) are unwrapped.

    Returns
    -------
    dict of str -> Tensor

    Raises
    ------
    TrainingError
        No such file; unreadable; a pickle that would import anything but tensors and plain
        containers (refused without running it); not a mapping of names to tensors.
    ConfigError
        A ``.safetensors`` file without the ``safetensors`` package installed.
    """
    path = Path(path)
    if not path.exists():
        raise TrainingError("no such weights file", path=path)
    if path.is_dir():
        path = find_weights_file(path)
    if not path.is_file():
        raise TrainingError("weights path is not a file", path=path)
    if path.suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    elif _is_torchscript(path):
        obj = _read_torchscript(path)
    else:
        obj = _torch_load(path)

    for _ in range(4):  # {"state_dict": {...}} / {"model": {...}}, possibly nested
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or len(obj) == 0:
        raise TrainingError(
            f"not a state dict (got {type(obj).__name__}"
            f"{' of length 0' if isinstance(obj, Mapping) else ''}); expected a mapping of "
            "parameter names to tensors, or a checkpoint with a 'state_dict' or 'model' entry",
            path=path,
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise TrainingError(
            f"not a state dict: {len(bad)} entries are not name → tensor, e.g. {bad[:3]!r}",
            path=path,
        )
    return dict(obj)


# ---------------------------------------------------------------------------------------------
# fitting a state dict into a module


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP/compile wrappers (``module.``, ``_orig_mod.``) and select ``backbone.*``."""
    for _ in range(4):
        before = state
        for prefix in ("module.", "_orig_mod."):
            state = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
        if any(k.startswith("backbone.") for k in state):
            # a whole MILModel (backbone.* + head.*) or a wrapper: keep the backbone part
            state = {
                k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")
            }
        if state.keys() == before.keys():
            break
    return state


def _is_identity_key(key: str, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``key`` belongs to a submodule replaced by Identity (e.g. ResNet ``fc``)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return isinstance(modules[prefix], nn.Identity)
    return False


def _some(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def fit_state_dict(
    module: nn.Module, state: Mapping[str, Tensor], *, path: str | os.PathLike | None = None
) -> nn.Module:
    """Load ``state`` into ``module`` in place, after checking that it fits, key by key.

    Keys prefixed with ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) are stripped; when
    keys start with ``backbone.`` (a saved :class:`~wsi_pipeline.models.MILModel`) only those are
    used, without the prefix; keys of submodules ``module`` replaced by :class:`torch.nn.Identity`
    (a torchvision ResNet's ``fc.*``) are dropped. Missing ``num_batches_tracked`` buffers are
    tolerated; every other missing, unexpected or mis-shaped key is an error.

    Parameters
    ----------
    module : torch.nn.Module
    state : mapping of str -> Tensor
    path : path, optional
        Named in the error message.

    Returns
    -------
    torch.nn.Module
        ``module``.

    Raises
    ------
    TrainingError
        One line naming how many keys are missing, unexpected or of another shape, and the first
        few of each.
    """
    state = _strip_prefixes(dict(state))
    own = module.state_dict()
    modules = dict(module.named_modules())
    state = {k: v for k, v in state.items() if k in own or not _is_identity_key(k, modules)}

    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({_some(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) ({_some(mismatched)})")
    if problems:
        raise TrainingError(
            f"weights do not fit backbone {type(module).__name__}: {'; '.join(problems)}",
            path=path,
        )
    module.load_state_dict(state, strict=False)
    return module


def load_weights_file(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """:func:`read_weights_file` then :func:`fit_state_dict`; returns ``module``."""
    return fit_state_dict(module, read_weights_file(path), path=path)


# ---------------------------------------------------------------------------------------------
# torchvision weights, from torchvision's cache


def _torchvision_enum(arch: str) -> Any:
    import torchvision  # heavy: only when torchvision weights are asked for

    try:
        return torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return None


def torchvision_weight_names(arch: str) -> list[str]:
    """torchvision's weights names of architecture ``arch`` (``DEFAULT`` last); ``[]`` if none."""
    enum = _torchvision_enum(arch)
    if enum is None:
        return []
    names = [n for n in enum.__members__ if n != "DEFAULT"]
    return [*names, "DEFAULT"] if "DEFAULT" in enum.__members__ else names


def _torchvision_member(arch: str, name: str) -> Any:
    enum = _torchvision_enum(arch)
    if enum is None:
        return None
    short = name.split(".", 1)[1] if name.startswith(f"{enum.__name__}.") else name
    return enum.__members__.get(short)


def torchvision_checkpoint(arch: str, name: str) -> tuple[Path, str]:
    """Where torchvision keeps the weights ``name`` of ``arch``, and their full name.

    Parameters
    ----------
    arch : str
        torchvision architecture (``"resnet50"``).
    name : str
        ``"IMAGENET1K_V2"``, ``"DEFAULT"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``.

    Returns
    -------
    path : Path
        ``torch.hub.get_dir()/checkpoints/<file name of the weights' url>``; it exists.
    full_name : str
        ``"ResNet50_Weights.IMAGENET1K_V2"`` (``DEFAULT`` resolved).

    Raises
    ------
    ConfigError
        ``name`` is not a weights name of ``arch`` (lists the valid ones).
    TrainingError
        The file is not in the cache (says which file to put where; nothing is downloaded).
    """
    member = _torchvision_member(arch, name)
    if member is None:
        valid = torchvision_weight_names(arch)
        raise ConfigError(
            f"{arch}: unknown torchvision weights {name!r}; valid: "
            f"{', '.join(valid) if valid else '(none for this architecture)'}"
        )
    url = str(member.url)
    file = os.path.basename(urlparse(url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / file
    if not path.is_file():
        raise TrainingError(
            f"{arch} {member.name}: weights not in the cache; put {file} at {path} "
            f"(from {url}) or pass a local file"
        )
    return path, f"{type(member).__name__}.{member.name}"


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.lower().endswith(_FILE_SUFFIXES)


def load_weights(
    module: nn.Module,
    weights: str | os.PathLike,
    *,
    arch: str | None = None,
    name: str | None = None,
) -> str:
    """Load the weights ``weights`` names into ``module`` (in place); where they came from.

    Parameters
    ----------
    module : torch.nn.Module
        A freshly built (randomly initialised) backbone.
    weights : str or path-like
        ``"none"`` (keep the random init), an existing file or folder (see
        :func:`read_weights_file`), or a torchvision weights name when ``arch`` is set.
    arch : str, optional
        The torchvision architecture ``module`` is (``"resnet50"``), for weights names.
    name : str, optional
        The backbone's name, for messages.

    Returns
    -------
    str
        :data:`RANDOM_INIT`, the file's absolute path, or torchvision's full weights name.

    Raises
    ------
    ConfigError
        An unknown weights name (the valid ones listed).
    TrainingError
        A missing or unreadable file, a refused pickle, weights of another architecture, or
        torchvision weights not in the cache.
    """
    spec = os.fspath(weights)
    if spec.strip().lower() == NO_WEIGHTS:
        return RANDOM_INIT
    path = Path(spec).expanduser()
    if path.exists():
        load_weights_file(module, path)
        return str(path.absolute())
    if arch is not None and _torchvision_member(arch, spec) is not None:
        cached, full_name = torchvision_checkpoint(arch, spec)
        load_weights_file(module, cached)
        return full_name
    if _looks_like_path(spec):
        raise TrainingError("no such weights file", path=path)
    names = torchvision_weight_names(arch) if arch else []
    owner = name or arch or type(module).__name__
    raise ConfigError(
        f"{owner}: unknown weights {spec!r}; valid: {', '.join([*names, NO_WEIGHTS])}, "
        "or a weights file (.pt/.pth/.bin, .safetensors, TorchScript) or folder"
    )


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
    timm = _require("timm", what=f"encoder {preset.name!r}", hint=TIMM_HINT)
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
    conch = _require(
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
    transformers = _require(
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
                f"cannot build {preset.name}: {_first_line(exc)}", path=file.parent
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
