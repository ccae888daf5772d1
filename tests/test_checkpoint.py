"""Optimisation and checkpoints (wsi_pipeline.checkpoint) on a tiny real model: the AdamW
schedule and gradient clip, and a save/restore round trip that continues bit-for-bit. The
``train --resume`` of a whole run is tested in test_training.py."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from wsi_pipeline.checkpoint import (
    CLIP_NORM,
    Optimization,
    TrainState,
    make_optimization,
    restore_checkpoint,
    save_checkpoint,
)
from wsi_pipeline.specs import TrainConfig

CPU = torch.device("cpu")
CONFIG = TrainConfig(epochs=3, lr=1e-2, weight_decay=1e-3, warmup_epochs=1)
STEPS = 4  # optimizer steps per epoch


@dataclass
class Setup:
    """What a checkpoint is saved from and restored into (a ``Checkpointed``)."""

    model: nn.Module
    optim: Optimization
    device: torch.device


def make_setup(seed: int, config: TrainConfig = CONFIG) -> Setup:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return Setup(model, make_optimization(model, config, steps_per_epoch=STEPS, device=CPU), CPU)


def run_steps(setup: Setup, n: int) -> list[float]:
    """``n`` training steps on random batches drawn from torch's RNG (dropout draws from it
    too); the losses."""
    losses = []
    setup.model.train()
    for _ in range(n):
        x = torch.randn(5, 6)
        y = torch.randint(0, 3, (5,))
        loss = nn.functional.cross_entropy(setup.model(x), y)
        setup.optim.step(loss)
        losses.append(loss.item())
    return losses


def same_state(a: Any, b: Any) -> bool:
    """Nested state dicts (tensors, numbers, lists, dicts) equal exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------------------------
def test_make_optimization_warm_up_then_cosine_per_step() -> None:
    setup = make_setup(0)
    opt = setup.optim
    assert isinstance(opt.optimizer, torch.optim.AdamW)
    group = opt.optimizer.param_groups[0]
    assert group["weight_decay"] == CONFIG.weight_decay
    assert not opt.scaler.is_enabled()  # no gradient scaler on the CPU
    total, warm = STEPS * CONFIG.epochs, STEPS * CONFIG.warmup_epochs
    want = [(s + 1) / warm for s in range(warm)]
    want += [
        0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))) for s in range(warm, total)
    ]
    got = []
    for _ in range(total):
        got.append(opt.scheduler.get_last_lr()[0] / CONFIG.lr)
        run_steps(setup, 1)
    assert got == pytest.approx(want)
    assert got[warm - 1] == pytest.approx(1.0) and got[0] == pytest.approx(1 / warm)
    assert opt.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # 0 at the last step
    no_warm = make_setup(0, TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0)).optim
    assert no_warm.scheduler.get_last_lr()[0] == pytest.approx(1e-2)  # cosine from the start


def test_only_trainable_parameters_and_the_gradient_clip() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 3))
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = make_optimization(model, CONFIG, steps_per_epoch=STEPS, device=CPU)
    assert [id(p) for p in opt.params] == [id(p) for p in model[1].parameters()]
    assert [id(p) for p in opt.optimizer.param_groups[0]["params"]] == [id(p) for p in opt.params]
    frozen = model[0].weight.clone()
    opt.step(1e6 * model(torch.randn(5, 6)).square().sum())  # a huge gradient
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in opt.params]))
    assert norm.item() == pytest.approx(CLIP_NORM, rel=1e-4)  # clipped to CLIP_NORM
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None


