"""Faults after tiling: a corrupt chunk inside one real store fails that slide, not the batch.

A real store of the ``small_cohort`` fixture is copied and the JPEG bytes of its inner chunks are
overwritten on disk (the shard index stays valid, as after bit rot or a bad copy). Each stage must
report that store in one line naming it, exit 1, and finish the others: ``predict`` (its row in
predictions.csv carries the error), ``evaluate``, ``features`` and ``heatmap`` (a corrupt
``scores`` chunk). Training refuses the run with one line (the run is left unfinished, so nothing
takes it for a model); once the store is re-tiled, the same training gives the clean model.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST

from wsi_pipeline import runs
from wsi_pipeline.cli import main
from wsi_pipeline.codecs import EMPTY, index_nbytes
from wsi_pipeline.data import BagDataset
from wsi_pipeline.errors import StoreError, worker_message
from wsi_pipeline.prediction import read_predictions
from wsi_pipeline.specs import TrainConfig
from wsi_pipeline.store import PatchReader, shard_path
from wsi_pipeline.training import train

BAD = "synth_003"


def corrupt_chunks(store: Path, *, first_only: bool = False) -> None:
    """Overwrite the first 8 bytes of every inner JPEG chunk of ``store``'s shard 0 on disk (only
    the first chunk with ``first_only``); the shard index and its checksum stay intact."""
    per = PatchReader(store).per_shard
    p = shard_path(store, 0)
    data = bytearray(p.read_bytes())
    index = data[-index_nbytes(per) : -4]
    for j in range(1 if first_only else per):
        off, nbytes = struct.unpack("<QQ", index[16 * j : 16 * j + 16])
        if off != EMPTY and nbytes >= 8:
            data[off : off + 8] = bytes(8)
    p.write_bytes(bytes(data))


@pytest.fixture()
def bad_stores(small_cohort: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the small cohort's stores with the chunks of ``synth_003`` corrupted."""
    stores = shutil.copytree(small_cohort[0], tmp_path / "stores")
    corrupt_chunks(stores / f"{BAD}.zarr")
    return stores


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("ERROR", "error"))]


def test_reader_names_the_corrupt_patch(bad_stores: Path) -> None:
    store = bad_stores / f"{BAD}.zarr"
    with pytest.raises(StoreError, match=r"synth_003\.zarr: patch 0 \(shard 0\) cannot be decoded"):
        PatchReader(store).read([0])
    good = PatchReader(bad_stores / "synth_000.zarr").read([0, 1])
    assert good.shape[0] == 2 and good.dtype == np.uint8


