"""Labels, splits, store resolution and bags (wsi_pipeline.data), on real stores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import add_blank_store, tile_cohort_slide, write_labels

from wsi_pipeline.data import (
    SPLIT_NAMES,
    BagDataset,
    augment_bag,
    check_tiling,
    make_splits,
    negative_class,
    read_labels,
    resolve_stores,
)
from wsi_pipeline.errors import ConfigError, StoreError, TrainingError
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.store import SlideStore


def test_labels_and_splits(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    stores, labels_csv = small_cohort
    labels = read_labels(labels_csv)
    assert labels.classes == ("0", "1")
    found, skipped = resolve_stores(stores, labels)
    assert len(found) == 8 and not skipped
    s1 = make_splits(labels, list(found), seed=3)
    assert s1 == make_splits(labels, list(found), seed=3)
    assert {"train", "val", "test"} == set(s1.values()) == set(SPLIT_NAMES)
    # case grouping: two slides of one case never straddle splits
    rows = [(r.slide_id, r.label, "", f"case{i // 2}") for i, r in enumerate(labels.rows)]
    p = tmp_path / "cases.csv"
    with open(p, "w") as fh:
        fh.write("slide_id,label,split,case_id\n")
        fh.writelines(",".join(r) + "\n" for r in rows)
    lab = read_labels(p)
    for seed in range(5):
        sp = make_splits(lab, [r.slide_id for r in lab.rows], seed=seed)
        for a, b in zip(rows[::2], rows[1::2]):
            assert sp[a[0]] == sp[b[0]]
    folds = [make_splits(labels, list(found), folds=4, fold=k) for k in range(4)]
    assert sorted(s for f in folds for s, v in f.items() if v == "val") == sorted(found)


def test_bad_labels(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    _, labels_csv = small_cohort
    ids = [r.slide_id for r in read_labels(labels_csv).rows]
    with pytest.raises(ConfigError, match=r"missing column\(s\) label"):
        read_labels(write_labels(tmp_path / "a.csv", [(ids[0],)]))
    with pytest.raises(ConfigError, match=r"duplicate slide id 'synth_000' \(first on line 2\)"):
        read_labels(write_labels(tmp_path / "b.csv", [(ids[0], 0), (ids[0], 1)]))
    with pytest.raises(ConfigError, match=r"unknown split 'holdout'"):
        read_labels(write_labels(tmp_path / "c.csv", [(ids[0], 0, "holdout")]))
    with pytest.raises(ConfigError, match="labels file not found"):
        read_labels(tmp_path / "none.csv")
    # split aliases are mapped to the split names
    lab = read_labels(write_labels(tmp_path / "d.csv", [(ids[0], 0, "Validation")]))
    assert lab.rows[0].split == "val"


def test_bad_splits(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    _, labels_csv = small_cohort
    labels = read_labels(labels_csv)
    ids = [r.slide_id for r in labels.rows]
    with pytest.raises(ConfigError, match="folds must be >= 2"):
        make_splits(labels, ids, folds=1)
    with pytest.raises(ConfigError, match=r"fold must be in 0\.\.2"):
        make_splits(labels, ids, folds=3, fold=3)
    with pytest.raises(ConfigError, match="sum to less than 1"):
        make_splits(labels, ids, val_fraction=0.5, test_fraction=0.5)
    one_class = read_labels(
        write_labels(tmp_path / "e.csv", [(i, 0, "train") for i in ids[:4]] + [(ids[4], 1, "val")])
    )
    with pytest.raises(TrainingError, match="training split has a single class"):
        make_splits(one_class, ids[:5])
    partial = read_labels(write_labels(tmp_path / "f.csv", [(ids[0], 0, "train"), (ids[1], 1, "")]))
    with pytest.raises(ConfigError, match="'split' is empty for synth_001"):
        make_splits(partial, ids[:2])


def test_missing_and_mismatched_stores(small_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    stores, labels_csv = small_cohort
    labels = read_labels(labels_csv)
    ids = [r.slide_id for r in labels.rows]
    with pytest.raises(TrainingError, match=r"'nope': no store nope\.zarr"):
        resolve_stores(stores, read_labels(write_labels(tmp_path / "d.csv", [("nope", 1)])))
    with pytest.raises(TrainingError, match="no such folder of stores"):
        resolve_stores(tmp_path / "none", labels)
    bad = tmp_path / "stores"
    shutil.copytree(stores, bad)
    zarr.open_group(str(bad / f"{ids[0]}.zarr"), mode="r+").attrs["complete"] = False
    with pytest.raises(TrainingError, match=r"'synth_000': store synth_000\.zarr is unfinished"):
        resolve_stores(bad, labels)
    shutil.rmtree(bad / f"{ids[0]}.zarr")
    tile_cohort_slide(labels_csv, ids[0], bad, TilingSpec(tile_px=96, mpp=1.0))
    found, _ = resolve_stores(bad, labels)
    with pytest.raises(TrainingError, match=r"tile size 64 px, .synth_000. was tiled on 96 px"):
        check_tiling(found)
    shared = check_tiling(resolve_stores(stores, labels)[0])
    assert shared["tile_px"] == 64 and shared["mpp"] == 1.0


def test_store_without_patches_is_left_out(
    small_cohort: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stores, labels_csv = small_cohort
    d = tmp_path / "stores"
    shutil.copytree(stores, d)
    add_blank_store(d, tmp_path)
    lab = tmp_path / "l.csv"
    lab.write_text(labels_csv.read_text() + "blank,0\n")
    found, skipped = resolve_stores(d, read_labels(lab))
    assert skipped == ["blank"] and "blank" not in found
    assert "store has no patches" in caplog.text


def test_bags_are_seeded_and_augmented(small_cohort: tuple[Path, Path]) -> None:
    stores, _ = small_cohort
    paths = sorted(stores.glob("*.zarr"))[:2]
    ds = BagDataset(paths, [0, 1], max_patches=8, augment=True, seed=1)
    a, ya, _ = ds[0]
    b, _, _ = ds[0]
    assert a.shape == (8, 3, 64, 64) and a.dtype == torch.uint8 and ya == 0
    assert torch.equal(a, b)  # same epoch: same bag
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], a)  # next epoch: another subset/augmentation
    full = BagDataset(paths, [0, 1])
    assert len(full[0][0]) == SlideStore(paths[0]).n_patches


def test_feature_bags_need_the_features(small_cohort: tuple[Path, Path]) -> None:
    stores, _ = small_cohort
    ds = BagDataset(sorted(stores.glob("*.zarr"))[:1], [0], features="nope-000000000000")
    with pytest.raises(StoreError, match="no 'features/nope-000000000000'; run the features"):
        ds[0]
    with pytest.raises(ValueError, match="one target per store"):
        BagDataset(sorted(stores.glob("*.zarr"))[:2], [0])


def test_augment_bag_keeps_shape_and_pixels() -> None:
    rng = np.random.default_rng(0)
    bag = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    out = augment_bag(bag, np.random.default_rng(1), jitter=0.0)
    assert out.shape == bag.shape and out.dtype == np.uint8
    # without jitter each patch is a rotation/flip of itself: same multiset of pixels
    for p, q in zip(bag, out):
        assert sorted(p.reshape(-1, 3).tolist()) == sorted(q.reshape(-1, 3).tolist())


def test_negative_class() -> None:
    assert negative_class(["tumour", "Normal"]) == 1
    assert negative_class(["1", "0"]) == 1
    assert negative_class(["a", "b"]) == 0


# ---------------------------------------------------------------------------------------------
# strict labels: no silent extra classes, no silent NaN, no two slides on one store
# ---------------------------------------------------------------------------------------------
def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("1", "1.0"),
        ("True", "true"),
        ("1", "True"),
        ("0", "False"),
        ("Tumor", "tumor"),
        ("01", "1"),
    ],
)
def test_one_spelling_per_class(tmp_path: Path, first: str, second: str) -> None:
    p = _csv(tmp_path / "l.csv", f"slide_id,label\na,{first}\nb,0.5\nc,{second}\n")
    msg = rf"^{p}:4: label '{second}' is another spelling of '{first}' \(line 2\); use one spelling"
    with pytest.raises(ConfigError, match=msg):
        read_labels(p)


def test_consistent_spellings_are_read_as_written(tmp_path: Path) -> None:
    lab = read_labels(_csv(tmp_path / "l.csv", "slide_id,label\na,10\nb,2\nc,True\n"))
    assert lab.classes == ("True", "2", "10")  # numbers (True is 1) in numeric order
    lab = read_labels(_csv(tmp_path / "m.csv", "slide_id,label\na,1.0\nb,0.0\nc,1.0\n"))
    assert lab.classes == ("0.0", "1.0") and [r.label for r in lab.rows] == ["1.0", "0.0", "1.0"]
    lab = read_labels(_csv(tmp_path / "n.csv", "slide_id,label\na,tumor\nb,normal\n"))
    assert lab.classes == ("normal", "tumor")


@pytest.mark.parametrize(("cell", "shown"), [("", "empty"), ("nan", "'nan'"), ("NaN", "'NaN'")])
def test_missing_labels_are_refused(tmp_path: Path, cell: str, shown: str) -> None:
    p = _csv(tmp_path / "l.csv", f"slide_id,label\na,1\nb,{cell}\n")
    with pytest.raises(ConfigError, match=rf"^{p}:3: label of 'b' is {shown}; give every slide"):
        read_labels(p)


def test_slide_ids_that_share_a_store_are_refused(tmp_path: Path) -> None:
    p = _csv(tmp_path / "l.csv", "slide_id,label\nsynth 000,1\nsynth_001,0\nsynth_000,0\n")
    msg = (
        rf"^{p}:4: slide ids 'synth 000' \(line 2\) and 'synth_000' both map to the store "
        r"synth_000\.zarr; rename one of them$"
    )
    with pytest.raises(ConfigError, match=msg):
        read_labels(p)


def test_a_case_in_two_splits_is_refused(tmp_path: Path) -> None:
    text = "slide_id,label,split,case_id\na,1,train,c1\nb,0,val,c2\nc,1,test,c1\n"
    p = _csv(tmp_path / "l.csv", text)
    msg = rf"^{p}:4: case 'c1' is in split 'test' here and in 'train' on line 2; all slides"
    with pytest.raises(ConfigError, match=msg):
        read_labels(p)
    ok = read_labels(_csv(tmp_path / "m.csv", text.replace("test,c1", "train,c1")))
    assert [r.case_id for r in ok.rows] == ["c1", "c2", "c1"]


def test_bad_labels_stop_train_with_exit_2(
    small_cohort: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsi_pipeline.cli import main

    stores, _ = small_cohort
    before = sorted(p.name for p in stores.iterdir())
    p = _csv(tmp_path / "l.csv", "slide_id,label\nsynth_000,1\nsynth_001,1.0\n")
    run = tmp_path / "run"
    assert main(["train", str(stores), "--labels", str(p), "--out", str(run), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {p}:3: label '1.0' is another spelling of '1' (line 2); use one spelling per class"
    ]
    assert not run.exists() and sorted(p.name for p in stores.iterdir()) == before


def test_stores_without_a_label_are_listed_in_one_line(
    small_cohort: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stores, labels_csv = small_cohort
    labels = read_labels(labels_csv)
    rows = labels_csv.read_text().splitlines()
    p = _csv(tmp_path / "l.csv", "\n".join(rows[:3]) + "\n")  # 2 of the 8 slides
    with caplog.at_level("INFO", logger="wsi_pipeline.data"):
        found, _ = resolve_stores(stores, read_labels(p))
    assert len(found) == 2
    lines = [r.getMessage() for r in caplog.records if "without a label" in r.getMessage()]
    assert len(lines) == 1, lines
    unused = sorted(r.slide_id for r in labels.rows if r.slide_id not in found)
    assert f"6 store(s) without a label in {p}, not used: " in lines[0]
    assert ", ".join(unused[:5]) + ", ... (1 more)" in lines[0]
    caplog.clear()
    with caplog.at_level("INFO", logger="wsi_pipeline.data"):
        resolve_stores(stores, labels)
    assert "without a label" not in caplog.text
