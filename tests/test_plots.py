"""The training run's figures (wsi_pipeline.plots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline import runs
from wsi_pipeline.plots import plot_curves, plot_roc, plot_training

PNG = b"\x89PNG\r\n\x1a\n"


def _eval(n: int, classes: int = 2) -> dict:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(classes), n)
    return {"n": n, "auc": 0.5, "targets": [i % classes for i in range(n)], "probs": p}


def test_plot_training_writes_both_figures(tmp_path: Path) -> None:
    history = [
        {"epoch": 0, "train_loss": 0.7, "val_loss": 0.69, "val_auc": 0.5},
        {"epoch": 1, "train_loss": 0.6, "val_loss": 0.65, "val_auc": float("nan")},
    ]
    plot_training(tmp_path, history, _eval(6), None, ["0", "1"])
    for name in (runs.CURVES, runs.ROC):
        assert (tmp_path / name).read_bytes().startswith(PNG), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([runs.CURVES, runs.ROC])


def test_plots_without_validation_or_binary_task(tmp_path: Path) -> None:
    assert plot_curves([{"epoch": 0, "train_loss": 1.0}], tmp_path / "c.png").is_file()
    out = plot_roc({"val": _eval(6, classes=3), "test": None}, ["a", "b", "c"], tmp_path / "r.png")
    assert out.read_bytes().startswith(PNG)