def test_truncated_chunk_is_a_store_error(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    """A shard cut short (a copy that stopped) fails the read with one line, never decodes
    fewer bytes."""
    stores = shutil.copytree(small_cohort[0], tmp_path / "stores")
    store = stores / f"{BAD}.zarr"
    p = shard_path(store, 0)
    data = p.read_bytes()
    p.write_bytes(data[:100] + data[-index_nbytes(PatchReader(store).per_shard) :])
    with pytest.raises(StoreError, match=r"synth_003\.zarr: patch \d+ \(shard 0\)"):
        PatchReader(store).read(np.arange(PatchReader(store).n))


def test_predict_fails_only_the_corrupt_slide(
    bad_stores: Path, fast_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pred"
    rc = main(["predict", str(bad_stores), "--run", str(fast_run), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and f"{BAD}.zarr: patch 0 (shard 0) cannot be decoded" in lines[0]
    rows = {r["slide_id"]: r for r in read_predictions(out / runs.PREDICTIONS)}
    assert len(rows) == 8
    assert "cannot be decoded" in rows[BAD]["error"] and rows[BAD]["probability"] == ""
    assert all(r["error"] == "" and r["probability"] for s, r in rows.items() if s != BAD)


def test_evaluate_and_features_go_on(
    bad_stores: Path,
    fast_run: Path,
    small_cohort: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    labels = small_cohort[1]
    rc = main(
        [
            "evaluate",
            str(bad_stores),
            "--run",
            str(fast_run),
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "ev"),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert [f"{BAD}.zarr" in line for line in error_lines(err)] == [True]
    assert (tmp_path / "ev" / "evaluation.json").is_file()
    rc = main(["features", str(bad_stores), "--backbone", "smallcnn", "--weights", "none", "-q"])
    captured = capsys.readouterr()
    assert rc == 1 and "Traceback" not in captured.err
    assert [f"{BAD}.zarr" in line for line in error_lines(captured.err)] == [True]
    assert "7 computed, 1 failed" in captured.out + captured.err


def test_heatmap_fails_only_the_slide_with_corrupt_scores(
    small_cohort: tuple[Path, Path], fast_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stores = shutil.copytree(small_cohort[0], tmp_path / "stores")
    assert main(["predict", str(stores), "--run", str(fast_run), "--out", str(tmp_path), "-q"]) == 0
    chunk = stores / f"{BAD}.zarr" / "scores" / "run" / "c" / "0"
    chunk.write_bytes(bytes(8) + chunk.read_bytes()[8:])
    capsys.readouterr()
    out = tmp_path / "hm"
    rc = main(["heatmap", str(stores), "--run", str(fast_run), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and f"{BAD}.zarr: cannot read its arrays" in lines[0]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        f"synth_00{i}" for i in range(8) if i != 3
    ]


def test_worker_error_keeps_its_one_line(bad_stores: Path) -> None:
    """An error raised in a DataLoader worker reaches the main process as its own line, not
    torch's 'Caught ... Original Traceback' text."""
    ds = BagDataset([bad_stores / f"{BAD}.zarr"], [1])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(StoreError) as info:
        next(iter(loader))
    msg = str(info.value)
    assert msg.startswith(str(bad_stores / f"{BAD}.zarr") + ": patch 0 (shard 0)"), msg
    assert "Traceback" not in msg and "Caught" not in msg
    assert worker_message("plain message", "StoreError") == "plain message"


def test_train_refuses_a_corrupt_slide_and_the_retiled_run_is_the_clean_model(
    bad_stores: Path,
    small_cohort: tuple[Path, Path],
    fast_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Training stops with one line naming the store (exit 1) and leaves an unfinished run that
    predict refuses; after the store is re-tiled (here: its good copy put back) the same training
    gives exactly the model of a clean run."""
    labels = small_cohort[1]
    run = tmp_path / "run"
    args = ["train", str(bad_stores), "--labels", str(labels), "--out", str(run), "-q"]
    args += ["--epochs", "2", "--max-patches", "16", "--workers", "2", "--patience", "5"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and f"{BAD}.zarr: patch" in lines[0], lines
    assert not runs.is_finished(run)
    assert not (run / runs.MODEL).exists()
    rc = main(["predict", str(bad_stores), "--run", str(run), "--out", str(tmp_path / "p"), "-q"])
    assert rc != 0 and "Traceback" not in capsys.readouterr().err
    # re-tile: the good store back in place, then the same training as the clean fixture
    shutil.rmtree(bad_stores / f"{BAD}.zarr")
    shutil.copytree(small_cohort[0] / f"{BAD}.zarr", bad_stores / f"{BAD}.zarr")
    train(bad_stores, labels, run, config=TrainConfig(**FAST), progress=False)
    got = torch.load(run / runs.MODEL, weights_only=True)
    want = torch.load(fast_run / runs.MODEL, weights_only=True)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_features_mode_predict_fails_only_the_damaged_stores(
    small_cohort: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Features mode: a store whose missing features cannot be embedded (corrupt patches) and
    a store whose cached features are torn each fail on one line naming the store; the other
    six are predicted (exit 1)."""
    stores = shutil.copytree(small_cohort[0], tmp_path / "stores")
    run = tmp_path / "frun"
    cfg = TrainConfig(mode="features", backbone="smallcnn", **{**FAST, "epochs": 1})
    train(stores, small_cohort[1], run, config=cfg, progress=False)
    name = json.loads((run / runs.CONFIG).read_text())["extractor"]
    feats = Path("features") / name
    shutil.rmtree(stores / f"{BAD}.zarr" / feats)  # to be embedded again, from corrupt patches
    corrupt_chunks(stores / f"{BAD}.zarr")
    torn = "synth_005"
    chunk = next(
        p
        for p in (stores / f"{torn}.zarr" / feats).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    chunk.write_bytes(chunk.read_bytes()[:10])  # a copy that stopped
    out = tmp_path / "pred"
    rc = main(["predict", str(stores), "--run", str(run), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 2, lines
    assert any(f"{BAD}.zarr: patch" in line for line in lines), lines
    assert any(f"{torn}.zarr: cannot read {feats.as_posix()}" in line for line in lines), lines
    rows = {r["slide_id"]: r for r in read_predictions(out / runs.PREDICTIONS)}
    assert len(rows) == 8 and rows[BAD]["error"] and rows[torn]["error"]
    assert all(r["probability"] and not r["error"] for s, r in rows.items() if s not in (BAD, torn))


def test_a_flipped_bit_inside_a_patch_fails_its_read(
    small_cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    """Bit rot that still decodes: one bit flipped in the middle of a JPEG chunk gives a valid
    JPEG of other pixels, but the chunk's crc32c fails the read, through PatchReader and through
    zarr, so nothing trains or predicts on the changed pixels."""
    import zarr

    from wsi_pipeline.codecs import decode_chunk, read_shard_index

    stores = shutil.copytree(small_cohort[0], tmp_path / "stores")
    store = stores / f"{BAD}.zarr"
    reader = PatchReader(store)
    clean = reader.read([0])[0]
    p = shard_path(store, 0)
    data = bytearray(p.read_bytes())
    off, nbytes = (int(v) for v in read_shard_index(bytes(data), reader.per_shard)[0])
    data[off + nbytes // 2] ^= 0x10
    p.write_bytes(bytes(data))
    changed = decode_chunk(bytes(data[off : off + nbytes - 4]), "jpeg", reader.shape_hwc)
    assert not np.array_equal(changed, clean)  # the payload alone decodes, to other pixels
    with pytest.raises(StoreError, match=r"patch 0 \(shard 0\) cannot be decoded \(chunk checksum"):
        PatchReader(store).read([0])
    with pytest.raises(Exception, match=r"(?i)checksum"):
        zarr.open_group(store, mode="r")["patches"][0]
    np.testing.assert_array_equal(PatchReader(store).read([1])[0], reader.read([1])[0])
