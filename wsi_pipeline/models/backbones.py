"""Patch backbones: CNN encoders mapping normalised patches ``(N, 3, T, T)`` to embeddings ``(N, D)``.

Registered backbones (see :func:`list_backbones`):

``"smallcnn"``
    A small five-stage CNN (conv-BN-ReLU, stride 2 per stage, global average pool), ``D = 128``.
    Fast enough for CPU tests and CPU training.
``"resnet18"``, ``"resnet50"``
    torchvision ResNets, randomly initialised, classification ``fc`` replaced by
    :class:`torch.nn.Identity` (``D = 512`` and ``2048``). Pretrained weights are never downloaded;
    pass a local state-dict file as ``weights``.

Backbones take *normalised* float input. :class:`PatchNormalize` (used inside
:class:`~wsi_pipeline.models.MILModel`) maps uint8 ``[0, 255]`` or float ``[0, 1]`` patches to
ImageNet-normalised float.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, TrainingError
from .registry import backbone_builder, register_backbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PatchNormalize",
    "SmallCNN",
    "get_backbone",
    "load_backbone_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchNormalize(nn.Module):
    """Convert patches to float and normalise them with the ImageNet mean and std.

    ``uint8`` input is taken as ``[0, 255]`` and divided by 255; floating input is taken as already
    in ``[0, 1]``. The result is ``(x - mean) / std`` per channel, in the dtype of this module's
    buffers (float32 unless the model was cast with ``.half()`` etc.). The memory format
    (``channels_last``) of the input is kept.

    Shapes: ``(N, 3, T, T)`` → ``(N, 3, T, T)``.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        # Not persistent: state dicts of models stay free of constants.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` : (N, 3, T, T) uint8 or float → (N, 3, T, T) float."""
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype).div_(255.0)
        elif x.is_floating_point():
            x = x.to(self.mean.dtype)
        else:
            raise ConfigError(f"patches must be uint8 or floating point, got dtype {x.dtype}")
        return (x - self.mean) / self.std


def _conv_bn_relu(in_ch: int, out_ch: int, *, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Small, fast patch encoder: five stride-2 conv-BN-ReLU stages and global average pooling.

    Stages ``2, 3, 4`` (0-based) add a second stride-1 conv-BN-ReLU. With the default widths it has
    about 0.58 M parameters; forward+backward of 64 patches of 128 px takes about 0.1 s on two
    CPU cores.

    Parameters
    ----------
    widths : sequence of int
        Output channels of each stage; the embedding size is ``widths[-1]``.

    Shapes: ``(N, 3, T, T)`` (normalised float, any ``T >= 1``) → ``(N, widths[-1])``.
    """

    def __init__(self, *, widths: Sequence[int] = (16, 32, 64, 128, 128)) -> None:
        super().__init__()
        if len(widths) == 0 or any(int(w) < 1 for w in widths):
            raise ConfigError(f"SmallCNN widths must be positive integers, got {tuple(widths)}")
        stages: list[nn.Module] = []
        in_ch = 3
        for i, width in enumerate(widths):
            stage = _conv_bn_relu(in_ch, width, stride=2)
            if i >= 2:
                stage = nn.Sequential(*stage, *_conv_bn_relu(width, width, stride=1))
            stages.append(stage)
            in_ch = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = int(widths[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Embed ``x`` : (N, 3, T, T) normalised float → (N, D)."""
        return torch.flatten(self.pool(self.features(x)), 1)


@register_backbone("smallcnn")
def smallcnn() -> tuple[nn.Module, int]:
    """Small CNN, ``D = 128`` (see :class:`SmallCNN`)."""
    model = SmallCNN()
    return model, model.out_dim


def _torchvision_resnet(arch: str) -> tuple[nn.Module, int]:
    import torchvision  # heavy: only when a ResNet is built

    model = getattr(torchvision.models, arch)(weights=None)  # never download
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, dim


@register_backbone("resnet18")
def resnet18() -> tuple[nn.Module, int]:
    """torchvision ResNet-18, random init, ``fc`` = Identity, ``D = 512``."""
    return _torchvision_resnet("resnet18")


@register_backbone("resnet50")
def resnet50() -> tuple[nn.Module, int]:
    """torchvision ResNet-50, random init, ``fc`` = Identity, ``D = 2048``."""
    return _torchvision_resnet("resnet50")


def get_backbone(name: str, *, weights: str | os.PathLike | None = None) -> tuple[nn.Module, int]:
    """Build the registered patch backbone ``name``.

    Parameters
    ----------
    name : str
        One of :func:`list_backbones`.
    weights : str or path-like, optional
        A local state-dict file to load (see :func:`load_backbone_weights`); random init when
        ``None``.

    Returns
    -------
    module : torch.nn.Module
        Maps normalised float patches ``(N, 3, T, T)`` to embeddings ``(N, D)``; in training mode.
    dim : int
        ``D``.

    Raises
    ------
    ConfigError
        Unknown backbone name.
    TrainingError
        ``weights`` cannot be read or does not fit the backbone.
    """
    module, dim = backbone_builder(name)()
    if weights is not None:
        load_backbone_weights(module, weights)
    return module, dim


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise TrainingError("no such weights file", path=path)
    if not path.is_file():
        raise TrainingError("weights path is not a file", path=path)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TrainingError(
            f"not a weights-only torch file (objects other than tensors and plain containers, "
            f"or not a torch file at all): {_first_line(exc)}",
            path=path,
        ) from None
    except Exception as exc:  # corrupt zip, truncated file, garbage bytes ...
        raise TrainingError(f"cannot read weights file: {_first_line(exc)}", path=path) from None

    # Unwrap training checkpoints: {"state_dict": {...}} / {"model": {...}} (possibly nested).
    for _ in range(4):
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


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state-dict file into ``backbone`` in place.

    Accepted files (read with ``torch.load(path, map_location="cpu", weights_only=True)``):

    - a plain state dict in this package's naming or torchvision naming; keys of submodules the
      backbone replaced by :class:`torch.nn.Identity` (a torchvision ResNet's ``fc.*``) are dropped;
    - a checkpoint dict with the state dict under ``"state_dict"`` or ``"model"``;
    - keys prefixed with ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) are stripped; when
      keys start with ``backbone.`` (e.g. a saved :class:`~wsi_pipeline.models.MILModel`), only
      those are used, without the prefix.

    Missing ``num_batches_tracked`` buffers are tolerated; every other missing, unexpected or
    mis-shaped key is an error.

    Parameters
    ----------
    backbone : torch.nn.Module
        The module to load into (e.g. from :func:`get_backbone`).
    path : str or path-like
        The weights file.

    Returns
    -------
    torch.nn.Module
        ``backbone`` itself.

    Raises
    ------
    TrainingError
        The file does not exist, cannot be read, is not a state dict of tensors, or does not fit
        ``backbone`` (the message names a few offending keys).
    """
    path = Path(path)
    state = _strip_prefixes(_read_state_dict(path))
    own = backbone.state_dict()
    modules = dict(backbone.named_modules())
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
            f"weights do not fit backbone {type(backbone).__name__}: {'; '.join(problems)}",
            path=path,
        )
    backbone.load_state_dict(state, strict=False)
    return backbone