# ---------------------------------------------------------------------------------------------
# state and checkpoints
# ---------------------------------------------------------------------------------------------
def test_save_restore_round_trip_continues_bit_for_bit(tmp_path: Path) -> None:
    """Restored into a freshly built set-up (other initial weights, other RNG state): the same
    parameters, optimizer, scheduler and RNG stream, so the next steps are the same steps."""
    path = tmp_path / "checkpoint.pt"
    a = make_setup(0)
    run_steps(a, STEPS * 2)
    history = [
        {"epoch": 0, "train_loss": 1.1, "lr": 0.01, "val_auc": 0.75},
        {"epoch": 1, "train_loss": 0.9, "lr": 0.008, "val_auc": None},
    ]
    best = {"epoch": 0, "auc": 0.75, "loss": 0.8, "by": "val_auc"}
    save_checkpoint(path, a, TrainState(history=history, best=best, next_epoch=2), epoch=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file
    saved_params = {k: v.clone() for k, v in a.model.state_dict().items()}
    saved_optim = copy.deepcopy(a.optim.optimizer.state_dict())  # it holds live tensors
    after_a = run_steps(a, STEPS)  # what the run did next
    draws_a = torch.rand(8)

    b = make_setup(1)
    torch.manual_seed(123)  # another RNG state, which restoring replaces
    assert not same_state(b.model.state_dict(), saved_params)
    state = restore_checkpoint(path, b)
    assert same_state(b.model.state_dict(), saved_params)
    assert same_state(b.optim.optimizer.state_dict(), saved_optim)
    assert b.optim.scheduler.last_epoch == STEPS * 2
    assert b.optim.scheduler.state_dict()["_last_lr"] == pytest.approx(
        [CONFIG.lr * 0.5 * (1 + math.cos(math.pi * STEPS / (STEPS * 2)))]
    )
    assert state == TrainState(history=history, best=best, next_epoch=2, stale=1)
    after_b = run_steps(b, STEPS)
    assert after_b == after_a  # the same batches, dropout masks and updates
    assert torch.equal(torch.rand(8), draws_a)  # the same RNG stream afterwards
    assert same_state(b.model.state_dict(), a.model.state_dict())
    assert same_state(b.optim.optimizer.state_dict(), a.optim.optimizer.state_dict())


def test_checkpoint_holds_weights_only_types(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    setup = make_setup(0)
    save_checkpoint(path, setup, TrainState(), epoch=0)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ck) == {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "epoch",
        "history",
        "best",
    }
    assert ck["epoch"] == 0 and json.loads(ck["history"]) == []
    assert json.loads(ck["best"]) == {"epoch": -1, "auc": -1.0, "loss": math.inf}
    assert set(ck["rng"]) == {"torch"}  # no CUDA state on the CPU


def test_a_failed_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    setup = make_setup(0)
    save_checkpoint(path, setup, TrainState(), epoch=0)
    before = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj: Any, f: Any, *args: Any, **kw: Any) -> None:
        real_save(obj, f, *args, **kw)  # into the open temporary file (util.save_torch)
        f.seek(100)
        f.truncate()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, setup, TrainState(history=[{"epoch": 1}]), epoch=1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_restored_state_counts_stale_epochs_and_early_stop(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    setup = make_setup(0)
    history = [{"epoch": e, "train_loss": 1.0 - e / 10} for e in range(5)]
    history[-1]["stopped_early"] = True
    best = {"epoch": 1, "auc": 0.9, "loss": 0.7, "by": "val_auc"}
    save_checkpoint(path, setup, TrainState(history=history, best=best), epoch=4)
    state = restore_checkpoint(path, make_setup(0))
    assert (state.next_epoch, state.stale, state.stopped_early) == (5, 3, True)
    assert state.history == history and state.best == best
    assert state.finished(epochs=40)  # stopped early


def test_train_state_finished() -> None:
    assert TrainState() == TrainState(history=[], next_epoch=0, stale=0, stopped_early=False)
    assert TrainState().best == {"epoch": -1, "auc": -1.0, "loss": math.inf}
    assert not TrainState().finished(3)  # no epoch run yet: never finished (nor calibrated)
    two = TrainState(history=[{"epoch": 0}, {"epoch": 1}], next_epoch=2)
    assert not two.finished(3) and two.finished(2)
    assert TrainState(history=[{"epoch": 0}], stopped_early=True).finished(3)
