"""Self-supervised pretraining of a patch backbone on the stores' own patches (SimCLR).

:func:`pretrain` trains a registered backbone (``smallcnn``, ``resnet18``, ``resnet50``) with a
small projection head on two augmented views of every patch (NT-Xent contrastive loss, AdamW with
a per-step warm-up + cosine schedule) and writes the backbone's state dict, a file that
``train --backbone-weights`` and ``features --backbone ... --weights`` load
(:func:`wsi_pipeline.weights.read_weights_file`).

H&E views (:func:`augment`, batched on the device): a random resized crop, flips and 90°
rotations (one affine resampling), HED stain jitter (Tellez et al.: each of the haematoxylin,
eosin and DAB optical densities scaled and shifted), brightness/contrast/saturation jitter and a
Gaussian blur. Every random draw of epoch ``e`` comes from generators seeded with ``(seed, e)``,
so a run resumed from its per-epoch checkpoint equals an uninterrupted one on the CPU.

The work folder (``<weights>.pretrain/`` by default) holds ``checkpoint.pt`` (model, optimizer,
scheduler, scaler, RNG states, epoch, history; read with ``torch.load(weights_only=True)``),
``config.json``, ``history.json`` and ``tensorboard/``. On CUDA: AMP (bf16, or fp16 with loss
scaling), channels-last, and DDP under ``torchrun`` (the batches of an epoch split over the ranks,
rank 0 writes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, TrainingError, WSIPipelineError, short_reason
from .specs import PretrainConfig
from .util import atomic_write_json, output_dir, save_torch

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "HISTORY",
    "TENSORBOARD",
    "PretrainResult",
    "augment",
    "nt_xent",
    "pretrain",
    "pretrain_state",
    "work_dir_for",
]

log = logging.getLogger(__name__)

#: files of the work folder
CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
HISTORY = "history.json"
TENSORBOARD = "tensorboard"

# Ruifrok & Johnston's H&E-DAB stain vectors (as in scikit-image's ``rgb_from_hed``)
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def work_dir_for(weights: str | os.PathLike) -> Path:
    """The default work folder of a weights file: ``<weights>.pretrain`` beside it."""
    p = Path(weights)
    return p.with_name(p.name + ".pretrain")


# ---------------------------------------------------------------------------------------------
# views


def _affine(n: int, gen: Any, scale: tuple[float, float]) -> Any:
    """Per-sample ``(n, 2, 3)`` affine maps: a random resized crop, a flip and a 90° rotation."""
    import torch

    area = torch.empty(n).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(log_r)
    # the side clamped to the patch gives its area to the other one, so a full-area crop is the
    # whole patch whatever the ratio drawn
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = (area / w).clamp(max=1.0)
    w = (area / h).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    k = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[k]
    rot = torch.stack([torch.stack([cos * flip, -sin], 1), torch.stack([sin * flip, cos], 1)], 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, :2, :2] = torch.diag_embed(torch.stack([w, h], 1)) @ rot
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def _blur(x: Any, sigma: Any) -> Any:
    """Gaussian blur of each image of ``x`` (N, 3, H, W) with its own ``sigma`` (N,), 5 taps."""
    import torch
    import torch.nn.functional as F

    n, c, hh, ww = x.shape
    t = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    s = sigma.to(x.device, x.dtype).clamp(min=1e-3)[:, None]
    k = torch.exp(-(t[None] ** 2) / (2 * s**2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*3, 5)
    y = x.reshape(1, n * c, hh, ww)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, hh, ww)


def augment(patches: Any, gen: Any, config: PretrainConfig) -> Any:
    """One random H&E view of each patch.

    Parameters
    ----------
    patches : Tensor
        ``(N, 3, T, T)`` float in ``[0, 1]`` (on any device).
    gen : torch.Generator
        CPU generator of every random draw (so views are reproducible).
    config : PretrainConfig
        ``crop_px``, ``crop_scale``, ``stain_jitter``, ``color_jitter``, ``blur_p``.

    Returns
    -------
    Tensor
        ``(N, 3, crop_px, crop_px)`` float in ``[0, 1]``.
    """
    import torch
    import torch.nn.functional as F

    x = patches
    n, dev = x.shape[0], x.device
    out_px = int(config.crop_px or x.shape[-1])
    theta = _affine(n, gen, config.crop_scale).to(dev, x.dtype)
    grid = F.affine_grid(theta, [n, 3, out_px, out_px], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    s = float(config.stain_jitter)
    if s > 0:  # HED: optical density -> stain concentrations, scale and shift, back
        hed_from_rgb = torch.as_tensor(_HED_FROM_RGB, dtype=x.dtype, device=dev)
        rgb_from_hed = torch.as_tensor(_RGB_FROM_HED, dtype=x.dtype, device=dev)
        alpha = (1 + torch.empty(n, 1, 3).uniform_(-s, s, generator=gen)).to(dev, x.dtype)
        beta = torch.empty(n, 1, 3).uniform_(-s, s, generator=gen).to(dev, x.dtype)
        od = -torch.log(x.clamp(min=1 / 255)).permute(0, 2, 3, 1).reshape(n, -1, 3)
        hed = (od @ hed_from_rgb) * alpha + beta
        x = torch.exp(-(hed @ rgb_from_hed)).reshape(n, out_px, out_px, 3).permute(0, 3, 1, 2)

    j = float(config.color_jitter)
    if j > 0:
        b, c, sat = (
            (1 + torch.empty(n, 1, 1, 1).uniform_(-j, j, generator=gen)).to(dev, x.dtype)
            for _ in range(3)
        )
        x = x * b
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
        grey = (
            x * torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=x.dtype)[:, None, None]
        ).sum(1, keepdim=True)
        x = (x - grey) * sat + grey

    if config.blur_p > 0:
        on = torch.rand(n, generator=gen) < config.blur_p
        sigma = torch.empty(n).uniform_(0.1, 1.5, generator=gen) * on
        x = _blur(x, sigma)
    return x.clamp(0.0, 1.0).contiguous()


def nt_xent(z1: Any, z2: Any, temperature: float) -> Any:
    """SimCLR's NT-Xent loss of two views' projections ``(N, D)`` (each other's positive)."""
    import torch
    import torch.nn.functional as F

    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


# ---------------------------------------------------------------------------------------------
# the model


def _simclr_model(config: PretrainConfig) -> Any:
    from torch import nn

    from .models import get_backbone
    from .models.backbones import PatchNormalize

    backbone, dim = get_backbone(config.backbone, weights=config.init_weights)

    class SimCLR(nn.Module):
        """Normalise, embed with the backbone, project (2-layer MLP)."""

        def __init__(self) -> None:
            super().__init__()
            self.normalize = PatchNormalize()
            self.backbone = backbone
            self.head = nn.Sequential(
                nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, config.proj_dim)
            )

        def forward(self, x: Any) -> Any:
            return self.head(self.backbone(self.normalize(x)))

    return SimCLR()


