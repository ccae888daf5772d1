"""Shared fixtures: the real test slides in ../shared, small synthetic data built once, and
``logged`` (the package's warnings in ``caplog``).

The session fixtures write real files with the package's own writers (``synth``, ``tiling``,
``training``); tests must not modify them (copy first: ``shutil.copytree``, ``copy_run``).
The plain helpers they are built with are in helpers.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import FAST, make_cohort

from wsi_pipeline.specs import TilingSpec

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_SHARED", ROOT.parent / "shared"))
TESTDATA = SHARED / "testdata" / "slides"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _environ_back() -> Iterator[None]:
    """Each test leaves the environment as it found it: a dask ``LocalCluster`` started in a
    test sets ``OMP_NUM_THREADS=1`` (and more) here, and a later test's training subprocess
    then ran one thread and gave other floats than the in-process reference run."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The folder of real slides (``../shared/testdata/slides``)."""
    if not TESTDATA.is_dir():
        pytest.skip(f"real test slides not found at {TESTDATA} (set WSI_SHARED)")
    return TESTDATA


@pytest.fixture
def logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """``caplog`` with the package's warnings (the CLI stops them from propagating)."""
    monkeypatch.setattr(logging.getLogger("wsi_pipeline"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="wsi_pipeline")
    return caplog


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small synthetic slides at 0.5 mpp, written once (tests only read them by name):

    - ``pos.svs``: 2560 x 1792 px, seed 3, 2 lesions (4 % of the tissue);
    - ``neg.svs``: 2048 x 1536 px, seed 4, no lesion;
    - ``blank.svs``: 1024 x 768 px, seed 5, no tissue;
    - ``tiny.svs``: 200 x 150 px, seed 6, 90 % tissue (smaller than one tile);
    - ``pen.svs``: 2048 x 1536 px, seed 8, with a pen mark.
    """
    from wsi_pipeline.synth import write_slide

    d = tmp_path_factory.mktemp("synth")
    write_slide(
        d / "pos.svs", width=2560, height=1792, mpp=0.5, seed=3, n_lesions=2, lesion_fraction=0.04
    )
    write_slide(d / "neg.svs", width=2048, height=1536, mpp=0.5, seed=4)
    write_slide(d / "blank.svs", width=1024, height=768, mpp=0.5, seed=5, tissue_fraction=0.0)
    write_slide(d / "tiny.svs", width=200, height=150, mpp=0.5, seed=6, tissue_fraction=0.9)
    write_slide(d / "pen.svs", width=2048, height=1536, mpp=0.5, seed=8, pen_mark=True)
    return d


@pytest.fixture(scope="session")
def synth_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic slide: ``s.svs``, 768 x 512 px at 0.5 mpp, seed 1, no lesion."""
    from wsi_pipeline.synth import write_slide

    path = tmp_path_factory.mktemp("synth_slide") / "s.svs"
    write_slide(path, width=768, height=512, mpp=0.5, seed=1)
    return path


@pytest.fixture(scope="session")
def tiled_store(synth_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`synth_slide` tiled at level 0 in 64-px patches: the path of ``stores/s.zarr``."""
    from wsi_pipeline.store import store_path
    from wsi_pipeline.tile_batch import tile_slide

    stores = tmp_path_factory.mktemp("tiled") / "stores"
    res = tile_slide(synth_slide, stores, spec=TilingSpec(tile_px=64))
    assert res.ok and res.n_patches > 0, res
    return store_path(stores, res.slide_id)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 small labelled slides (1536 x 1024 px at 0.5 mpp, seed 21) tiled in 64-px patches at
    1 mpp (``helpers.TILING``): ``(stores folder, labels.csv)``, for fast plumbing checks."""
    return make_cohort(tmp_path_factory.mktemp("small_cohort"), 8, width=1536, height=1024, seed=21)


@pytest.fixture(scope="session")
def fast_run(small_cohort: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder named ``run`` (``TrainConfig(**helpers.FAST)``) trained on
    :func:`small_cohort`; copy it (``helpers.copy_run``) to change it."""
    from wsi_pipeline.specs import TrainConfig
    from wsi_pipeline.training import train

    stores, labels_csv = small_cohort
    run = tmp_path_factory.mktemp("fast_run") / "run"
    train(stores, labels_csv, run, config=TrainConfig(**FAST), progress=False)
    return run


@pytest.fixture(scope="session")
def three_class(
    small_cohort: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """A finished 1-epoch run on :func:`small_cohort` relabelled with three classes a/b/c
    (6 train, 1 val, 1 test): ``(stores, labels.csv, run)``; copy them to change them."""
    import shutil

    from helpers import write_labels

    from wsi_pipeline.specs import TrainConfig
    from wsi_pipeline.training import train

    stores, _ = small_cohort
    root = tmp_path_factory.mktemp("three_class")
    splits = ["train"] * 6 + ["val", "test"]
    labels = write_labels(
        root / "labels.csv", [(f"synth_{i:03d}", "abc"[i % 3], splits[i]) for i in range(8)]
    )
    shutil.copytree(stores, root / "stores")
    config = TrainConfig(epochs=1, max_patches=8, num_workers=0)
    train(root / "stores", labels, root / "run", config=config, progress=False)
    return root / "stores", labels, root / "run"


@pytest.fixture(scope="session")
def scored_batch(
    small_cohort: tuple[Path, Path], fast_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A pipeline-like output folder for the report and viewer (read only): ``stores/`` holds
    :func:`small_cohort`'s 8 stores, the first 6 predicted by :func:`fast_run` (scores ``run``,
    ``predictions/predictions.csv``), 2 without scores, a blank slide's store (no tissue), and
    ``manifest.csv`` also lists ``broken``, a file that failed to tile."""
    from helpers import TILING, add_blank_store

    from wsi_pipeline.prediction import predict
    from wsi_pipeline.store import list_stores
    from wsi_pipeline.tile_batch import tile_slides

    out = tmp_path_factory.mktemp("scored_batch")
    stores = out / "stores"
    shutil.copytree(small_cohort[0], stores)
    ids = [p.stem for p in list_stores(stores)]
    predict(stores, fast_run, out / "predictions", slide_ids=ids[:6], progress=False, device="cpu")
    add_blank_store(stores, out)
    (out / "broken.svs").write_bytes(b"this is not a slide")
    res = tile_slides([out / "broken.svs"], stores, spec=TILING, progress=False)
    assert not res[0].ok
    return out


@pytest.fixture()
def live_pid() -> Iterator[int]:
    """The pid of a real process that stays alive during the test (not this one)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
