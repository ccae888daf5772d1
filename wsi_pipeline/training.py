"""Weakly supervised MIL training from slide labels: end-to-end CNN or cached-feature heads.

``train(store_dir, labels_csv, run_dir, config=TrainConfig(...))`` checks all inputs, splits the
slides, trains with AdamW and a warm-up + cosine schedule, evaluates on the validation split each
epoch (AUC), stops early, checkpoints each epoch atomically (``--resume`` continues bit-for-bit on
the CPU), and leaves in the run folder everything ``predict`` needs:

``model.pt`` (best weights, plain state dict), ``config.json`` (model + training config),
``tiling.json``, ``labels.json``, ``splits.csv``, ``metrics.json``, ``calibration.json`` (the
probability calibration fitted on the validation slides), ``checkpoint.pt``,
``tensorboard/``, ``curves.png``, ``roc.png`` (and ``extractor.pt`` in features mode).

Runs under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on GPUs): bags are split
over ranks and rank 0 evaluates and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .calibration import apply_calibration
from .data import (
    BagDataset,
    Labels,
    check_tiling,
    make_splits,
    negative_class,
    read_labels,
    resolve_stores,
)
from .errors import ConfigError, TrainingError
from .metrics import auc_score, probability_metrics, roc_curve
from .runs import RUN_VERSION
from .specs import TrainConfig

__all__ = [
    "build_model",
    "evaluate",
    "resolve_device",
    "train",
    "train_folds",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# small pieces shared with predict
# --------------------------------------------------------------------------------------------
def resolve_device(device: str) -> Any:
    """``auto`` -> CUDA when available, else CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but no CUDA device is available")
    return torch.device(device)


def build_model(
    config: TrainConfig, num_classes: int, *, in_dim: int | None = None, load_backbone: bool = True
) -> Any:
    """The MIL model the config describes (features mode: head only, on ``in_dim`` features)."""
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


def _autocast(device: Any, amp: bool) -> contextlib.AbstractContextManager:
    import torch

    if device.type == "cuda" and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _to_device(x: Any, device: Any, channels_last: bool) -> Any:
    import torch

    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def bag_output(
    model: Any, x: Any, *, device: Any, amp: bool, channels_last: bool, chunk: int = 512
) -> Any:
    """Inference on a whole bag of any size: embed in chunks, then the head once."""
    import torch

    with torch.inference_mode(), _autocast(device, amp):
        if x.ndim == 4:  # patches
            hs = [
                model.embed(_to_device(x[i : i + chunk], device, channels_last))
                for i in range(0, len(x), chunk)
            ]
            h = torch.cat(hs).float()
        else:
            h = _to_device(x, device, False).float()
        return model.head_forward(h)


