"""The ``wsi_jpeg`` zarr v3 codec of the ``patches`` array (docs/store.md).

An array-to-bytes codec storing each ``(1, T, T, 3)`` uint8 chunk as one standalone baseline
JPEG (any JPEG decoder reads a chunk on its own). It is registered with zarr on import of this
module (:mod:`wsi_pipeline.store` imports it with zarr) and through the ``zarr.codecs`` entry
point of the installed package, so plain ``zarr.open_group(...)["patches"][i]`` decodes patches
in any process that has wsi-pipeline installed. The tiler encodes chunks without it
(:func:`wsi_pipeline.codecs.encode_chunk`) and never imports zarr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.registry import register_codec

from .codecs import CODEC_NAME, encode_chunk

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

__all__ = ["JpegCodec"]


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """zarr v3 array->bytes codec: a uint8 ``(..., H, W, 3)`` chunk as one baseline JPEG.

    Configuration: ``quality`` (1..100) used when zarr itself encodes a chunk.
    """

    is_fixed_size = False
    quality: int = 90

    def __init__(self, *, quality: int = 90) -> None:
        object.__setattr__(self, "quality", int(quality))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JpegCodec:
        config = data.get("configuration") or {}
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        return {"name": CODEC_NAME, "configuration": {"quality": self.quality}}

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        import imagecodecs

        arr = imagecodecs.jpeg8_decode(chunk_bytes.to_bytes())
        # zarr's NDArrayLike protocol (all() -> bool) does not match numpy 2's ndarray stubs.
        out = arr.reshape(chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(out)  # type: ignore[arg-type]

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        arr = np.asarray(chunk_array.as_ndarray_like())
        h, w, c = arr.shape[-3:]
        data = encode_chunk(arr.reshape(h, w, c), "jpeg", quality=self.quality)
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError("JPEG output size is data dependent")


register_codec(CODEC_NAME, JpegCodec)
