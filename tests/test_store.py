"""The store contract: keys, fast reads, zarr interoperability, and "is this store current?"."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from wsi_pipeline.errors import ConfigError, StoreError
from wsi_pipeline.specs import SlideMeta, TilingSpec
from wsi_pipeline.store import (
    COORDS,
    DONE,
    FRESH,
    PATCHES,
    RESUME,
    STALE,
    THUMBNAIL,
    TISSUE_FRACTION,
    TISSUE_MASK,
    SlideStore,
    finish_store,
    is_complete,
    list_stores,
    patch_count,
    read_coords,
    shard_path,
    store_path,
    store_problems,
    store_state,
    unfinished_shards,
    write_array,
)
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tile_batch import tile_slide

SPEC = TilingSpec(tile_px=128, patches_per_shard=8)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("slide")
    write_slide(d / "s.svs", width=1536, height=1024, mpp=0.5, seed=2)
    return d / "s.svs"


@pytest.fixture(scope="module")
def store(slide: Path) -> Path:
    tile_slide(slide, slide.parent / "out", spec=SPEC)
    return slide.parent / "out" / "s.zarr"


@pytest.fixture()
def store_copy(store: Path, tmp_path: Path) -> Path:
    """A copy of the complete store that a test may change."""
    return Path(shutil.copytree(store, tmp_path / "s.zarr"))


def test_layout_keys(store: Path) -> None:
    """The keys of docs/store.md, as plain zarr sees them."""
    assert (PATCHES, COORDS, TISSUE_FRACTION) == ("patches", "coords", "tissue_fraction")
    assert (THUMBNAIL, TISSUE_MASK) == ("thumbnail", "tissue_mask")
    g = zarr.open_group(str(store), mode="r")
    assert set(g.array_keys()) == {PATCHES, COORDS, TISSUE_FRACTION, THUMBNAIL, TISSUE_MASK}
    n = g[COORDS].shape[0]
    assert g[PATCHES].shape == (n, 128, 128, 3) and g[TISSUE_FRACTION].shape == (n,)
    assert g[THUMBNAIL].attrs["downsample"] == g[TISSUE_MASK].attrs["downsample"]
    assert g[THUMBNAIL].shape[:2] == g[TISSUE_MASK].shape
    assert g.attrs["tiling"]["n_patches"] == n == patch_count(store)
    assert np.array_equal(read_coords(store, 2, 5), g[COORDS][2:5])


def _meta() -> SlideMeta:
    return SlideMeta(
        path="s.svs",
        file_size=1,
        backend="openslide",
        vendor=None,
        width=10,
        height=10,
        level_dimensions=((10, 10),),
        level_downsamples=(1.0,),
    )


def test_attributes_written_in_one_write_each(tmp_path: Path, monkeypatch) -> None:
    """A batch of attributes is one write of zarr.json (zarr's ``attrs.update`` writes it once
    per key), with the same attributes in the same order; a new store is written as plain
    files, not through zarr's store (whose every file operation takes a thread of its own)."""
    from wsi_pipeline import store as store_mod

    writes: list[str] = []
    orig = zarr.storage.LocalStore.set

    async def counting_set(self, key, value, *args, **kwargs):  # type: ignore[no-untyped-def]
        writes.append(key)
        return await orig(self, key, value, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting_set)
    path = store_mod.create_store(tmp_path / "a.zarr", slide_id="a", meta=_meta(), tiling={"x": 1})
    g = store_mod.open_store(path, require_complete=False, mode="r+")
    assert writes == [] and sorted(p.name for p in (tmp_path / "a.zarr").iterdir()) == ["zarr.json"]
    assert list(g.attrs) == ["wsi_pipeline", "slide_id", "slide", "tiling", "complete"]
    attrs = {"downsample": 2.0, "method": "otsu", "params": {}, "tissue_fraction": 0.5}
    arr = write_array(g, "m", np.ones((4, 4), bool), chunks=(4, 4), attrs=attrs)
    assert writes == ["m/zarr.json", "m/c/0/0", "m/zarr.json"]  # metadata, data, attributes
    assert dict(zarr.open_group(str(tmp_path / "a.zarr"))["m"].attrs) == attrs == dict(arr.attrs)
    writes.clear()
    store_mod.create_patches_array(
        g, n=3, tile_px=8, codec="jpeg", quality=90, patches_per_shard=2, attrs={"mpp": 0.5}
    )
    assert writes == ["patches/zarr.json"]
    p = zarr.open_group(str(tmp_path / "a.zarr"))[PATCHES]
    assert dict(p.attrs) == {"codec": "jpeg", "quality": 90, "mpp": 0.5}
    writes.clear()
    twin = zarr.open_group(str(tmp_path / "a.zarr"), mode="r+")
    zarr_doc = twin.update_attributes({"tiling": {"x": 1, "status": "ok", "n_patches": 3}})
    zarr_doc.update_attributes({"complete": True})
    zarr_bytes = (tmp_path / "a.zarr" / "zarr.json").read_bytes()
    g.update_attributes({"complete": False, "tiling": {"x": 1}})  # as it was
    writes.clear()
    store_mod.mark_complete(tmp_path / "a.zarr", status="ok", n_patches=3)
    assert writes == [] and is_complete(tmp_path / "a.zarr")  # written as a plain file
    # the document zarr's update_attributes writes, byte for byte
    assert (tmp_path / "a.zarr" / "zarr.json").read_bytes() == zarr_bytes
    assert zarr.open_group(str(tmp_path / "a.zarr")).attrs["tiling"] == {
        "x": 1,
        "status": "ok",
        "n_patches": 3,
    }
    with pytest.raises(StoreError, match="not a group"):
        store_mod.mark_complete(tmp_path / "a.zarr" / "m")


