"""The per-slide zarr v3 store: ``<out>/<slide_id>.zarr`` (layout in docs/store.md).

Writers create the group, write each array, and set ``complete: true`` last; readers open only
complete stores (:func:`open_store`). Patches are read either through zarr or, much faster for
random access, through :class:`PatchReader`, which reads inner chunks straight from the shard
files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .codecs import (
    CODEC_NAME,
    EMPTY,
    ZSTD_LEVEL,
    chunk_payload,
    decode_chunk,
    index_nbytes,
    read_shard_index,
)
from .errors import ConfigError, StoreError
from .specs import MaskSpec, SlideMeta, TilingSpec
from .util import atomic_write_bytes, sanitize_id

__all__ = [
    "COORDS",
    "DONE",
    "FEATURES",
    "FRESH",
    "PATCHES",
    "RESUME",
    "SCORES",
    "STALE",
    "STORE_VERSION",
    "THUMBNAIL",
    "TISSUE_FRACTION",
    "TISSUE_MASK",
    "PatchReader",
    "SlideStore",
    "class_scores_key",
    "create_patches_array",
    "create_store",
    "features_key",
    "find_stores",
    "finish_store",
    "grid_arrays",
    "has_complete_array",
    "is_complete",
    "list_stores",
    "mark_complete",
    "mask_arrays",
    "open_store",
    "patch_count",
    "read_array",
    "read_coords",
    "remove_partial_writes",
    "remove_scores",
    "score_runs",
    "scores_key",
    "shard_is_done",
    "shard_path",
    "store_path",
    "store_problems",
    "store_state",
    "tiling_attrs",
    "unfinished_shards",
    "write_array",
    "write_class_scores",
    "write_features",
    "write_scores",
    "write_shard",
]

#: Layout version written to ``attrs["wsi_pipeline"]["store_version"]``; bump on breaking change.
STORE_VERSION = 2  # 2: a crc32c after every inner chunk of patches

# The store's keys (docs/store.md). Every module names arrays through these.
PATCHES = "patches"  #: (N, T, T, 3) uint8, sharded, one patch per inner chunk
COORDS = "coords"  #: (N, 2) int64 level-0 (x, y) of each patch's top-left corner
TISSUE_FRACTION = "tissue_fraction"  #: (N,) float32
THUMBNAIL = "thumbnail"  #: (h, w, 3) uint8, attrs ``downsample``
TISSUE_MASK = "tissue_mask"  #: (h, w) bool, attrs ``downsample``
FEATURES = "features"  #: group of ``features/<extractor>`` (N, D) arrays
#: group of ``scores/<run_id>`` and ``scores/<run_id>-attention`` (N,) arrays and
#: ``scores/<run_id>-classes`` (N, C) arrays
SCORES = "scores"
_ATTENTION_SUFFIX = "-attention"
_CLASSES_SUFFIX = "-classes"


def features_key(extractor: str) -> str:
    """``features/<extractor>``: the cached patch features of one frozen backbone."""
    return f"{FEATURES}/{extractor}"


def scores_key(run_id: str, *, attention: bool = False) -> str:
    """``scores/<run_id>`` (per-patch abnormality) or ``scores/<run_id>-attention``."""
    return f"{SCORES}/{run_id}{_ATTENTION_SUFFIX if attention else ''}"


def class_scores_key(run_id: str) -> str:
    """``scores/<run_id>-classes``: the per-patch probability of each of the run's classes."""
    return f"{SCORES}/{run_id}{_CLASSES_SUFFIX}"


def score_runs(group: Any) -> list[str]:
    """Run ids that have per-patch scores in a store group (attention and per-class arrays
    left out)."""
    if SCORES not in group:
        return []
    extra = (_ATTENTION_SUFFIX, _CLASSES_SUFFIX)
    return sorted(k for k in group[SCORES].array_keys() if not k.endswith(extra))


def store_path(out_dir: str | os.PathLike, slide_id: str) -> Path:
    """``out_dir/<slide_id>.zarr`` with the id sanitised to one safe path component."""
    return Path(out_dir) / f"{sanitize_id(slide_id)}.zarr"


def list_stores(folder: str | os.PathLike, *, slide_ids: Sequence[str] | None = None) -> list[Path]:
    """All ``*.zarr`` stores directly inside ``folder``, sorted by name.

    Parameters
    ----------
    folder : path
    slide_ids : sequence of str, optional
        Only these slides (ids are sanitised as store names are).

    Raises
    ------
    StoreError
        ``folder`` is not a folder.
    ConfigError
        A slide id in ``slide_ids`` has no store in ``folder`` (bad usage: one line naming them).
    """
    p = Path(folder)
    if not p.is_dir():
        raise StoreError("no such folder of stores", path=p)
    found = sorted(q for q in p.iterdir() if q.suffix == ".zarr" and q.is_dir())
    return found if slide_ids is None else _select(found, slide_ids, str(p))


