"""Optimisation and checkpoints of a training run: AdamW with its schedule, where training stands
(:class:`TrainState`), and the atomic checkpoint that ``--resume`` continues bit-for-bit on the CPU.

:func:`make_optimization` builds the :class:`Optimization` of a model (AdamW, a per-step warm-up +
cosine schedule, the AMP gradient scaler; :meth:`Optimization.step` clips the gradient norm to
:data:`CLIP_NORM`). :func:`save_checkpoint` writes model, optimizer, scheduler, scaler, RNG states,
the epoch, the history and the best epoch; :func:`restore_checkpoint` loads them back. The loop
that uses them is :mod:`wsi_pipeline.training`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import TrainingError, short_reason
from .specs import TrainConfig
from .util import save_torch

__all__ = [
    "CLIP_NORM",
    "Checkpointed",
    "Optimization",
    "TrainState",
    "make_optimization",
    "restore_checkpoint",
    "save_checkpoint",
]

#: Gradient-norm clip of every optimizer step.
CLIP_NORM = 5.0


# --------------------------------------------------------------------------------------------
# optimisation
# --------------------------------------------------------------------------------------------
@dataclass
class Optimization:
    """AdamW, its warm-up + cosine schedule (per step) and the AMP gradient scaler."""

    params: list[Any]
    optimizer: Any
    scheduler: Any
    scaler: Any

    def step(self, loss: Any) -> None:
        """Backward ``loss``, clip the gradient norm to :data:`CLIP_NORM`, step and schedule."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()


def _schedule(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_optimization(
    model: Any, config: TrainConfig, *, steps_per_epoch: int, device: Any
) -> Optimization:
    """The :class:`Optimization` of ``model``'s trainable parameters for ``config``.

    Parameters
    ----------
    model : torch.nn.Module
    config : TrainConfig
        ``lr``, ``weight_decay``, ``epochs``, ``warmup_epochs`` (linear warm-up, then cosine decay
        to 0 at the last step) and ``amp`` (a gradient scaler on CUDA without bfloat16).
    steps_per_epoch : int
        Optimizer steps per epoch (the schedule is per step).
    device : torch.device

    Returns
    -------
    Optimization
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = steps_per_epoch * config.epochs
    warm = steps_per_epoch * config.warmup_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warm))
    use_scaler = device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    return Optimization(params, optimizer, scheduler, scaler)


# --------------------------------------------------------------------------------------------
# state and checkpoints
# --------------------------------------------------------------------------------------------
def _no_best() -> dict[str, Any]:
    return {"epoch": -1, "auc": -1.0, "loss": float("inf")}


@dataclass
class TrainState:
    """Where training stands.

    Attributes
    ----------
    history : list of dict
        One record per epoch run (``epoch`` 0-based, ``train_loss``, ``lr``, ``val_*``, ...).
    best : dict
        ``epoch`` (-1 before the first), ``auc`` (-1 without one) and ``loss`` of the best epoch,
        and ``by``: what chose it (``val_auc``, ``val_loss`` or ``train_loss``).
    next_epoch : int
        The epoch to run next.
    stale : int
        Epochs since the best one (early stopping).
    stopped_early : bool
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=_no_best)
    next_epoch: int = 0
    stale: int = 0
    stopped_early: bool = False

    def finished(self, epochs: int) -> bool:
        """Training is over: stopped early, or ``epochs`` epochs run (never with no epoch run)."""
        if not self.history:
            return False
        return self.stopped_early or self.history[-1]["epoch"] + 1 >= epochs


class Checkpointed(Protocol):
    """What a checkpoint is saved from and restored into: a
    :class:`wsi_pipeline.training.TrainingSetup`, or anything with these attributes.

    Attributes
    ----------
    model : torch.nn.Module
        The model being trained (not the DistributedDataParallel wrapper).
    optim : Optimization
    device : torch.device
    """

    model: Any
    optim: Optimization
    device: Any


def _rng_state(device: Any) -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: Any) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, setup: Checkpointed, state: TrainState, *, epoch: int) -> None:
    """Save the full training state after ``epoch`` to ``path`` atomically (weights-only types).

    Model, optimizer, scheduler, scaler, RNG states, the epoch, and the history and best epoch
    (as JSON strings).

    Parameters
    ----------
    path : Path
        The checkpoint file (``runs.CHECKPOINT`` in the run folder).
    setup : Checkpointed
        Its model, optimization and device.
    state : TrainState
    epoch : int
        The epoch just finished (0-based).
    """

    opt = setup.optim
    ckpt = {
        "model": setup.model.state_dict(),
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "scaler": opt.scaler.state_dict(),
        "rng": _rng_state(setup.device),
        "epoch": epoch,
        "history": json.dumps(state.history),
        "best": json.dumps(state.best),
    }
    save_torch(ckpt, path)


def restore_checkpoint(path: Path, setup: Checkpointed) -> TrainState:
    """Load a :func:`save_checkpoint` file into ``setup`` (and the RNGs); the state it saved.

    Parameters
    ----------
    path : Path
    setup : Checkpointed
        Built as for the run that saved the file; its model and optimization are loaded in place.

    Returns
    -------
    TrainState
        With ``next_epoch`` the epoch after the saved one.
    """
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        setup.model.load_state_dict(ck["model"])
    except Exception as exc:  # truncated, corrupt, not ours, or another model's checkpoint
        raise TrainingError(
            f"{path}: cannot resume from this checkpoint ({short_reason(exc)}); "
            "train again without --resume"
        ) from exc
    setup.optim.optimizer.load_state_dict(ck["optimizer"])
    setup.optim.scheduler.load_state_dict(ck["scheduler"])
    setup.optim.scaler.load_state_dict(ck["scaler"])
    _set_rng_state(ck["rng"], setup.device)
    history = json.loads(ck["history"])
    best = json.loads(ck["best"])
    return TrainState(
        history=history,
        best=best,
        next_epoch=int(ck["epoch"]) + 1,
        stale=sum(1 for h in history if h["epoch"] > best["epoch"]),
        stopped_early=bool(history and history[-1].get("stopped_early")),
    )
