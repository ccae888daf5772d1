"""Plain helpers of the tests: build a tiled synthetic cohort, copy a run, write a labels file.

The session fixtures built with them (``small_cohort``, ``fast_run``, ...) are in conftest.py;
tests import these functions and constants directly (``from helpers import FAST``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_pipeline import runs
from wsi_pipeline.metrics import auc_score
from wsi_pipeline.prediction import read_predictions
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.store import SlideStore, scores_key
from wsi_pipeline.synth import LABELS_FILE, SLIDES_DIR, lesion_patches, write_cohort, write_slide
from wsi_pipeline.tile_batch import tile_slides

#: The tiling of the ``small_cohort`` fixture: 64-px patches at 1 mpp.
TILING = TilingSpec(tile_px=64, mpp=1.0)
#: The training options of the ``fast_run`` fixture (``TrainConfig(**FAST)``): an attention head
#: (not the default top-k one), so that the runs of most tests also have attention scores.
FAST = {"model": "abmil", "epochs": 2, "max_patches": 16, "num_workers": 0, "patience": 5}
#: A small pipeline file's content (add ``out``): 8 synthetic slides, tiled with overlap, every
#: stage from synth to heatmap in seconds.
SMALL_PIPELINE = {
    "name": "small",
    "synth": {
        "n_slides": 8,
        "width": 1536,
        "height": 1024,
        "mpp": 0.5,
        "seed": 21,
        "lesion_fraction": 0.05,
    },
    "tile": {"mpp": 1.0, "tile_size": 64, "overlap": 32},
    "train": {"epochs": 2, "max_patches": 16, "num_workers": 0},
    "predict": {"device": "cpu"},
    "heatmap": {"which": "score", "mode": "probability", "threshold": 0.5},
}


def check_learned(stores: Path, run: Path, predictions: Path, cohort: Path) -> None:
    """A run of ``train``'s defaults on a synthetic cohort learned from its slide labels.

    The run did not stall and its train loss fell well below chance (learning is visible, not
    selected); on the slides it did not train on (validation and test), the slide AUC is high,
    and the patches of planted lesions score higher than the other patches of positive slides
    (the precondition for heatmaps). ``predictions``: predict's folder for ``run`` on
    ``stores`` (scores written under the run folder's name).
    """
    metrics = json.loads((run / runs.METRICS).read_text())
    assert not metrics["stalled"], metrics["warnings"]
    assert not any("fell from" in w for w in metrics["warnings"]), metrics["warnings"]
    loss = metrics["history"][-1]["train_loss"]
    assert loss < 0.6 * math.log(2), f"train loss {loss:.3f}: learning is visible, not selected"
    split = runs.read_splits(run)
    rows = read_predictions(predictions / runs.PREDICTIONS)
    held = [r for r in rows if split[r["slide_id"]]["split"] != "train"]
    y = [int(split[r["slide_id"]]["label"]) for r in held]
    auc = auc_score(y, np.array([float(r["p_1"]) for r in held]))
    assert auc >= 0.9, f"held-out slide AUC {auc:.2f}"
    ys, ss = [], []
    for r in held:
        if split[r["slide_id"]]["label"] != "1":
            continue
        st = SlideStore(stores / f"{r['slide_id']}.zarr")
        ys.append(lesion_patches(cohort, r["slide_id"], st.coords, st.tiling["patch_l0"]))
        ss.append(np.asarray(st.group[scores_key(run.name)][...]))
    patch_auc = auc_score(np.concatenate(ys).astype(int), np.concatenate(ss))
    assert patch_auc >= 0.9, f"patch-level AUC {patch_auc:.2f}"


def make_cohort(
    root: Path, n: int, *, width: int, height: int, seed: int, spec: TilingSpec = TILING, **kw
) -> tuple[Path, Path]:
    """``n`` synthetic slides in ``root/cohort`` tiled into ``root/stores``: (stores, labels.csv)."""
    cohort = root / "cohort"
    write_cohort(cohort, n_slides=n, width=width, height=height, mpp=0.5, seed=seed, **kw)
    res = tile_slides(
        sorted((cohort / SLIDES_DIR).iterdir()), root / "stores", spec=spec, progress=False
    )
    assert all(r.ok for r in res), res
    return root / "stores", cohort / LABELS_FILE


def tile_cohort_slide(labels_csv: Path, slide_id: str, stores: Path, spec: TilingSpec) -> None:
    """Tile one slide of the cohort of ``labels_csv`` into ``stores`` with another ``spec``."""
    slide = next((labels_csv.parent / SLIDES_DIR).glob(f"{slide_id}.*"))
    tile_slides([slide], stores, spec=spec, progress=False)


def add_blank_store(stores: Path, work: Path) -> Path:
    """A complete store without patches, ``stores/blank.zarr``, tiled like ``small_cohort``
    from a slide without tissue written to ``work/blank.svs``."""
    write_slide(work / "blank.svs", width=512, height=512, mpp=0.5, tissue_fraction=0.0)
    tile_slides([work / "blank.svs"], stores, spec=TILING, progress=False)
    return stores / "blank.zarr"


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run folder at ``dest`` (without its TensorBoard logs)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("tensorboard"))
    return dest


def read_strict_json(path: Path) -> dict:
    """The JSON file at ``path`` read by a strict parser: a NaN, Infinity or -Infinity in it
    fails (ValueError naming the file and the constant)."""

    def no_nan(name: str) -> None:
        raise ValueError(f"{path} is not strict JSON: {name}")

    return json.loads(Path(path).read_text(), parse_constant=no_nan)


def write_labels(path: Path, rows: list[tuple]) -> Path:
    """A labels file with the columns ``slide_id,label[,split]`` of ``rows``."""
    with open(path, "w") as fh:
        fh.write(",".join(("slide_id", "label", "split")[: len(rows[0])]) + "\n")
        for r in rows:
            fh.write(",".join(map(str, r)) + "\n")
    return path


def refuse_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to download weights (torch.hub's two downloaders) fail the test loudly."""
    import torch

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"download attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


class EvilPickle:
    """Unpickling this runs a shell command (touches ``marker``): a weights file that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def start_cli(args: list[str]) -> subprocess.Popen:
    """A real ``python -m wsi_pipeline ARGS`` in its own process (output discarded), to kill."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen(
        [sys.executable, "-m", "wsi_pipeline", *args],
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_cli(args: list[str], timeout: float = 600.0) -> subprocess.CompletedProcess:
    """``python -m wsi_pipeline ARGS`` in a fresh process, as a user runs it (text output)."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", "wsi_pipeline", *args],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_script(script: Path, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """A user's Python script run as ``python script.py`` in its own folder (text output)."""
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=script.parent,
    )


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 600.0
) -> None:
    """Poll ``ready()`` every 5 ms while ``proc`` runs; fail if it ends or times out first."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the command ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() - t0 < timeout, f"no {what} after {timeout:.0f} s"
        time.sleep(0.005)