def find_stores(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    slide_ids: Sequence[str] | None = None,
) -> list[Path]:
    """The stores a user named: each path a ``*.zarr`` store or a folder of stores
    (:func:`list_stores`); in order, once. What every stage that takes stores from the command
    line or a notebook reads them through.

    Parameters
    ----------
    paths : path or sequence of paths
    slide_ids : sequence of str, optional
        Only these slides (ids are sanitised as store names are).

    Raises
    ------
    ConfigError
        Bad usage, one line naming the paths, never an empty result: a path that is neither a
        store nor a folder, no store at all (an empty folder, or a folder of slides given for
        one of stores), a slide id in ``slide_ids`` that has no store among them.
    """
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: dict[Path, None] = {}
    for p in map(Path, given):
        if p.suffix == ".zarr" and p.is_dir():
            out[p] = None
        elif p.is_dir():
            out.update(dict.fromkeys(list_stores(p)))
        else:
            raise ConfigError(f"{p}: no such store or folder of stores")
    where = ", ".join(map(str, given)) or "no paths"
    if not out:
        raise ConfigError(f"no stores (*.zarr) in {where}")
    return list(out) if slide_ids is None else _select(list(out), slide_ids, where)


def _select(found: list[Path], slide_ids: Sequence[str], where: str) -> list[Path]:
    """The stores of ``slide_ids`` among ``found``, in ``found``'s order; ConfigError naming
    the ids that have none."""
    by_id = {q.stem: q for q in found}
    wanted = [sanitize_id(s) for s in slide_ids]
    unknown = [s for s, w in zip(slide_ids, wanted) if w not in by_id]
    if unknown:
        shown = ", ".join(repr(s) for s in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ConfigError(f"{where}: no store for slide id(s) {shown} ({len(found)} stores here)")
    keep = set(wanted)
    return [q for q in found if q.stem in keep]


def _zarr() -> Any:
    """zarr, with the patches' ``wsi_jpeg`` codec registered (:mod:`wsi_pipeline.zarr_jpeg`)."""
    import zarr

    from . import zarr_jpeg  # noqa: F401  (registers the codec)

    return zarr


def _read_attrs(path: Path) -> dict[str, Any]:
    """Group attributes (read from the group's ``zarr.json``, without zarr: the tiler asks this
    of every slide's store), or StoreError for a missing/unreadable store."""
    if not (path / "zarr.json").is_file():
        raise StoreError("no zarr store here; run 'wsi-pipeline tile' first", path=path)
    try:
        attrs = _group_doc(path).get("attributes", {})
        if not isinstance(attrs, dict):
            raise ValueError("its attributes are not a mapping")
        return attrs
    except (OSError, ValueError) as exc:
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


# --------------------------------------------------------------------------------------------
# the tiler's store: created, filled, marked complete
# --------------------------------------------------------------------------------------------
def tiling_attrs(
    spec: TilingSpec,
    *,
    mpp: float | None,
    downsample: float,
    read_level: int,
    patch_l0: float,
    stride_l0: float,
    slide_mpp: float | None,
) -> dict[str, Any]:
    """The ``tiling`` attributes of a new store (docs/store.md).

    Parameters
    ----------
    spec : TilingSpec
        The tiling asked for (stored whole under ``spec``: with the slide file's size and
        ``slide_mpp`` it is what :func:`store_state` compares).
    mpp : float or None
        Target µm per pixel (``None`` when the slide has no mpp and a level was tiled).
    downsample : float
        Level-0 pixels per patch pixel.
    read_level : int
        Pyramid level the patches are read from.
    patch_l0, stride_l0 : float
        Patch side and grid step in level-0 pixels.
    slide_mpp : float or None
        The user's level-0 mpp for the slide (``--slide-mpp``), if any.

    Returns
    -------
    dict
        JSON-ready; :func:`finish_store` adds ``status``, ``n_patches`` and timings.
    """
    return {
        "spec": spec.to_dict(),
        "tile_px": spec.tile_px,
        "mpp": mpp,
        "level": spec.level,
        "downsample": downsample,
        "read_level": read_level,
        "patch_l0": patch_l0,
        "stride_l0": stride_l0,
        "overlap_px": spec.overlap_px,
        "tissue_threshold": spec.min_tissue,
        "mask": spec.mask.to_dict(),
        "slide_mpp_override": slide_mpp,
        "package_version": __version__,
    }


def create_store(
    path: str | os.PathLike,
    *,
    slide_id: str,
    meta: SlideMeta,
    tiling: dict[str, Any],
    arrays: Sequence[dict[str, Any]] = (),
) -> Path:
    """Create (or recreate) an empty store with ``complete: false``.

    Written as plain files, without zarr (whose import is a third of a second of every tiling
    process): the arrays' chunks and ``zarr.json`` documents are the bytes zarr writes for them
    (``tests/test_store.py`` compares every file with zarr's own).

    Parameters
    ----------
    path : path
        The store folder (removed first if it exists).
    slide_id : str
        The slide's id.
    meta : SlideMeta
        Written to ``attrs["slide"]``.
    tiling : dict
        Written to ``attrs["tiling"]`` (see :func:`tiling_attrs`).
    arrays : sequence of dict
        Arrays to create with it (:func:`mask_arrays`, :func:`grid_arrays`).

    Returns
    -------
    Path
        The store (:func:`open_store` with ``require_complete=False`` opens it with zarr).
    """
    p = Path(path)
    if p.exists():
        shutil.rmtree(p)
    attrs = {
        "wsi_pipeline": {"store_version": STORE_VERSION, "package_version": __version__},
        "slide_id": slide_id,
        "slide": meta.to_dict(),
        "tiling": tiling,
        "complete": False,
    }
    files: dict[str, bytes] = {}
    for spec in arrays:
        if "data" in spec:
            files |= _chunk_files(spec["name"], np.asarray(spec["data"]), spec["chunks"])
        files[f"{spec['name']}/zarr.json"] = _json_bytes(_array_doc(spec))
    files["zarr.json"] = _json_bytes({"attributes": attrs, "zarr_format": 3, "node_type": "group"})
    _write_keys(p, files)
    return p


def _json_bytes(doc: dict[str, Any]) -> bytes:
    """A ``zarr.json`` document as zarr writes it (``json.dumps``, its indent of 2)."""
    return json.dumps(doc, indent=2, allow_nan=True).encode()


def _array_doc(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``zarr.json`` document of an array of a new store (:func:`_new_array`,
    :func:`_patches_array`): the one zarr writes for :func:`_zarr_kwargs` of it."""
    if "data" in spec:  # a small array, written whole
        data = np.asarray(spec["data"])
        shape, dtype, chunks, fill = data.shape, data.dtype, spec["chunks"], 0
        codecs = [_bytes_codec(dtype), _ZSTD_DOC]
    else:  # the patches, sharded
        shape, dtype, chunks, fill = spec["shape"], np.dtype(np.uint8), spec["shards"], 255
        inner: list[dict[str, Any]] = [_bytes_codec(dtype)]
        if spec["codec"] == "jpeg":
            inner = [{"name": CODEC_NAME, "configuration": {"quality": spec["quality"]}}]
        elif spec["codec"] == "zstd":
            inner.append(_ZSTD_DOC)
        sharding = {
            "chunk_shape": list(spec["chunks"]),
            "codecs": [*inner, {"name": "crc32c"}],
            "index_codecs": [_bytes_codec(np.dtype("<u8")), {"name": "crc32c"}],
            "index_location": "end",
        }
        codecs = [{"name": "sharding_indexed", "configuration": sharding}]
    return {
        "shape": [int(n) for n in shape],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": dtype.type(fill).item(),
        "codecs": codecs,
        "attributes": spec.get("attributes") or {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


#: zarr's ``ZstdCodec(level=ZSTD_LEVEL)`` in a ``zarr.json`` document.
_ZSTD_DOC = {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}


def _bytes_codec(dtype: np.dtype) -> dict[str, Any]:
    """zarr's ``bytes`` codec for ``dtype`` (little-endian; no endianness for single bytes)."""
    if dtype.itemsize == 1:
        return {"name": "bytes"}
    return {"name": "bytes", "configuration": {"endian": "little"}}


def _zarr_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """zarr's ``create_array`` arguments for an array of a new store (:func:`_new_array`,
    :func:`_patches_array`): what :func:`create_patches_array` creates through zarr, and what
    the tests create to compare :func:`create_store`'s files with."""
    zarr = _zarr()
    zstd = zarr.codecs.ZstdCodec(level=ZSTD_LEVEL)
    if "data" in spec:  # zarr writes the chunks too
        return {
            "name": spec["name"],
            "data": np.asarray(spec["data"]),
            "chunks": spec["chunks"],
            "compressors": [zstd],
            "attributes": spec.get("attributes"),
            "overwrite": True,
            "config": {"write_empty_chunks": True},
        }
    from .zarr_jpeg import JpegCodec

    serializer: Any = "auto"
    compressors: list[Any] = [zarr.codecs.Crc32cCodec()]  # last: each chunk's checksum
    if spec["codec"] == "jpeg":
        serializer = JpegCodec(quality=spec["quality"])
    elif spec["codec"] == "zstd":
        compressors.insert(0, zstd)
    return {
        "name": spec["name"],
        "shape": spec["shape"],
        "dtype": "uint8",
        "shards": spec["shards"],
        "chunks": spec["chunks"],
        "serializer": serializer,
        "compressors": compressors,
        "fill_value": 255,
        "overwrite": True,
        "attributes": spec.get("attributes"),
    }


def _chunk_files(name: str, data: np.ndarray, chunk_shape: tuple) -> dict[str, bytes]:
    """The chunk files of array ``name`` holding ``data`` whole, as zarr writes them (keys
    ``<name>/c/i/j``; each chunk full-size, padded with the fill value 0 past the array's edge;
    C-order little-endian bytes, then zarr's ``ZstdCodec`` at :data:`ZSTD_LEVEL`):
    ``tests/test_store.py`` checks them byte for byte against zarr's own."""
    from numcodecs import Zstd

    codec = Zstd(level=ZSTD_LEVEL, checksum=False)
    dtype = data.dtype.newbyteorder("<")
    grid = [range(math.ceil(n / c)) for n, c in zip(data.shape, chunk_shape, strict=True)]
    out: dict[str, bytes] = {}
    for idx in itertools.product(*grid):
        sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunk_shape, strict=True))
        part = data[sel]
        if part.shape != tuple(chunk_shape):
            full = np.zeros(chunk_shape, dtype)
            full[tuple(slice(0, n) for n in part.shape)] = part
            part = full
        raw = np.ascontiguousarray(part, dtype=dtype)
        out["/".join([name, "c", *map(str, idx)])] = bytes(codec.encode(raw))
    return out