@pytest.mark.parametrize("codec", ["jpeg", "zstd", "raw"])
def test_a_new_store_is_the_files_zarr_writes(tmp_path: Path, codec: str) -> None:
    """create_store writes a store without zarr (a third of a second to import in every tiling
    process): every file, edge chunks padded, and every ``zarr.json`` (the patches' for each
    codec) is byte for byte the one zarr writes, and the tiler's process never imports zarr."""
    import asyncio

    from zarr.core.group import AsyncGroup
    from zarr.core.sync import sync

    from wsi_pipeline import store as store_mod

    rng = np.random.default_rng(0)
    spec = TilingSpec(tile_px=8, patches_per_shard=2, codec=codec)
    tiling = {"spec": spec.to_dict(), "slide_mpp_override": None, "read_level": 0}
    tiling |= {"mpp": 0.5, "downsample": 1.0}
    thumb = rng.integers(0, 256, (600, 1100, 3), dtype=np.uint8)  # 2 x 3 chunks, edges padded
    mask = rng.random((600, 1100)) > 0.5
    coords = rng.integers(0, 10**6, (70000, 2))  # 2 chunks
    frac = rng.random(70000).astype(np.float32)
    arrays = [
        *store_mod.mask_arrays(thumb, mask, downsample=4.0, spec=spec.mask),
        *store_mod.grid_arrays(coords, frac, spec, tiling),
    ]
    store_mod.create_store(
        tmp_path / "a.zarr", slide_id="a", meta=_meta(), tiling=tiling, arrays=arrays
    )
    ours = {
        p.relative_to(tmp_path / "a.zarr").as_posix(): p.read_bytes()
        for p in (tmp_path / "a.zarr").rglob("*")
        if p.is_file()
    }
    attrs = json.loads(ours["zarr.json"])["attributes"]
    docs: dict = {}

    async def build() -> None:
        g = await AsyncGroup.from_store(zarr.storage.MemoryStore(docs), attributes=attrs)
        await asyncio.gather(*(g.create_array(**store_mod._zarr_kwargs(kw)) for kw in arrays))

    sync(build())
    theirs = {k: v.to_bytes() for k, v in docs.items()}
    assert sorted(ours) == sorted(theirs) and len(ours) == 1 + 4 + 6 + 2 + 2 + 2 + 1
    for key in theirs:
        assert ours[key] == theirs[key], key
    st = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert np.array_equal(st[THUMBNAIL][...], thumb) and np.array_equal(st[COORDS][...], coords)
    assert np.array_equal(st[TISSUE_MASK][...], mask) and np.array_equal(
        st[TISSUE_FRACTION][...], frac
    )


