"""Evaluate a trained run on a labelled cohort it never saw (an external test set).

The slides are predicted by :func:`wsi_pipeline.prediction.predict` -- the one inference path:
calibrated slide probabilities, per-patch scores written into the stores, stores tiled unlike the
run refused per slide -- and the labels are read and matched to the stores as training does
(:func:`wsi_pipeline.data.read_labels`, :func:`wsi_pipeline.data.resolve_stores`). The
metrics come from :mod:`wsi_pipeline.metrics`, each with a seeded percentile-bootstrap 95%
confidence interval over slides. The output folder holds:

- ``evaluation.json`` -- the metrics (strict JSON: an undefined metric is ``null`` with a
  ``reason``);
- ``evaluation.csv`` -- per slide: slide_id, label, p_<class>..., predicted, correct, error;
- ``roc.png`` -- the ROC (abnormal vs normal) for two classes, one-vs-rest ROCs for more;
- ``reliability.png`` -- the reliability diagram of the slide probabilities;
- ``predictions.csv`` -- what :func:`~wsi_pipeline.prediction.predict` wrote.

The decision rule is the run's: the class with the largest calibrated probability (for two
classes, abnormal probability >= 0.5).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import runs
from .data import negative_class, read_labels, resolve_stores
from .errors import ConfigError
from .metrics import auc_score, bootstrap_ci, brier_score, expected_calibration_error
from .store import list_stores, store_path
from .util import atomic_path, atomic_write_json, output_dir, sanitize_id

__all__ = [
    "EVALUATION",
    "EVALUATION_TABLE",
    "RELIABILITY",
    "ROC",
    "check_options",
    "evaluate",
    "slide_metrics",
]

log = logging.getLogger(__name__)

EVALUATION = "evaluation.json"  #: the metrics, in evaluate's output folder
EVALUATION_TABLE = "evaluation.csv"  #: per-slide labels, probabilities and predictions
ROC = runs.ROC  #: ROC curves (the run folder's name for them)
RELIABILITY = "reliability.png"  #: reliability diagram of the slide probabilities

#: Confidence bins of the expected calibration error and the reliability diagram.
N_BINS = 10
#: Coverage of the bootstrap confidence intervals.
CI_LEVEL = 0.95

Metric = Callable[[np.ndarray, np.ndarray], float]


def check_options(*, n_boot: int = 1000, seed: int = 0) -> None:
    """Validate the options of :func:`evaluate` (the command line and pipeline files call this).

    Raises
    ------
    ConfigError
        ``n_boot`` below 100 or ``seed`` negative.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ConfigError(f"n_boot must be an integer >= 100, not {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, not {seed!r}")


