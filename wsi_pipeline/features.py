"""Embed every patch once with a frozen encoder into the store's ``features/<extractor>``.

The extractor name is ``<backbone or encoder>-<first 12 hex of the sha256 of its weights>``, so
features made by the same weights are found again (training, then prediction on new slides) and
features of different weights never mix. Which weights an encoder gets is
:mod:`wsi_pipeline.weights` (torchvision names, local files, ``"none"``) and :mod:`wsi_pipeline.encoders` (presets);
a random initialisation happens only when asked for, and its features say so (store attrs
``weights: "random-init"`` and a WARNING). A randomly initialised backbone is seeded and, in a
training run, its weights are saved as ``extractor.pt`` in the run folder, so ``predict`` embeds
new slides identically.

The ``features`` stage (:func:`compute_features`) goes store by store: complete features are
skipped, a store that cannot be read fails on its own line and the rest go on. It can export the
features as CLAM and TRIDENT read them (:func:`export_features`: ``h5_files/<slide_id>.h5`` with
``features`` (N, D) and ``coords`` (N, 2), ``pt_files/<slide_id>.pt``), and import such ``.h5``
files into stores (:func:`import_features`).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .distributed import launch_place
from .encoders import Encoder, build_preset, encoder_preset
from .errors import ConfigError, StoreError, WSIPipelineError
from .inference import store_embeddings
from .locks import STAGE_WAIT_S, locked
from .runs import EXTRACTOR
from .store import (
    COORDS,
    features_key,
    find_stores,
    has_complete_array,
    open_store,
    remove_partial_writes,
    write_features,
)
from .util import atomic_path, output_dir, progress_bar, sanitize_id, save_torch
from .weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NO_WEIGHTS,
    load_weights,
    torchvision_weight_names,
)

__all__ = [
    "FEATURES_DTYPE",
    "H5_DIR",
    "PT_DIR",
    "FeatureResult",
    "FeaturesReport",
    "compute_features",
    "embed_store",
    "ensure_features",
    "export_features",
    "feature_stats",
    "import_features",
    "load_encoder",
    "state_dict_digest",
]

log = logging.getLogger(__name__)

#: dtype of the cached features in the store
FEATURES_DTYPE = "float16"
#: export folders inside ``--export-h5 DIR``: CLAM's layout (TRIDENT reads the ``.h5`` files)
H5_DIR = "h5_files"
PT_DIR = "pt_files"
#: a store tiled at an mpp this far (relative) from an encoder's gets a warning
_MPP_TOLERANCE = 0.1


def state_dict_digest(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names and tensor bytes (order independent; any dtype)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            raw = v.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # bf16 too
            h.update(raw.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the encoder


def load_encoder(
    *,
    backbone: str | None = None,
    encoder: str | None = None,
    weights: str | os.PathLike | None,
    seed: int = 0,
) -> Encoder:
    """The frozen encoder that a backbone or preset name and a weights spec describe.

    Parameters
    ----------
    backbone : str, optional
        A registered backbone (``smallcnn``, ``resnet18``, ``resnet50``); needs ``weights``.
    encoder : str, optional
        An encoder preset (``uni``, ``conch``, ``virchow2``, ``h-optimus-0``, ``phikon-v2``).
        Exactly one of ``backbone`` and ``encoder``.
    weights : str, path-like or None
        A torchvision weights name (torchvision backbones), a local file or folder, or ``"none"``
        for a random init (seeded with ``seed``); None only with ``encoder`` (the local Hugging
        Face cache). See :mod:`wsi_pipeline.weights` and :mod:`wsi_pipeline.encoders`.
    seed : int

    Returns
    -------
    Encoder
        In eval mode, on the CPU.

    Raises
    ------
    ConfigError
        Neither or both names, an unknown name, a backbone without ``weights``, a missing
        optional package (one line saying what to install).
    TrainingError
        Weights that cannot be found, read, trusted or fitted.
    """
    import torch

    from .models.registry import backbone_builder, backbone_torchvision_arch

    if (backbone is None) == (encoder is None):
        raise ConfigError(
            "give one of a backbone (--backbone) or an encoder preset (--encoder)"
            + (", not both" if backbone is not None else "")
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backbone is not None:
            arch = backbone_torchvision_arch(backbone)  # also: unknown backbone -> ConfigError
            if weights is None:
                names = torchvision_weight_names(arch) if arch else []
                raise ConfigError(
                    f"backbone {backbone!r} needs weights: "
                    + (f"a torchvision weights name ({', '.join(names)}), " if names else "")
                    + f"a weights file, or '{NO_WEIGHTS}' for a random initialisation"
                )
            net, dim = backbone_builder(backbone)()
            label = load_weights(net, weights, arch=arch, name=backbone)
            return Encoder(name=backbone, module=net.eval(), dim=dim, weights=label)
        assert encoder is not None
        preset = encoder_preset(encoder)
        net, dim, label = build_preset(encoder, weights)
    return Encoder(
        name=preset.name,
        module=net.eval(),
        dim=dim,
        weights=label,
        mean=preset.mean,
        std=preset.std,
        input_px=preset.input_px,
        interpolation=preset.interpolation,
        mpp=preset.mpp,
        licence=preset.licence,
        preset=preset.name,
    )


def _identify(enc: Encoder) -> tuple[str, str, dict[str, Any]]:
    """Extractor name, weights digest and state dict of an encoder."""
    state = enc.module.state_dict()
    digest = state_dict_digest(state)
    return f"{enc.name}-{digest[:12]}", digest, state


def _warn_random(enc: Encoder, name: str) -> None:
    if enc.random_init:
        log.warning(
            "features from a randomly initialised backbone (%s, weights '%s'): no pretrained "
            "knowledge; fine for tests and plumbing, not for results",
            name,
            NO_WEIGHTS,
        )


# ---------------------------------------------------------------------------------------------
# embedding


def embed_store(
    store: Path,
    net: Any,
    *,
    device: Any,
    batch_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    input_px: int | None = None,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Embeddings of all patches of one store with a frozen backbone.

    Patches are taken to ``[0, 1]``, normalised with ``mean``/``std`` and, when ``input_px`` is
    given and differs from the tile size, resized to ``(input_px, input_px)`` (antialiased).

    Parameters
    ----------
    store : Path
        A complete store.
    net : torch.nn.Module
        Backbone mapping normalised patches ``(K, 3, S, S)`` to ``(K, D)``, on ``device``.
    device : torch.device
    batch_size : int
        Patches per pass (bf16 autocast on CUDA where supported).
    mean, std : sequence of 3 float
    input_px : int, optional
    interpolation : {"bilinear", "bicubic"}

    Returns
    -------
    (N, D) float32 ndarray
        ``(0, 0)`` for a store without patches.
    """
    import torch.nn.functional as F

    from .models import PatchNormalize

    norm = PatchNormalize(mean=[float(m) for m in mean], std=[float(s) for s in std]).to(device)

    def embed(x: Any) -> Any:
        x = norm(x)
        if input_px and tuple(x.shape[-2:]) != (input_px, input_px):
            x = F.interpolate(
                x,
                size=(input_px, input_px),
                mode=interpolation,
                antialias=True,
                align_corners=False,
            )
        return net(x)

    h = store_embeddings(store, embed, device=device, chunk=batch_size, out_device="cpu")
    return h.numpy()


