"""The tile grid and extraction of one slide into its store (wsi_pipeline.tiling, driven by
``tile_batch.tile_slide``): masks, geometry, copied and resampled tiles, edges, resume of a
partly written store, bad input. Batches of slides and their manifest: test_tile_batch.py."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_pipeline.cli import main
from wsi_pipeline.errors import StoreError, TilingError
from wsi_pipeline.locks import lock_path
from wsi_pipeline.slide import open_slide
from wsi_pipeline.specs import MaskSpec, TilingSpec
from wsi_pipeline.store import (
    COORDS,
    PATCHES,
    THUMBNAIL,
    TISSUE_FRACTION,
    TISSUE_MASK,
    SlideStore,
    is_complete,
    open_store,
    shard_path,
)
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tile_batch import tile_slide, tile_slides
from wsi_pipeline.tiling import mask_slide, tiling_geometry


# ---------------------------------------------------------------------------------------------
# masks and stores (tissue_mask itself: test_tissue.py)
# ---------------------------------------------------------------------------------------------
def test_user_masks(tmp_path: Path, synth_dir: Path) -> None:
    import json

    from PIL import Image

    png = tmp_path / "m.png"
    m = np.zeros((96, 128), np.uint8)
    m[:, 64:] = 255
    Image.fromarray(m).save(png)
    spec = TilingSpec(tile_px=256, mask=MaskSpec(method="user", user_mask=str(png)))
    r = tile_slide(synth_dir / "neg.svs", tmp_path / "a", spec=spec)
    xs = SlideStore(tmp_path / "a" / "neg.zarr").coords[:, 0]
    assert r.status == "ok" and xs.min() >= 1024 - 256
    gj = tmp_path / "m.geojson"
    gj.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {},
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[0, 0], [1024, 0], [1024, 768], [0, 768], [0, 0]]],
                        },
                    }
                ],
            }
        )
    )
    spec = TilingSpec(tile_px=256, min_tissue=0.5, mask=MaskSpec(method="user", user_mask=str(gj)))
    tile_slide(synth_dir / "neg.svs", tmp_path / "b", spec=spec)
    c = SlideStore(tmp_path / "b" / "neg.zarr").coords
    assert len(c) == 12 and c[:, 0].max() < 1024 and c[:, 1].max() < 768


def test_geometry_and_mask_of_a_slide(synth_dir: Path) -> None:
    spec = TilingSpec(tile_px=128, mpp=1.0)
    with open_slide(synth_dir / "neg.svs") as s:
        with pytest.raises(
            TilingError, match=r"level 5 asked for, but the slide has levels 0\.\.1"
        ):
            tiling_geometry(s, TilingSpec(level=5))
        geo = tiling_geometry(s, spec)
        assert geo.downsample == 2.0 and geo.target_mpp == 1.0 and geo.read_level == 0
        assert geo.resampled and geo.read_px == 256 and geo.patch_l0 == 256
        lvl = tiling_geometry(s, TilingSpec(level=1))
        assert lvl.read_level == 1 and lvl.target_mpp == pytest.approx(0.5 * lvl.downsample)
        thumb, mask, ds = mask_slide(s, spec, geo)
    assert thumb.shape[:2] == mask.shape and mask.dtype == bool and mask.any()
    assert 1.0 <= ds <= geo.patch_l0 / 8


def test_mask_thumbnail_is_a_whole_number_of_level_pixels(tmp_path: Path) -> None:
    """A 0.2527 µm/px scan's 8 µm/px thumbnail (31.66 level-0 px) is taken at 32: 8 x 8 pixels
    of its 4x level, averaged exactly (Pillow's reduce of openslide's level); not when the
    mask would then resolve a patch side into fewer than 8 pixels."""
    import openslide
    from PIL import Image

    slide = tmp_path / "scan.svs"
    write_slide(slide, width=4096, height=2560, mpp=0.2527, seed=2)
    with open_slide(slide) as s:
        assert s.meta.level_downsamples[1:] == pytest.approx((4.0,))
        spec = TilingSpec(tile_px=256, mpp=0.5)
        thumb, mask, ds = mask_slide(s, spec, tiling_geometry(s, spec))
        fine = TilingSpec(tile_px=64, mpp=1.0)  # a patch is 253.3 level-0 px: 31.66 at most
        _, _, ds_fine = mask_slide(s, fine, tiling_geometry(s, fine))
    assert ds == 32.0 and thumb.shape == (*mask.shape, 3) == (80, 128, 3)
    assert ds_fine == pytest.approx(8.0 / 0.2527)
    with openslide.OpenSlide(str(slide)) as o:
        level = np.asarray(o.read_region((0, 0), 1, (1024, 640)).convert("RGB"))
    np.testing.assert_array_equal(thumb, np.asarray(Image.fromarray(level).reduce(8)))


def test_tile_native_copies_source_jpeg(synth_dir: Path, tmp_path: Path) -> None:
    r = tile_slide(synth_dir / "pos.svs", tmp_path, spec=TilingSpec(tile_px=256))
    assert r.status == "ok" and r.n_patches > 10
    st = SlideStore(tmp_path / "pos.zarr")
    g = zarr.open_group(str(st.path), mode="r")
    assert g.attrs["complete"] is True
    assert st.tiling["copied_source_tiles"] > 0
    coords = st.coords
    assert coords.dtype == np.int64 and coords.shape == (r.n_patches, 2)
    assert (coords % 256 == 0).all()
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    assert np.array_equal(order, np.arange(len(coords)))  # row-major
    assert (st.tissue_fraction >= 0.25).all()
    via_zarr = g[PATCHES][: min(8, r.n_patches)]
    via_reader = st.reader().read(np.arange(min(8, r.n_patches)))
    assert np.array_equal(via_zarr, via_reader)
    with open_slide(synth_dir / "pos.svs") as s:
        for i in range(0, r.n_patches, max(1, r.n_patches // 6)):
            x, y = coords[i]
            ref = s.read_region((int(x), int(y)), 0, (256, 256))
            got = via_reader[i] if i < len(via_reader) else st.reader().read([i])[0]
            if x + 256 <= 2560 and y + 256 <= 1792:  # copied tile: identical pixels
                assert np.array_equal(got, ref)
    assert g[THUMBNAIL].attrs["downsample"] == g[TISSUE_MASK].attrs["downsample"]


def test_tile_at_mpp_resamples_once(synth_dir: Path, tmp_path: Path) -> None:
    spec = TilingSpec(tile_px=128, mpp=1.0, codec="zstd", scaled_decode=False)  # full decode
    r = tile_slide(synth_dir / "pos.svs", tmp_path, spec=spec)
    st = SlideStore(tmp_path / "pos.zarr")
    assert st.tiling["downsample"] == pytest.approx(2.0) and st.tiling["mpp"] == 1.0
    assert st.tiling["patch_l0"] == 256
    with open_slide(synth_dir / "pos.svs") as s:
        for i in (0, r.n_patches // 2):
            x, y = st.coords[i]
            ref = s.read_region_mpp((int(x), int(y)), (128, 128), 1.0)
            got = st.reader().read([i])[0]
            assert np.abs(got.astype(int) - ref).max() <= 1  # lossless store of the same pixels


@pytest.mark.parametrize(
    ("scan_mpp", "target_mpp", "scale", "size", "tile_px"),
    [
        # patches on the 1/2-scale grid (the synthetic benchmark slide's case)
        (0.5, 1.0, 2, (2600, 1900), 128),
        # CAMELYON16-like scan: 2.06x, most patches start off that grid
        (0.243, 0.5, 2, (2600, 1900), 128),
        # TCGA-like 40x scan: 1.98x, decoded at 1/2 and enlarged ~1 %
        (0.2527, 0.5, 2, (2600, 1900), 128),
        # 3.96x from level 0 (a slide too small for a level 1: long side < 2,048 px)
        (0.2527, 1.0, 4, (2040, 2040), 128),
    ],
)
def test_scaled_decode_keeps_patches_and_pixels(
    tmp_path: Path,
    scan_mpp: float,
    target_mpp: float,
    scale: int,
    size: tuple[int, int],
    tile_px: int,
) -> None:
    """Decoding JPEG tiles at 1/2 or 1/4 scale keeps exactly the same patches (coords and
    tissue fractions) as full decoding, for every patch wherever it lies on the scaled grid.
    Its pixels (stored losslessly), over every patch: within 3 grey levels of openslide + area
    resize on average (measured 0.6-1.4), each no more than 1 worse than full decoding + Lanczos
    and at most 4 (measured: 3.8, a fine-textured patch of the x4 case at 1/4 scale + the
    bilinear warp, where full decoding gives 2.8; 3.2 on the 0.243 scan), and within 3.5 of
    full decoding."""
    import openslide
    from PIL import Image

    from wsi_pipeline.tiffsrc import open_tiff_level
    from wsi_pipeline.tiling import SlidePlan, decode_scale, prepare_slide

    slide = tmp_path / "scan.svs"
    width, height = size
    write_slide(slide, width=width, height=height, mpp=scan_mpp, seed=3, n_lesions=2)
    stores = {}
    for sd in (True, False):
        spec = TilingSpec(tile_px=tile_px, mpp=target_mpp, codec="zstd", scaled_decode=sd)
        tile_slide(slide, tmp_path / str(sd), spec=spec)
        stores[sd] = SlideStore(tmp_path / str(sd) / "scan.zarr")
        plan = prepare_slide(slide, tmp_path / f"plan{sd}", spec=spec)
        assert isinstance(plan, SlidePlan) and plan.geometry.read_level == 0
        tiff = open_tiff_level(plan.path, 0, plan.level_wh)
        assert tiff is not None and decode_scale(tiff, plan) == (scale if sd else 1)
        tiff.close()
    a, b = stores[True], stores[False]
    assert a.n_patches == b.n_patches >= 8
    assert np.array_equal(a.coords, b.coords)
    assert np.array_equal(a.group[TISSUE_FRACTION][:], b.group[TISSUE_FRACTION][:])
    patch_l0 = a.tiling["patch_l0"]
    off_grid = (np.round(a.coords / 1.0) % scale != 0).any(axis=1).mean()
    assert off_grid > 0.3 or float(patch_l0).is_integer()  # real scans: most start off the grid
    idx = list(range(a.n_patches))
    pa, pb = a.reader().read(idx), b.reader().read(idx)
    rp = math.ceil(patch_l0)  # read whole; the patch is its box of side patch_l0
    mad = []
    with openslide.OpenSlide(str(slide)) as s:
        for i in idx:
            x, y = (int(v) for v in a.coords[i])
            if x + rp > width or y + rp > height:
                continue  # past the edge openslide pads black, we pad white
            ref = s.read_region((x, y), 0, (rp, rp)).convert("RGB")
            box = (0, 0, patch_l0, patch_l0)
            ref = ref.resize((tile_px, tile_px), Image.Resampling.BOX, box=box)
            ref = np.asarray(ref).astype(int)
            da, db = np.abs(pa[i].astype(int) - ref).mean(), np.abs(pb[i].astype(int) - ref).mean()
            assert da <= 4.0 and da <= db + 1.0, (i, da, db)
            assert np.abs(pa[i].astype(int) - pb[i]).mean() <= 3.5
            mad.append(da)
    assert len(mad) >= 8 and np.mean(mad) <= 3.0


def test_a_level_within_two_percent_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A TCGA-like 0.2527 µm/px scan tiled at 1.0 µm/px is read from its level 1 (1.011 µm/px,
    1.1 % coarser), as a 0.25 µm/px scan is, and enlarged in the one resample: its patches
    match openslide's read of that level + resize; not from level 0 at 1/4. An unfinished
    store an older release was reading from level 0 is tiled again, not finished from two
    levels."""
    import openslide
    from PIL import Image

    from wsi_pipeline.tiling import prepare_slide

    slide = tmp_path / "scan.svs"
    write_slide(slide, width=2600, height=1900, mpp=0.2527, seed=4, n_lesions=1)
    spec = TilingSpec(tile_px=64, mpp=1.0, codec="zstd")
    r = tile_slide(slide, tmp_path / "a", spec=spec)
    st = SlideStore(tmp_path / "a" / "scan.zarr")
    assert r.status == "ok" and st.n_patches >= 8
    assert st.tiling["read_level"] == 1 and st.tiling["patch_l0"] == pytest.approx(253.26, 1e-3)
    side = st.tiling["patch_l0"] / 4.0  # level-1 px of a patch: 63.3
    got = st.reader().read(np.arange(st.n_patches))
    with openslide.OpenSlide(str(slide)) as s:
        assert s.level_downsamples[1] == pytest.approx(4.0)
        for i, (x, y) in enumerate(st.coords):
            if x + 254 > 2600 or y + 254 > 1900:
                continue  # past the edge openslide pads black, we pad white
            # from level-1 pixel (x0, y0) (openslide interpolates regions starting between
            # pixels), the patch's exact box of it
            x0, y0 = int(x) // 4, int(y) // 4
            ref = s.read_region((4 * x0, 4 * y0), 1, (66, 66)).convert("RGB")
            box = (x / 4 - x0, y / 4 - y0, x / 4 - x0 + side, y / 4 - y0 + side)
            ref = np.asarray(ref.resize((64, 64), Image.Resampling.BILINEAR, box=box))
            assert np.abs(got[i].astype(int) - ref).mean() <= 0.5

    # an unfinished store of an older release, read from level 0: tiled again from level 1
    out = tmp_path / "b"
    plan = prepare_slide(slide, out, spec=spec)
    g = zarr.open_group(plan.store, mode="r+")
    g.attrs["tiling"] = {**g.attrs["tiling"], "read_level": 0}
    with caplog.at_level("WARNING"):
        r2 = tile_slide(slide, out, spec=spec)
    assert "read from another level; tiling again" in caplog.text
    b = SlideStore(out / "scan.zarr")
    assert r2.status == "ok" and b.tiling["read_level"] == 1
    assert np.array_equal(b.reader().read(np.arange(b.n_patches)), got)


