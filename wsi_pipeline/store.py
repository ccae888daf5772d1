"""The per-slide zarr v3 store: ``<out>/<slide_id>.zarr`` (layout in docs/store.md).

Writers create the group, write each array, and set ``complete: true`` last; readers open only
complete stores (:func:`open_store`). Patches are read either through zarr or, much faster for
random access, through :class:`PatchReader`, which reads inner chunks straight from the shard
files.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .codecs import EMPTY, JpegCodec, decode_chunk, read_shard_index
from .errors import StoreError
from .specs import SlideMeta
from .util import sanitize_id

__all__ = [
    "COORDS",
    "FEATURES",
    "PATCHES",
    "SCORES",
    "STORE_VERSION",
    "THUMBNAIL",
    "TISSUE_FRACTION",
    "TISSUE_MASK",
    "PatchReader",
    "SlideStore",
    "create_patches_array",
    "create_store",
    "features_key",
    "has_complete_array",
    "is_complete",
    "list_stores",
    "mark_complete",
    "open_store",
    "scores_key",
    "shard_is_done",
    "shard_path",
    "store_path",
    "write_array",
    "write_features",
    "write_scores",
    "write_shard",
]

#: Layout version written to ``attrs["wsi_pipeline"]["store_version"]``; bump on breaking change.
STORE_VERSION = 1

# The store's keys (docs/store.md). Every module names arrays through these.
PATCHES = "patches"  #: (N, T, T, 3) uint8, sharded, one patch per inner chunk
COORDS = "coords"  #: (N, 2) int64 level-0 (x, y) of each patch's top-left corner
TISSUE_FRACTION = "tissue_fraction"  #: (N,) float32
THUMBNAIL = "thumbnail"  #: (h, w, 3) uint8, attrs ``downsample``
TISSUE_MASK = "tissue_mask"  #: (h, w) bool, attrs ``downsample``
FEATURES = "features"  #: group of ``features/<extractor>`` (N, D) arrays
SCORES = "scores"  #: group of ``scores/<run_id>`` and ``scores/<run_id>-attention`` (N,) arrays
_ATTENTION_SUFFIX = "-attention"


def features_key(extractor: str) -> str:
    """``features/<extractor>``: the cached patch features of one frozen backbone."""
    return f"{FEATURES}/{extractor}"


def scores_key(run_id: str, *, attention: bool = False) -> str:
    """``scores/<run_id>`` (per-patch abnormality) or ``scores/<run_id>-attention``."""
    return f"{SCORES}/{run_id}{_ATTENTION_SUFFIX if attention else ''}"


def score_runs(group: Any) -> list[str]:
    """Run ids that have per-patch scores in a store group (attention arrays left out)."""
    if SCORES not in group:
        return []
    return sorted(k for k in group[SCORES].array_keys() if not k.endswith(_ATTENTION_SUFFIX))


def store_path(out_dir: str | os.PathLike, slide_id: str) -> Path:
    """``out_dir/<slide_id>.zarr`` with the id sanitised to one safe path component."""
    return Path(out_dir) / f"{sanitize_id(slide_id)}.zarr"


def list_stores(folder: str | os.PathLike) -> list[Path]:
    """All ``*.zarr`` stores directly inside ``folder``, sorted by name."""
    p = Path(folder)
    if not p.is_dir():
        raise StoreError("no such folder of stores", path=p)
    return sorted(q for q in p.iterdir() if q.suffix == ".zarr" and q.is_dir())


def _zarr() -> Any:
    import zarr

    return zarr


def _read_attrs(path: Path) -> dict[str, Any]:
    """Group attributes, or StoreError for a missing/unreadable store."""
    zarr = _zarr()
    if not (path / "zarr.json").is_file():
        raise StoreError("no zarr store here; run 'wsi-pipeline tile' first", path=path)
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as exc:
        raise StoreError(f"unreadable store ({type(exc).__name__}: {exc})", path=path) from exc


def is_complete(path: str | os.PathLike) -> bool:
    """True when the store exists, is readable, of a known version and marked complete."""
    try:
        attrs = _read_attrs(Path(path))
    except StoreError:
        return False
    return attrs.get("complete") is True and _version_ok(attrs)


def _version_ok(attrs: dict[str, Any]) -> bool:
    v = (attrs.get("wsi_pipeline") or {}).get("store_version")
    return isinstance(v, int) and 1 <= v <= STORE_VERSION


def create_store(
    path: str | os.PathLike,
    *,
    slide_id: str,
    meta: SlideMeta,
    tiling: dict[str, Any],
) -> Any:
    """Create (or recreate) an empty store with ``complete: false``.

    Parameters
    ----------
    path : path
        The store folder (removed first if it exists).
    slide_id : str
        The slide's id.
    meta : SlideMeta
        Written to ``attrs["slide"]``.
    tiling : dict
        Written to ``attrs["tiling"]``.

    Returns
    -------
    zarr.Group
    """
    zarr = _zarr()
    p = Path(path)
    if p.exists():
        shutil.rmtree(p)
    g = zarr.open_group(str(p), mode="w", zarr_format=3)
    g.attrs.update(
        {
            "wsi_pipeline": {"store_version": STORE_VERSION, "package_version": __version__},
            "slide_id": slide_id,
            "slide": meta.to_dict(),
            "tiling": tiling,
            "complete": False,
        }
    )
    return g


def mark_complete(group: Any, **attrs: Any) -> None:
    """Record final attributes (e.g. ``status``, ``n_patches``) and then ``complete: true``."""
    tiling = dict(group.attrs.get("tiling", {}))
    tiling.update(attrs)
    group.attrs.update({"tiling": tiling})
    group.attrs.update({"complete": True})


def create_patches_array(
    group: Any,
    *,
    n: int,
    tile_px: int,
    codec: str,
    quality: int,
    patches_per_shard: int,
    attrs: dict[str, Any],
) -> Any:
    """Create the ``patches`` array (N, T, T, 3) uint8: shards of ``patches_per_shard`` patches,
    one patch per inner chunk, encoded with ``codec``."""
    zarr = _zarr()
    if codec == "jpeg":
        serializer: Any = JpegCodec(quality=quality)
        compressors: Any = None
    elif codec == "zstd":
        from .codecs import ZSTD_LEVEL

        serializer = "auto"
        compressors = zarr.codecs.ZstdCodec(level=ZSTD_LEVEL)
    else:
        serializer, compressors = "auto", None
    arr = group.create_array(
        "patches",
        shape=(n, tile_px, tile_px, 3),
        dtype="uint8",
        shards=(patches_per_shard, tile_px, tile_px, 3),
        chunks=(1, tile_px, tile_px, 3),
        serializer=serializer,
        compressors=compressors,
        fill_value=255,
        overwrite=True,
    )
    arr.attrs.update({"codec": codec, "quality": quality, **attrs})
    return arr


def write_array(
    group: Any, key: str, data: np.ndarray, *, chunks: tuple, attrs: dict[str, Any] | None = None
) -> Any:
    """Write ``data`` as array ``key`` of ``group`` (replacing it), then its attributes.

    ``chunks`` is clipped to the data's shape.
    """
    chunks = tuple(max(1, min(c, s)) if s else 1 for c, s in zip(chunks, data.shape))
    arr = group.create_array(key, shape=data.shape, dtype=data.dtype, chunks=chunks, overwrite=True)
    if data.size:
        arr[...] = data
    if attrs:
        arr.attrs.update(attrs)
    return arr


def has_complete_array(group: Any, key: str) -> bool:
    """True when ``key`` exists in ``group`` and was marked ``complete`` by its writer."""
    try:
        arr = group[key]
    except KeyError:
        return False
    return arr.attrs.get("complete") is True


def _write_marked(group: Any, key: str, data: np.ndarray, *, chunks: tuple, attrs: dict) -> None:
    """Write an array that readers use only once ``complete: true`` is set (set last)."""
    arr = write_array(group, key, data, chunks=chunks, attrs=attrs)
    arr.attrs.update({"complete": True})


def write_scores(
    group: Any, run_id: str, values: np.ndarray, attrs: dict[str, Any], *, attention: bool = False
) -> None:
    """Write per-patch scores ``(N,)`` float32 to ``scores/<run_id>`` (or its ``-attention``)."""
    values = np.asarray(values, dtype=np.float32)
    key = scores_key(run_id, attention=attention)
    _write_marked(group, key, values, chunks=(65536,), attrs=attrs)


def write_features(group: Any, extractor: str, feats: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write patch features ``(N, D)`` to ``features/<extractor>``, marked complete last."""
    _write_marked(group, features_key(extractor), feats, chunks=(8192, feats.shape[1]), attrs=attrs)


