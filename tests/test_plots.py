"""The training run's figures (wsi_pipeline.plots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline import runs
from wsi_pipeline.plots import (
    plot_curves,
    plot_reliability,
    plot_roc,
    plot_training,
    reliability_figure,
    roc_figure,
)

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


def _curves(fig) -> list:
    """The labelled lines of a one-Axes figure (the chance diagonal's label starts with _)."""
    (ax,) = fig.axes
    return [ln for ln in ax.lines if not ln.get_label().startswith("_")]


def test_multi_class_roc_draws_one_curve_per_class_and_split(tmp_path: Path) -> None:
    """Multi-class runs get one-vs-rest ROCs (roc.png used to be an empty plot)."""
    classes = ["a", "b", "c"]
    evals = {"val": _eval(9, classes=3), "test": _eval(6, classes=3)}
    curves = _curves(roc_figure(evals, classes))
    assert len(curves) == 6
    assert [ln.get_label().split(" AUC")[0] for ln in curves[:3]] == ["val: a", "val: b", "val: c"]
    assert {ln.get_linestyle() for ln in curves[3:]} == {"--"}
    history = [{"epoch": 0, "train_loss": 0.7}]
    plot_training(tmp_path, history, evals["val"], evals["test"], classes)
    assert (tmp_path / runs.ROC).read_bytes().startswith(PNG)


def test_binary_roc_scores_the_positive_class() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    ev = {"n": 4, "targets": [0, 0, 1, 1], "probs": probs}
    (last,) = _curves(roc_figure({"val": ev}, ["0", "1"]))
    assert last.get_label() == "val: AUC 1.000 (n=4)"
    fig = roc_figure({"": ev}, ["tumour", "normal"], positive=0)
    (first,) = _curves(fig)
    assert first.get_label() == "AUC 1.000 (n=4)" and "tumour vs rest" in fig.axes[0].get_title()
    fig = roc_figure({"val": {**ev, "targets": [1, 1, 1, 1]}}, ["0", "1"])
    assert _curves(fig) == [] and "no ROC" in fig.axes[0].texts[0].get_text()


def test_reliability_diagram(tmp_path: Path) -> None:
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.45, 0.55]])
    fig = reliability_figure(probs, [0, 1, 1, 1], n_bins=10)
    top, bottom = fig.axes
    assert "ECE" in top.get_title() and "n=4" in top.get_title()
    heights = [p.get_height() for p in bottom.patches]
    assert len(heights) == 10 and sum(heights) == 4
    assert len(top.patches) == 3  # non-empty bins only
    out = plot_reliability(probs, [0, 1, 1, 1], tmp_path / "rel.png")
    assert out.read_bytes().startswith(PNG)
    empty = reliability_figure(np.zeros((0, 2)), [])
    assert "n/a" in empty.axes[0].get_title()