def test_overlap_and_edges(synth_dir: Path, tmp_path: Path) -> None:
    spec = TilingSpec(tile_px=256, overlap_px=128, min_tissue=0.0)
    tile_slide(synth_dir / "tiny.svs", tmp_path / "pad", spec=spec)
    st = SlideStore(tmp_path / "pad" / "tiny.zarr")
    assert st.n_patches == 1  # smaller than one tile: one padded patch
    p = st.reader().read([0])[0]
    assert (p[160:, :] >= 250).all() and (p[:, 210:] >= 250).all()  # white padding
    drop = TilingSpec(tile_px=256, edge="drop")
    r = tile_slide(synth_dir / "tiny.svs", tmp_path / "drop", spec=drop)
    assert r.status == "no_tissue" and r.n_patches == 0
    r = tile_slide(synth_dir / "neg.svs", tmp_path / "ov", spec=spec)
    c = SlideStore(tmp_path / "ov" / "neg.zarr").coords
    assert set(np.unique(np.diff(np.unique(c[:, 0])))) == {128}


def test_patches_read_at_their_level_are_its_pixels(tmp_path: Path) -> None:
    """Patches read at their level without resampling (an overlap; zstd, lossless) are the
    level's pixels at their coordinates: inside the level views of the thread's band of decoded
    tiles, at its right and bottom edges (the slide is no multiple of the tile) padded white,
    in one thread and in two."""
    from wsi_pipeline.tiffsrc import open_tiff_level

    path = tmp_path / "odd.svs"
    write_slide(path, width=1000, height=740, mpp=0.5, seed=11, tissue_fraction=0.9)
    spec = TilingSpec(
        tile_px=128, overlap_px=64, codec="zstd", min_tissue=0.0, patches_per_shard=16
    )
    tiff = open_tiff_level(str(path), 0, (1000, 740))
    assert tiff is not None and tiff.compression == 7  # JPEG tiles, read directly
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        (r,) = tile_slides([path], out, spec=spec, workers=workers, progress=False)
        st = SlideStore(out / "odd.zarr")
        coords, got = st.coords, st.reader().read(np.arange(st.n_patches))
        assert r.status == "ok" and len(coords) > 100
        assert coords[:, 0].max() + 128 > 1000 and coords[:, 1].max() + 128 > 740  # edges in
        for (x, y), patch in zip(coords.tolist(), got):
            assert np.array_equal(patch, tiff.read(x, y, 128, 128)), (workers, x, y)


