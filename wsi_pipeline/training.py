"""Weakly supervised MIL training from slide labels: end-to-end CNN or cached-feature heads.

``train(store_dir, labels_csv, run_dir, config=TrainConfig(...))`` checks all inputs, splits the
slides, trains with AdamW and a warm-up + cosine schedule, evaluates on the validation split each
epoch (AUC), stops early, checkpoints each epoch atomically (``--resume`` continues bit-for-bit on
the CPU), and leaves in the run folder everything ``predict`` needs (names and writers in
:mod:`wsi_pipeline.runs`):

``model.pt`` (best weights, plain state dict), ``config.json`` (model + training config),
``tiling.json``, ``labels.json``, ``splits.csv``, ``metrics.json``, ``calibration.json`` (the
probability calibration fitted on the validation slides), ``checkpoint.pt``,
``tensorboard/``, ``curves.png``, ``roc.png`` (and ``extractor.pt`` in features mode).

The steps, in the shape of torchvision's reference scripts: :func:`setup_training` (device,
bags, model, optimizer), :func:`start_state` (fresh or restored from the checkpoint),
:func:`fit` (:func:`train_one_epoch`, then :func:`end_epoch`: :func:`evaluate`, best weights,
early stopping, :func:`~wsi_pipeline.checkpoint.save_checkpoint`), and :func:`finish` (best
weights, test evaluation, calibration, plots, metrics). The loss of a bag is
:func:`wsi_pipeline.losses.bag_loss`; the optimizer, the training state and the checkpoint are
:mod:`wsi_pipeline.checkpoint`.

What makes a result less trustworthy than it looks is said, not hidden: a validation set that is
empty or of a single class is a warning when training starts (the best epoch is then chosen by
the validation loss, or the train loss without validation slides, and the validation AUC is
``null`` with a ``val_auc_reason``); calibration is skipped without
:data:`~wsi_pipeline.calibration.MIN_CALIBRATION_SLIDES` validation slides of each class; a best
epoch chosen on few validation slides, and a train loss that never left chance, are warnings
(the rules are :mod:`wsi_pipeline.train_report`). All of them are logged and listed under
``warnings`` in ``metrics.json``, next to ``stalled`` and the Brier score and expected
calibration error before and after calibration (``calibration``). ``metrics.json`` and what
:func:`train` returns never hold NaN: a missing metric is ``null`` with a ``<name>_reason``.

Runs under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on GPUs; see
:mod:`wsi_pipeline.distributed`): bags are split over ranks and rank 0 evaluates and writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, runs
from .calibration import apply_calibration
from .checkpoint import (
    Optimization,
    TrainState,
    make_optimization,
    restore_checkpoint,
    save_checkpoint,
)
from .data import (
    SPLIT_NAMES,
    BagDataset,
    Labels,
    check_tiling,
    make_splits,
    read_labels,
    resolve_stores,
)
from .distributed import Distributed, broadcast_flag, distributed, wrap_ddp
from .inference import autocast, bag_output, build_model, load_weights, resolve_device, to_device
from .losses import Objective, epoch_objective, make_objective, step_loss
from .metrics import auc_score, probability_metrics
from .specs import TrainConfig, fold_config
from .train_report import (
    auc_reason,
    calibrate,
    calibration_report,
    late_auc_warning,
    selection_warning,
    stall_warning,
    validation_warning,
)
from .util import output_dir, progress_bar, save_torch

__all__ = [
    "TrainingSetup",
    "end_epoch",
    "epoch_order",
    "evaluate",
    "finish",
    "fit",
    "setup_training",
    "start_state",
    "steps_per_epoch",
    "train",
    "train_folds",
    "train_one_epoch",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def evaluate(
    model: Any,
    dataset: BagDataset,
    *,
    device: Any,
    amp: bool = True,
    channels_last: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Slide-level loss, accuracy and AUC of ``model`` on every bag of ``dataset``.

    Returns
    -------
    dict
        ``loss``, ``acc``, ``auc`` (NaN without bags or with a single class; see
        :func:`auc_reason`), ``n``, ``logits`` (n, C), ``probs``
        (n, C) softmax, ``targets`` (n,) and ``patch_logits`` (one (N_i, C) array per bag).
    """
    import torch
    import torch.nn.functional as F

    model.eval()
    raw, targets, losses, patch = [], [], [], []
    for x, y, _ in _loader(dataset, shuffle_order=None, num_workers=num_workers, device=device):
        out = bag_output(model, x, device=device, amp=amp, channels_last=channels_last)
        logits = out.logits.float()
        losses.append(float(F.cross_entropy(logits[None], torch.tensor([y], device=device))))
        raw.append(logits.cpu().numpy())
        patch.append(out.patch_logits.float().cpu().numpy())
        targets.append(int(y))
    logits_np = np.stack(raw) if raw else np.zeros((0, 2), np.float32)
    p = torch.softmax(torch.from_numpy(logits_np), -1).numpy()
    return {
        "logits": logits_np,
        "patch_logits": patch,
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "acc": float(np.mean(p.argmax(1) == np.asarray(targets))) if raw else float("nan"),
        "auc": auc_score(targets, p) if raw else float("nan"),
        "n": len(targets),
        "probs": p,
        "targets": targets,
    }


