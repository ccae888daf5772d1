"""The training run's figures: loss/AUC curves (``curves.png``) and ROC curves (``roc.png``).

Matplotlib with the Agg backend, imported only when a figure is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import roc_curve
from .runs import CURVES, ROC
from .util import atomic_path

__all__ = ["plot_curves", "plot_roc", "plot_training"]


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


def plot_roc(
    evaluations: Mapping[str, Mapping[str, Any] | None],
    classes: Sequence[str],
    path: str | os.PathLike,
) -> Path:
    """ROC curves of binary evaluations (last class vs the rest), one per named split.

    Parameters
    ----------
    evaluations : mapping of name -> evaluation or None
        Each from :func:`wsi_pipeline.training.evaluate` (``n``, ``auc``, ``targets``, ``probs``
        (n, C)); None, empty or multi-class ones are left out.
    classes : sequence of str
    path : path
        The PNG file to write (a note instead of curves when none is binary).

    Returns
    -------
    Path
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, ev in evaluations.items():
        if ev is None or not ev["n"] or ev["probs"].shape[1] != 2:
            continue
        fpr, tpr = roc_curve(ev["targets"], ev["probs"][:, 1])
        ax.plot(fpr, tpr, label=f"{name} AUC {ev['auc']:.3f} (n={ev['n']})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"ROC ({classes[-1]} vs rest)",
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "ROC curves are drawn for binary tasks", ha="center", va="center")
    _save(plt, fig, path)
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