def _embed(store: Path, enc: Encoder, net: Any, *, device: Any, batch_size: int) -> np.ndarray:
    feats = embed_store(
        store,
        net,
        device=device,
        batch_size=batch_size,
        mean=enc.mean,
        std=enc.std,
        input_px=enc.input_px,
        interpolation=enc.interpolation,
    )
    if feats.shape[0] == 0:
        feats = np.zeros((0, enc.dim), np.float32)
    return feats.astype(FEATURES_DTYPE)


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
    backbone: str | None = None,
    encoder: str | None = None,
    weights: str | os.PathLike | None,
    device: Any,
    seed: int = 0,
    run_dir: Path | None = None,
    progress: bool = True,
    batch_size: int = 256,
    failed: dict[Path, str] | None = None,
) -> tuple[str, int]:
    """Make sure every store has ``features/<extractor>``; compute the missing ones.

    Parameters
    ----------
    stores : sequence of Path
        Complete stores.
    backbone, encoder : str, optional
        A registered backbone or an encoder preset (see :func:`load_encoder`).
    weights : path, str or None
        See :func:`load_encoder`; ``"none"`` for a random init with ``seed``. None with a
        backbone also means a random init, as before: it logs the random-init WARNING (pass
        ``"none"`` to ask for it).
    device : torch.device
    seed : int
    run_dir : Path, optional
        Where to save ``extractor.pt`` (the weights used).
    progress : bool
    batch_size : int
    failed : dict, optional
        Per-store isolation: a store that cannot be read (unfinished, a corrupt chunk) or
        whose features cannot be written gets its one-line error here (``failed[store]``)
        and the others go on. Without it the first such error is raised (training needs
        every slide).

    Returns
    -------
    name : str
        The extractor name (``features/<name>`` in each store).
    dim : int
        Feature dimension.

    Raises
    ------
    StoreError
        A store is unfinished or unreadable (without ``failed``).
    """
    if weights is None and backbone is not None:
        weights = NO_WEIGHTS
    enc = load_encoder(backbone=backbone, encoder=encoder, weights=weights, seed=seed)
    name, digest, state = _identify(enc)
    _warn_random(enc, name)
    if run_dir is not None:
        save_torch(state, run_dir / EXTRACTOR)
    net = enc.module.to(device).eval()
    attrs = {**enc.attrs(), "weights_sha256": digest}

    def isolate(sp: Path, exc: Exception) -> None:
        if failed is None:
            raise exc
        msg = str(exc) if isinstance(exc, WSIPipelineError) else f"{sp}: {exc}"
        failed[sp] = " ".join(msg.split())

    todo = []
    for sp in stores:
        try:
            if not has_complete_array(open_store(sp), features_key(name)):
                todo.append(sp)
        except StoreError as exc:
            isolate(sp, exc)
    for sp in progress_bar(todo, desc=f"features {name}", unit="slide", progress=progress):
        try:
            feats = _embed(sp, enc, net, device=device, batch_size=batch_size)
            _write_locked(sp, name, feats, attrs)
        except (StoreError, OSError) as exc:
            isolate(sp, exc)
    if todo:
        log.info(
            "features %s: embedded %d store(s), %d already cached",
            name,
            len(todo),
            len(stores) - len(todo),
        )
    return name, enc.dim