def test_no_tissue_store_is_complete_and_empty(synth_dir: Path, tmp_path: Path) -> None:
    r = tile_slide(synth_dir / "blank.svs", tmp_path)
    assert r.status == "no_tissue" and r.n_patches == 0
    g = open_store(tmp_path / "blank.zarr")
    assert g[PATCHES].shape[0] == 0 and g[COORDS].shape == (0, 2)
    assert g.attrs["tiling"]["status"] == "no_tissue"


def test_mpp_missing(testdata: Path, tmp_path: Path) -> None:
    tcga = testdata / "aperio/tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(
        TilingError,
        match=r"tcga.*--mpp 0.5 asked for, but the slide has no "
        r"resolution \(mpp\) metadata.*--slide-mpp",
    ):
        tile_slide(tcga, tmp_path, spec=TilingSpec(mpp=0.5))
    r = tile_slide(tcga, tmp_path, spec=TilingSpec(mpp=0.5, tile_px=256), slide_mpp=0.25)
    assert r.status == "ok"
    st = SlideStore(tmp_path / "tcga-cr-7395-01a-01-ts1.zarr")
    assert st.meta.mpp == 0.25 and st.meta.mpp_source == "user"
    assert st.tiling["read_level"] == 1  # the 2x level, no level-0 decode
    r = tile_slide(tcga, tmp_path / "lvl", spec=TilingSpec(level=1, tile_px=128))
    assert (
        r.status == "ok"
        and SlideStore(tmp_path / "lvl" / f"{tcga.stem}.zarr").tiling["mpp"] is None
    )


