"""The training loss (wsi_pipeline.losses): the objective of a config, the bag loss and the
top-k instance loss."""

from __future__ import annotations

from pathlib import Path

import torch

from wsi_pipeline.losses import bag_loss, make_objective, topk_instance_loss
from wsi_pipeline.specs import TrainConfig


def test_objective_and_bag_loss(small_cohort: tuple[Path, Path]) -> None:
    from wsi_pipeline.data import BagDataset

    stores, _ = small_cohort
    bags = BagDataset(sorted(stores.glob("*.zarr"))[:3], [0, 1, 1])
    cpu = torch.device("cpu")
    obj = make_objective(TrainConfig(balance="loss"), ("0", "1"), bags, device=cpu)
    assert obj.instance == "topk" and obj.negative == 0
    assert torch.allclose(obj.class_weights, torch.tensor([1.5, 0.75]))
    clam = make_objective(TrainConfig(model="clam_sb"), ("0", "1"), bags, device=cpu)
    assert clam.instance == "clam" and clam.class_weights is None
    assert (
        make_objective(TrainConfig(model="clam_sb"), ("0", "1"), bags, device=cpu, world=2).instance
        == "none"
    )
    assert (
        make_objective(TrainConfig(instance_weight=0.0), ("0", "1"), bags, device=cpu).instance
        == "none"
    )
    # without an instance loss the bag loss is the slide cross-entropy
    from wsi_pipeline.inference import build_model

    model = build_model(TrainConfig(), 2).eval()
    x = bags[0][0]
    none = make_objective(TrainConfig(instance_weight=0.0), ("0", "1"), bags, device=cpu)
    with torch.no_grad():
        loss = bag_loss(model, model, x, 1, none)
        ref = torch.nn.functional.cross_entropy(model(x).logits[None], torch.tensor([1]))
    assert torch.isclose(loss, ref)


def test_instance_loss_follows_the_mil_assumption() -> None:
    """Only the k most abnormal-looking patches get a gradient: towards the negative class in a
    negative slide (hard negatives), towards the slide's class in a positive one."""
    logits = torch.tensor(
        [[0.0, 2.0], [0.0, -1.0], [0.0, 0.5], [0.0, 3.0], [0.0, -2.0]], requires_grad=True
    )
    topk_instance_loss(logits, 0, 0, k=2).backward()
    moved = logits.grad.abs().sum(dim=1) > 0
    assert moved.tolist() == [True, False, False, True, False]  # the two highest margins
    assert bool((logits.grad[moved, 1] > 0).all())  # their positive logit is pushed down
    logits.grad = None
    loss = topk_instance_loss(logits, 1, 0, k=2)
    loss.backward()
    assert moved.tolist() == (logits.grad.abs().sum(dim=1) > 0).tolist()
    assert bool((logits.grad[moved, 1] < 0).all())  # pushed up (gradient descent)
    target = torch.ones(2, dtype=torch.long)
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits[[3, 0]], target))
    # three classes, slide of class 2: top-k by the class-2-vs-normal margin
    three = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], requires_grad=True)
    topk_instance_loss(three, 2, 0, k=1).backward()
    assert (three.grad.abs().sum(dim=1) > 0).tolist() == [False, True, False]
    # k larger than the bag: every patch
    assert torch.isfinite(topk_instance_loss(logits[:1], 1, 0, k=8))


def test_instance_warmup_takes_every_patch_then_the_top_k() -> None:
    """During the naive-MIL warm-up the instance loss is the cross-entropy of every patch with the
    slide's label; afterwards only the top ``instance_k`` patches count."""
    import torch
    import torch.nn.functional as F

    from wsi_pipeline.losses import Objective, epoch_objective, topk_instance_loss

    config = TrainConfig(max_patches=16, instance_k=2, instance_warmup_epochs=3)
    base = Objective(instance="topk", weight=0.6, k=2)
    logits = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    naive = F.cross_entropy(logits, torch.ones(16, dtype=torch.long))
    early, late = epoch_objective(base, config, 2), epoch_objective(base, config, 3)
    assert early.k == 16 and late.k == 2
    assert torch.allclose(topk_instance_loss(logits, 1, 0, k=early.k), naive)
    assert not torch.allclose(topk_instance_loss(logits, 1, 0, k=late.k), naive)


def test_warmup_without_a_topk_instance_loss_says_it_does_nothing(logged) -> None:
    import logging

    logged.set_level(logging.INFO, logger="wsi_pipeline")
    cpu = torch.device("cpu")
    for config, why in (
        (TrainConfig(model="clam_sb"), "clam_sb has its own instance loss"),
        (TrainConfig(instance_weight=0.0), "no instance loss"),
    ):
        logged.clear()
        make_objective(config, ("0", "1"), None, device=cpu)
        assert f"instance_warmup_epochs 15 has no effect ({why})" in logged.text
    logged.clear()
    make_objective(TrainConfig(), ("0", "1"), None, device=cpu)  # the defaults: it does something
    assert "no effect" not in logged.text
