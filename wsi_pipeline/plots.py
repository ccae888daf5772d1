"""Figures: a training run's loss/AUC curves (``curves.png``) and ROC curves (``roc.png``), and
an evaluation's ROC curves and reliability diagram.

Matplotlib with the Agg backend, imported only when a figure is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .metrics import auc_score, calibration_bins, expected_calibration_error, roc_curve
from .runs import CURVES, ROC
from .util import atomic_path

__all__ = [
    "plot_curves",
    "plot_reliability",
    "plot_roc",
    "plot_training",
    "reliability_figure",
    "roc_figure",
]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG atomically, and close it."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Training/validation loss and validation AUC per epoch.

    Parameters
    ----------
    history : sequence of mapping
        One record per epoch: ``epoch`` (0-based), ``train_loss``, optionally ``val_loss`` and
        ``val_auc``.
    path : path
        The PNG file to write.

    Returns
    -------
    Path
    """
    plt = _pyplot()
    ep = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    if any("val_loss" in h for h in history):
        ax[0].plot(ep, [h.get("val_loss", np.nan) for h in history], label="val")
        ax[1].plot(ep, [h.get("val_auc", np.nan) for h in history], label="val AUC")
    ax[0].set(xlabel="epoch", ylabel="loss", title="loss")
    ax[1].set(xlabel="epoch", ylabel="AUC", title="validation AUC", ylim=(0, 1.02))
    ax[0].legend()
    _save(plt, fig, path)
    return Path(path)


def _roc_curves(
    ax: Any,
    evaluations: Mapping[str, Mapping[str, Any] | None],
    classes: Sequence[str],
    positive: int | None,
) -> str:
    """Draw the ROC curves of ``evaluations`` on ``ax``; the title."""
    named = [(k, ev) for k, ev in evaluations.items() if ev is not None and ev["n"]]
    multi = any(np.asarray(ev["probs"]).shape[1] > 2 for _, ev in named)
    pos = (len(classes) - 1) if positive is None else positive
    for i, (name, ev) in enumerate(named):
        probs = np.asarray(ev["probs"], dtype=np.float64)
        targets = np.asarray(ev["targets"], dtype=np.int64)
        style = ("-", "--", "-.", ":")[i % 4]
        prefix = f"{name}: " if name else ""
        wanted = range(probs.shape[1]) if probs.shape[1] > 2 else [pos]
        for c in wanted:
            y = (targets == c).astype(np.int64)
            if y.all() or not y.any():
                continue  # no ROC without slides on both sides
            fpr, tpr = roc_curve(y, probs[:, c])
            auc = auc_score(y, probs[:, c])
            what = f"{classes[c]} " if probs.shape[1] > 2 else ""
            ax.plot(
                fpr,
                tpr,
                style,
                color=f"C{c if probs.shape[1] > 2 else i}",
                label=f"{prefix}{what}AUC {auc:.3f} (n={len(y)})",
            )
    return "ROC (each class vs the rest)" if multi else f"ROC ({classes[pos]} vs rest)"


def roc_figure(
    evaluations: Mapping[str, Mapping[str, Any] | None],
    classes: Sequence[str],
    *,
    positive: int | None = None,
) -> Any:
    """ROC curves of slide-level evaluations: one per named evaluation for two classes, one per
    class (that class vs the rest) and evaluation for more.

    Parameters
    ----------
    evaluations : mapping of name -> evaluation or None
        Each with ``n``, ``targets`` (n,) class indices and ``probs`` (n, C) class probabilities
        (as :func:`wsi_pipeline.training.evaluate` returns); None or empty ones are left out,
        and so is a class without slides on both sides (it has no ROC). The name starts each
        curve's label (an empty name: none).
    classes : sequence of str
        Class names in index order.
    positive : int, optional
        The class scored in the two-class case (default: the last).

    Returns
    -------
    matplotlib.figure.Figure
        One Axes; each curve is a line labelled with its AUC (the chance diagonal's label
        starts with ``_``). A note replaces the curves when none can be drawn.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    title = _roc_curves(ax, evaluations, classes, positive)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="_chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no ROC: no slides of both classes", ha="center", va="center")
    return fig


def plot_roc(
    evaluations: Mapping[str, Mapping[str, Any] | None],
    classes: Sequence[str],
    path: str | os.PathLike,
    *,
    positive: int | None = None,
) -> Path:
    """Write :func:`roc_figure` as a PNG: the ROC for two classes, one-vs-rest ROCs per class
    for more.

    Parameters
    ----------
    evaluations : mapping of name -> evaluation or None
        See :func:`roc_figure`.
    classes : sequence of str
    path : path
        The PNG file to write (a note instead of curves when none can be drawn).
    positive : int, optional
        The class scored in the two-class case (default: the last).

    Returns
    -------
    Path
    """
    _save(_pyplot(), roc_figure(evaluations, classes, positive=positive), path)
    return Path(path)


def reliability_figure(probs: ArrayLike, targets: ArrayLike, *, n_bins: int = 10) -> Any:
    """Reliability diagram: accuracy against confidence per bin, and how many slides each holds.

    Parameters
    ----------
    probs : (N, C) floats
        Class probabilities; confidence is a slide's largest one.
    targets : (N,) ints
        True class indices.
    n_bins : int
        Equal-width confidence bins over [0, 1] (:func:`wsi_pipeline.metrics.calibration_bins`).

    Returns
    -------
    matplotlib.figure.Figure
        Two Axes: accuracy per non-empty bin (bars) against the diagonal, with the expected
        calibration error in the title; the count per bin below.
    """
    from matplotlib.figure import Figure

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    conf, acc, count = calibration_bins(p, y, n_bins=n_bins)
    ece = expected_calibration_error(p, y, n_bins=n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    used = count > 0
    fig = Figure(figsize=(4.5, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(
        edges[:-1][used],
        acc[used],
        width=1.0 / n_bins,
        align="edge",
        alpha=0.7,
        edgecolor="k",
        label="accuracy",
    )
    top.plot(conf[used], acc[used], "o", color="C1", label="mean confidence")
    top.plot([0, 1], [0, 1], "k:", lw=0.8, label="_perfect")
    ece_text = "n/a" if np.isnan(ece) else f"{ece:.3f}"
    top.set(
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"reliability (ECE {ece_text}, n={int(count.sum())})",
    )
    if used.any():
        top.legend(loc="upper left", fontsize="small")
    else:
        top.text(0.5, 0.5, "no slides", ha="center", va="center")
    bottom.bar(edges[:-1], count, width=1.0 / n_bins, align="edge", color="0.6", edgecolor="k")
    bottom.set(xlabel="confidence (largest class probability)", ylabel="slides")
    return fig


def plot_reliability(
    probs: ArrayLike, targets: ArrayLike, path: str | os.PathLike, *, n_bins: int = 10
) -> Path:
    """Write :func:`reliability_figure` as a PNG.

    Parameters
    ----------
    probs : (N, C) floats
    targets : (N,) ints
    path : path
        The PNG file to write.
    n_bins : int

    Returns
    -------
    Path
    """
    _save(_pyplot(), reliability_figure(probs, targets, n_bins=n_bins), path)
    return Path(path)


def plot_training(
    run_dir: str | os.PathLike,
    history: Sequence[Mapping[str, Any]],
    val: Mapping[str, Any] | None,
    test: Mapping[str, Any] | None,
    classes: Sequence[str],
) -> None:
    """Write a run's ``curves.png`` and ``roc.png`` (validation and test slides)."""
    run = Path(run_dir)
    plot_curves(history, run / CURVES)
    plot_roc({"val": val, "test": test}, classes, run / ROC)