# ---------------------------------------------------------------------------------------------
# the features stage


@dataclass(frozen=True)
class FeatureResult:
    """What the features stage did with one store.

    Attributes
    ----------
    store : Path
    status : {"computed", "skipped", "imported", "failed"}
        ``skipped``: the features were complete already.
    n_patches : int
    error : str or None
        One line, for ``failed``.
    off_mpp : float or None
        The store's mpp when it is off the encoder's intended one (a WARNING lists them).
    """

    store: Path
    status: str
    n_patches: int = 0
    error: str | None = None
    off_mpp: float | None = None

    @property
    def ok(self) -> bool:
        """Not failed."""
        return self.status != "failed"


@dataclass(frozen=True)
class FeaturesReport:
    """The features stage over some stores: extractor name, dimension, weights, per-store results."""

    name: str
    dim: int
    weights: str
    results: list[FeatureResult]

    def counts(self) -> dict[str, int]:
        """Number of stores per status."""
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def _write_locked(store: Path, name: str, feats: np.ndarray, attrs: dict[str, Any]) -> None:
    """:func:`~wsi_pipeline.store.write_features` under the store's lock (as ``tile`` and
    ``predict`` write it), waiting for another writer of the store; still locked after
    :data:`~wsi_pipeline.locks.STAGE_WAIT_S`: ``StoreLocked`` (a ``StoreError``, one line)."""
    with locked(store, wait_s=STAGE_WAIT_S, name=str(store)):
        remove_partial_writes(store)  # left by a writer killed mid-write
        write_features(open_store(store, mode="r+"), name, feats, attrs)


def _one_line(exc: BaseException, store: Path) -> str:
    if isinstance(exc, WSIPipelineError):
        return str(exc)
    msg = " ".join(str(exc).split())[:200]
    return f"{store}: {type(exc).__name__}: {msg}"


def _store_mpp(group: Any) -> float | None:
    mpp = (dict(group.attrs).get("tiling") or {}).get("mpp")
    return None if mpp is None else float(mpp)