def evaluate(
    model: Any,
    dataset: BagDataset,
    *,
    device: Any,
    amp: bool = True,
    channels_last: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Slide-level loss, accuracy and AUC of ``model`` on every bag of ``dataset``."""
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

    ds: Any = dataset if shuffle_order is None else Subset(dataset, list(shuffle_order))
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
# distributed
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def _distributed(device_pref: str) -> Iterator[_Dist]:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield _Dist()
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield _Dist(rank, world, local)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _epoch_order(
    train_idx: Sequence[int],
    targets: Sequence[int],
    *,
    balance: str,
    seed: int,
    epoch: int,
    world: int,
) -> list[int]:
    """This epoch's bag order (identical on every rank); class-balanced draws with ``sampler``."""
    rng = np.random.default_rng([seed, epoch, 0xB46])
    idx = np.asarray(train_idx)
    if balance == "sampler":
        y = np.asarray([targets[i] for i in idx])
        counts = np.bincount(y)
        w = 1.0 / counts[y]
        order = rng.choice(idx, size=len(idx), replace=True, p=w / w.sum())
    else:
        order = rng.permutation(idx)
    n = (len(order) // world) * world or len(order)
    return [int(i) for i in order[:n]]


def ids_train(order: Sequence[str], splits: dict[str, str]) -> list[str]:
    return [s for s in order if splits[s] == "train"]


def _feature_stats(stores: Sequence[Path], name: str) -> tuple[Any, Any]:
    """Per-dimension mean and std of the cached features of the training slides."""
    import torch

    from .store import open_store

    total, sq, n = None, None, 0
    for sp in stores:
        f = np.asarray(open_store(sp)[f"features/{name}"][...], np.float64)
        total = f.sum(0) if total is None else total + f.sum(0)
        sq = (f * f).sum(0) if sq is None else sq + (f * f).sum(0)
        n += len(f)
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(sq / max(n, 1) - mean * mean, 0.0))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


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


def _schedule(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


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


def _load_weights(model: Any, path: Path) -> None:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise TrainingError(
            f"{path}: cannot load weights ({' '.join(str(exc).split())[:200]})"
        ) from exc


def load_model(run: dict[str, Any], *, device: Any) -> Any:
    """The trained model of a run (best weights), in eval mode on ``device``."""
    config: TrainConfig = run["train_config"]
    model = build_model(
        config,
        len(run["labels"]["classes"]),
        in_dim=run["config"].get("in_dim"),
        load_backbone=False,
    )
    _load_weights(model, Path(run["dir"]) / "model.pt")
    return model.to(device).eval()


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
    with _distributed(config.device) as dist_info:
        return _train(
            config,
            run,
            labels,
            stores,
            skipped,
            tiling,
            splits,
            dist_info,
            resume=resume,
            stop_after=stop_after,
            progress=progress and dist_info.main,
        )


def _train(
    config: TrainConfig,
    run: Path,
    labels: Labels,
    stores: dict[str, Path],
    skipped: list[str],
    tiling: dict[str, Any],
    splits: dict[str, str],
    dist_info: _Dist,
    *,
    resume: bool,
    stop_after: int | None,
    progress: bool,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = resolve_device(config.device)
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    torch.manual_seed(config.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    num_workers = (
        config.num_workers
        if config.num_workers is not None
        else (4 if device.type == "cuda" else 1)
    )
    run.mkdir(parents=True, exist_ok=True)
    ckpt_path = run / "checkpoint.pt"

    order = [sid for sid in stores if splits[sid] in ("train", "val", "test")]
    ids = {sp: [s for s in order if splits[s] == sp] for sp in ("train", "val", "test")}
    targets = [labels.index(next(r.label for r in labels.rows if r.slide_id == s)) for s in order]
    num_classes = len(labels.classes)

    in_dim = None
    extractor = None
    if config.mode == "features":
        from .features import ensure_features

        extractor, in_dim = ensure_features(
            [stores[s] for s in order],
            backbone=config.backbone,
            weights=config.backbone_weights,
            device=device,
            seed=config.seed,
            run_dir=run if dist_info.main else None,
            progress=progress,
        )
    model = build_model(config, num_classes, in_dim=in_dim)
    if extractor is not None:
        model.set_feature_stats(
            *_feature_stats([stores[s] for s in ids_train(order, splits)], extractor)
        )
    model = model.to(device)
    if config.channels_last and device.type == "cuda" and config.mode == "e2e":
        model = model.to(memory_format=torch.channels_last)

    def bags(split: str, *, training: bool) -> BagDataset:
        return BagDataset(
            [stores[s] for s in ids[split]],
            [targets[pos[s]] for s in ids[split]],
            max_patches=config.max_patches if training else config.eval_max_patches,
            features=extractor,
            augment=training and config.mode == "e2e",
            jitter=config.color_jitter,
            seed=config.seed,
        )

    pos = {s: i for i, s in enumerate(order)}
    train_set = bags("train", training=True)
    val_set, test_set = bags("val", training=False), bags("test", training=False)
    train_idx = list(range(len(train_set)))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(train_idx) // dist_info.world)
    total = steps_per_epoch * config.epochs
    warm = steps_per_epoch * config.warmup_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warm))
    use_scaler = device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    class_w = None
    if config.balance == "loss":
        counts = np.bincount(train_set.targets, minlength=num_classes)
        class_w = torch.tensor(
            len(train_idx) / (num_classes * np.maximum(counts, 1)),
            dtype=torch.float32,
            device=device,
        )

    run_config = {
        "run_version": RUN_VERSION,
        "package_version": __version__,
        "train": config.to_dict(),
        "num_classes": num_classes,
        "in_dim": in_dim if in_dim is not None else model.in_dim,
        "extractor": extractor,
        "torch_version": torch.__version__,
    }
    history: list[dict[str, Any]] = []
    best = {"epoch": -1, "auc": -1.0, "loss": float("inf")}
    start_epoch = 0
    if resume:
        if not ckpt_path.is_file():
            raise TrainingError(f"{run}: nothing to resume (no checkpoint.pt)")
        old = (
            json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
        )
        if old.get("train") != config.to_dict():
            diff = sorted(
                k for k in config.to_dict() if (old.get("train") or {}).get(k) != getattr(config, k)
            )
            raise TrainingError(
                f"{run}: cannot resume with a different config "
                f"(changed: {', '.join(diff) or 'all'})"
            )
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"], device)
        history = json.loads(ck["history"])
        best = json.loads(ck["best"])
        start_epoch = int(ck["epoch"]) + 1
        log.info("resuming %s at epoch %d", run, start_epoch)
    elif ckpt_path.exists() and dist_info.main:
        log.warning(
            "%s: starting over (an earlier checkpoint is replaced; use --resume to continue it)",
            run,
        )

    if dist_info.main:
        _atomic_json(run_config, run / "config.json")
        _atomic_json(tiling, run / "tiling.json")
        _atomic_json(
            {
                "classes": list(labels.classes),
                "labels_csv": str(labels.path),
                "skipped_no_patches": skipped,
            },
            run / "labels.json",
        )
        with open(run / "splits.csv", "w") as fh:
            fh.write("slide_id,label,split\n")
            for s in order:
                fh.write(f"{s},{labels.classes[targets[pos[s]]]},{splits[s]}\n")

    ddp_model = model
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.model == "clam_sb",
        )

    instance_loss = config.model == "clam_sb" and config.instance_weight > 0
    if instance_loss and dist_info.world > 1:
        log.warning("clam_sb under torchrun: the instance loss is left out (bag loss only)")
        instance_loss = False
    topk_loss = config.model != "clam_sb" and config.instance_weight > 0
    neg_idx = negative_class(labels.classes)
    writer = None
    if dist_info.main:
        with contextlib.suppress(Exception):
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=start_epoch)

    stale = sum(1 for h in history if h["epoch"] > best["epoch"]) if history else 0
    epochs_run = 0
    stopped_early = bool(history and history[-1].get("stopped_early"))
    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if stopped_early or (stop_after is not None and epochs_run >= stop_after):
            break
        t0 = time.time()
        model.train()
        train_set.set_epoch(epoch)
        order_e = _epoch_order(
            train_idx,
            train_set.targets,
            balance=config.balance,
            seed=config.seed,
            epoch=epoch,
            world=dist_info.world,
        )
        mine = order_e[dist_info.rank :: dist_info.world]
        losses = []
        bar = tqdm(
            total=len(mine),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="bag",
            disable=None if progress else True,
            leave=False,
        )
        for x, y, _ in _loader(
            train_set, shuffle_order=mine, num_workers=num_workers, device=device
        ):
            x = _to_device(x, device, config.channels_last)
            yt = torch.tensor([y], device=device)
            with _autocast(device, config.amp):
                if instance_loss:  # CLAM: bag loss + instance clustering loss on the same h
                    h = model.embed(x)
                    out = model.head_forward(h)
                else:
                    out = ddp_model(x)
                loss = F.cross_entropy(out.logits[None].float(), yt, weight=class_w)
                inst = None
                if instance_loss:
                    inst = model.head.instance_loss(h.float(), int(y))
                elif topk_loss:
                    inst = topk_instance_loss(
                        out.patch_logits.float(), int(y), neg_idx, k=config.instance_k
                    )
                if inst is not None:
                    loss = (1 - config.instance_weight) * loss + config.instance_weight * inst
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        bar.close()
        rec: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "lr": float(scheduler.get_last_lr()[0]),
        }
        stop_flag = torch.zeros(1)
        if dist_info.main:
            ev = (
                evaluate(
                    model,
                    val_set,
                    device=device,
                    amp=config.amp,
                    channels_last=config.channels_last,
                )
                if ids["val"]
                else None
            )
            if ev is not None:
                rec.update(val_loss=ev["loss"], val_auc=ev["auc"], val_acc=ev["acc"])
            rec["seconds"] = round(time.time() - t0, 2)
            auc = rec.get("val_auc", float("nan"))
            better = (
                not math.isnan(auc)
                and (auc > best["auc"] or (auc == best["auc"] and rec["val_loss"] < best["loss"]))
            ) or (not ids["val"] and rec["train_loss"] < best["loss"])
            if better or best["epoch"] < 0:
                best = {
                    "epoch": epoch,
                    "auc": auc if not math.isnan(auc) else -1.0,
                    "loss": rec.get("val_loss", rec["train_loss"]),
                }
                _atomic_torch_save(model.state_dict(), run / "model.pt")
                stale = 0
            else:
                stale += 1
            if stale >= config.patience and epoch + 1 >= config.min_epochs:
                rec["stopped_early"] = True
                stop_flag[0] = 1
            history.append(rec)
            if writer is not None:
                for k in ("train_loss", "val_loss", "val_auc", "val_acc", "lr"):
                    if k in rec and not (isinstance(rec[k], float) and math.isnan(rec[k])):
                        writer.add_scalar(k.replace("_", "/", 1), rec[k], epoch)
                writer.flush()
            _atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(device),
                    "epoch": epoch,
                    "history": json.dumps(history),
                    "best": json.dumps(best),
                },
                ckpt_path,
            )
            _write_metrics(run, history, best, None, splits, config)
            log.info(
                "epoch %d: %s",
                epoch + 1,
                ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float)),
            )
        if dist_info.world > 1:
            import torch.distributed as dist

            dist.broadcast(stop_flag, src=0)
        epochs_run += 1
        if stop_flag[0] > 0:
            stopped_early = True
    if writer is not None:
        writer.close()

    finished = stopped_early or not history or history[-1]["epoch"] + 1 >= config.epochs
    result: dict[str, Any] = {}
    if dist_info.main:
        test = None
        if finished:
            _load_weights(model, run / "model.pt")
            if ids["test"]:
                test = evaluate(
                    model,
                    test_set,
                    device=device,
                    amp=config.amp,
                    channels_last=config.channels_last,
                )
            val = (
                evaluate(
                    model,
                    val_set,
                    device=device,
                    amp=config.amp,
                    channels_last=config.channels_last,
                )
                if ids["val"]
                else None
            )
            cal = _calibrate(run, val, labels.classes)
            if test is not None:
                test["calibrated"] = probability_metrics(
                    apply_calibration(test["logits"], cal), test["targets"]
                )
            _plots(run, history, val, test, labels.classes)
        result = _write_metrics(run, history, best, test, splits, config, finished=finished)
    return result