def _loader(
    dataset: BagDataset, *, shuffle_order: Sequence[int] | None, num_workers: int, device: Any
) -> Any:
    import torch
    from torch.utils.data import DataLoader, Subset

    ds: Any = dataset  # a Dataset by duck typing
    if shuffle_order is not None:
        ds = Subset(ds, list(shuffle_order))
    return DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=None,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingSetup:
    """Everything one training run works with, made by :func:`setup_training`.

    Attributes
    ----------
    config : TrainConfig
    run : Path
        The run folder.
    device : torch.device
    dist : Distributed
    model : MILModel
        On ``device``.
    ddp_model : torch.nn.Module
        ``model``, wrapped in DistributedDataParallel under torchrun.
    bags : dict of str -> BagDataset
        ``train``, ``val`` and ``test`` (possibly empty).
    optim : Optimization
    objective : Objective
    num_workers : int
        DataLoader workers of the training bags.
    targets : dict of str -> int
        Class index of each slide in a split, in store order.
    record : dict
        ``config.json`` (run and package versions, training config, classes, ``in_dim``,
        ``extractor``).
    classes : tuple of str
        Class names, in index order.
    """

    config: TrainConfig
    run: Path
    device: Any
    dist: Distributed
    model: Any
    ddp_model: Any
    bags: dict[str, BagDataset]
    optim: Optimization
    objective: Objective
    num_workers: int
    targets: dict[str, int]
    record: dict[str, Any]
    classes: tuple[str, ...] = ()