def compute_features(
    paths: Sequence[str | os.PathLike],
    *,
    backbone: str | None = None,
    encoder: str | None = None,
    weights: str | os.PathLike | None,
    device: str = "auto",
    batch_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    export_dir: str | os.PathLike | None = None,
    progress: bool = True,
    scheduler: str | None = None,
) -> FeaturesReport:
    """The ``features`` stage: ``features/<extractor>`` in every store, store by store.

    Parameters
    ----------
    paths : sequence of path
        Stores and/or folders of stores (see :func:`find_stores`).
    backbone, encoder, weights, seed
        The encoder (see :func:`load_encoder`; a backbone needs ``weights``, ``"none"`` included).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:<i>"``.
    batch_size : int
        Patches per forward pass.
    overwrite : bool
        Recompute complete features (and rewrite exports).
    export_dir : path, optional
        Also export each store's features (see :func:`export_features`).
    progress : bool
    scheduler : str, optional
        Address of a running dask.distributed scheduler: its workers (which must see the same
        files, weights included) embed one store per task, each worker loading the encoder
        once. The encoder is built here first, so a bad name or file fails before any task.

    Returns
    -------
    FeaturesReport
        A store that is unfinished or unreadable is ``failed`` with a one-line error; the rest
        are still processed. Under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` embeds stores
        ``r, r + world, ...`` (on GPU ``LOCAL_RANK``) and reports those.

    Raises
    ------
    ConfigError, TrainingError
        The encoder cannot be built (nothing was written).
    """
    from .inference import resolve_device

    if int(batch_size) < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size!r}")
    stores = find_stores(paths)
    if export_dir is not None:
        output_dir(export_dir)
    dev = resolve_device(device)
    place = launch_place()
    if place.world > 1:  # under torchrun: every rank embeds its own share of the slides
        stores = stores[place.rank :: place.world]
        if dev.type == "cuda" and dev.index is None:
            dev = type(dev)("cuda", place.local_rank)
    spec = _EncoderSpec(
        backbone, encoder, None if weights is None else str(weights), seed, _stamp(weights)
    )
    enc, name, _ = _built(spec)  # here first: a bad encoder fails before any store
    _warn_random(enc, name)
    job = _FeaturesJob(spec, str(dev), int(batch_size), overwrite, export_dir)
    if scheduler:
        results = _on_cluster(scheduler, job, stores, progress=progress, name=name)
    else:
        bar = progress_bar(stores, desc=f"features {name}", unit="slide", progress=progress)
        results = [job(sp) for sp in bar]
    off_mpp: dict[float, list[str]] = {}
    for r in results:
        if r.off_mpp is not None:
            off_mpp.setdefault(r.off_mpp, []).append(r.store.stem)
    for mpp, ids in sorted(off_mpp.items()):
        log.warning(
            "encoder %s expects patches at %g mpp; %d store(s) tiled at %g mpp (%s%s)",
            enc.name,
            enc.mpp,
            len(ids),
            mpp,
            ", ".join(ids[:3]),
            ", ..." if len(ids) > 3 else "",
        )
    return FeaturesReport(name=name, dim=enc.dim, weights=enc.weights, results=results)


@dataclass(frozen=True)
class _EncoderSpec:
    """What :func:`load_encoder` is called with, and the weights file's size and mtime: the key
    of a process's loaded encoder (a file written again since is loaded again)."""

    backbone: str | None
    encoder: str | None
    weights: str | None
    seed: int
    stamp: tuple[int, int] | None = None


