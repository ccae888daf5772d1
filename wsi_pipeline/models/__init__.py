"""MIL models for weakly supervised slide classification: patch backbones + MIL pooling heads.

Torch stage: imported explicitly (``from wsi_pipeline.models import get_model``), never by
``import wsi_pipeline``.

Usage::

    model = get_model("abmil", num_classes=2, backbone="smallcnn")  # end-to-end
    out = model(patches_uint8)  # (N, 3, T, T) → MILOutput(logits (2,), (N, 2), (N,))
    head = get_model("abmil", num_classes=2, backbone=None, in_dim=512)  # cached features
    out = head(features)  # (N, 512) → MILOutput

Input normalisation happens inside :class:`MILModel`: uint8 patches are divided by 255 (float
patches are taken as ``[0, 1]``), then normalised with the ImageNet mean/std.
"""

from __future__ import annotations

from . import heads as _heads  # noqa: F401  (registers the models)
from .backbones import PatchNormalize, SmallCNN, get_backbone, load_backbone_weights
from .mil import MILModel, MILOutput
from .registry import (
    get_model,
    list_backbones,
    list_models,
    model_options,
    register_backbone,
    register_model,
)

__all__ = [
    "MILModel",
    "MILOutput",
    "PatchNormalize",
    "SmallCNN",
    "get_backbone",
    "get_model",
    "list_backbones",
    "list_models",
    "load_backbone_weights",
    "model_options",
    "register_backbone",
    "register_model",
]
