"""Small synthetic cohorts tiled into real stores, and a trained run, for the torch-stage tests.

Each is built once per test session (cached here, so test files that share them do not rebuild
them) in a ``tmp_path_factory`` folder; tests that change them work on a copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wsi_pipeline.specs import TilingSpec, TrainConfig
from wsi_pipeline.synth import write_cohort
from wsi_pipeline.tiling import tile_slides

TILING = TilingSpec(tile_px=64, mpp=1.0)
FAST = {"epochs": 2, "max_patches": 16, "num_workers": 0, "patience": 5}

_CACHE: dict[str, tuple[Path, ...]] = {}


def make_cohort(
    root: Path, n: int, *, width: int, height: int, seed: int, spec: TilingSpec = TILING, **kw
) -> tuple[Path, Path]:
    """``n`` synthetic slides in ``root/cohort`` tiled into ``root/stores``: (stores, labels.csv)."""
    write_cohort(root / "cohort", n_slides=n, width=width, height=height, mpp=0.5, seed=seed, **kw)
    res = tile_slides(
        sorted((root / "cohort" / "slides").iterdir()), root / "stores", spec=spec, progress=False
    )
    assert all(r.ok for r in res)
    return root / "stores", root / "cohort" / "labels.csv"


def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 small slides tiled at 1 mpp, 64-px patches: fast plumbing checks (stores, labels.csv)."""
    if "small" not in _CACHE:
        root = tmp_path_factory.mktemp("small")
        _CACHE["small"] = make_cohort(root, 8, width=1536, height=1024, seed=21)
    stores, labels_csv = _CACHE["small"]
    return stores, labels_csv


def fast_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run (``FAST`` config) trained on :func:`small_cohort`; copy it to change it."""
    if "fast_run" not in _CACHE:
        from wsi_pipeline.training import train

        stores, labels_csv = small_cohort(tmp_path_factory)
        run = tmp_path_factory.mktemp("fast") / "run"
        train(stores, labels_csv, run, config=TrainConfig(**FAST), progress=False)
        _CACHE["fast_run"] = (run,)
    return _CACHE["fast_run"][0]


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run folder at ``dest`` (without its TensorBoard logs)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("tensorboard"))
    return dest


def write_labels(path: Path, rows: list[tuple]) -> Path:
    """A labels file with the columns ``slide_id,label[,split]`` of ``rows``."""
    with open(path, "w") as fh:
        fh.write(",".join(("slide_id", "label", "split")[: len(rows[0])]) + "\n")
        for r in rows:
            fh.write(",".join(map(str, r)) + "\n")
    return path