def shard_path(store: str | os.PathLike, shard: int) -> Path:
    """File of shard ``shard`` of ``patches`` (zarr v3 default chunk keys)."""
    return Path(store) / "patches" / "c" / str(shard) / "0" / "0" / "0"


def write_shard(store: str | os.PathLike, shard: int, data: bytes) -> None:
    """Write one shard file atomically (temporary file, then rename)."""
    p = shard_path(store, shard)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, p)


def shard_is_done(store: str | os.PathLike, shard: int, n_chunks: int, per_shard: int) -> bool:
    """True when shard ``shard`` exists, its index checks out and holds ``n_chunks`` chunks."""
    p = shard_path(store, shard)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            fh.seek(max(0, size - (16 * per_shard + 4)))
            index = read_shard_index(fh.read(), per_shard)
    except (OSError, ValueError):
        return False
    present = index[:, 0] != EMPTY
    return bool(present[:n_chunks].all()) and int(index[present].sum(axis=1).max(initial=0)) <= size


class PatchReader:
    """Random access to patches by reading inner chunks straight from the shard files.

    Picklable (holds only paths and small metadata), so it can travel to DataLoader workers.

    Parameters
    ----------
    store : path
        A complete store.
    """

    def __init__(self, store: str | os.PathLike) -> None:
        g = open_store(store)
        arr = g["patches"]
        self.store = Path(store)
        self.n = int(arr.shape[0])
        self.shape_hwc = tuple(int(v) for v in arr.shape[1:])
        self.per_shard = int(arr.shards[0]) if arr.shards else self.n
        self.codec = str(arr.attrs.get("codec", "jpeg"))
        self._indices: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_indices"] = {}
        return d

    def __len__(self) -> int:
        return self.n

    def _index(self, shard: int) -> np.ndarray:
        idx = self._indices.get(shard)
        if idx is None:
            p = shard_path(self.store, shard)
            with open(p, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - (16 * self.per_shard + 4)))
                try:
                    idx = read_shard_index(fh.read(), self.per_shard)
                except ValueError as exc:
                    raise StoreError(f"corrupt shard {shard}: {exc}", path=p) from exc
            self._indices[shard] = idx
        return idx

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Patches at ``indices`` as a ``(K, T, T, 3)`` uint8 array (in the order given)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self.shape_hwc), np.uint8)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise StoreError(f"patch index out of range 0..{self.n - 1}", path=self.store)
        order = np.argsort(idx, kind="stable")  # read shard by shard, in file order
        fh = None
        cur = -1
        try:
            for k in order:
                i = int(idx[k])
                shard, j = divmod(i, self.per_shard)
                off, nbytes = self._index(shard)[j]
                if off == EMPTY:
                    out[k] = 255
                    continue
                if shard != cur:
                    if fh is not None:
                        fh.close()
                    fh = open(shard_path(self.store, shard), "rb")
                    cur = shard
                fh.seek(int(off))
                out[k] = decode_chunk(fh.read(int(nbytes)), self.codec, self.shape_hwc)
        finally:
            if fh is not None:
                fh.close()
        return out


