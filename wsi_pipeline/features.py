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

from .runs import EXTRACTOR
from .store import PatchReader, features_key, has_complete_array, open_store, write_features
from .util import atomic_path

__all__ = ["embed_store", "ensure_features", "state_dict_digest"]

log = logging.getLogger(__name__)

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
    """Embeddings ``(N, D)`` float32 of all patches of one store (normalised like MILModel)."""
    import torch

    from .models import PatchNormalize

    norm = PatchNormalize().to(device)
    reader = PatchReader(store)
    outs = []
    with torch.inference_mode():
        for i in range(0, reader.n, batch_size):
            x = torch.from_numpy(reader.read(np.arange(i, min(reader.n, i + batch_size))))
            x = x.permute(0, 3, 1, 2).to(device, non_blocking=True)
            ctx = (
                torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda"
                else torch.autocast("cpu", enabled=False)
            )
            with ctx:
                h = net(norm(x))
            outs.append(h.float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


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
    name = f"{backbone}-{state_dict_digest(state)[:12]}"
    if run_dir is not None:
        with atomic_path(run_dir / EXTRACTOR) as tmp:
            torch.save(state, tmp)
    net = net.to(device).eval()
    todo = []
    for sp in stores:
        g = open_store(sp)
        if not has_complete_array(g, features_key(name)):
            todo.append(sp)
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
                "weights_sha256": state_dict_digest(state),
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