def _stamp(weights: str | os.PathLike | None) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a weights file, or None (a name, a folder, no weights)."""
    if weights is None:
        return None
    try:
        st = os.stat(weights)
    except OSError:
        return None
    return None if os.path.isdir(weights) else (st.st_size, st.st_mtime_ns)


_LOADED: dict[_EncoderSpec, tuple[Encoder, str, dict[str, Any]]] = {}


def _built(spec: _EncoderSpec) -> tuple[Encoder, str, dict[str, Any]]:
    """The encoder of ``spec``, its extractor name and its store attributes, loaded once per
    process (a dask worker embeds many stores with one load)."""
    if spec not in _LOADED:
        enc = load_encoder(
            backbone=spec.backbone, encoder=spec.encoder, weights=spec.weights, seed=spec.seed
        )
        name, digest, _ = _identify(enc)
        _LOADED.clear()  # one encoder held at a time
        _LOADED[spec] = (enc, name, {**enc.attrs(), "weights_sha256": digest})
    return _LOADED[spec]


@dataclass(frozen=True)
class _FeaturesJob:
    """Embed one store (picklable: sent to dask workers as is)."""

    spec: _EncoderSpec
    device: str
    batch_size: int
    overwrite: bool
    export_dir: str | os.PathLike | None

    def __call__(self, sp: Path) -> FeatureResult:
        import torch

        enc, name, attrs = _built(self.spec)
        dev = torch.device(self.device)
        try:
            g = open_store(sp, mode="r+")
            n = int(g[COORDS].shape[0])
            off_mpp = None
            if self.overwrite or not has_complete_array(g, features_key(name)):
                mpp = _store_mpp(g)
                if enc.mpp and mpp and abs(mpp - enc.mpp) > _MPP_TOLERANCE * enc.mpp:
                    off_mpp = mpp
                net = enc.module.to(dev).eval()
                feats = _embed(sp, enc, net, device=dev, batch_size=self.batch_size)
                _write_locked(sp, name, feats, attrs)
                status = "computed"
            else:
                status = "skipped"
            if self.export_dir is not None:
                export_features(sp, name, self.export_dir, overwrite=self.overwrite)
            return FeatureResult(sp, status, n, off_mpp=off_mpp)
        except (WSIPipelineError, OSError, ValueError, KeyError) as exc:
            log.debug("features of %s failed", sp, exc_info=True)
            return FeatureResult(sp, "failed", error=_one_line(exc, sp))


def _on_cluster(
    address: str, job: _FeaturesJob, stores: Sequence[Path], *, progress: bool, name: str
) -> list[FeatureResult]:
    """``job`` over ``stores`` on the dask.distributed scheduler at ``address``, in order."""
    from distributed import Client, as_completed

    with Client(address) as client:
        futures = client.map(job, list(stores), pure=False)
        bar = progress_bar(
            total=len(futures),
            desc=f"features {name}",
            unit="slide",
            progress=progress,
        )
        for _ in as_completed(futures):
            bar.update(1)
        bar.close()
        return list(client.gather(futures))


# ---------------------------------------------------------------------------------------------
# CLAM/TRIDENT .h5 and .pt files


def _h5py() -> Any:
    return importlib.import_module("h5py")  # a dependency; imported here only (no type stubs)


def export_features(
    store: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write one store's ``features/<name>`` as CLAM and TRIDENT read them.

    ``out_dir/h5_files/<slide_id>.h5`` holds ``features`` (N, D) float32 and ``coords`` (N, 2)
    int64 (level-0 top-left corners; attrs ``patch_size``, ``patch_size_level0``,
    ``patch_level``, ``mpp``); ``out_dir/pt_files/<slide_id>.pt`` is ``torch.save`` of the
    (N, D) float32 features tensor. Both are written atomically; files of the same extractor
    and weights are kept unless ``overwrite``.

    Returns
    -------
    h5_path, pt_path : Path

    Raises
    ------
    StoreError
        The store is unfinished or has no complete ``features/<name>``.
    """
    import torch

    sp = Path(store)
    g = open_store(sp)
    key = features_key(name)
    if not has_complete_array(g, key):
        raise StoreError(f"no complete '{key}'; run 'wsi-pipeline features' first", path=sp)
    arr = g[key]
    digest = arr.attrs.get("weights_sha256")
    slide_id = sanitize_id(str(g.attrs.get("slide_id") or sp.stem))
    h5_path = Path(out_dir) / H5_DIR / f"{slide_id}.h5"
    pt_path = Path(out_dir) / PT_DIR / f"{slide_id}.pt"
    h5py = _h5py()
    if not overwrite and h5_path.is_file() and pt_path.is_file():
        try:
            with h5py.File(h5_path, "r") as f:
                same = f.attrs.get("extractor") == name and f.attrs.get("weights_sha256") == digest
        except OSError:
            same = False
        if same:
            return h5_path, pt_path
    feats = np.asarray(arr[...], np.float32)
    coords = np.asarray(g[COORDS][...], np.int64).reshape(-1, 2)
    tiling = dict(g.attrs.get("tiling") or {})
    h5_path.parent.mkdir(parents=True, exist_ok=True)
    pt_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(h5_path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats)
            c = f.create_dataset("coords", data=coords)
            c.attrs["patch_size"] = int(tiling.get("tile_px") or 0)
            c.attrs["patch_size_level0"] = round(float(tiling.get("patch_l0") or 0))
            c.attrs["patch_level"] = int(tiling.get("read_level") or 0)
            c.attrs["mpp"] = float(tiling["mpp"]) if tiling.get("mpp") is not None else np.nan
            c.attrs["name"] = slide_id
            f.attrs["slide_id"] = slide_id
            f.attrs["extractor"] = name
            f.attrs["weights"] = str(arr.attrs.get("weights"))
            f.attrs["weights_sha256"] = str(digest)
            f.attrs["wsi_pipeline_version"] = __version__
    save_torch(torch.from_numpy(feats), pt_path)
    return h5_path, pt_path