def _device(config: TrainConfig, dist_info: Distributed) -> Any:
    """The device of this rank, with the seed and CPU determinism set."""
    import torch

    device = resolve_device(config.device)
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    torch.manual_seed(config.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def _model(
    config: TrainConfig,
    num_classes: int,
    device: Any,
    *,
    in_dim: int | None,
    extractor: str | None,
    train_stores: Sequence[Path],
) -> Any:
    """The randomly initialised model on ``device`` (features mode: feature statistics set)."""
    import torch

    model = build_model(config, num_classes, in_dim=in_dim)
    if extractor is not None:
        from .features import feature_stats

        model.set_feature_stats(*feature_stats(train_stores, extractor))
    model = model.to(device)
    if config.channels_last and device.type == "cuda" and config.mode == "e2e":
        model = model.to(memory_format=torch.channels_last)
    return model


def _bags(
    config: TrainConfig,
    stores: dict[str, Path],
    splits: dict[str, str],
    targets: dict[str, int],
    extractor: str | None,
) -> dict[str, BagDataset]:
    """The ``train``, ``val`` and ``test`` bags (training ones subsampled and augmented)."""
    bags = {}
    for split in SPLIT_NAMES:
        ids = [s for s in stores if splits[s] == split]
        training = split == "train"
        bags[split] = BagDataset(
            [stores[s] for s in ids],
            [targets[s] for s in ids],
            max_patches=config.max_patches if training else config.eval_max_patches,
            features=extractor,
            augment=training and config.mode == "e2e",
            jitter=config.color_jitter,
            seed=config.seed,
        )
    return bags


def setup_training(
    config: TrainConfig,
    run: Path,
    labels: Labels,
    stores: dict[str, Path],
    splits: dict[str, str],
    dist_info: Distributed,
    *,
    progress: bool = True,
) -> TrainingSetup:
    """Device, cached features (features mode), model, bags, optimizer and loss of a run.

    Parameters
    ----------
    config : TrainConfig
    run : Path
        The run folder (created; rank 0 saves ``extractor.pt`` there in features mode).
    labels : Labels
    stores : dict of slide_id -> Path
        The slides to train, validate and test on.
    splits : dict of slide_id -> split
    dist_info : Distributed
    progress : bool

    Returns
    -------
    TrainingSetup
    """
    device = _device(config, dist_info)
    output_dir(run)
    stores = {s: p for s, p in stores.items() if splits[s] in SPLIT_NAMES}
    label_of = {r.slide_id: r.label for r in labels.rows}
    targets = {s: labels.index(label_of[s]) for s in stores}
    extractor, in_dim = None, None
    if config.mode == "features":
        from .features import ensure_features

        extractor, in_dim = ensure_features(
            list(stores.values()),
            backbone=config.backbone,
            weights=config.backbone_weights,
            device=device,
            seed=config.seed,
            run_dir=run if dist_info.main else None,
            progress=progress,
        )
    train_stores = [p for s, p in stores.items() if splits[s] == "train"]
    model = _model(
        config,
        len(labels.classes),
        device,
        in_dim=in_dim,
        extractor=extractor,
        train_stores=train_stores,
    )
    bags = _bags(config, stores, splits, targets, extractor)
    unused = config.model == "clam_sb"
    return TrainingSetup(
        config=config,
        run=run,
        device=device,
        dist=dist_info,
        model=model,
        ddp_model=wrap_ddp(model, device, dist_info, find_unused_parameters=unused),
        bags=bags,
        optim=make_optimization(
            model,
            config,
            steps_per_epoch=steps_per_epoch(len(bags["train"]), config, dist_info.world),
            device=device,
        ),
        objective=make_objective(
            config, labels.classes, bags["train"], device=device, world=dist_info.world
        ),
        num_workers=config.num_workers
        if config.num_workers is not None
        else (4 if device.type == "cuda" else 1),
        targets=targets,
        record=_run_record(config, len(labels.classes), model.in_dim, extractor),
        classes=tuple(labels.classes),
    )


def _run_record(
    config: TrainConfig, num_classes: int, in_dim: int, extractor: str | None
) -> dict[str, Any]:
    """What ``config.json`` records: versions, the training config, the model's shape."""
    import torch

    return {
        "run_version": runs.RUN_VERSION,
        "package_version": __version__,
        "train": config.to_dict(),
        "num_classes": num_classes,
        "in_dim": in_dim,
        "extractor": extractor,
        "torch_version": torch.__version__,
    }


def start_state(
    setup: TrainingSetup,
    *,
    resume: bool,
    tiling: dict[str, Any] | None = None,
    splits: dict[str, str] | None = None,
) -> TrainState:
    """A fresh state, or the checkpoint's (``resume``; see :func:`wsi_pipeline.runs.check_resumable`:
    the config, and the ``tiling`` and ``splits`` when given, must be the run's)."""
    ckpt = setup.run / runs.CHECKPOINT
    if resume:
        runs.check_resumable(
            setup.run,
            setup.config,
            tiling=tiling,
            classes=setup.classes if splits is not None else None,
            splits=None if splits is None else _split_rows(setup, splits),
        )
        state = restore_checkpoint(ckpt, setup)
        log.info("resuming %s at epoch %d", setup.run, state.next_epoch)
        return state
    if setup.dist.main:
        if ckpt.exists() or (setup.run / runs.MODEL).exists():
            log.warning(
                "%s: starting over (the earlier model and checkpoint are removed; use --resume "
                "to continue a checkpoint)",
                setup.run,
            )
        runs.start_over(setup.run)  # a run killed from here on is never taken for the old one
    return TrainState()


# --------------------------------------------------------------------------------------------
# epochs
# --------------------------------------------------------------------------------------------
def epoch_order(
    train_idx: Sequence[int],
    targets: Sequence[int],
    *,
    balance: str,
    seed: int,
    epoch: int,
    world: int,
    per_step: int = 1,
) -> list[int]:
    """This epoch's bag order (identical on every rank), whole steps of ``per_step`` bags per rank.

    With ``balance="sampler"`` the bags are class-balanced draws: with one bag per step, drawn
    with replacement weighted by class; with several, each step takes the classes in turn
    (every class equally often in a step of ``per_step >= C`` bags), each class's bags in a
    seeded shuffle repeated as needed. Otherwise a seeded permutation.
    """
    rng = np.random.default_rng([seed, epoch, 0xB46])
    idx = np.asarray(train_idx)
    if balance == "sampler" and per_step > 1:
        y = np.asarray([targets[i] for i in idx])
        pools = [rng.permutation(idx[y == c]) for c in np.unique(y)]
        order = np.empty(len(idx), dtype=idx.dtype)
        for k in range(len(idx)):  # class k % C, its (k // C)-th bag (repeated as needed)
            pool = pools[k % len(pools)]
            order[k] = pool[(k // len(pools)) % len(pool)]
    elif balance == "sampler":
        y = np.asarray([targets[i] for i in idx])
        counts = np.bincount(y)
        w = 1.0 / counts[y]
        order = rng.choice(idx, size=len(idx), replace=True, p=w / w.sum())
    else:
        order = rng.permutation(idx)
    unit = world * per_step
    n = (len(order) // unit) * unit or (len(order) // world) * world or len(order)
    return [int(i) for i in order[:n]]


def steps_per_epoch(n_bags: int, config: TrainConfig, world: int = 1) -> int:
    """Optimizer steps of one epoch of ``n_bags`` training bags (the schedule is per step)."""
    per_rank = max(1, n_bags // world)
    return max(1, per_rank // max(1, min(config.slides_per_step, per_rank)))


def train_one_epoch(setup: TrainingSetup, epoch: int, *, progress: bool = True) -> dict[str, Any]:
    """One pass over this rank's share of the training bags, ``slides_per_step`` bags a step.

    Returns
    -------
    dict
        The epoch's record so far: ``epoch``, ``train_loss`` (mean over this rank's steps) and
        ``lr`` (after the epoch's last step).
    """
    config, dist_info, device = setup.config, setup.dist, setup.device
    train_set = setup.bags["train"]
    setup.model.train()
    train_set.set_epoch(epoch)
    order = epoch_order(
        range(len(train_set)),
        train_set.targets,
        balance=config.balance,
        seed=config.seed,
        epoch=epoch,
        world=dist_info.world,
        per_step=config.slides_per_step,
    )
    mine = order[dist_info.rank :: dist_info.world]
    per_step = min(config.slides_per_step, len(mine))  # the order holds whole steps only
    objective = epoch_objective(setup.objective, config, epoch)
    losses = []
    bar = progress_bar(
        total=len(mine),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="bag",
        progress=progress,
        leave=False,
    )
    xs: list[Any] = []
    ys: list[int] = []
    for x, y, _ in _loader(
        train_set, shuffle_order=mine, num_workers=setup.num_workers, device=device
    ):
        xs.append(to_device(x, device, config.channels_last))
        ys.append(int(y))
        bar.update(1)
        if len(xs) < per_step:
            continue
        with autocast(device, config.amp):
            loss = step_loss(setup.model, setup.ddp_model, xs, ys, objective)
        setup.optim.step(loss)
        xs, ys = [], []
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    return {
        "epoch": epoch,
        "train_loss": float(np.mean(losses)),
        "lr": float(setup.optim.scheduler.get_last_lr()[0]),
    }


def _selected_by(rec: dict[str, Any], *, has_val: bool) -> str:
    """What chooses the best epoch: ``val_auc``, else ``val_loss`` (a validation set of a
    single class has no AUC), else ``train_loss`` (no validation slides)."""
    if not has_val:
        return "train_loss"
    return "val_loss" if math.isnan(rec.get("val_auc", math.nan)) else "val_auc"


def _better(rec: dict[str, Any], best: dict[str, Any], *, has_val: bool) -> bool:
    """The epoch beats the best one: higher validation AUC (then lower validation loss); lower
    validation loss when the validation AUC is undefined; lower training loss without validation
    slides; the first epoch always."""
    by = _selected_by(rec, has_val=has_val)
    if by == "val_auc":
        auc = rec["val_auc"]
        better = auc > best["auc"] or (auc == best["auc"] and rec["val_loss"] < best["loss"])
    else:
        better = rec[by] < best["loss"]
    return better or best["epoch"] < 0


def _log_scalars(writer: Any, rec: dict[str, Any]) -> None:
    if writer is None:
        return
    for k in ("train_loss", "val_loss", "val_auc", "val_acc", "lr"):
        if k in rec and not (isinstance(rec[k], float) and math.isnan(rec[k])):
            writer.add_scalar(k.replace("_", "/", 1), rec[k], rec["epoch"])
    writer.flush()


def end_epoch(
    setup: TrainingSetup,
    state: TrainState,
    rec: dict[str, Any],
    *,
    started: float,
    splits: dict[str, str],
    writer: Any = None,
) -> bool:
    """Rank 0 after an epoch: validate, keep the best weights, checkpoint, write metrics.

    Updates ``state`` (history, best, stale) and the run folder (``model.pt`` when the epoch is
    the best so far, ``checkpoint.pt``, ``metrics.json``, TensorBoard).

    Returns
    -------
    bool
        Stop early (no better epoch in ``patience`` epochs, after ``min_epochs``).
    """

    config, run = setup.config, setup.run
    epoch = rec["epoch"]
    has_val = len(setup.bags["val"]) > 0
    if has_val:
        ev = evaluate(
            setup.model,
            setup.bags["val"],
            device=setup.device,
            amp=config.amp,
            channels_last=config.channels_last,
        )
        rec.update(val_loss=ev["loss"], val_auc=ev["auc"], val_acc=ev["acc"])
        if math.isnan(ev["auc"]):
            rec["val_auc_reason"] = (
                auc_reason(ev["targets"], setup.classes, "validation") or "non-finite scores"
            )
    else:
        rec.update(val_auc=math.nan, val_auc_reason="no validation slides")
    rec["seconds"] = round(time.time() - started, 2)
    if _better(rec, state.best, has_val=has_val):
        auc = rec["val_auc"]
        state.best = {
            "epoch": epoch,
            "auc": auc if not math.isnan(auc) else -1.0,
            "loss": rec.get("val_loss", rec["train_loss"]),
            "by": _selected_by(rec, has_val=has_val),
        }
        save_torch(setup.model.state_dict(), run / runs.MODEL)
        state.stale = 0
    else:
        state.stale += 1
    stop = state.stale >= config.patience and epoch + 1 >= config.min_epochs
    if stop:
        rec["stopped_early"] = True
    state.history.append(rec)
    _log_scalars(writer, rec)
    save_checkpoint(run / runs.CHECKPOINT, setup, state, epoch=epoch)
    runs.write_metrics(run, state.history, state.best, None, splits, config)
    log.info(
        "epoch %d: %s",
        epoch + 1,
        ", ".join(
            f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float) and not math.isnan(v)
        ),
    )
    return stop


def _summary_writer(run: Path, start_epoch: int) -> Any:
    """A TensorBoard writer of ``run/tensorboard``, or None without tensorboard."""
    with contextlib.suppress(Exception):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(run / runs.TENSORBOARD), purge_step=start_epoch)
    return None


def fit(
    setup: TrainingSetup,
    state: TrainState,
    *,
    splits: dict[str, str],
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainState:
    """The epoch loop, from ``state.next_epoch`` until ``config.epochs``, early stopping or
    ``stop_after`` epochs in this call; returns the updated ``state``."""
    writer = _summary_writer(setup.run, state.next_epoch) if setup.dist.main else None
    epochs_run = 0
    for epoch in range(state.next_epoch, setup.config.epochs):
        if state.stopped_early or (stop_after is not None and epochs_run >= stop_after):
            break
        started = time.time()
        rec = train_one_epoch(setup, epoch, progress=progress)
        stop = setup.dist.main and end_epoch(
            setup, state, rec, started=started, splits=splits, writer=writer
        )
        state.next_epoch = epoch + 1
        epochs_run += 1
        if broadcast_flag(stop, setup.dist):
            state.stopped_early = True
    if writer is not None:
        writer.close()
    return state


# --------------------------------------------------------------------------------------------
# the end
# --------------------------------------------------------------------------------------------
def finish(
    setup: TrainingSetup,
    state: TrainState,
    *,
    classes: Sequence[str],
    splits: dict[str, str],
) -> dict[str, Any]:
    """Rank 0 at the end of a call to ``train``: write ``metrics.json``.

    When training is over, first reload the best weights, evaluate them on the test and
    validation slides, fit and write ``calibration.json`` (and add the calibrated test metrics,
    and Brier score and calibration error before and after calibration), draw ``curves.png``
    and ``roc.png``, and check for a stalled run (:func:`~wsi_pipeline.train_report.stall_warning`) and a best epoch chosen
    on few validation slides. Every warning is logged and listed in ``metrics.json``.

    Returns
    -------
    dict
        The metrics written (no NaN: ``null`` with a ``<name>_reason``).
    """
    from .plots import plot_training

    config, run = setup.config, setup.run
    finished = state.finished(config.epochs)
    warnings = [validation_warning(auc_reason(setup.bags["val"].targets, classes, "validation"))]
    test = None
    stalled = None
    report = None
    if finished:
        load_weights(setup.model, run / runs.MODEL)
        kw = {"device": setup.device, "amp": config.amp, "channels_last": config.channels_last}
        test = evaluate(setup.model, setup.bags["test"], **kw) if len(setup.bags["test"]) else None
        val = evaluate(setup.model, setup.bags["val"], **kw) if len(setup.bags["val"]) else None
        cal = calibrate(val, classes)
        runs.write_calibration(run, cal)
        report = calibration_report(cal, {"val": val, "test": test})
        if test is not None:
            test["calibrated"] = probability_metrics(
                apply_calibration(test["logits"], cal), test["targets"]
            )
            if math.isnan(test["auc"]):
                test["auc_reason"] = (
                    auc_reason(test["targets"], classes, "test") or "non-finite scores"
                )
        plot_training(run, state.history, val, test, classes)
        if "skipped" in cal:
            warnings.append(f"calibration skipped: {cal['skipped']}")
        late = [
            selection_warning(state.best, len(setup.bags["val"])),
            late_auc_warning(state.history, state.best),
            stall_warning(state.history, len(classes)),
        ]
        for w in late:
            if w is not None:
                log.warning("%s", w)
        warnings += late
        stalled = late[-1] is not None
    return runs.write_metrics(
        run,
        state.history,
        state.best,
        test,
        splits,
        config,
        finished=finished,
        warnings=[w for w in warnings if w is not None],
        stalled=stalled,
        calibration=report,
    )


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
def train(
    store_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a MIL model from slide labels.

    Parameters
    ----------
    store_dir : path
        Folder of ``<slide_id>.zarr`` stores.
    labels_csv : path
        ``slide_id,label[,split][,case_id]``.
    run_dir : path
        Output folder (created).
    config : TrainConfig
    resume : bool
        Continue from ``run_dir/checkpoint.pt`` (same config required).
    stop_after : int, optional
        Stop after this many epochs in this call (for time-limited jobs; resume later).
    progress : bool
        Show progress bars (on a terminal; never in logs).

    Returns
    -------
    dict
        The metrics written to ``metrics.json`` (empty on ranks other than 0 under torchrun).

    Raises
    ------
    ConfigError, TrainingError, StoreError
        Bad labels, stores, splits or options -- all checked before training starts.
    """
    config = config or TrainConfig()
    run = Path(run_dir)
    labels = read_labels(labels_csv)
    stores, skipped = resolve_stores(store_dir, labels)
    tiling = check_tiling(stores)
    splits = make_splits(
        labels,
        list(stores),
        seed=config.seed,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        folds=config.folds,
        fold=config.fold,
    )
    with distributed(config.device) as dist_info:
        progress = progress and dist_info.main
        if dist_info.main:
            _warn_validation(labels, stores, splits)
        setup = setup_training(config, run, labels, stores, splits, dist_info, progress=progress)
        state = start_state(setup, resume=resume, tiling=tiling, splits=splits)
        if dist_info.main:
            _write_run_start(setup, labels, splits, tiling, skipped)
        state = fit(setup, state, splits=splits, stop_after=stop_after, progress=progress)
        if not dist_info.main:
            return {}
        return finish(setup, state, classes=labels.classes, splits=splits)


def _warn_validation(labels: Labels, stores: dict[str, Path], splits: dict[str, str]) -> None:
    """Log a warning when training starts with a validation set that cannot give an AUC."""
    label_of = {r.slide_id: r.label for r in labels.rows}
    val = [labels.index(label_of[s]) for s in stores if splits.get(s) == "val"]
    warning = validation_warning(auc_reason(val, labels.classes, "validation"))
    if warning is not None:
        log.warning("%s", warning)


def _split_rows(setup: TrainingSetup, splits: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(slide_id, label, split)`` of every slide of the run, as ``splits.csv`` records them."""
    return [(s, setup.classes[t], splits[s]) for s, t in setup.targets.items()]


def _write_run_start(
    setup: TrainingSetup,
    labels: Labels,
    splits: dict[str, str],
    tiling: dict[str, Any],
    skipped: list[str],
) -> None:
    """``config.json``, ``tiling.json``, ``labels.json`` and ``splits.csv`` of the run."""
    runs.write_run_start(
        setup.run,
        config=setup.record,
        tiling=tiling,
        labels={
            "classes": list(labels.classes),
            "labels_csv": str(labels.path),
            "skipped_no_patches": skipped,
        },
        splits=_split_rows(setup, splits),
    )


def train_folds(
    store_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    config: TrainConfig,
    folds: int,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """K-fold cross-validation (grouped by case, stratified): ``run_dir/fold_<k>`` per fold and
    ``run_dir/cv_metrics.json`` with the per-fold and mean validation AUC."""
    per_fold = []
    for k in range(folds):
        cfg = fold_config(config, folds=folds, fold=k)
        fold_dir = runs.fold_dir(run_dir, k)
        again = resume and (fold_dir / runs.CHECKPOINT).is_file()
        m = train(store_dir, labels_csv, fold_dir, config=cfg, resume=again, progress=progress)
        per_fold.append(m.get("best_val_auc"))
    return runs.write_cv_metrics(run_dir, per_fold)
