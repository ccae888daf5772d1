"""Patch backbones: CNN encoders mapping normalised patches ``(N, 3, T, T)`` to embeddings ``(N, D)``.

Registered backbones (see :func:`list_backbones`):

``"smallcnn"``
    A small five-stage CNN (conv-BN-ReLU, stride 2 per stage, global average pool), ``D = 128``.
    Fast enough for CPU tests and CPU training.
``"resnet18"``, ``"resnet50"``
    torchvision ResNets, randomly initialised, classification ``fc`` replaced by
    :class:`torch.nn.Identity` (``D = 512`` and ``2048``). Pretrained weights are never downloaded:
    pass torchvision's weights name (``"IMAGENET1K_V1"``, read from torchvision's cache) or a local
    file as ``weights`` (:mod:`wsi_pipeline.weights`).

Backbones take *normalised* float input. :class:`PatchNormalize` (used inside
:class:`~wsi_pipeline.models.MILModel`) maps uint8 ``[0, 255]`` or float ``[0, 1]`` patches to
ImageNet-normalised float.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..weights import IMAGENET_MEAN, IMAGENET_STD, load_weights, load_weights_file
from .registry import backbone_builder, backbone_torchvision_arch, register_backbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PatchNormalize",
    "SmallCNN",
    "get_backbone",
    "load_backbone_weights",
]


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


@register_backbone("resnet18", torchvision="resnet18")
def resnet18() -> tuple[nn.Module, int]:
    """torchvision ResNet-18, random init, ``fc`` = Identity, ``D = 512``."""
    return _torchvision_resnet("resnet18")


@register_backbone("resnet50", torchvision="resnet50")
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
        What :func:`wsi_pipeline.weights.load_weights` accepts: a local weights file (see
        :func:`load_backbone_weights`) or folder, a torchvision weights name for a torchvision
        backbone (``"IMAGENET1K_V2"``, read from torchvision's cache, never downloaded), or
        ``"none"``; random init when ``None`` or ``"none"``.

    Returns
    -------
    module : torch.nn.Module
        Maps normalised float patches ``(N, 3, T, T)`` to embeddings ``(N, D)``; in training mode.
    dim : int
        ``D``.

    Raises
    ------
    ConfigError
        Unknown backbone name, unknown weights name (the valid ones listed).
    TrainingError
        ``weights`` cannot be read, is refused, is not in torchvision's cache, or does not fit
        the backbone.
    """
    module, dim = backbone_builder(name)()
    if weights is not None:
        load_weights(module, weights, arch=backbone_torchvision_arch(name), name=name)
    return module, dim


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a weights file into ``backbone`` in place (see
    :func:`wsi_pipeline.weights.load_weights_file`).

    Accepted files: a state dict (``.pt``/``.pth``/``.bin``, read with
    ``torch.load(weights_only=True)``), ``.safetensors``, a TorchScript archive (its tensors), or
    a checkpoint dict with the state dict under ``"state_dict"`` or ``"model"``; in this
    package's naming or torchvision naming. Keys of submodules the backbone replaced by
    :class:`torch.nn.Identity` (a torchvision ResNet's ``fc.*``) are dropped; ``module.``
    (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are stripped; when keys start with
    ``backbone.`` (a saved :class:`~wsi_pipeline.models.MILModel`), only those are used.

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
        The file does not exist, cannot be read, is a pickle that would run code (refused), is
        not a state dict of tensors, or does not fit ``backbone`` (the message names a few
        offending keys).
    """
    return load_weights_file(backbone, path)
