"""Export a run's patch-level scorer for the WSInfer QuPath extension.

WSInfer models are a folder with ``torchscript.pt`` and ``config.json`` (the WSInfer model-config
schema, ``spec_version`` "1.0": ``architecture``, ``num_classes``, ``class_names``,
``patch_size_pixels``, ``spacing_um_px`` and ``transform``, a list of ``Resize`` / ``ToTensor`` /
``Normalize`` steps). The extension reads each tile at ``spacing_um_px``, applies the transforms,
runs the TorchScript model on a batch ``(B, 3, T, T)`` and takes the **softmax** of its output as
the class probabilities it stores as measurements.

The exported module is the run's backbone followed by the head's instance classifier (the part
that makes ``patch_logits``), then the run's patch calibration written as logits, so that
``softmax(output)`` equals the per-patch class probabilities ``predict`` computes; ``1 - p(negative
class)`` is the score ``predict`` writes to ``scores/<run_id>``. The input normalisation (ImageNet
mean/std) is the config's ``Normalize`` step, so the module takes normalised float patches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import runs
from .errors import ConfigError, TrainingError
from .util import atomic_path, atomic_write_json, output_dir, torchscript_quiet

__all__ = ["CONFIG", "FORMATS", "TORCHSCRIPT", "export_run", "patch_scorer", "wsinfer_config"]

#: Export formats of ``wsi-pipeline export``.
FORMATS = ("wsinfer",)
#: File names the WSInfer QuPath extension looks for in a model folder.
TORCHSCRIPT = "torchscript.pt"
CONFIG = "config.json"


def _calibration_logits(cal: dict[str, Any] | None, num_classes: int) -> dict[str, Any]:
    """The run's patch calibration as constants of a logit map (see :func:`patch_scorer`)."""
    if cal is None or cal.get("method") in (None, "none"):
        return {"kind": "none"}
    if cal["method"] == "temperature":
        return {"kind": "temperature", "t": float(cal["temperature"])}
    if cal["method"] != "platt" or num_classes != 2:
        raise TrainingError(f"calibration method {cal['method']!r} cannot be exported")
    neg = int(cal["negative"])
    if "patch" in cal:
        pc = cal["patch"]
        return {
            "kind": "binary",
            "neg": neg,
            "a": float(pc["a"]),
            "b": -float(pc["a"]) * float(pc["center"]),
        }
    return {"kind": "binary", "neg": neg, "a": float(cal["a"]), "b": float(cal["b"])}


def patch_scorer(model: Any, calibration: dict[str, Any] | None) -> Any:
    """The per-patch part of an end-to-end MIL model as one ``nn.Module``.

    Parameters
    ----------
    model : MILModel
        An end-to-end model (with a backbone), in eval mode.
    calibration : dict or None
        The run's ``calibration.json``.

    Returns
    -------
    torch.nn.Module
        ``(B, 3, T, T)`` float patches normalised with the ImageNet mean/std → ``(B, C)`` logits
        whose softmax is the calibrated per-patch class probabilities.

    Raises
    ------
    TrainingError
        A features-mode model, a head without an instance classifier, or a calibration that
        cannot be written as logits.
    """
    import torch
    from torch import nn

    if model.backbone is None:
        raise TrainingError(
            "features-mode runs cannot be exported yet (their frozen extractor is not part of the "
            "model); export an end-to-end run"
        )
    head = model.head
    if not (hasattr(head, "proj") and hasattr(head, "classifier")):
        raise TrainingError(f"head {type(head).__name__} has no instance classifier to export")
    num_classes = int(head.classifier.out_features)
    consts = _calibration_logits(calibration, num_classes)

    class PatchScorer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = model.backbone
            self.proj = head.proj
            self.classifier = head.classifier

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.classifier(self.proj(self.backbone(x))).float()
            if consts["kind"] == "temperature":
                return z / consts["t"]
            if consts["kind"] == "binary":
                neg = consts["neg"]
                s = consts["a"] * (z[:, 1 - neg] - z[:, neg]) + consts["b"]
                zero = torch.zeros_like(s)
                cols = [zero, s] if neg == 0 else [s, zero]
                return torch.stack(cols, dim=1)
            return z

    return PatchScorer().eval()


def wsinfer_config(run: dict[str, Any], *, architecture: str) -> dict[str, Any]:
    """The WSInfer ``config.json`` of a run (model-config spec 1.0).

    Parameters
    ----------
    run : dict
        From :func:`wsi_pipeline.runs.load_run`.
    architecture : str
        Recorded as ``architecture``.

    Returns
    -------
    dict

    Raises
    ------
    TrainingError
        The run was tiled at a pyramid level, so its patches have no known spacing in µm/px.
    """
    from .models.backbones import IMAGENET_MEAN, IMAGENET_STD

    tiling = run["tiling"]
    if tiling.get("mpp") is None:
        raise TrainingError(
            f"{run['dir']}: the run was tiled at a pyramid level, not at an mpp; WSInfer needs the "
            "patch spacing in µm/px (tile with --mpp and train again)"
        )
    classes = [str(c) for c in run["labels"]["classes"]]
    size = int(tiling["tile_px"])
    return {
        "spec_version": "1.0",
        "architecture": architecture,
        "num_classes": len(classes),
        "class_names": classes,
        "patch_size_pixels": size,
        "spacing_um_px": float(tiling["mpp"]),
        "transform": [
            {"name": "Resize", "arguments": {"size": size}},
            {"name": "ToTensor"},
            {
                "name": "Normalize",
                "arguments": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            },
        ],
    }


def export_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str = "wsinfer"
) -> dict[str, Path]:
    """Write a run's patch scorer in an exchange format.

    Parameters
    ----------
    run_dir : path
        A finished training run.
    out_dir : path
        The model folder to write (``torchscript.pt`` and ``config.json``); put it in QuPath's
        WSInfer ``user`` models folder to use it there.
    fmt : {"wsinfer"}

    Returns
    -------
    dict
        ``{"torchscript": path, "config": path}``.

    Raises
    ------
    ConfigError
        An unknown format.
    TrainingError
        A run that cannot be loaded or exported (one line naming the run and the reason).
    """
    import torch

    from .inference import load_model

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    run = runs.load_run(run_dir)
    out = output_dir(out_dir)  # checked before the model is traced
    cfg = run["train_config"]
    config = wsinfer_config(run, architecture=f"wsi-pipeline {cfg.model}+{cfg.backbone}")
    model = load_model(run, device=torch.device("cpu"))
    scorer = patch_scorer(model, run.get("calibration"))
    size = config["patch_size_pixels"]
    example = torch.zeros((2, 3, size, size))
    with torch.inference_mode(False), torch.no_grad(), torchscript_quiet():
        # torch.jit is deprecated, but DJL (QuPath) loads it
        traced = torch.jit.trace(scorer, example, check_trace=False)
    ts = out / TORCHSCRIPT
    with atomic_path(ts) as tmp:
        traced.save(str(tmp))
    cp = out / CONFIG
    atomic_write_json(cp, config)
    json.loads(cp.read_text())  # written strictly; fails loudly if not
    return {"torchscript": ts, "config": cp}
