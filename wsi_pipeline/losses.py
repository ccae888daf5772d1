"""The training loss of a MIL model: slide cross-entropy mixed with an instance loss.

:func:`make_objective` turns a :class:`~wsi_pipeline.specs.TrainConfig` into an
:class:`Objective`; :func:`bag_loss` is the loss of one bag under it: the slide-level
cross-entropy (class-weighted with ``balance="loss"``), mixed with CLAM's instance clustering loss
(``clam_sb``) or with :func:`topk_instance_loss` (the other heads) by ``instance_weight``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import BagDataset, negative_class
from .specs import TrainConfig

__all__ = [
    "Objective",
    "bag_loss",
    "epoch_objective",
    "make_objective",
    "step_loss",
    "topk_instance_loss",
]

log = logging.getLogger(__name__)


def topk_instance_loss(patch_logits: Any, label: int, negative: int, *, k: int = 8) -> Any:
    """Instance loss from the MIL assumption, on the ``k`` most abnormal-looking patches.

    In a negative slide every patch is negative: the ``k`` patches the model finds most abnormal
    are pushed to the negative class (hard negatives). In a positive slide at least one patch is
    positive: the ``k`` patches that look most like the slide's class are pushed to it, as in
    max/top-k MIL (Campanella et al. 2019). This gives the patch encoder direct gradients when
    the abnormality covers a few percent of the tissue and attention pooling dilutes it.

    Parameters
    ----------
    patch_logits : (N, C) Tensor
    label, negative : int
        The slide's class and the negative (normal) class.
    k : int
        Patches per bag (clipped to N).

    Returns
    -------
    Tensor
        Scalar cross-entropy.
    """
    import torch
    import torch.nn.functional as F

    if label == negative:  # most abnormal: largest logit of another class over the normal one
        others = [c for c in range(patch_logits.shape[1]) if c != negative]
        margin = patch_logits[:, others].max(dim=1).values - patch_logits[:, negative]
    else:
        margin = patch_logits[:, label] - patch_logits[:, negative]
    idx = torch.topk(margin.detach(), min(k, len(margin))).indices
    target = torch.full((len(idx),), label, dtype=torch.long, device=patch_logits.device)
    return F.cross_entropy(patch_logits[idx], target)


@dataclass(frozen=True)
class Objective:
    """The training loss: slide cross-entropy, mixed with an instance loss.

    Attributes
    ----------
    class_weights : (C,) Tensor or None
        Cross-entropy class weights (``balance="loss"``).
    instance : {"clam", "topk", "none"}
        CLAM's instance clustering loss (``clam_sb``), :func:`topk_instance_loss`, or none.
    weight : float
        ``(1 - weight) * slide + weight * instance``.
    k : int
        Patches per bag of the top-k instance loss.
    negative : int
        The negative class.
    """

    class_weights: Any = None
    instance: str = "none"
    weight: float = 0.0
    k: int = 8
    negative: int = 0


def make_objective(
    config: TrainConfig,
    classes: Sequence[str],
    train_set: BagDataset,
    *,
    device: Any,
    world: int = 1,
) -> Objective:
    """The :class:`Objective` of a training config.

    Parameters
    ----------
    config : TrainConfig
        ``balance``, ``instance_weight``, ``instance_k`` and ``model`` are used.
    classes : sequence of str
        Class names, in index order (the negative class is found among them).
    train_set : BagDataset
        The training bags (their class counts weight the loss with ``balance="loss"``).
    device : torch.device
        Where the class weights go.
    world : int
        Processes under torchrun; CLAM's instance loss is left out when above 1.

    Returns
    -------
    Objective
    """
    import torch

    class_w = None
    if config.balance == "loss":
        counts = np.bincount(train_set.targets, minlength=len(classes))
        class_w = torch.tensor(
            len(train_set) / (len(classes) * np.maximum(counts, 1)),
            dtype=torch.float32,
            device=device,
        )
    instance = "none"
    if config.instance_weight > 0:
        instance = "clam" if config.model == "clam_sb" else "topk"
    if instance == "clam" and world > 1:
        log.warning("clam_sb under torchrun: the instance loss is left out (bag loss only)")
        instance = "none"
    if config.instance_warmup_epochs > 0 and instance != "topk":
        why = "clam_sb has its own instance loss" if instance == "clam" else "no instance loss"
        log.info(
            "instance_warmup_epochs %s has no effect (%s): every epoch has the same objective",
            config.instance_warmup_epochs,
            why,
        )
    return Objective(
        class_w, instance, config.instance_weight, config.instance_k, negative_class(classes)
    )


def epoch_objective(objective: Objective, config: TrainConfig, epoch: int) -> Objective:
    """The objective of one epoch: during the first ``config.instance_warmup_epochs`` the top-k
    instance loss takes every patch of a bag (naive MIL: each patch gets its slide's label)."""
    if epoch < config.instance_warmup_epochs:
        return dataclasses.replace(objective, k=config.max_patches)
    return objective


def bag_loss(model: Any, ddp_model: Any, x: Any, y: int, objective: Objective) -> Any:
    """The training loss of one bag (call under :func:`wsi_pipeline.inference.autocast`).

    Parameters
    ----------
    model : MILModel
    ddp_model : torch.nn.Module
        ``model`` or its DistributedDataParallel wrapper (the forward pass goes through it).
    x : (N, 3, T, T) or (N, D) Tensor
        The bag, on the model's device.
    y : int
        The slide's class.
    objective : Objective

    Returns
    -------
    Tensor
        Scalar loss.
    """
    return step_loss(model, ddp_model, [x], [y], objective)


def step_loss(
    model: Any, ddp_model: Any, xs: Sequence[Any], ys: Sequence[int], objective: Objective
) -> Any:
    """The training loss of one step: the mean loss of its bags, embedded in one backbone pass.

    The patches of every bag go through the backbone together, so that in training mode
    BatchNorm normalises over the patches of several slides of both classes, as it will see them
    at evaluation (running statistics), instead of over one slide; each bag is then pooled on
    its own. Call under :func:`wsi_pipeline.inference.autocast`.

    Parameters
    ----------
    model : MILModel
    ddp_model : torch.nn.Module
        ``model`` or its DistributedDataParallel wrapper (the forward pass goes through it).
    xs : sequence of Tensor
        The bags, ``(N_i, 3, T, T)`` or ``(N_i, D)``, on the model's device.
    ys : sequence of int
        The slides' classes.
    objective : Objective

    Returns
    -------
    Tensor
        Scalar loss (the mean over the bags).
    """
    import torch

    sizes = [int(x.shape[0]) for x in xs]
    x = xs[0] if len(xs) == 1 else torch.cat(list(xs), dim=0)
    hs: list[Any]
    if objective.instance == "clam":  # bag loss + instance clustering loss on the same h
        hs = list(torch.split(model.embed(x), sizes, dim=0))
        outs = [model.head_forward(h) for h in hs]
    else:
        outs = ddp_model(x, sizes)
        hs = [None] * len(outs)
    losses = [_one_bag(model, out, h, int(y), objective) for out, h, y in zip(outs, hs, ys)]
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def _one_bag(model: Any, out: Any, h: Any, y: int, objective: Objective) -> Any:
    import torch
    import torch.nn.functional as F

    yt = torch.tensor([y], device=out.logits.device)
    loss = F.cross_entropy(out.logits[None].float(), yt, weight=objective.class_weights)
    if objective.instance == "clam":
        inst = model.head.instance_loss(h.float(), y)
    elif objective.instance == "topk":
        inst = topk_instance_loss(out.patch_logits.float(), y, objective.negative, k=objective.k)
    else:
        return loss
    return (1 - objective.weight) * loss + objective.weight * inst