def _calibrate(run: Path, val: dict[str, Any] | None, classes: Sequence[str]) -> dict[str, Any]:
    """Fit the probability calibration on the validation slides; ``calibration.json``
    (see :mod:`wsi_pipeline.calibration`)."""
    from .calibration import fit_calibration, fit_patch_reference, identity_calibration

    neg = negative_class(classes)
    if val is None or not val["n"]:
        cal = identity_calibration(len(classes))
    else:
        cal = fit_calibration(val["logits"], val["targets"], negative=neg)
        cal = fit_patch_reference(
            cal, [p for p, t in zip(val["patch_logits"], val["targets"]) if t == neg]
        )
    _atomic_json(cal, run / "calibration.json")
    return cal


def _write_metrics(
    run: Path,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    test: dict[str, Any] | None,
    splits: dict[str, str],
    config: TrainConfig,
    *,
    finished: bool = False,
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for sp in splits.values():
        counts[sp] = counts.get(sp, 0) + 1
    metrics = {
        "finished": finished,
        "epochs_run": len(history),
        "best_epoch": best["epoch"] + 1 if best["epoch"] >= 0 else None,
        "best_val_auc": best["auc"] if best["auc"] >= 0 else None,
        "history": history,
        "splits": counts,
        "mode": config.mode,
        "model": config.model,
        "backbone": config.backbone,
    }
    if test is not None:
        metrics["test"] = {
            k: test[k] for k in ("auc", "acc", "loss", "n", "calibrated") if k in test
        }
    _atomic_json(metrics, run / "metrics.json")
    return metrics


def _plots(
    run: Path,
    history: list[dict[str, Any]],
    val: dict[str, Any] | None,
    test: dict[str, Any] | None,
    classes: Sequence[str],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    if any("val_loss" in h for h in history):
        ax[0].plot(ep, [h.get("val_loss", np.nan) for h in history], label="val")
        ax[1].plot(ep, [h.get("val_auc", np.nan) for h in history], label="val AUC")
    ax[0].set(xlabel="epoch", ylabel="loss", title="loss")
    ax[1].set(xlabel="epoch", ylabel="AUC", title="validation AUC", ylim=(0, 1.02))
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(run / "curves.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, ev in (("val", val), ("test", test)):
        if ev is None or not ev["n"] or ev["probs"].shape[1] != 2:
            continue
        fpr, tpr = roc_curve(ev["targets"], ev["probs"][:, 1])
        ax.plot(fpr, tpr, label=f"{name} AUC {ev['auc']:.3f} (n={ev['n']})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"ROC ({classes[-1]} vs rest)",
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "ROC curves are drawn for binary tasks", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(run / "roc.png", dpi=100)
    plt.close(fig)


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
    out = Path(run_dir)
    per_fold = []
    for k in range(folds):
        cfg = dataclasses.replace(config, folds=folds, fold=k, test_fraction=0.0)
        fold_dir = out / f"fold_{k}"
        again = resume and (fold_dir / "checkpoint.pt").is_file()
        m = train(store_dir, labels_csv, fold_dir, config=cfg, resume=again, progress=progress)
        per_fold.append(m.get("best_val_auc"))
    aucs = np.array([a for a in per_fold if a is not None], float)
    res = {
        "folds": folds,
        "val_auc": per_fold,
        "val_auc_mean": float(aucs.mean()) if aucs.size else float("nan"),
        "val_auc_std": float(aucs.std()) if aucs.size else float("nan"),
    }
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(res, out / "cv_metrics.json")
    return res