def _write_keys(root: Path, items: dict[str, bytes]) -> None:
    """Write a new store's keys as files under ``root``: the arrays' chunks, then their
    ``zarr.json``, then the group's (``complete: false``). A store cut short by a crash is then
    one without a group or without a grid (tiled afresh, :func:`store_state`), never one whose
    ``coords`` lack their chunk (resumed, reading as zeros)."""

    def order(key: str) -> tuple[int, str]:
        return (2 if key == "zarr.json" else 1 if key.endswith("/zarr.json") else 0), key

    made: set[Path] = set()
    for key in sorted(items, key=order):
        f = root / key
        if f.parent not in made:
            f.parent.mkdir(parents=True, exist_ok=True)
            made.add(f.parent)
        with open(f, "wb") as fh:
            fh.write(items[key])


def mask_arrays(
    thumbnail: np.ndarray, mask: np.ndarray, *, downsample: float, spec: MaskSpec
) -> list[dict[str, Any]]:
    """The ``thumbnail`` and ``tissue_mask`` arrays (same grid) of a new store, each with its
    ``downsample``, as :func:`create_store`'s ``arrays``.

    Parameters
    ----------
    thumbnail : (h, w, 3) uint8 ndarray
    mask : (h, w) bool ndarray
    downsample : float
        Level-0 pixels per thumbnail (and mask) pixel.
    spec : MaskSpec
        How the mask was made (recorded with it).
    """
    attrs = {
        "downsample": downsample,
        "method": spec.method,
        "params": spec.to_dict(),
        "tissue_fraction": float(mask.mean()),
    }
    return [
        _new_array(THUMBNAIL, thumbnail, (512, 512, 3), {"downsample": downsample}),
        _new_array(TISSUE_MASK, mask, (1024, 1024), attrs),
    ]


