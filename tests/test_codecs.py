"""Patch codecs: the shard byte layout, chunk encode/decode, standalone JPEG tiles, wsi_jpeg."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.codecs import (
    CODEC_NAME,
    EMPTY,
    adobe_rgb_marker,
    chunk_payload,
    decode_chunk,
    encode_chunk,
    index_nbytes,
    join_jpeg_tables,
    read_shard_index,
    shard_bytes,
)
from wsi_pipeline.zarr_jpeg import JpegCodec


def _gradient(size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.stack([150 + 2 * xx, 120 + 2 * yy, 200 - xx - yy], axis=-1).astype(np.uint8)


def test_shard_round_trip() -> None:
    """Each inner chunk is followed by its crc32c: a changed byte fails its read."""
    chunks = [b"abc", None, b"defgh"]
    data = shard_bytes(chunks, 4)
    idx = read_shard_index(data, 4)
    assert idx[0].tolist() == [0, 7] and idx[2].tolist() == [7, 9]
    assert idx[1, 0] == EMPTY and idx[3, 0] == EMPTY
    assert chunk_payload(data[0:7]) == b"abc" and chunk_payload(data[7:16]) == b"defgh"
    with pytest.raises(ValueError, match="checksum mismatch"):
        chunk_payload(b"abd" + data[3:7])
    with pytest.raises(ValueError, match="shorter than its checksum"):
        chunk_payload(b"ab")
    with pytest.raises(ValueError, match="checksum"):
        read_shard_index(data[:-1] + bytes([data[-1] ^ 1]), 4)
    with pytest.raises(ValueError, match="shorter"):
        read_shard_index(b"xx", 4)


def test_shard_index_is_at_the_end() -> None:
    data = shard_bytes([b"abc", b"de"], 2)
    assert len(data) == 5 + 2 * 4 + index_nbytes(2) and index_nbytes(2) == 2 * 16 + 4
    assert read_shard_index(data[-index_nbytes(2) :], 2)[1].tolist() == [7, 6]


@pytest.mark.parametrize("codec", ["jpeg", "zstd", "raw"])
def test_chunk_codecs(codec: str) -> None:
    patch = _gradient()
    back = decode_chunk(encode_chunk(patch, codec, quality=95), codec, (32, 32, 3))
    if codec == "jpeg":
        assert np.abs(back.astype(int) - patch).mean() < 4
    else:
        assert np.array_equal(back, patch)


@pytest.mark.parametrize("codec", ["jpeg", "zstd", "raw"])
def test_chunk_of_a_view_is_the_chunk_of_its_copy(codec: str) -> None:
    """A patch that is a view into a wider image (rows apart by the image's stride, as from a
    band of decoded tiles) is encoded to the same bytes as its contiguous copy."""
    wide = np.concatenate([_gradient()] * 4, axis=1)  # 32 x 128
    view = wide[:, 41:73]
    assert not view.flags.c_contiguous
    assert encode_chunk(view, codec) == encode_chunk(view.copy(), codec)
    back = decode_chunk(encode_chunk(view, codec, quality=95), codec, (32, 32, 3))
    assert np.abs(back.astype(int) - view).mean() < (4 if codec == "jpeg" else 1)


def test_unknown_codec() -> None:
    with pytest.raises(ValueError, match="unknown patch codec 'png'"):
        encode_chunk(_gradient(), "png")
    with pytest.raises(ValueError, match="unknown patch codec 'png'"):
        decode_chunk(b"", "png", (32, 32, 3))


def test_join_jpeg_tables_needs_a_jpeg() -> None:
    with pytest.raises(ValueError, match="not a JPEG"):
        join_jpeg_tables(b"\x00\x01", None, rgb=False)


def test_join_jpeg_tables_marks_rgb() -> None:
    jpeg = encode_chunk(_gradient(), "jpeg", quality=95)
    assert join_jpeg_tables(jpeg, None, rgb=False) == jpeg
    marked = join_jpeg_tables(jpeg, None, rgb=True)
    assert marked[:2] == b"\xff\xd8" and marked[2:].startswith(adobe_rgb_marker())
    assert marked.endswith(jpeg[2:])


def test_jpeg_codec_config_round_trip() -> None:
    codec = JpegCodec(quality=77)
    d = codec.to_dict()
    assert d == {"name": CODEC_NAME, "configuration": {"quality": 77}}
    assert JpegCodec.from_dict(d).quality == 77
    # the name the zarr.codecs entry point of installs before it moved gives
    from wsi_pipeline import codecs

    assert codecs.JpegCodec is JpegCodec


def test_jpeg_codec_in_zarr(tmp_path) -> None:
    """zarr itself encodes and decodes chunks with wsi_jpeg (one JPEG per chunk)."""
    import zarr

    arr = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=(2, 32, 32, 3),
        chunks=(1, 32, 32, 3),
        dtype="uint8",
        serializer=JpegCodec(quality=95),
        compressors=None,
    )
    arr[0] = _gradient()
    back = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[0]
    assert np.abs(back.astype(int) - _gradient()).mean() < 4