def test_a_new_store_cut_short_is_never_resumed(tmp_path: Path, monkeypatch) -> None:
    """A new store is written chunks first, then the arrays' metadata, then the group's: killed
    after any of its files, it is tiled afresh, never resumed with an array short of its chunks
    (coords reading as zeros)."""
    import builtins

    from wsi_pipeline import store as store_mod

    spec = TilingSpec(tile_px=8, patches_per_shard=2)
    coords = np.array([[0, 0], [8, 0], [0, 8]], np.int64)
    tiling = {"spec": spec.to_dict(), "slide_mpp_override": None, "read_level": 0}
    tiling |= {"mpp": 0.5, "downsample": 1.0}
    thumb, mask = np.full((4, 5, 3), 200, np.uint8), np.ones((4, 5), bool)
    arrays = [
        *store_mod.mask_arrays(thumb, mask, downsample=4.0, spec=spec.mask),
        *store_mod.grid_arrays(coords, np.ones(3, np.float32), spec, tiling),
    ]

    def create(path: Path) -> None:
        store_mod.create_store(path, slide_id="a", meta=_meta(), tiling=tiling, arrays=arrays)

    whole = tmp_path / "whole.zarr"
    create(whole)
    n_files = sum(1 for f in whole.rglob("*") if f.is_file())
    assert store_state(whole, spec, file_size=1, slide_mpp=None) == RESUME
    assert np.array_equal(read_coords(whole), coords)
    assert store_problems(whole, 0, 2)[:1] == ["'coords' has shape (3, 2) (expected 0 patches)"]

    def dying_open(k: int) -> Callable[..., Any]:
        """``open`` that lets ``k`` files be written, then fails like a full disk."""
        opened = 0

        def fake(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal opened
            if "w" in str(args[1] if len(args) > 1 else kwargs.get("mode", "r")):
                opened += 1
                if opened > k:
                    raise OSError(28, "No space left on device")
            return builtins.open(*args, **kwargs)

        return fake

    for k in range(n_files):
        monkeypatch.setattr(store_mod, "open", dying_open(k), raising=False)
        with pytest.raises(OSError):
            create(tmp_path / f"cut{k}.zarr")
        monkeypatch.undo()
        state = store_state(tmp_path / f"cut{k}.zarr", spec, file_size=1, slide_mpp=None)
        assert state == FRESH, (k, state)


def test_plain_zarr_reads_the_store_without_our_import(store: Path) -> None:
    """The wsi_jpeg codec is found through the installed entry point."""
    code = (
        "import sys, zarr; g = zarr.open_group(sys.argv[1], mode='r'); "
        f"print(g[{PATCHES!r}][3].shape, g[{PATCHES!r}].shape[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[:3] == ["(128,", "128,", "3)"]


def test_reader_matches_zarr_and_dask(store: Path) -> None:
    st = SlideStore(store)
    idx = np.array([st.n_patches - 1, 0, 9, 9])
    got = st.reader().read(idx)
    ref = np.stack([st.group[PATCHES][int(i)] for i in idx])
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


def test_reader_refuses_a_torn_shard(store_copy: Path) -> None:
    p = shard_path(store_copy, 0)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(StoreError, match="corrupt shard 0: shard index checksum mismatch"):
        SlideStore(store_copy).reader().read([0])


def test_store_paths_are_safe(tmp_path: Path) -> None:
    assert store_path(tmp_path, "../../etc/passwd").parent == tmp_path
    assert store_path(tmp_path, "a/b").name == "a_b.zarr"
    with pytest.raises(StoreError, match="no such folder"):
        list_stores(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# "is this store current?"
# ---------------------------------------------------------------------------------------------
def test_store_state_of_a_complete_store(store: Path, slide: Path, tmp_path: Path) -> None:
    size = slide.stat().st_size
    assert store_state(store, SPEC, file_size=size, slide_mpp=None) == DONE
    assert store_state(store, TilingSpec(tile_px=256), file_size=size, slide_mpp=None) == STALE
    assert store_state(store, SPEC, file_size=size + 1, slide_mpp=None) == STALE
    assert store_state(store, SPEC, file_size=None, slide_mpp=None) == STALE
    assert store_state(store, SPEC, file_size=size, slide_mpp=0.5) == STALE
    assert store_state(tmp_path / "none.zarr", SPEC, file_size=size, slide_mpp=None) == FRESH


def test_store_state_of_an_unfinished_store(store_copy: Path, slide: Path) -> None:
    size = slide.stat().st_size
    g = zarr.open_group(str(store_copy), mode="r+")
    g.attrs["complete"] = False
    assert store_state(store_copy, SPEC, file_size=size, slide_mpp=None) == RESUME
    # the same keys decide resuming: another tiling, file or slide mpp is started afresh
    assert store_state(store_copy, TilingSpec(tile_px=256), file_size=size, slide_mpp=None) == FRESH
    assert store_state(store_copy, SPEC, file_size=size + 1, slide_mpp=None) == FRESH
    assert store_state(store_copy, SPEC, file_size=size, slide_mpp=0.5) == FRESH
    shutil.rmtree(store_copy / COORDS)  # killed before the grid was written
    assert store_state(store_copy, SPEC, file_size=size, slide_mpp=None) == FRESH


def test_store_state_of_another_layout_version(store_copy: Path, slide: Path) -> None:
    g = zarr.open_group(str(store_copy), mode="r+")
    g.attrs["wsi_pipeline"] = {"store_version": 99, "package_version": "9.0"}
    assert store_state(store_copy, SPEC, file_size=slide.stat().st_size, slide_mpp=None) == FRESH
    (store_copy / "zarr.json").write_text("{not json")
    assert store_state(store_copy, SPEC, file_size=slide.stat().st_size, slide_mpp=None) == FRESH


def test_unfinished_shards_and_finish(store_copy: Path) -> None:
    n = patch_count(store_copy)
    n_shards = -(-n // 8)
    assert n_shards >= 3 and unfinished_shards(store_copy, n, 8) == ()
    shard_path(store_copy, 1).unlink()
    torn = shard_path(store_copy, n_shards - 1)
    torn.write_bytes(torn.read_bytes()[:-10])
    assert unfinished_shards(store_copy, n, 8) == (1, n_shards - 1)
    g = zarr.open_group(str(store_copy), mode="r+")
    g.attrs["complete"] = False
    with pytest.raises(StoreError, match=r"s\.zarr: shard 1 missing or torn after extraction"):
        finish_store(store_copy, status="ok", n_patches=n, patches_per_shard=8)
    assert zarr.open_group(str(store_copy), mode="r").attrs["complete"] is False


# ---------------------------------------------------------------------------------------------
# "complete" means every array is whole (finish_store)
# ---------------------------------------------------------------------------------------------
def _unfinish(store: Path) -> int:
    """Mark a copy unfinished again (as before its last step); returns its patch count."""
    zarr.open_group(str(store), mode="r+").attrs["complete"] = False
    return patch_count(store)


def test_finish_store_marks_a_whole_store_complete(store_copy: Path) -> None:
    n = _unfinish(store_copy)
    assert store_problems(store_copy, n, 8) == []
    finish_store(store_copy, status="ok", n_patches=n, patches_per_shard=8)
    assert is_complete(store_copy)


def test_finish_store_refuses_a_lost_thumbnail_chunk(store_copy: Path) -> None:
    """The issue's store: a thumbnail whose chunk was lost reads as all zeros."""
    n = _unfinish(store_copy)
    before = {p: p.read_bytes() for p in store_copy.rglob("*") if p.is_file()}
    chunk = next(p for p in sorted((store_copy / THUMBNAIL / "c").rglob("*")) if p.is_file())
    chunk.unlink()
    del before[chunk]
    assert not zarr.open_group(str(store_copy), mode="r")[THUMBNAIL][...].any()  # all zero
    with pytest.raises(
        StoreError,
        match=r"s\.zarr: 'thumbnail': 1 of 1 chunks missing; not marked complete$",
    ):
        finish_store(store_copy, status="ok", n_patches=n, patches_per_shard=8)
    assert not is_complete(store_copy)
    # nothing else was touched: a rerun resumes from what is there
    assert {p: p.read_bytes() for p in store_copy.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: shutil.rmtree(s / TISSUE_MASK), r"no 'tissue_mask' array"),
        (lambda s: shutil.rmtree(s / COORDS), r"no 'coords' array"),
        (
            lambda s: write_array(
                zarr.open_group(str(s), mode="r+"),
                TISSUE_MASK,
                np.ones((3, 4), bool),
                chunks=(8, 8),
            ),
            r"'tissue_mask' \(3, 4\) is not on the thumbnail's grid",
        ),
        (
            lambda s: write_array(
                zarr.open_group(str(s), mode="r+"), TISSUE_FRACTION, np.ones(2, "f4"), chunks=(8,)
            ),
            r"'tissue_fraction' has shape \(2,\) \(expected \d+ patches\)",
        ),
    ],
)
def test_finish_store_refuses_missing_or_misshapen_arrays(
    store_copy: Path, damage: Callable[[Path], object], message: str
) -> None:
    n = _unfinish(store_copy)
    damage(store_copy)
    with pytest.raises(StoreError, match=message):
        finish_store(store_copy, status="ok", n_patches=n, patches_per_shard=8)
    assert not is_complete(store_copy)


def test_finish_store_refuses_a_group_document_that_is_not_json(store_copy: Path) -> None:
    """The group's zarr.json torn (half written by a crash, or damaged) between the shards and
    the finish: one error naming the store, nothing marked complete, the file left as found."""
    n = _unfinish(store_copy)
    doc = store_copy / "zarr.json"
    torn = doc.read_bytes()[:100]
    doc.write_bytes(torn)
    with pytest.raises(StoreError, match=r"s\.zarr: unreadable store \(JSONDecodeError\)"):
        finish_store(store_copy, status="ok", n_patches=n, patches_per_shard=8)
    assert doc.read_bytes() == torn and not is_complete(store_copy)


def test_finish_store_refuses_a_wrong_patch_count(store_copy: Path) -> None:
    n = _unfinish(store_copy)
    with pytest.raises(StoreError, match=r"'coords' has shape \(\d+, 2\) \(expected \d+ patches\)"):
        finish_store(store_copy, status="ok", n_patches=n + 1, patches_per_shard=8)


def test_arrays_equal_to_their_fill_value_are_written(tmp_path: Path) -> None:
    """An all-False mask (a slide without tissue) is on disk, so "missing" means lost."""
    from wsi_pipeline.store import _array_facts

    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    arr = write_array(g, TISSUE_MASK, np.zeros((40, 30), bool), chunks=(16, 16))
    facts = _array_facts(tmp_path / "g.zarr" / TISSUE_MASK, whole=True)
    assert arr.nchunks == 6 and facts == ((40, 30), 0, 6)  # shape, none missing, of 6


def test_list_stores_selects_slides_and_refuses_unknown_ids(tmp_path: Path) -> None:
    for name in ("b", "a", "c_1"):
        (tmp_path / f"{name}.zarr").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_stores(tmp_path)] == ["a.zarr", "b.zarr", "c_1.zarr"]
    picked = list_stores(tmp_path, slide_ids=["c 1", "a"])  # sanitised like store names
    assert [p.name for p in picked] == ["a.zarr", "c_1.zarr"]
    with pytest.raises(
        ConfigError, match=r"no store for slide id\(s\) 'zz', 'yy' \(3 stores here\)"
    ):
        list_stores(tmp_path, slide_ids=["a", "zz", "yy"])


def test_predict_and_heatmap_refuse_an_unknown_slide_id(
    small_cohort: tuple[Path, Path], fast_run: Path, tmp_path: Path, capsys
) -> None:
    """Exit 2 with one line, not 'predicted 0 of 0 slides' and exit 0."""
    from wsi_pipeline.cli import main

    stores, _ = small_cohort
    for cmd in ("predict", "heatmap"):
        args = [cmd, str(stores), "--run", str(fast_run), "--out", str(tmp_path / cmd)]
        assert main([*args, "--slide", "no_such_slide", "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no store for slide id(s) 'no_such_slide'" in err[0]


def test_store_documents_read_without_zarr_name_what_is_wrong(store_copy: Path) -> None:
    """The tiler reads a store's group and ``coords`` documents as JSON (no zarr): a ``coords``
    document gone gives one line naming the store, and a group document whose attributes are
    not a mapping is an unreadable store (tiled afresh), not a plausible empty one."""
    assert patch_count(store_copy) > 0
    (store_copy / COORDS / "zarr.json").unlink()
    with pytest.raises(StoreError, match="no readable 'coords' array") as err:
        patch_count(store_copy)
    assert str(store_copy) in str(err.value) and "\n" not in str(err.value)
    doc = json.loads((store_copy / "zarr.json").read_text())
    (store_copy / "zarr.json").write_text(json.dumps({**doc, "attributes": [1, 2]}))
    assert not is_complete(store_copy)
    assert store_state(store_copy, SPEC, file_size=1, slide_mpp=None) == FRESH