def test_store_version_and_unfinished_are_refused(synth_dir: Path, tmp_path: Path) -> None:
    tile_slide(synth_dir / "neg.svs", tmp_path)
    sp = tmp_path / "neg.zarr"
    g = zarr.open_group(str(sp), mode="r+")
    g.attrs["wsi_pipeline"] = {"store_version": 99, "package_version": "9.0"}
    with pytest.raises(StoreError, match=r"neg\.zarr: store layout version 99 .*9\.0"):
        open_store(sp)
    g.attrs["wsi_pipeline"] = {"store_version": 1, "package_version": "0.1.0"}
    g.attrs["complete"] = False
    with pytest.raises(StoreError, match="unfinished"):
        SlideStore(sp)
    with pytest.raises(StoreError, match="no zarr store here"):
        open_store(tmp_path / "missing.zarr")


# ---------------------------------------------------------------------------------------------
# usage errors, resume of a store, bad input
# ---------------------------------------------------------------------------------------------
def test_tile_usage_errors(synth_dir: Path, tmp_path: Path) -> None:
    assert (
        main(
            [
                "tile",
                str(synth_dir / "neg.svs"),
                "--out",
                str(tmp_path / "o"),
                "--mpp",
                "1",
                "--level",
                "1",
            ]
        )
        == 2
    )
    assert (
        main(["tile", str(synth_dir / "neg.svs"), "--out", str(tmp_path / "o"), "--overlap", "300"])
        == 2
    )
    assert main(["tile", "--out", str(tmp_path / "o")]) == 2


