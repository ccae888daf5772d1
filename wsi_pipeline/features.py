"""Embed every patch once with a frozen backbone into the store's ``features/<extractor>``.

The extractor name is ``<backbone>-<first 12 hex of the sha256 of its weights>``, so features made
by the same weights are found again (training, then prediction on new slides) and features of
different weights never mix. A randomly initialised backbone is seeded and its weights are saved
as ``extractor.pt`` in the run folder, so ``predict`` embeds new slides identically.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .inference import store_embeddings
from .runs import EXTRACTOR
from .store import features_key, has_complete_array, open_store, write_features
from .util import atomic_path

__all__ = ["FEATURES_DTYPE", "embed_store", "ensure_features", "feature_stats", "state_dict_digest"]

log = logging.getLogger(__name__)

#: dtype of the cached features in the store
FEATURES_DTYPE = "float16"


def state_dict_digest(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names and tensor bytes (order independent)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(k.encode())
        if hasattr(v, "detach"):
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _build_backbone(backbone: str, weights: str | os.PathLike | None, seed: int) -> Any:
    import torch

    from .models import get_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net, dim = get_backbone(backbone, weights=weights)
    return net, dim


def embed_store(store: Path, net: Any, *, device: Any, batch_size: int = 256) -> np.ndarray:
    """Embeddings of all patches of one store with a frozen backbone (normalised like MILModel).

    Parameters
    ----------
    store : Path
        A complete store.
    net : torch.nn.Module
        Backbone mapping normalised patches ``(K, 3, T, T)`` to ``(K, D)``, on ``device``.
    device : torch.device
    batch_size : int
        Patches per pass (bf16 autocast on CUDA where supported).

    Returns
    -------
    (N, D) float32 ndarray
        ``(0, 0)`` for a store without patches.
    """
    from .models import PatchNormalize

    norm = PatchNormalize().to(device)
    h = store_embeddings(
        store, lambda x: net(norm(x)), device=device, chunk=batch_size, out_device="cpu"
    )
    return h.numpy()


def feature_stats(stores: Sequence[Path], name: str) -> tuple[Any, Any]:
    """Per-dimension mean and std of the cached features ``features/<name>`` of some stores.

    Parameters
    ----------
    stores : sequence of Path
        Complete stores holding ``features/<name>`` (the training slides).
    name : str
        Extractor name.

    Returns
    -------
    mean, std : (D,) float32 Tensor
        Over all patches of all stores (population std).
    """
    import torch

    total: Any = 0.0
    sq: Any = 0.0
    n = 0
    for sp in stores:
        f = np.asarray(open_store(sp)[features_key(name)][...], np.float64)
        total = total + f.sum(0)
        sq = sq + (f * f).sum(0)
        n += len(f)
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(sq / max(n, 1) - mean * mean, 0.0))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def ensure_features(
    stores: Sequence[Path],
    *,
    backbone: str,
    weights: str | os.PathLike | None,
    device: Any,
    seed: int = 0,
    run_dir: Path | None = None,
    progress: bool = True,
    batch_size: int = 256,
) -> tuple[str, int]:
    """Make sure every store has ``features/<extractor>``; compute the missing ones.

    Parameters
    ----------
    stores : sequence of Path
        Complete stores.
    backbone : str
        Registered backbone name.
    weights : path or None
        Backbone weights (random init with ``seed`` when None).
    device : torch.device
    seed : int
    run_dir : Path, optional
        Where to save ``extractor.pt`` (the weights used).
    progress : bool
    batch_size : int

    Returns
    -------
    name : str
        The extractor name (``features/<name>`` in each store).
    dim : int
        Feature dimension.
    """
    import torch
    from tqdm.auto import tqdm

    net, dim = _build_backbone(backbone, weights, seed)
    state = net.state_dict()
    digest = state_dict_digest(state)
    name = f"{backbone}-{digest[:12]}"
    if run_dir is not None:
        with atomic_path(run_dir / EXTRACTOR) as tmp:
            torch.save(state, tmp)
    net = net.to(device).eval()
    todo = [sp for sp in stores if not has_complete_array(open_store(sp), features_key(name))]
    for sp in tqdm(todo, desc=f"features {name}", unit="slide", disable=None if progress else True):
        feats = embed_store(sp, net, device=device, batch_size=batch_size)
        g = open_store(sp, mode="r+")
        write_features(
            g,
            name,
            feats.astype(FEATURES_DTYPE),
            {
                "backbone": backbone,
                "weights": str(weights) if weights else None,
                "weights_sha256": digest,
                "dim": dim,
                "normalization": "x/255, ImageNet mean/std",
            },
        )
    if todo:
        log.info(
            "features %s: embedded %d store(s), %d already cached",
            name,
            len(todo),
            len(stores) - len(todo),
        )
    return name, dim