def grid_arrays(
    coords_xy: np.ndarray, tissue_fraction: np.ndarray, spec: TilingSpec, tiling: dict[str, Any]
) -> list[dict[str, Any]]:
    """The ``coords`` and ``tissue_fraction`` arrays of a new store and its empty ``patches``
    array for them, as :func:`create_store`'s ``arrays``.

    Parameters
    ----------
    coords_xy : (N, 2) int64 ndarray
        Level-0 top-left corner of each patch.
    tissue_fraction : (N,) float32 ndarray
    spec : TilingSpec
        Patch size, codec and shard size of ``patches``.
    tiling : dict
        The store's ``tiling`` attributes (:func:`tiling_attrs`): the patches' ``mpp``,
        ``downsample`` and ``read_level``.
    """
    attrs = {"units": "level-0 px", "order": "x, y (top-left corner)"}
    patches = _patches_array(
        n=len(coords_xy),
        tile_px=spec.tile_px,
        codec=spec.codec,
        quality=spec.jpeg_quality,
        patches_per_shard=spec.patches_per_shard,
        attrs={k: tiling[k] for k in ("mpp", "downsample", "read_level")},
    )
    return [
        _new_array(COORDS, coords_xy, (65536, 2), attrs),
        _new_array(TISSUE_FRACTION, tissue_fraction, (65536,), None),
        patches,
    ]


def _new_array(
    key: str, data: np.ndarray, chunks: tuple, attrs: dict[str, Any] | None
) -> dict[str, Any]:
    """A small array of a new store (:func:`create_store`), written whole with its data and
    attributes (every chunk, as :func:`write_array`: ``chunks`` clipped to the shape),
    compressed with zstd at :data:`ZSTD_LEVEL` (zarr's default level 3 took 5.4 against 1.7 ms
    a 1,250 x 938 thumbnail, for 2 % fewer bytes)."""
    return {
        "name": key,
        "data": data,
        "chunks": _clip_chunks(chunks, data.shape),
        "attributes": attrs,
    }


def create_patches_array(
    group: Any,
    *,
    n: int,
    tile_px: int,
    codec: str,
    quality: int,
    patches_per_shard: int,
    attrs: dict[str, Any] | None = None,
) -> Any:
    """Create the empty ``patches`` array, ``(n, tile_px, tile_px, 3)`` uint8, in an open store
    group (zarr).

    Shards hold ``patches_per_shard`` patches, one patch per inner chunk, encoded with ``codec``
    (``"jpeg"``, ``"zstd"`` or ``"raw"``) and followed by its crc32c; missing patches read as
    white. The tiler fills the
    shards with :func:`write_shard`.

    Returns
    -------
    zarr.Array
    """
    return group.create_array(
        **_zarr_kwargs(
            _patches_array(
                n=n,
                tile_px=tile_px,
                codec=codec,
                quality=quality,
                patches_per_shard=patches_per_shard,
                attrs=attrs,
            )
        )
    )


