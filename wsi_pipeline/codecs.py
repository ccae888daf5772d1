"""Patch codecs: the byte-level helpers the tiler uses to encode patches and build shards.

The patches' inner chunks are one standalone baseline JPEG each (codec ``wsi_jpeg``, a zarr v3
array-to-bytes codec: :mod:`wsi_pipeline.zarr_jpeg`, registered with zarr on its import and
through the ``zarr.codecs`` entry point, so plain ``zarr.open_group(...)["patches"][i]`` decodes
patches in any process that has wsi-pipeline installed), zstd or raw bytes. This module does not
import zarr: the tiler writes its stores without it.

The tiler does not push patches one by one through zarr (about 1 ms per chunk of Python/async
overhead, see docs/store.md): it encodes inner chunks itself and writes whole shards in the
sharding codec's binary layout (:func:`shard_bytes`), each inner chunk followed by its crc32c
(zarr's ``crc32c`` codec, the last of the inner codecs), so a chunk whose bytes changed on disk
fails its read instead of decoding to other pixels. Readers may use zarr or
:func:`read_shard_index` + :func:`chunk_payload` + :func:`decode_chunk` directly.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .util import rows_whole

__all__ = [
    "CODEC_NAME",
    "EMPTY",
    "ZSTD_LEVEL",
    "adobe_rgb_marker",
    "chunk_payload",
    "decode_chunk",
    "encode_chunk",
    "index_nbytes",
    "join_jpeg_tables",
    "read_shard_index",
    "shard_bytes",
]

#: Name of the JPEG codec in zarr metadata (and of its ``zarr.codecs`` entry point).
CODEC_NAME = "wsi_jpeg"
#: zstd level of ``codec="zstd"`` patches: 1, twice as fast as 3 on H&E pixels for 12% more bytes
#: (``benchmarks/bench_tiling.py``, zstd row; the level is in each store's metadata).
ZSTD_LEVEL = 1
#: Offset/length of a missing inner chunk in a shard index.
EMPTY = 2**64 - 1

# APP14 "Adobe" segment with transform=0: tells decoders the 3 components are RGB, not YCbCr.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def adobe_rgb_marker() -> bytes:
    """The APP14 segment that marks a JPEG's components as RGB (no colour transform)."""
    return _ADOBE_RGB