# ---------------------------------------------------------------------------------------------
# metrics of (targets (N,), probs (N, C)); NaN when undefined
# ---------------------------------------------------------------------------------------------
def _balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Mean recall over the classes present (NaN with fewer than two)."""
    pred = p.argmax(axis=1)
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([np.mean(pred[y == c] == c) for c in present]))


def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(p.argmax(axis=1) == y)) if len(y) else float("nan")


def _recall(c: int, *, rest: bool = False) -> Metric:
    """Fraction of the slides of class ``c`` (``rest``: of the other classes) that are
    predicted so (sensitivity, or specificity, one-vs-rest); NaN without such slides."""

    def metric(y: np.ndarray, p: np.ndarray) -> float:
        yes = (y != c) if rest else (y == c)
        if not yes.any():
            return float("nan")
        pred = p.argmax(axis=1)[yes]
        return float(np.mean((pred != c) if rest else (pred == c)))

    return metric


def _class_auc(c: int) -> Metric:
    def metric(y: np.ndarray, p: np.ndarray) -> float:
        return auc_score((y == c).astype(np.int64), p[:, c])

    return metric


def _abnormal_auc(neg: int) -> Metric:
    def metric(y: np.ndarray, p: np.ndarray) -> float:
        return auc_score((y != neg).astype(np.int64), 1.0 - p[:, neg])

    return metric


def _brier(y: np.ndarray, p: np.ndarray) -> float:
    return brier_score(p, y)


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    return expected_calibration_error(p, y, n_bins=N_BINS)


def _with_ci(
    metric: Metric, y: np.ndarray, p: np.ndarray, why: str, *, n_boot: int, seed: int
) -> dict[str, Any]:
    """``{"value", "ci95", "reason"}``: the metric, its bootstrap interval, and why either is
    null (``reason`` is null when both are defined)."""
    if len(y) == 0:
        return {"value": None, "ci95": None, "reason": "no slides were evaluated"}
    value = metric(y, p)
    if math.isnan(value):
        return {"value": None, "ci95": None, "reason": why}
    ci = bootstrap_ci(metric, y, p, n_boot=n_boot, level=CI_LEVEL, seed=seed)
    if ci is None:
        reason = "too few slides: the metric is undefined on most bootstrap resamples"
        return {"value": value, "ci95": None, "reason": reason}
    return {"value": value, "ci95": [ci[0], ci[1]], "reason": None}


def slide_metrics(
    targets: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Slide-level metrics of calibrated class probabilities, each with a bootstrap 95% CI.

    Parameters
    ----------
    targets : (N,) ints
        True class indices into ``classes``.
    probs : (N, C) float ndarray
        Calibrated class probabilities; the prediction is the largest (two classes: abnormal
        probability >= 0.5).
    classes : sequence of str
        The run's class names (``C`` of them).
    n_boot, seed : int
        Bootstrap resamples (of slides, with replacement) and their seed; every metric uses
        the same resamples.

    Returns
    -------
    dict
        Each metric as ``{"value", "ci95": [low, high], "reason"}`` (``null`` and a reason when
        undefined): ``auc`` (two classes: abnormal vs normal; more: macro mean of the one-vs-rest
        AUCs), ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present),
        ``brier`` (sum over classes of the squared error, mean over slides: 0..2), ``ece``
        (top-label, 10 bins); for two classes also ``sensitivity`` and ``specificity`` (of the
        abnormal class); for more, ``per_class``: ``{class: {"n", "auc", "sensitivity",
        "specificity"}}`` one-vs-rest.
    """
    y = np.asarray(targets, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64).reshape(len(y), len(classes))
    kw = {"n_boot": n_boot, "seed": seed}
    two = "needs slides of at least two classes"
    out: dict[str, Any] = {}
    if len(classes) == 2:
        neg = negative_class(classes)
        out["auc"] = _with_ci(_abnormal_auc(neg), y, p, two, **kw)
    else:
        out["auc"] = _with_ci(auc_score, y, p, "no class has slides on both sides", **kw)
    out["accuracy"] = _with_ci(_accuracy, y, p, "no slides were evaluated", **kw)
    out["balanced_accuracy"] = _with_ci(_balanced_accuracy, y, p, two, **kw)
    if len(classes) == 2:
        neg = negative_class(classes)
        pos_name, neg_name = classes[1 - neg], classes[neg]
        no_pos, no_neg = f"no slides labelled {pos_name!r}", f"no slides labelled {neg_name!r}"
        out["sensitivity"] = _with_ci(_recall(neg, rest=True), y, p, no_pos, **kw)
        out["specificity"] = _with_ci(_recall(neg), y, p, no_neg, **kw)
    out["brier"] = _with_ci(_brier, y, p, "no slides were evaluated", **kw)
    out["ece"] = _with_ci(_ece, y, p, "no slides were evaluated", **kw)
    if len(classes) > 2:
        per: dict[str, Any] = {}
        for c, name in enumerate(classes):
            none, rest = f"no slides labelled {name!r}", f"no slides labelled other than {name!r}"
            per[name] = {
                "n": int(np.sum(y == c)),
                "auc": _with_ci(_class_auc(c), y, p, f"{none} or {rest}", **kw),
                "sensitivity": _with_ci(_recall(c), y, p, none, **kw),
                "specificity": _with_ci(_recall(c, rest=True), y, p, rest, **kw),
            }
        out["per_class"] = per
    return out


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _check_classes(
    labels_path: str, found: Sequence[str], classes: Sequence[str], run: Path
) -> None:
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ConfigError(
            f"{labels_path}: label(s) {', '.join(map(repr, unknown))} are not classes of the run "
            f"{run} ({', '.join(map(repr, classes))}); relabel or evaluate with another run"
        )