def _patches_array(
    *,
    n: int,
    tile_px: int,
    codec: str,
    quality: int,
    patches_per_shard: int,
    attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``patches`` array of a new store (:func:`create_store`,
    :func:`create_patches_array`)."""
    return {
        "name": PATCHES,
        "shape": (n, tile_px, tile_px, 3),
        "shards": (patches_per_shard, tile_px, tile_px, 3),
        "chunks": (1, tile_px, tile_px, 3),
        "codec": codec,
        "quality": quality,
        "attributes": {"codec": codec, "quality": quality, **(attrs or {})},
    }


def read_coords(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` of a store's ``coords`` (complete or still being written).

    Returns
    -------
    (K, 2) int64 ndarray
        Level-0 ``(x, y)`` top-left corners.
    """
    return np.asarray(_zarr().open_array(str(Path(path) / COORDS), mode="r")[start:stop])


def patch_count(path: str | os.PathLike) -> int:
    """Number of patches (rows of ``coords``) of a store, complete or not (from its
    ``zarr.json``)."""
    facts = _array_facts(Path(path) / COORDS, whole=False)
    if facts is None or not facts[0]:
        raise StoreError(f"no readable {COORDS!r} array", path=path)
    return facts[0][0]


def mark_complete(path: str | os.PathLike, **attrs: Any) -> None:
    """Record final ``tiling`` attributes (e.g. ``status``, ``n_patches``) and ``complete: true``
    in one atomic write (temporary file, then rename) of the store's group ``zarr.json``.

    The document is the one zarr's ``update_attributes`` writes (``json.dumps`` with zarr's
    indent of 2; ``tests/test_store.py`` compares the bytes), written here: zarr took 1.5 of a
    finished slide's 2.5 ms opening the group through its event loop.
    """
    doc_path = Path(path) / "zarr.json"
    try:
        doc = _group_doc(path)
    except json.JSONDecodeError:
        raise  # finish_store names it: "unreadable store (JSONDecodeError)"
    except ValueError as exc:
        raise StoreError(str(exc), path=path) from exc
    attributes = doc.setdefault("attributes", {})
    tiling = dict(attributes.get("tiling", {}))
    tiling.update(attrs)
    attributes.update({"tiling": tiling, "complete": True})
    atomic_write_bytes(doc_path, _json_bytes(doc))


def _group_doc(path: str | os.PathLike) -> dict[str, Any]:
    """The store's group document (its ``zarr.json``, parsed).

    Raises
    ------
    OSError
        It cannot be read.
    ValueError
        It is not JSON (``json.JSONDecodeError``), or not a zarr group's.
    """
    doc = json.loads((Path(path) / "zarr.json").read_bytes())
    if not isinstance(doc, dict) or doc.get("node_type") != "group" or doc.get("zarr_format") != 3:
        raise ValueError("zarr.json is not a group's (zarr v3)")
    return doc


def finish_store(
    path: str | os.PathLike,
    *,
    status: str,
    n_patches: int,
    patches_per_shard: int,
    **attrs: Any,
) -> None:
    """Check that every array of the store is whole, then :func:`mark_complete`.

    A store is never marked complete unless ``coords`` ``(n_patches, 2)``, ``tissue_fraction``
    ``(n_patches,)``, ``thumbnail`` ``(h, w, 3)`` and ``tissue_mask`` ``(h, w)`` are there with
    those shapes and all their chunks on disk, and ``patches`` has ``n_patches`` rows and every
    shard written and whole (:func:`store_problems`).

    Parameters
    ----------
    path : path
        A store being written.
    status : str
        The tiling's outcome (``"ok"``, ``"no_tissue"``), recorded in ``tiling``.
    n_patches : int
        Rows of ``coords`` (recorded in ``tiling``).
    patches_per_shard : int
    **attrs
        More ``tiling`` attributes (``copied_source_tiles``, ``seconds``).

    Raises
    ------
    StoreError
        An array is missing, of the wrong shape or torn, or a shard is missing or torn (the
        first problem named; the store stays unfinished, so a rerun redoes or resumes it).
    """
    problems = store_problems(path, n_patches, patches_per_shard)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise StoreError(f"{problems[0]}{more}; not marked complete", path=path)
    try:
        mark_complete(path, status=status, n_patches=n_patches, **attrs)
    except (FileNotFoundError, ValueError) as exc:  # no group document, or not one
        raise StoreError(
            f"unreadable store ({type(exc).__name__}); not marked complete", path=path
        ) from exc


def store_problems(path: str | os.PathLike, n_patches: int, patches_per_shard: int) -> list[str]:
    """What keeps a store being written from being complete; empty when it is whole.

    Read from the store's files (its ``zarr.json`` documents, which chunk files exist, the
    shards' indexes), not through zarr: 0.2 against 2.5 ms for the benchmark slide's store.

    Parameters
    ----------
    path : path
        A store (complete or not).
    n_patches : int
        The rows ``coords``, ``tissue_fraction`` and ``patches`` must have.
    patches_per_shard : int

    Returns
    -------
    list of str
        One short phrase per problem, e.g. ``"thumbnail: 2 of 4 chunks missing"`` or
        ``"shard 3 missing or torn after extraction"``.
    """
    p = Path(path)
    try:
        _group_doc(p)
    except (OSError, ValueError) as exc:
        return [f"unreadable store ({type(exc).__name__})"]
    n = int(n_patches)
    expected: dict[str, Callable[[tuple[int, ...]], bool]] = {
        COORDS: lambda s: s == (n, 2),
        TISSUE_FRACTION: lambda s: s == (n,),
        THUMBNAIL: lambda s: len(s) == 3 and s[2] == 3 and s[0] > 0 and s[1] > 0,
        TISSUE_MASK: lambda s: len(s) == 2,
        PATCHES: lambda s: len(s) == 4 and s[0] == n and s[3] == 3,
    }
    problems: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for key, ok in expected.items():
        fact = _array_facts(p / key, whole=key != PATCHES)
        if fact is None:
            problems.append(f"no {key!r} array")
            continue
        shape, missing, nchunks = fact
        shapes[key] = shape
        if not ok(shape):
            problems.append(f"{key!r} has shape {shape} (expected {n} patches)")
        elif missing:
            problems.append(f"{key!r}: {missing} of {nchunks} chunks missing")
    thumb, mask = shapes.get(THUMBNAIL), shapes.get(TISSUE_MASK)
    if thumb is not None and mask is not None and thumb[:2] != mask:
        problems.append(f"{TISSUE_MASK!r} {mask} is not on the thumbnail's grid {thumb[:2]}")
    if PATCHES in shapes:
        torn = unfinished_shards(path, n, patches_per_shard)
        if torn:
            problems.append(
                f"shard {torn[0]} missing or torn after extraction"
                + (f" ({len(torn)} of {PATCHES!r}'s shards)" if len(torn) > 1 else "")
            )
    return problems


def _array_facts(folder: Path, *, whole: bool) -> tuple[tuple[int, ...], int, int] | None:
    """``(shape, missing chunks, chunks)`` of the zarr v3 array in ``folder``, from its
    ``zarr.json`` and the chunk files there (counted only when ``whole``, else 0, 0); None when
    there is no readable array."""
    try:
        meta = json.loads((folder / "zarr.json").read_bytes())
        if meta.get("node_type") != "array":
            return None
        shape = tuple(int(v) for v in meta["shape"])
        if not whole:
            return shape, 0, 0
        chunk = [int(v) for v in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        enc = meta.get("chunk_key_encoding") or {}
        default = enc.get("name", "default") == "default"
        sep = (enc.get("configuration") or {}).get("separator", "/" if default else ".")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    grid = [range(math.ceil(s / max(1, c))) for s, c in zip(shape, chunk, strict=False)]
    prefix = ["c"] if default else []
    keys = [sep.join([*prefix, *map(str, idx)]) for idx in itertools.product(*grid)]
    missing = sum(not os.path.isfile(folder / k) for k in keys)
    return shape, missing, len(keys)


# --------------------------------------------------------------------------------------------
# "is this store current?": the one rule for skipping, resuming and redoing a slide
# --------------------------------------------------------------------------------------------
DONE = "done"  #: complete, from the same slide file with the same tiling: skip the slide
RESUME = "resume"  #: unfinished, from the same file with the same tiling: write missing shards
STALE = "stale"  #: complete, but from another file or tiling: tile again
FRESH = "fresh"  #: no usable store (none, unreadable, another layout, unfinished other): tile


def store_state(
    path: str | os.PathLike,
    spec: TilingSpec,
    *,
    file_size: int | None,
    slide_mpp: float | None,
    read_level: int | None = None,
) -> str:
    """What tiling a slide into the store at ``path`` has to do: one of
    :data:`DONE`, :data:`RESUME`, :data:`STALE`, :data:`FRESH`.

    A store is "the same" when it was made from a slide file of ``file_size`` bytes, with the
    same :class:`~wsi_pipeline.specs.TilingSpec` and the same ``slide_mpp`` override; everything
    else in its ``tiling`` attributes follows from these. The same keys decide both skipping a
    complete store and resuming an unfinished one.

    Parameters
    ----------
    path : path
        ``<out>/<slide_id>.zarr`` (need not exist).
    spec : TilingSpec
    file_size : int or None
        Size in bytes of the slide file now (``None`` if it cannot be read).
    slide_mpp : float or None
        The user's level-0 mpp for the slide, if any.
    read_level : int, optional
        The pyramid level the patches would be read from now, once the slide is open: an
        unfinished store that was being read from another one (a release changed which level
        counts as the resolution asked) is tiled afresh rather than finished from two levels.

    Returns
    -------
    str
    """
    p = Path(path)
    try:
        attrs = _read_attrs(p)
    except StoreError:
        return FRESH
    if not _version_ok(attrs):
        return FRESH
    tiling = attrs.get("tiling") or {}
    same = (
        tiling.get("spec") == spec.to_dict()
        and tiling.get("slide_mpp_override") == slide_mpp
        and (attrs.get("slide") or {}).get("file_size") == file_size
    )
    if attrs.get("complete") is True:
        return DONE if same else STALE
    current = (attrs.get("wsi_pipeline") or {}).get("store_version") == STORE_VERSION
    if read_level is not None and tiling.get("read_level") != read_level:
        return FRESH
    return RESUME if same and current and _has_grid(p) else FRESH


def _has_grid(path: Path) -> bool:
    """True when an unfinished store got as far as its grid and (empty) patches array."""
    return all(_array_facts(path / key, whole=False) for key in (COORDS, TISSUE_FRACTION, PATCHES))


# --------------------------------------------------------------------------------------------
# other stages' arrays
# --------------------------------------------------------------------------------------------


def write_array(
    group: Any, key: str, data: np.ndarray, *, chunks: tuple, attrs: dict[str, Any] | None = None
) -> Any:
    """Write ``data`` as array ``key`` of ``group`` (replacing it), then its attributes.

    ``chunks`` is clipped to the data's shape. Every chunk is written, even one that equals the
    fill value, so :func:`store_problems` can tell a whole array from a torn one.
    """
    chunks = _clip_chunks(chunks, data.shape)
    arr = group.create_array(
        key,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        overwrite=True,
        # every chunk is a file, even one equal to the fill value: a missing chunk then always
        # means a lost write (finish_store checks), never "all zeros"
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data
    if attrs:  # after the data, in one write of zarr.json (``attrs.update`` writes it per key)
        arr = arr.update_attributes(attrs)
    return arr


def _clip_chunks(chunks: tuple, shape: tuple) -> tuple:
    """``chunks`` no larger than ``shape`` (and at least 1) along each axis."""
    return tuple(max(1, min(c, s)) if s else 1 for c, s in zip(chunks, shape))


def read_array(group: Any, key: str, store: str | os.PathLike, dtype: Any = None) -> np.ndarray:
    """The whole array ``key`` of an open store group, or one line saying it cannot be read.

    Parameters
    ----------
    group : zarr.Group
        The store, opened.
    key : str
        The array (``features/<extractor>``, ``scores/<run>``, ...).
    store : path
        The store's folder, for the message.
    dtype : numpy dtype, optional
        Convert to it.

    Returns
    -------
    ndarray

    Raises
    ------
    StoreError
        The array is missing, or a chunk of it is missing, unreadable or fails to decode (a
        damaged store: zarr's codecs raise RuntimeError or ValueError).
    """
    try:
        return np.asarray(group[key][...], dtype)
    except (KeyError, OSError, RuntimeError, ValueError) as exc:
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise StoreError(f"cannot read {key} ({why}); the store is damaged", path=store) from exc


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


def remove_partial_writes(path: str | os.PathLike) -> int:
    """Remove the files zarr-python's ``LocalStore`` leaves in a store when its writer is killed
    between writing a key and renaming it into place (``<key>.<hex>.partial``); how many.

    For a stage that adds arrays (features, predict), called while it holds the store's lock:
    every writer of a store holds it, so no such file is being written by anyone else. Never
    read by zarr, they are only litter, but litter a rerun should not leave behind."""
    n = 0
    for f in Path(path).rglob("*.partial"):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            n += 1
    return n


def remove_scores(group: Any, run_id: str) -> None:
    """Delete a run's ``scores/<run_id>``, ``-classes`` and ``-attention`` arrays, if present.

    What ``predict`` does to a store whose scores it could not finish (a full disk), so that no
    array of that run is left half-written or next to another model's arrays.
    """
    for key in (scores_key(run_id), class_scores_key(run_id), scores_key(run_id, attention=True)):
        with contextlib.suppress(KeyError, FileNotFoundError):
            del group[key]


def write_class_scores(
    group: Any, run_id: str, probs: np.ndarray, classes: Sequence[str], attrs: dict[str, Any]
) -> None:
    """Write per-patch class probabilities ``(N, C)`` float32 to ``scores/<run_id>-classes``.

    Parameters
    ----------
    group : zarr.Group
        The store, opened read-write.
    run_id : str
        The predict run.
    probs : (N, C) ndarray
        Column ``j`` is the probability of ``classes[j]``.
    classes : sequence of str
        The run's class names in column order (recorded as the ``classes`` attribute).
    attrs : dict
        Further attributes (how the probabilities were made).

    Raises
    ------
    ValueError
        ``probs`` is not ``(N, len(classes))``.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"class scores of shape {probs.shape} for {len(classes)} classes")
    chunks = (65536, probs.shape[1])
    _write_marked(
        group,
        class_scores_key(run_id),
        probs,
        chunks=chunks,
        attrs={**attrs, "classes": list(classes)},
    )


def write_features(group: Any, extractor: str, feats: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write patch features ``(N, D)`` to ``features/<extractor>``, marked complete last."""
    _write_marked(group, features_key(extractor), feats, chunks=(8192, feats.shape[1]), attrs=attrs)


# --------------------------------------------------------------------------------------------
# shard files of ``patches``
# --------------------------------------------------------------------------------------------
def shard_path(store: str | os.PathLike, shard: int) -> Path:
    """File of shard ``shard`` of ``patches`` (zarr v3 default chunk keys)."""
    return Path(store) / PATCHES / "c" / str(shard) / "0" / "0" / "0"


def write_shard(store: str | os.PathLike, shard: int, data: bytes) -> None:
    """Write one shard file atomically (temporary file, then rename)."""
    p = shard_path(store, shard)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, data)


def _shard_index(path: Path, per_shard: int) -> tuple[np.ndarray, int]:
    """A shard file's ``(per_shard, 2)`` index and its size in bytes.

    Raises ``OSError`` (no such file, unreadable) or ``ValueError`` (torn: short or bad checksum).
    """
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - index_nbytes(per_shard)))
        return read_shard_index(fh.read(), per_shard), size