def test_resume_after_partial_write(synth_dir: Path, tmp_path: Path) -> None:
    spec = TilingSpec(tile_px=128, patches_per_shard=16)
    ref = tile_slide(synth_dir / "pos.svs", tmp_path / "ref", spec=spec)
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "ref", out)
    store = out / "pos.zarr"
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["complete"] = False  # as if killed before the end
    n_shards = -(-ref.n_patches // 16)
    shard_path(store, n_shards - 1).unlink()  # last shard never written
    torn = shard_path(store, 1)
    torn.write_bytes(torn.read_bytes()[:-10])  # a torn shard is redone too
    before = shard_path(store, 0).stat().st_mtime_ns
    r = tile_slide(synth_dir / "pos.svs", out, spec=spec)
    assert r.status == "ok" and is_complete(store)
    assert shard_path(store, 0).stat().st_mtime_ns == before  # finished shards kept
    a = SlideStore(store).reader().read(np.arange(r.n_patches))
    b = SlideStore(tmp_path / "ref" / "pos.zarr").reader().read(np.arange(ref.n_patches))
    assert np.array_equal(a, b)
    # a changed file is not resumed: the store is redone
    g.attrs["complete"] = False
    slide2 = tmp_path / "pos.svs"
    write_slide(slide2, width=2560, height=1792, mpp=0.5, seed=99, n_lesions=1)
    shutil.move(store, out / "keep.zarr")
    shutil.move(out / "keep.zarr", out / "pos.zarr")
    r2 = tile_slide(slide2, out, spec=spec)
    assert r2.status == "ok"
    assert SlideStore(store).meta.file_size == slide2.stat().st_size


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("mpp", [None, 1.0])
def test_corrupt_tile_mid_slide(
    synth_dir: Path, tmp_path: Path, mpp: float | None, workers: int, caplog
) -> None:
    """A file that opens but has a broken tile in the tissue fails with the region named, in
    one line: on the copy path and on the resampled path (tiles decoded at 1/2 scale). With
    two threads the slide's other tasks, running or queued when its first one failed, are let
    go (the batch went down on them: ``KeyError``), and its store's lock with the last one."""
    import tifffile

    bad = tmp_path / "in" / "bad.svs"
    bad.parent.mkdir()
    shutil.copy(synth_dir / "pos.svs", bad)
    st_ok = tile_slide(synth_dir / "pos.svs", tmp_path / "ref", spec=TilingSpec(tile_px=256))
    coords = SlideStore(tmp_path / "ref" / "pos.zarr").coords
    x, y = coords[len(coords) // 2]
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[0]
        idx = (int(y) // 256) * ((page.imagewidth + 255) // 256) + int(x) // 256
        off, n = int(page.dataoffsets[idx]), int(page.databytecounts[idx])
    with open(bad, "r+b") as fh:
        fh.seek(off + n - 40)
        fh.write(b"\x00" * 40)  # destroys the end of the tile, including its EOI marker
    spec = TilingSpec(tile_px=256 if mpp is None else 128, mpp=mpp, patches_per_shard=16)
    res = tile_slides(
        [bad, synth_dir / "neg.svs"], tmp_path / "out", spec=spec, progress=False, workers=workers
    )
    assert st_ok.status == "ok"
    assert res[0].status == "failed" and "cannot be decoded" in res[0].error
    assert mpp is not None or f"x={x} y={y}" in res[0].error
    assert "bad.svs" in res[0].error
    assert res[1].status == "ok"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [res[0].error]
    assert not lock_path(tmp_path / "out" / "bad.zarr").exists()
    assert not is_complete(tmp_path / "out" / "bad.zarr")