def import_features(
    paths: Sequence[str | os.PathLike],
    h5_dir: str | os.PathLike,
    *,
    name: str,
    overwrite: bool = False,
    progress: bool = True,
) -> FeaturesReport:
    """Import ``<slide_id>.h5`` files (CLAM/TRIDENT layout) into the stores as ``features/<name>``.

    Each store's file is ``h5_dir/<slide_id>.h5`` or ``h5_dir/h5_files/<slide_id>.h5``; its
    ``coords`` must be the store's own (same patches in the same order), so the features line
    up with the patches.

    Parameters
    ----------
    paths : sequence of path
        Stores and/or folders of stores.
    h5_dir : path
    name : str
        Extractor name to store them under (one safe path component, e.g. ``"uni-trident"``).
    overwrite : bool
        Replace complete features of that name.
    progress : bool

    Returns
    -------
    FeaturesReport
        ``imported``, ``skipped`` (complete already) or ``failed`` per store (no file, other
        coords, not such a file).
    """
    if not name or sanitize_id(name) != name:
        raise ConfigError(f"extractor name must be letters, digits and ._- only, got {name!r}")
    folder = Path(h5_dir)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of .h5 files")
    h5py = _h5py()
    results = []
    dim = 0
    for sp in progress_bar(
        find_stores(paths), desc=f"import {name}", unit="slide", progress=progress
    ):
        try:
            g = open_store(sp, mode="r+")
            coords = np.asarray(g[COORDS][...], np.int64).reshape(-1, 2)
            if not overwrite and has_complete_array(g, features_key(name)):
                dim = dim or int(g[features_key(name)].shape[1])
                results.append(FeatureResult(sp, "skipped", len(coords)))
                continue
            slide_id = sanitize_id(str(g.attrs.get("slide_id") or sp.stem))
            h5 = next(
                (
                    p
                    for p in (folder / f"{slide_id}.h5", folder / H5_DIR / f"{slide_id}.h5")
                    if p.is_file()
                ),
                None,
            )
            if h5 is None:
                raise StoreError(f"no {slide_id}.h5 in {folder} (or its {H5_DIR}/)", path=sp)
            with h5py.File(h5, "r") as f:
                if "features" not in f or "coords" not in f:
                    raise StoreError("not a features file: needs 'features' and 'coords'", path=h5)
                feats = np.asarray(f["features"][...], np.float32)
                theirs = np.asarray(f["coords"][...]).astype(np.int64).reshape(-1, 2)
                weights = str(f.attrs.get("weights", "unknown"))
            feats = feats.reshape(len(feats), -1)
            if (
                len(feats) != len(theirs)
                or theirs.shape != coords.shape
                or (theirs != coords).any()
            ):
                raise StoreError(
                    f"coords differ from the store's ({len(theirs)} vs {len(coords)} patches); "
                    "it was made from another tiling",
                    path=h5,
                )
            dim = int(feats.shape[1])
            attrs = {"backbone": None, "encoder": None, "weights": weights, "dim": dim}
            _write_locked(
                sp,
                name,
                feats.astype(FEATURES_DTYPE),
                {**attrs, "imported_from": str(h5.absolute())},
            )
            results.append(FeatureResult(sp, "imported", len(coords)))
        except (WSIPipelineError, OSError, ValueError, KeyError) as exc:
            results.append(FeatureResult(sp, "failed", error=_one_line(exc, sp)))
    return FeaturesReport(name=name, dim=dim, weights="imported", results=results)
