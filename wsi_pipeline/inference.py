"""Running a MIL model: the device, the model a run describes, its weights, and bag inference.

Shared by training (evaluation), prediction and the feature cache: one rule for the device
(``auto``), one for mixed precision (bf16 where supported, else fp16, CUDA only), one for moving
patches to the device (channels-last on CUDA), and one for embedding a whole store in chunks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, TrainingError
from .runs import MODEL
from .specs import TrainConfig

__all__ = [
    "autocast",
    "bag_output",
    "build_model",
    "load_model",
    "load_weights",
    "resolve_device",
    "store_embeddings",
    "to_device",
]


def resolve_device(device: str) -> Any:
    """The torch device to run on.

    Parameters
    ----------
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:<i>"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ConfigError
        CUDA asked for but not available.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but no CUDA device is available")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:<i>, not {device!r}") from None


def build_model(
    config: TrainConfig, num_classes: int, *, in_dim: int | None = None, load_backbone: bool = True
) -> Any:
    """The MIL model a training config describes (randomly initialised).

    Parameters
    ----------
    config : TrainConfig
        Model, backbone, head sizes and mode.
    num_classes : int
    in_dim : int, optional
        Feature dimension (features mode: the model is the head only, on ``in_dim`` features).
    load_backbone : bool
        Load ``config.backbone_weights`` into the backbone (end-to-end mode); ``False`` when the
        run's own weights are loaded next.

    Returns
    -------
    MILModel
    """
    from .models import get_model, model_options

    opts: dict[str, Any] = {
        "num_classes": num_classes,
        "hidden_dim": config.hidden_dim,
        "dropout": config.dropout,
    }
    if "attn_dim" in model_options(config.model):
        opts["attn_dim"] = config.attn_dim
    if config.mode == "features":
        opts.update(backbone=None, in_dim=in_dim)
    else:
        opts.update(backbone=config.backbone, grad_checkpoint=config.grad_checkpoint)
        if load_backbone and config.backbone_weights:
            opts["backbone_weights"] = config.backbone_weights
    return get_model(config.model, **opts)


def load_weights(model: Any, path: str | os.PathLike) -> Any:
    """Load a plain state dict (``torch.load(..., weights_only=True)``) into ``model``.

    Parameters
    ----------
    model : torch.nn.Module
    path : path
        A state-dict file such as a run's ``model.pt``.

    Returns
    -------
    torch.nn.Module
        ``model``, with the weights loaded.

    Raises
    ------
    TrainingError
        The file cannot be read or does not fit the model (first 200 characters of the cause).
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise TrainingError(
            f"{path}: cannot load weights ({' '.join(str(exc).split())[:200]})"
        ) from exc
    return model


def load_model(run: dict[str, Any], *, device: Any) -> Any:
    """The trained model of a run (best weights), in eval mode on ``device``.

    Parameters
    ----------
    run : dict
        From :func:`wsi_pipeline.runs.load_run`.
    device : torch.device

    Returns
    -------
    MILModel

    Raises
    ------
    TrainingError
        The run's ``model.pt`` cannot be loaded into the model its config describes.
    """
    config: TrainConfig = run["train_config"]
    model = build_model(
        config,
        len(run["labels"]["classes"]),
        in_dim=run["config"].get("in_dim"),
        load_backbone=False,
    )
    load_weights(model, Path(run["dir"]) / MODEL)
    return model.to(device).eval()


def autocast(device: Any, amp: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA when ``amp``: bf16 where supported, else fp16; else a no-op.

    Parameters
    ----------
    device : torch.device
    amp : bool

    Returns
    -------
    context manager
    """
    import torch

    if device.type == "cuda" and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(x: Any, device: Any, channels_last: bool) -> Any:
    """Move a tensor to ``device`` (non-blocking); patches ``(N, 3, T, T)`` channels-last on CUDA.

    Parameters
    ----------
    x : Tensor
    device : torch.device
    channels_last : bool
        Use the channels-last memory format for 4-D tensors on CUDA.

    Returns
    -------
    Tensor
    """
    import torch

    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def bag_output(
    model: Any, x: Any, *, device: Any, amp: bool, channels_last: bool, chunk: int = 512
) -> Any:
    """Inference on a whole bag of any size: embed in chunks, then the head once.

    Parameters
    ----------
    model : MILModel
    x : (N, 3, T, T) uint8 Tensor or (N, D) float Tensor
        Patches (end-to-end) or cached features.
    device : torch.device
    amp, channels_last : bool
        See :func:`autocast` and :func:`to_device`.
    chunk : int
        Patches per backbone pass.

    Returns
    -------
    MILOutput
    """
    import torch

    with torch.inference_mode(), autocast(device, amp):
        if x.ndim == 4:  # patches
            hs = [
                model.embed(to_device(x[i : i + chunk], device, channels_last))
                for i in range(0, len(x), chunk)
            ]
            h = torch.cat(hs).float()
        else:
            h = to_device(x, device, False).float()
        return model.head_forward(h)


def store_embeddings(
    store: str | os.PathLike,
    embed: Callable[[Any], Any],
    *,
    device: Any,
    amp: bool = True,
    channels_last: bool = False,
    chunk: int = 512,
    out_device: Any = None,
) -> Any:
    """Embeddings of every patch of a store, computed ``chunk`` patches at a time.

    Parameters
    ----------
    store : path
        A complete store.
    embed : callable
        Maps uint8 patches ``(K, 3, T, T)`` on ``device`` to embeddings ``(K, D)``
        (e.g. ``MILModel.embed``).
    device : torch.device
        Where ``embed`` runs.
    amp, channels_last : bool
        See :func:`autocast` and :func:`to_device`.
    chunk : int
        Patches per pass (bounds the memory of one pass).
    out_device : torch.device or str, optional
        Where each chunk's embeddings are collected (default ``device``; ``"cpu"`` keeps only
        one chunk on the GPU).

    Returns
    -------
    (N, D) float32 Tensor
        In store order; ``(0, 0)`` for a store without patches.
    """
    import torch

    from .store import PatchReader

    reader = PatchReader(store)
    out_device = device if out_device is None else out_device
    hs = []
    with torch.inference_mode(), autocast(device, amp):
        for i in range(0, reader.n, chunk):
            x = torch.from_numpy(reader.read(np.arange(i, min(reader.n, i + chunk))))
            x = to_device(x.permute(0, 3, 1, 2), device, channels_last)
            hs.append(embed(x).float().to(out_device))
    return torch.cat(hs) if hs else torch.zeros((0, 0), device=out_device)