def join_jpeg_tables(tile: bytes, tables: bytes | None, *, rgb: bool) -> bytes:
    """Turn an abbreviated TIFF JPEG tile into a standalone JPEG.

    Parameters
    ----------
    tile : bytes
        The tile's bytes as stored in the TIFF (starts with SOI).
    tables : bytes or None
        The TIFF ``JPEGTables`` (an SOI ... EOI stream of DQT/DHT), if any.
    rgb : bool
        True when the TIFF's photometric interpretation is RGB (Aperio): an Adobe APP14 marker is
        inserted so decoders skip the YCbCr->RGB conversion.

    Returns
    -------
    bytes
        A JPEG any decoder reads to the same pixels as the TIFF reader.
    """
    if tile[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG tile (no SOI marker)")
    mid = memoryview(tables)[2:-2] if tables else b""
    # one join, one copy of the tile (three + of a ~60 KB tile were three)
    return b"".join((b"\xff\xd8", _ADOBE_RGB if rgb else b"", mid, memoryview(tile)[2:]))


def encode_chunk(patch: np.ndarray, codec: str, *, quality: int = 90) -> bytes:
    """Encode one ``(T, T, 3)`` uint8 patch as an inner chunk of the ``patches`` array."""
    if codec == "jpeg":
        import imagecodecs

        # rows of a larger image (a view into a band of decoded tiles) are encoded where they
        # lie: libjpeg-turbo reads rows by their stride, and a copy would hand the interpreter
        # to the other threads and back once more a patch
        src = patch if rows_whole(patch) else np.ascontiguousarray(patch)
        return bytes(imagecodecs.jpeg8_encode(src, level=quality))
    if codec == "zstd":
        from numcodecs import Zstd

        return bytes(Zstd(level=ZSTD_LEVEL).encode(np.ascontiguousarray(patch)))
    if codec == "raw":
        return np.ascontiguousarray(patch).tobytes()
    raise ValueError(f"unknown patch codec {codec!r}")


def decode_chunk(data: bytes, codec: str, shape_hwc: tuple[int, int, int]) -> np.ndarray:
    """Decode one inner chunk to an ``(T, T, 3)`` uint8 patch."""
    import imagecodecs

    if codec == "jpeg":
        arr = imagecodecs.jpeg8_decode(data)
    elif codec == "zstd":
        from numcodecs import Zstd

        arr = np.frombuffer(Zstd().decode(data), np.uint8)
    elif codec == "raw":
        arr = np.frombuffer(data, np.uint8)
    else:
        raise ValueError(f"unknown patch codec {codec!r}")
    return arr.reshape(shape_hwc)


def _crc32c(data: bytes) -> bytes:
    import google_crc32c

    return struct.pack("<I", google_crc32c.value(data))


def chunk_payload(data: bytes) -> bytes:
    """The encoded chunk in an inner chunk's bytes as :func:`shard_bytes` writes them: all but
    the last 4 bytes, which must be their crc32c (what zarr's ``crc32c`` codec checks).

    Raises
    ------
    ValueError
        A chunk shorter than its checksum, or whose checksum does not match (its bytes changed).
    """
    if len(data) < 4:
        raise ValueError("chunk shorter than its checksum")
    if _crc32c(data[:-4]) != data[-4:]:
        raise ValueError("chunk checksum mismatch: its bytes changed on disk")
    return data[:-4]


def shard_bytes(chunks: list[bytes | None], chunks_per_shard: int) -> bytes:
    """Build one shard in zarr's sharding layout (index at the end, ``bytes`` + ``crc32c``), each
    inner chunk followed by its crc32c.

    Parameters
    ----------
    chunks : list of bytes or None
        Encoded inner chunks in order; ``None`` marks a missing chunk. At most
        ``chunks_per_shard`` entries (missing trailing ones are empty).
    chunks_per_shard : int
        Inner chunks along the shard's first axis (the other axes have one chunk).

    Returns
    -------
    bytes
        ``chunk bytes + crc32c ... | index (chunks_per_shard x 2 uint64 LE) | crc32c of the
        index``.
    """
    index = np.full((chunks_per_shard, 2), EMPTY, dtype="<u8")
    parts: list[bytes] = []
    offset = 0
    for i, c in enumerate(chunks):
        if c is None:
            continue
        index[i] = (offset, len(c) + 4)
        parts.append(c)
        parts.append(_crc32c(c))
        offset += len(c) + 4
    idx = index.tobytes()
    parts.append(idx)
    parts.append(_crc32c(idx))
    return b"".join(parts)


def index_nbytes(chunks_per_shard: int) -> int:
    """Bytes of a shard's index at its end: ``(offset, nbytes)`` uint64 per chunk, then a crc32c."""
    return 16 * chunks_per_shard + 4


def read_shard_index(data_tail: bytes, chunks_per_shard: int) -> np.ndarray:
    """Parse (and checksum) a shard index from the shard's last :func:`index_nbytes` bytes.

    Returns
    -------
    (chunks_per_shard, 2) uint64 ndarray
        ``(offset, nbytes)`` per inner chunk; :data:`EMPTY` for missing chunks.

    Raises
    ------
    ValueError
        When the tail is short or its checksum does not match (a torn or foreign file).
    """
    n = index_nbytes(chunks_per_shard)
    if len(data_tail) < n:
        raise ValueError("shard shorter than its index")
    idx, crc = data_tail[-n:-4], data_tail[-4:]
    if _crc32c(idx) != crc:
        raise ValueError("shard index checksum mismatch")
    return np.frombuffer(idx, dtype="<u8").reshape(chunks_per_shard, 2)


def __getattr__(name: str) -> Any:
    """``JpegCodec``, the zarr codec (:mod:`wsi_pipeline.zarr_jpeg`), imported with zarr on first
    use: this module is the tiler's, which never imports zarr (a third of a second a process).
    The name stays here for the ``zarr.codecs`` entry point of installs made before it moved."""
    if name == "JpegCodec":
        from .zarr_jpeg import JpegCodec

        return JpegCodec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
