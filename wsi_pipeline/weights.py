"""Weights files and torchvision weights names, offline: what ``--weights`` means for a backbone.

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

Every problem is one line: an unknown name lists the valid ones, a file of another architecture
names the first differing keys and shapes (:func:`fit_state_dict`), a refused pickle says so.

This room sits below :mod:`wsi_pipeline.models` (``get_backbone(weights=...)`` calls
:func:`load_weights`) and :mod:`wsi_pipeline.encoders` (the pathology presets, which read their
files with :func:`read_weights_file` and :func:`fit_state_dict`).
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from .errors import ConfigError, TrainingError
from .util import torchscript_quiet

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NO_WEIGHTS",
    "RANDOM_INIT",
    "TIMM_HINT",
    "find_weights_file",
    "first_line",
    "fit_state_dict",
    "load_weights",
    "load_weights_file",
    "read_weights_file",
    "require_package",
    "torchvision_checkpoint",
    "torchvision_weight_names",
]

#: the normalisation of ``[0, 1]`` RGB that torchvision's ImageNet weights expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: the ``weights`` value that asks for a random initialisation
NO_WEIGHTS = "none"
#: how features of a randomly initialised encoder are labelled (store attrs ``weights``)
RANDOM_INIT = "random-init"
#: what to install for the timm presets and for ``.safetensors`` files
TIMM_HINT = "pip install 'wsi-pipeline[timm]'"

#: file names tried, in order, inside a weights folder (after a preset's own)
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".ts", ".jit", ".torchscript")


# ---------------------------------------------------------------------------------------------
# reading weights files


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``exc`` in one line of at most ``limit`` characters: ``"<Type>: <first line>"``."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def require_package(module: str, *, what: str, hint: str) -> Any:
    """``import module``, or a one-line :class:`ConfigError` saying what to install.

    Parameters
    ----------
    module : str
        Dotted module name (``"safetensors.torch"``).
    what : str
        What needs it, the start of the message (``"reading a .safetensors file"``).
    hint : str
        What to run to install it (``"pip install ..."``).
    """
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
        raise TrainingError(f"cannot read weights file: {first_line(exc)}", path=path) from None


def _read_safetensors(path: Path) -> Any:
    st = require_package("safetensors.torch", what="reading a .safetensors file", hint=TIMM_HINT)
    try:
        return st.load_file(str(path), device="cpu")
    except Exception as exc:
        raise TrainingError(f"cannot read safetensors file: {first_line(exc)}", path=path) from None


def _read_torchscript(path: Path) -> Any:
    try:
        with torchscript_quiet():  # TorchScript is deprecated upstream
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise TrainingError(f"cannot read TorchScript file: {first_line(exc)}", path=path) from None
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