def shard_is_done(store: str | os.PathLike, shard: int, n_chunks: int, per_shard: int) -> bool:
    """True when shard ``shard`` exists, its index checks out and holds ``n_chunks`` chunks."""
    try:
        index, size = _shard_index(shard_path(store, shard), per_shard)
    except (OSError, ValueError):
        return False
    present = index[:, 0] != EMPTY
    return bool(present[:n_chunks].all()) and int(index[present].sum(axis=1).max(initial=0)) <= size


def unfinished_shards(
    store: str | os.PathLike, n_patches: int, patches_per_shard: int
) -> tuple[int, ...]:
    """Shards of ``patches`` that are missing or torn (see :func:`shard_is_done`), in order."""
    per = patches_per_shard
    return tuple(
        s
        for s in range(math.ceil(n_patches / per))
        if not shard_is_done(store, s, min(per, n_patches - s * per), per)
    )


def _chunk_checksums(arr: Any) -> bool:
    """Whether the inner chunks of the sharded array ``arr`` end with a crc32c (stores of
    version 2 on; version 1 had none)."""
    for codec in arr.metadata.to_dict().get("codecs", []):
        if codec.get("name") == "sharding_indexed":
            inner = codec.get("configuration", {}).get("codecs", [])
            return bool(inner) and inner[-1].get("name") == "crc32c"
    return False


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
        arr = g[PATCHES]
        self.store = Path(store)
        self.n = int(arr.shape[0])
        t, w, c = (int(v) for v in arr.shape[1:])
        self.shape_hwc = (t, w, c)
        self.per_shard = int(arr.shards[0]) if arr.shards else self.n
        self.codec = str(arr.attrs.get("codec", "jpeg"))
        self.checksums = _chunk_checksums(arr)
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
            try:
                idx, _ = _shard_index(p, self.per_shard)
            except ValueError as exc:
                raise StoreError(f"corrupt shard {shard}: {exc}", path=p) from exc
            self._indices[shard] = idx
        return idx

    def _decode(self, data: bytes, nbytes: int, i: int, shard: int) -> np.ndarray:
        """Decode inner chunk ``i``; a short or undecodable chunk is a :class:`StoreError`
        naming the store, the patch and the shard (never a codec traceback)."""
        try:
            if len(data) != nbytes:
                raise ValueError(f"{len(data)} of {nbytes} bytes on disk")
            if self.checksums:
                data = chunk_payload(data)
            return decode_chunk(data, self.codec, self.shape_hwc)
        except (ValueError, RuntimeError) as exc:  # imagecodecs' errors are RuntimeErrors
            raise StoreError(
                f"patch {i} (shard {shard}) cannot be decoded ({exc}); the store is corrupt: "
                "re-tile the slide ('wsi-pipeline tile --overwrite')",
                path=self.store,
            ) from exc

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Patches at ``indices`` as a ``(K, T, T, 3)`` uint8 array (in the order given).

        Raises
        ------
        StoreError
            A shard whose index or one of whose chunks is torn or cannot be decoded.
        """
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
                if fh is None or shard != cur:
                    if fh is not None:
                        fh.close()
                    fh = open(shard_path(self.store, shard), "rb")
                    cur = shard
                fh.seek(int(off))
                out[k] = self._decode(fh.read(int(nbytes)), int(nbytes), i, shard)
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
        return int(self.group[COORDS].shape[0])

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 ``(x, y)`` of each patch's top-left corner."""
        return np.asarray(self.group[COORDS][...])

    @property
    def tissue_fraction(self) -> np.ndarray:
        """(N,) float32 tissue fraction of each patch."""
        return np.asarray(self.group[TISSUE_FRACTION][...])

    @property
    def thumbnail(self) -> np.ndarray:
        """(h, w, 3) uint8 thumbnail the tissue mask was made from."""
        return np.asarray(self.group[THUMBNAIL][...])

    @property
    def tissue_mask(self) -> np.ndarray:
        """(h, w) bool tissue mask, on the thumbnail's grid."""
        return np.asarray(self.group[TISSUE_MASK][...])

    @property
    def thumbnail_downsample(self) -> float:
        """Level-0 pixels per :attr:`thumbnail` pixel."""
        return float(self.group[THUMBNAIL].attrs["downsample"])

    @property
    def mask_downsample(self) -> float:
        """Level-0 pixels per :attr:`tissue_mask` pixel (for a mask stored without it: the
        slide's width over the mask's)."""
        arr = self.group[TISSUE_MASK]
        return float(arr.attrs.get("downsample", self.meta.width / arr.shape[1]))

    def reader(self) -> PatchReader:
        """A fast random-access reader of the patches."""
        return PatchReader(self.path)

    def patches_dask(self) -> Any:
        """The patches as a lazy ``dask.array`` (one dask chunk per shard)."""
        import dask.array as da

        arr = self.group[PATCHES]
        return da.from_zarr(arr, chunks=arr.shards or arr.chunks)