def open_store(path: str | os.PathLike, *, require_complete: bool = True, mode: str = "r") -> Any:
    """Open a store's zarr group.

    Parameters
    ----------
    path : path
        ``<out>/<slide_id>.zarr``.
    require_complete : bool
        Refuse stores without ``complete: true`` (unfinished writes are never used).
    mode : {"r", "r+"}
        ``"r+"`` for stages that add their own arrays (features, scores).

    Raises
    ------
    StoreError
        Missing, unreadable, unfinished, or written by a newer, incompatible version.
    """
    p = Path(path)
    attrs = _read_attrs(p)
    info = attrs.get("wsi_pipeline") or {}
    if not _version_ok(attrs):
        raise StoreError(
            f"store layout version {info.get('store_version')!r} (written by wsi-pipeline "
            f"{info.get('package_version', '?')}) is not readable by wsi-pipeline {__version__} "
            f"(reads versions 1..{STORE_VERSION}); re-tile the slide",
            path=p,
        )
    if require_complete and attrs.get("complete") is not True:
        raise StoreError(
            "store is unfinished (no complete: true); rerun 'wsi-pipeline tile'", path=p
        )
    return _zarr().open_group(str(p), mode=mode)


class SlideStore:
    """Read access to one complete store, for notebooks and the training stages.

    Attributes
    ----------
    path : Path
    slide_id : str
    meta : SlideMeta
    tiling : dict
        The ``tiling`` attributes (tile size, mpp, downsample, ...).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.group = open_store(self.path)
        attrs = dict(self.group.attrs)
        self.slide_id: str = attrs.get("slide_id") or self.path.stem
        self.meta = SlideMeta.from_dict(attrs["slide"])
        self.tiling: dict[str, Any] = dict(attrs["tiling"])

    def __repr__(self) -> str:
        return f"SlideStore({str(self.path)!r}, n_patches={self.n_patches})"

    @property
    def n_patches(self) -> int:
        return int(self.group["coords"].shape[0])

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 ``(x, y)`` of each patch's top-left corner."""
        return np.asarray(self.group["coords"][...])

    @property
    def tissue_fraction(self) -> np.ndarray:
        """(N,) float32 tissue fraction of each patch."""
        return np.asarray(self.group["tissue_fraction"][...])

    @property
    def thumbnail(self) -> np.ndarray:
        return np.asarray(self.group["thumbnail"][...])

    @property
    def tissue_mask(self) -> np.ndarray:
        return np.asarray(self.group["tissue_mask"][...])

    def reader(self) -> PatchReader:
        """A fast random-access reader of the patches."""
        return PatchReader(self.path)

    def patches_dask(self) -> Any:
        """The patches as a lazy ``dask.array`` (one dask chunk per shard)."""
        import dask.array as da

        arr = self.group["patches"]
        return da.from_zarr(arr, chunks=arr.shards or arr.chunks)