# ---------------------------------------------------------------------------------------------
# the patches


@dataclass
class _Patches:
    """Every patch of the stores, as (store, index) pairs, and their readers."""

    readers: list[Any]
    store_of: np.ndarray
    index_of: np.ndarray

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Patches ``rows`` as (K, T, T, 3) uint8, in order."""
        first = self.readers[0]
        out = np.empty((len(rows), *first.shape_hwc), np.uint8)
        stores = self.store_of[rows]
        for s in np.unique(stores):
            sel = np.flatnonzero(stores == s)
            out[sel] = self.readers[int(s)].read(self.index_of[rows[sel]])
        return out


def _open_patches(stores: Sequence[Path]) -> _Patches:
    from .store import PatchReader

    readers, store_of, index_of = [], [], []
    shapes = set()
    for sp in stores:
        try:
            r = PatchReader(sp)
        except (WSIPipelineError, OSError, KeyError, ValueError) as exc:
            # one line, and the other stores go on
            log.warning("pretrain: skipping %s: %s", sp, " ".join(str(exc).split())[:200])
            continue
        if r.n == 0:
            continue
        readers.append(r)
        shapes.add(r.shape_hwc)
        store_of.append(np.full(r.n, len(readers) - 1, np.int32))
        index_of.append(np.arange(r.n, dtype=np.int64))
    if not readers:
        raise ConfigError(
            "no patches to pretrain on: the stores hold no tissue patches or cannot be read"
        )
    if len(shapes) > 1:
        raise ConfigError(
            f"stores of different patch sizes {sorted(shapes)}; pretrain on one tiling at a time"
        )
    return _Patches(readers, np.concatenate(store_of), np.concatenate(index_of))


def _epoch_batches(n: int, epoch: int, config: PretrainConfig, world: int) -> list[np.ndarray]:
    """The batches (rows) of ``epoch``: a seeded permutation, capped, split in equal batches."""
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(n)
    if config.patches_per_epoch is not None:
        order = order[: config.patches_per_epoch]
    bs = config.batch_size
    nb = len(order) // bs
    nb -= nb % world  # every rank the same number of steps (DDP)
    return [order[i * bs : (i + 1) * bs] for i in range(nb)]


# ---------------------------------------------------------------------------------------------
# checkpoints


def _rng_state(device: Any) -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _save_checkpoint(
    path: Path, parts: dict[str, Any], epoch: int, history: list, device: Any
) -> None:

    ck = {k: v.state_dict() for k, v in parts.items()}
    ck.update(epoch=epoch, history=json.dumps(history), rng=_rng_state(device))
    save_torch(ck, path)


def _restore_checkpoint(path: Path, parts: dict[str, Any], device: Any) -> tuple[int, list]:
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        for k, v in parts.items():
            v.load_state_dict(ck[k])
        history = json.loads(ck["history"])
        epoch = int(ck["epoch"])
    except Exception as exc:
        raise TrainingError(
            f"cannot resume from this checkpoint ({short_reason(exc)}); "
            "delete the work folder to start again",
            path=path,
        ) from None
    torch.set_rng_state(ck["rng"]["torch"])
    if device.type == "cuda" and "cuda" in ck["rng"]:
        torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
    return epoch + 1, history


def _made_with(path: Path) -> tuple[dict[str, Any] | None, list[str] | None]:
    """The ``config`` and ``stores`` recorded in a JSON file of a pretraining (the weights'
    ``.json`` or the work folder's ``config.json``); Nones when unreadable."""
    try:
        saved = json.loads(path.read_text())
        return dict(saved["config"]), list(saved["stores"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def pretrain_state(
    out: str | os.PathLike, config: PretrainConfig, stores: Sequence[str | os.PathLike]
) -> str:
    """Whether pretraining ``config`` on ``stores`` into ``out`` is ``"done"`` (the weights were
    made so), can ``"resume"`` (its default work folder holds a checkpoint of the same options
    and stores) or starts ``"fresh"``."""
    out = Path(out)
    want = (config.to_dict(), [str(s) for s in stores])
    if out.is_file() and _made_with(out.with_name(out.name + ".json")) == want:
        return "done"
    work = work_dir_for(out)
    return (
        "resume" if (work / CHECKPOINT).is_file() and _made_with(work / CONFIG) == want else "fresh"
    )


def _check_resumable(work: Path, config: PretrainConfig, stores: Sequence[Path]) -> None:
    """Refuse to resume a checkpoint made with other options or stores (one line)."""
    old_config, old_stores = _made_with(work / CONFIG)
    if old_config is None or old_stores is None:
        raise TrainingError(
            f"cannot resume: {CONFIG} is missing or unreadable; delete the work folder to start "
            "again",
            path=work,
        )
    new = config.to_dict()
    diff = sorted(k for k in set(old_config) | set(new) if old_config.get(k) != new.get(k))
    if diff:
        raise ConfigError(
            f"{work}: cannot resume: option(s) {', '.join(diff)} differ from the checkpointed "
            "run's; use the same options, or another --out / --work"
        )
    if old_stores != [str(s) for s in stores]:
        raise ConfigError(f"{work}: cannot resume: the stores differ from the checkpointed run's")


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class PretrainResult:
    """What :func:`pretrain` did.

    Attributes
    ----------
    weights : Path or None
        The backbone state dict written (None when stopped before the last epoch).
    work : Path
        The work folder (checkpoint, history, TensorBoard logs).
    epochs_done : int
    history : list of dict
        Per epoch: ``epoch``, ``loss``, ``lr``, ``seconds``, ``patches_per_s``.
    seconds : float
        Wall time of this call.
    main : bool
        Whether this process is rank 0 (the one that writes; always under one process).
    """

    weights: Path | None
    work: Path
    epochs_done: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    main: bool = True


def _device(config: PretrainConfig, rank_local: int, world: int) -> Any:
    import torch

    from .inference import resolve_device

    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", rank_local)
    return device


def _autocast(device: Any, config: PretrainConfig) -> Any:
    import contextlib

    import torch

    if device.type != "cuda" or not config.amp:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_amp_dtype(config))


def _amp_dtype(config: PretrainConfig) -> Any:
    import torch

    if config.amp_dtype == "float16":
        return torch.float16
    if config.amp_dtype == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def pretrain(
    stores: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: PretrainConfig | None = None,
    *,
    work: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> PretrainResult:
    """Pretrain ``config.backbone`` with SimCLR on the patches of ``stores``; write ``out``.

    Parameters
    ----------
    stores : sequence of path
        Stores and/or folders of stores (complete ones; one tiling).
    out : path
        The weights file to write: the backbone's state dict (``torch.save``), loadable by
        ``train --backbone-weights`` and ``features --weights``.
    config : PretrainConfig, optional
    work : path, optional
        Work folder (default :func:`work_dir_for`).
    resume : bool
        Continue from the work folder's checkpoint (its options and stores must be the same).
    stop_after : int, optional
        Stop after this many epochs in all (checkpointed; for interrupting on purpose).
    progress : bool
        Log one line per epoch.
    on_epoch : callable, optional
        Called with each epoch's history row.

    Returns
    -------
    PretrainResult

    Raises
    ------
    ConfigError
        No patches; stores of different patch sizes; a checkpoint exists and ``resume`` is not
        set; resume with other options.
    TrainingError
        A store that cannot be read; an unreadable checkpoint; init weights that do not fit.
    """
    import torch

    from .distributed import distributed, launch_place, wrap_ddp
    from .inference import to_device
    from .store import find_stores

    config = config or PretrainConfig()
    t0 = time.perf_counter()
    paths = find_stores(stores)
    out = Path(out)
    work = Path(work) if work is not None else work_dir_for(out)
    ckpt = work / CHECKPOINT
    if ckpt.exists() and not resume:
        raise ConfigError(
            f"{work}: a pretraining checkpoint is already here; pass --resume to continue it, "
            "or another --out / --work"
        )
    if resume and ckpt.exists():
        _check_resumable(work, config, paths)
    if launch_place().rank == 0:  # where the weights go, checked before hours of training
        output_dir(out.parent)
        output_dir(work)

    with distributed(config.device) as dist_info:
        device = _device(config, dist_info.local_rank, dist_info.world)
        torch.manual_seed(config.seed)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        data = _open_patches(paths)
        n = len(data.store_of)
        steps = len(_epoch_batches(n, 0, config, dist_info.world)) // dist_info.world
        if steps < 1:
            raise ConfigError(
                f"too few patches ({n}) for one batch of {config.batch_size}"
                f"{f' per each of {dist_info.world} ranks' if dist_info.world > 1 else ''}; "
                "lower --batch-size"
            )
        model = _simclr_model(config).to(device)
        cl = config.channels_last and device.type == "cuda"
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        total, warm = steps * config.epochs, steps * config.warmup_epochs

        def schedule(s: int) -> float:
            if warm and s < warm:
                return (s + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        use_scaler = device.type == "cuda" and config.amp and _amp_dtype(config) == torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        parts = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
        start, history = 0, list[dict[str, Any]]()
        if resume and ckpt.exists():
            start, history = _restore_checkpoint(ckpt, parts, device)
            log.info("resuming pretraining at epoch %d of %d", start + 1, config.epochs)
        elif dist_info.main:
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                work / CONFIG,
                {"config": config.to_dict(), "stores": [str(s) for s in paths]},
            )
        net = wrap_ddp(model, device, dist_info)
        writer = _tensorboard(work, start * steps) if dist_info.main else None
        last = config.epochs if stop_after is None else min(config.epochs, int(stop_after))
        try:
            for epoch in range(start, last):
                row = _train_epoch(
                    net,
                    data,
                    epoch,
                    config,
                    opt,
                    sched,
                    scaler,
                    device,
                    dist_info,
                    cl,
                    to_device,
                    writer,
                    steps,
                )
                history.append(row)
                if dist_info.main:
                    _save_checkpoint(ckpt, parts, epoch, history, device)
                    atomic_write_json(work / HISTORY, history)
                    if writer is not None:
                        writer.add_scalar("pretrain/epoch_loss", row["loss"], epoch)
                        writer.flush()
                if progress:
                    log.info(
                        "pretrain epoch %d/%d: loss %.4f, %.0f patches/s",
                        epoch + 1,
                        config.epochs,
                        row["loss"],
                        row["patches_per_s"],
                    )
                if on_epoch is not None:
                    on_epoch(row)
        finally:
            if writer is not None:
                writer.close()
        done = len(history) >= config.epochs
        written = None
        if done and dist_info.main:
            out.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
            save_torch(state, out)
            atomic_write_json(
                out.with_name(out.name + ".json"),
                {
                    "method": "simclr",
                    "backbone": config.backbone,
                    "epochs": len(history),
                    "final_loss": history[-1]["loss"] if history else None,
                    "config": config.to_dict(),
                    "stores": [str(s) for s in paths],
                    "patches": int(n),
                },
            )
            written = out
    return PretrainResult(
        weights=written,
        work=work,
        epochs_done=len(history),
        history=history,
        seconds=time.perf_counter() - t0,
        main=dist_info.main,
    )


def _tensorboard(work: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep training without it
        return None
    return SummaryWriter(log_dir=str(work / TENSORBOARD), purge_step=purge_step)


def _train_epoch(
    net: Any,
    data: _Patches,
    epoch: int,
    config: PretrainConfig,
    opt: Any,
    sched: Any,
    scaler: Any,
    device: Any,
    dist_info: Any,
    channels_last: bool,
    to_device: Any,
    writer: Any,
    steps: int,
) -> dict[str, Any]:
    import torch

    net.train()
    t0 = time.perf_counter()
    batches = _epoch_batches(len(data.store_of), epoch, config, dist_info.world)
    mine = batches[dist_info.rank :: dist_info.world]
    gen = torch.Generator().manual_seed(
        int(config.seed) * 1_000_003 + epoch * 7919 + dist_info.rank
    )
    losses = []
    for i, rows in enumerate(mine):
        x = torch.from_numpy(data.read(rows)).permute(0, 3, 1, 2)
        x = to_device(x, device, False).float().div_(255.0)
        v1, v2 = augment(x, gen, config), augment(x, gen, config)
        if channels_last:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        with _autocast(device, config):
            z = net(torch.cat([v1, v2]))
        loss = nt_xent(z[: len(rows)], z[len(rows) :], config.temperature)
        if not torch.isfinite(loss):
            raise TrainingError(f"pretraining diverged at epoch {epoch + 1} (loss {loss.item()})")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(float(loss.detach()))
        if writer is not None:
            writer.add_scalar("pretrain/loss", losses[-1], epoch * steps + i)
            writer.add_scalar("pretrain/lr", sched.get_last_lr()[0], epoch * steps + i)
    seconds = time.perf_counter() - t0
    n_patches = len(mine) * config.batch_size * dist_info.world
    return {
        "epoch": epoch,
        "loss": float(np.mean(losses)),
        "lr": float(sched.get_last_lr()[0]),
        "seconds": round(seconds, 3),
        "patches_per_s": round(n_patches / max(seconds, 1e-9), 1),
    }
