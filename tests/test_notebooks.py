"""The notebooks run top to bottom (executed with nbclient), so they cannot rot.

Notebook 03 is also the suite's evidence that ``train``'s defaults learn from slide labels: its
run is checked as a user would judge it (:func:`helpers.check_learned`), and its heatmaps
against the planted lesions (:func:`check_localisation`). The same defaults on the demo's own
cohort, over five training seeds and three cohorts, are ``benchmarks/bench_training.py``'s
study (a test of the demo's cohort took 16 minutes of the suite's 34).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from helpers import check_learned
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HIT_RATE = 0.5  # of each held-out positive's planted lesion, at or above 0.5
FALSE_AREA = 0.05  # of each held-out negative's tissue, at or above 0.5


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if "tiling_qc" in path.name:  # reads a real slide: skipped without them
        monkeypatch.setenv("WSI_TESTDATA", str(request.getfixturevalue("testdata")))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    if "training_and_heatmaps" in path.name:  # it learned, and the heatmap finds the lesions
        out = tmp_path / "training-out"
        check_learned(out / "stores", out / "run", out / "predictions", out / "cohort")
        check_localisation(json.loads((out / "localisation.json").read_text()))


def check_localisation(rows: list[dict]) -> None:
    """Notebook 03's held-out slides: each positive's planted lesion is mostly covered by the
    heatmap at or above 0.5 (the exported regions), and negatives have almost nothing there."""
    hits = [r["hit_rate"] for r in rows if r["label"] == "1"]
    false = [r["tissue_above"] for r in rows if r["label"] == "0"]
    assert hits and false, rows
    assert min(hits) >= HIT_RATE, f"lesion covered by the heatmap: {hits}"
    assert max(false) <= FALSE_AREA, f"negative tissue above threshold: {false}"


def test_notebooks_are_stored_without_outputs() -> None:
    assert len(NOTEBOOKS) == 3
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name