def _write_table(path: Path, rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> Path:
    """``evaluation.csv``: slide_id, label, p_<class>..., predicted, correct, error."""
    fields = ["slide_id", "label", *[f"p_{c}" for c in classes], "predicted", "correct", "error"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            row = {"slide_id": r["slide_id"], "label": r["label"], "error": r["error"]}
            if r["probabilities"]:
                for c in classes:
                    row[f"p_{c}"] = f"{r['probabilities'][c]:.6f}"
                row["predicted"] = r["predicted"]
                row["correct"] = int(r["predicted"] == r["label"])
            w.writerow(row)
    return path


def _run_overlap(run_dir: Path, slide_ids: Sequence[str]) -> dict[str, int]:
    """How many of ``slide_ids`` the run trained, validated or tested on (its splits.csv)."""
    splits = runs.read_splits(run_dir)
    counts: dict[str, int] = {}
    for sid in slide_ids:
        split = splits.get(sid, {}).get("split")
        if split:
            counts[split] = counts.get(split, 0) + 1
    return dict(sorted(counts.items()))


def _slide_rows(
    label_rows: Sequence[Any],
    preds: Sequence[Any],
    store_dir: str | os.PathLike,
    no_patches: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per labelled slide: slide_id, label, probabilities ({} when not predicted),
    predicted, error (predictions are matched to labels through their store's name)."""
    by_stem = {sanitize_id(p.slide_id): p for p in preds}
    rows: list[dict[str, Any]] = []
    for r in label_rows:
        pred = by_stem.get(store_path(store_dir, r.slide_id).stem)
        row = {"slide_id": r.slide_id, "label": r.label, "probabilities": {}, "predicted": ""}
        if pred is None:
            row["error"] = (
                "no patches in the store (no tissue)"
                if r.slide_id in no_patches
                else "not predicted"
            )
        else:
            row.update(
                probabilities=dict(pred.probabilities), predicted=pred.predicted, error=pred.error
            )
        rows.append(row)
    return rows


def evaluate(
    store_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    run_id: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the run in ``run_dir`` on the labelled slides of ``store_dir``.

    Parameters
    ----------
    store_dir : path
        Folder of ``<slide_id>.zarr`` stores of the cohort (tiled like the run's slides).
    run_dir : path
        A training run folder.
    labels_csv : path
        ``slide_id,label`` (other columns, such as ``split``, are ignored: every labelled slide
        is evaluated); labels must be classes of the run.
    out_dir : path
        Output folder (created): ``evaluation.json``, ``evaluation.csv``, ``roc.png``,
        ``reliability.png`` and ``predictions.csv``.
    device : {"auto", "cpu", "cuda"}
    run_id : str, optional
        Name of the per-patch scores written into the stores; default: the run folder's name.
    n_boot, seed : int
        Bootstrap resamples of the confidence intervals, and their seed.
    progress : bool

    Returns
    -------
    dict
        What ``evaluation.json`` holds: ``n`` (slides evaluated), ``metrics`` (see
        :func:`slide_metrics`), ``failed`` (slide_id, error), ... .

    Raises
    ------
    ConfigError
        A bad labels file, a label that is not a class of the run, bad options.
    TrainingError
        A missing or incompatible run; labelled slides without a complete store.
    """
    from .plots import plot_reliability, plot_roc
    from .prediction import predict

    check_options(n_boot=n_boot, seed=seed)
    labels = read_labels(labels_csv)
    run = runs.load_run(run_dir)
    classes = list(run["labels"]["classes"])
    _check_classes(labels.path, labels.classes, classes, Path(run_dir))
    stores, no_patches = resolve_stores(store_dir, labels)
    labelled = {sanitize_id(r.slide_id) for r in labels.rows}
    unlabelled = [s.stem for s in list_stores(store_dir) if s.stem not in labelled]
    if unlabelled:
        log.info("%d store(s) without a label are left out", len(unlabelled))
    overlap = _run_overlap(Path(run_dir), list(stores))
    if overlap:
        log.warning(
            "%s: %s of these slides were used by the run (%s): not an external test set",
            labels.path,
            sum(overlap.values()),
            ", ".join(f"{k} {v}" for k, v in sorted(overlap.items())),
        )
    out = output_dir(out_dir)
    preds = (
        predict(
            store_dir,
            run_dir,
            out,
            device=device,
            slide_ids=list(stores),
            run_id=run_id,
            progress=progress,
        )
        if stores
        else []
    )
    rows = _slide_rows(labels.rows, preds, store_dir, no_patches)
    scored = [r for r in rows if r["probabilities"]]
    failed = [r for r in rows if r["error"] and r["slide_id"] not in no_patches]
    targets = np.asarray([classes.index(r["label"]) for r in scored], dtype=np.int64)
    probs = np.asarray(
        [[r["probabilities"][c] for c in classes] for r in scored], dtype=np.float64
    ).reshape(-1, len(classes))
    neg = negative_class(classes)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "run_id": runs.run_id(run_dir, run_id),
        "labels": labels.path,
        "stores": str(store_dir),
        "classes": classes,
        "negative_class": classes[neg],
        "decision": "the class of largest calibrated probability"
        + (" (abnormal probability >= 0.5)" if len(classes) == 2 else ""),
        "calibration": (run.get("calibration") or {}).get("method", "none"),
        "n": len(scored),
        "n_labelled": len(rows),
        "class_counts": {c: int(np.sum(targets == i)) for i, c in enumerate(classes)},
        "bootstrap": {"n_boot": n_boot, "level": CI_LEVEL, "seed": seed, "unit": "slide"},
        "ece_bins": N_BINS,
        "metrics": slide_metrics(targets, probs, classes, n_boot=n_boot, seed=seed),
        "failed": [{"slide_id": r["slide_id"], "error": r["error"]} for r in failed],
        "no_patches": list(no_patches),
        "unlabelled_stores": len(unlabelled),
        "seen_by_run": overlap,
        "files": {
            "table": str(out / EVALUATION_TABLE),
            "roc": str(out / ROC),
            "reliability": str(out / RELIABILITY),
            "predictions": str(out / runs.PREDICTIONS),
        },
    }
    _write_table(out / EVALUATION_TABLE, rows, classes)
    ev = {"n": len(scored), "targets": targets, "probs": probs}
    plot_roc({"": ev}, classes, out / ROC, positive=1 - neg if len(classes) == 2 else None)
    plot_reliability(probs, targets, out / RELIABILITY, n_bins=N_BINS)
    atomic_write_json(out / EVALUATION, result)
    return result
