"""The store contract: shard layout, the JPEG codec, fast reads, zarr interoperability."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.codecs import (
    EMPTY,
    decode_chunk,
    encode_chunk,
    join_jpeg_tables,
    read_shard_index,
    shard_bytes,
)
from wsi_pipeline.errors import StoreError
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.store import SlideStore, list_stores, store_path
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tiling import tile_slide


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("store")
    write_slide(d / "s.svs", width=1536, height=1024, mpp=0.5, seed=2)
    tile_slide(d / "s.svs", d / "out", spec=TilingSpec(tile_px=128, patches_per_shard=8))
    return d / "out" / "s.zarr"


def test_shard_round_trip() -> None:
    chunks = [b"abc", None, b"defgh"]
    data = shard_bytes(chunks, 4)
    idx = read_shard_index(data, 4)
    assert idx[0].tolist() == [0, 3] and idx[2].tolist() == [3, 5]
    assert idx[1, 0] == EMPTY and idx[3, 0] == EMPTY
    with pytest.raises(ValueError, match="checksum"):
        read_shard_index(data[:-1] + bytes([data[-1] ^ 1]), 4)
    with pytest.raises(ValueError, match="shorter"):
        read_shard_index(b"xx", 4)


@pytest.mark.parametrize("codec", ["jpeg", "zstd", "raw"])
def test_chunk_codecs(codec: str) -> None:
    yy, xx = np.mgrid[:32, :32]
    patch = np.stack([150 + 2 * xx, 120 + 2 * yy, 200 - xx - yy], axis=-1).astype(np.uint8)
    back = decode_chunk(encode_chunk(patch, codec, quality=95), codec, (32, 32, 3))
    if codec == "jpeg":
        assert np.abs(back.astype(int) - patch).mean() < 4
    else:
        assert np.array_equal(back, patch)


def test_join_jpeg_tables_needs_a_jpeg() -> None:
    with pytest.raises(ValueError, match="not a JPEG"):
        join_jpeg_tables(b"\x00\x01", None, rgb=False)


def test_plain_zarr_reads_the_store_without_our_import(store: Path) -> None:
    """The wsi_jpeg codec is found through the installed entry point."""
    code = (
        "import sys, zarr; g = zarr.open_group(sys.argv[1], mode='r'); "
        "print(g['patches'][3].shape, g['patches'].shape[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[:3] == ["(128,", "128,", "3)"]


def test_reader_matches_zarr_and_dask(store: Path) -> None:
    st = SlideStore(store)
    idx = np.array([st.n_patches - 1, 0, 9, 9])
    got = st.reader().read(idx)
    ref = np.stack([st.group["patches"][int(i)] for i in idx])
    assert np.array_equal(got, ref)
    d = st.patches_dask()
    assert d.chunks[0][0] == 8 and np.array_equal(d[9].compute(), ref[2])
    with pytest.raises(StoreError, match="patch index out of range"):
        st.reader().read([st.n_patches])


def test_reader_is_picklable(store: Path) -> None:
    import pickle

    r = SlideStore(store).reader()
    r.read([0])
    r2 = pickle.loads(pickle.dumps(r))
    assert np.array_equal(r2.read([1]), r.read([1]))


def test_store_paths_are_safe(tmp_path: Path) -> None:
    assert store_path(tmp_path, "../../etc/passwd").parent == tmp_path
    assert store_path(tmp_path, "a/b").name == "a_b.zarr"
    with pytest.raises(StoreError, match="no such folder"):
        list_stores(tmp_path / "missing")
