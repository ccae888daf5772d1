"""The run folder: its file names, format version, id rule, its writers and readers, and the
"finished?" / "resumable?" checks.

A run folder is what ``train`` writes and ``predict``/``heatmap`` read (layout in
docs/store.md). Every other module names run files through the constants here, and the JSON and
CSV files of a run are written only by the functions here (atomically). The torch files
(``model.pt``, ``checkpoint.pt``, ``extractor.pt``) are written by the torch stages, under these
names, through :func:`wsi_pipeline.util.atomic_path`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ConfigError, TrainingError
from .specs import TrainConfig, fold_config, tiling_mismatch
from .util import atomic_write_json, atomic_write_text, json_ready, sanitize_id

__all__ = [
    "CALIBRATION",
    "CHECKPOINT",
    "CONFIG",
    "CURVES",
    "CV_METRICS",
    "EXTRACTOR",
    "LABELS",
    "METRICS",
    "MODEL",
    "PREDICTIONS",
    "ROC",
    "RUN_VERSION",
    "SPLITS",
    "TENSORBOARD",
    "TILING",
    "check_resumable",
    "cv_state",
    "fold_dir",
    "is_finished",
    "load_run",
    "model_id",
    "read_classes",
    "read_cv_metrics",
    "read_metrics",
    "read_splits",
    "run_id",
    "run_state",
    "start_over",
    "write_calibration",
    "write_cv_metrics",
    "write_metrics",
    "write_run_start",
    "write_splits",
]

#: Run layout version written to ``config.json``; bump on a breaking change.
RUN_VERSION = 1

CONFIG = "config.json"  #: model + training config, run/package/torch versions
TILING = "tiling.json"  #: the tiling the run was trained on
LABELS = "labels.json"  #: class names, labels file, slides left out
SPLITS = "splits.csv"  #: slide_id,label,split
MODEL = "model.pt"  #: best weights (plain state dict)
CHECKPOINT = "checkpoint.pt"  #: last epoch's full training state (``--resume``)
METRICS = "metrics.json"  #: history, best epoch, test metrics, ``finished``
CALIBRATION = "calibration.json"  #: probability calibration fitted on the validation slides
EXTRACTOR = "extractor.pt"  #: frozen backbone weights in features mode
CV_METRICS = "cv_metrics.json"  #: k-fold summary in the parent of ``fold_<k>``
PREDICTIONS = "predictions.csv"  #: predict's per-slide table (in predict's output folder)
TENSORBOARD = "tensorboard"  #: folder of TensorBoard event files
CURVES = "curves.png"  #: loss and validation-AUC curves
ROC = "roc.png"  #: ROC curves of the validation and test slides


def run_id(run_dir: str | os.PathLike, explicit: str | None = None) -> str:
    """The id under which a run's scores are stored: ``explicit``, else the run folder's name,
    sanitised to one path component (``scores/<run_id>`` in each store)."""
    return sanitize_id(explicit or Path(run_dir).resolve().name)


def is_finished(run_dir: str | os.PathLike) -> bool:
    """True when ``metrics.json`` says the training of ``run_dir`` finished (the run's
    "finished" flag, written last by ``train``) and its ``model.pt`` exists."""
    d = Path(run_dir)
    try:
        metrics = json.loads((d / METRICS).read_text())
    except (OSError, ValueError):
        return False
    return metrics.get("finished") is True and (d / MODEL).is_file()


def model_id(run_dir: str | os.PathLike) -> str:
    """What identifies the model a run folder holds now: the first 16 hex digits of the SHA-256
    of ``model.pt`` and ``calibration.json`` (when there is one). ``predict`` records it with the
    scores it writes, so that scores of an earlier model of a retrained run folder are never
    shown as this model's (see ``heatmap``)."""
    d = Path(run_dir)
    h = hashlib.sha256()
    for name in (MODEL, CALIBRATION):
        p = d / name
        if p.is_file():
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


def start_over(run_dir: str | os.PathLike) -> None:
    """Before a fresh (not resumed) training writes into ``run_dir``: remove what an earlier
    training left that could be mistaken for this one's (model, checkpoint, calibration,
    metrics), so that a run killed early is never taken for a finished one or resumed from
    another config's checkpoint."""
    d = Path(run_dir)
    for name in (METRICS, MODEL, CHECKPOINT, CALIBRATION):
        (d / name).unlink(missing_ok=True)


def load_run(run_dir: str | os.PathLike, *, allow_unfinished: bool = False) -> dict[str, Any]:
    """Read a run folder's config, tiling, classes and metrics.

    Parameters
    ----------
    run_dir : path
    allow_unfinished : bool
        Accept a run whose training has not finished (``metrics.json`` without
        ``finished: true``): its ``model.pt`` is the best epoch so far, not calibrated. The
        returned dict says which under ``"finished"``.

    Returns
    -------
    dict
        ``dir``, ``config``, ``tiling``, ``labels`` (the JSON files), ``finished``,
        ``calibration`` (or None), ``model_id`` (:func:`model_id`) and ``train_config``.

    Raises
    ------
    TrainingError
        A missing folder or file, a run written by an incompatible version, or an unfinished run
        (unless ``allow_unfinished``).
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise TrainingError(f"{d}: no such run folder; run 'wsi-pipeline train' first")
    out: dict[str, Any] = {"dir": d}
    for name in (CONFIG, TILING, LABELS):
        p = d / name
        if not p.is_file():
            raise TrainingError(f"{d}: not a complete run (no {name}); train again")
        try:
            out[name.split(".")[0]] = json.loads(p.read_text())
        except ValueError as exc:
            raise TrainingError(f"{p}: unreadable ({exc})") from exc
    if not (d / MODEL).is_file():
        raise TrainingError(f"{d}: not a complete run (no {MODEL}); train again")
    cfg = out["config"]
    if int(cfg.get("run_version", 0)) != RUN_VERSION:
        raise TrainingError(
            f"{d}: run format {cfg.get('run_version')!r} (wsi-pipeline "
            f"{cfg.get('package_version', '?')}) is not readable by "
            f"{__version__}; train again"
        )
    out["finished"] = is_finished(d)
    if not allow_unfinished and not out["finished"]:
        raise TrainingError(
            f"{d}: training has not finished ({METRICS} has no 'finished: true'); finish it with "
            "'wsi-pipeline train ... --resume', or pass --allow-unfinished to use the best "
            "weights so far (uncalibrated)"
        )
    cal = d / CALIBRATION
    out["calibration"] = json.loads(cal.read_text()) if cal.is_file() else None
    out["model_id"] = model_id(d)
    try:
        out["train_config"] = TrainConfig.from_dict(cfg["train"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise TrainingError(f"{d}/{CONFIG}: incompatible training config ({exc})") from exc
    return out


def run_state(run_dir: str | os.PathLike, config: TrainConfig) -> str:
    """Whether training ``config`` into ``run_dir`` is ``"done"``, can ``"resume"`` or starts ``"fresh"``.

    ``done``: a finished run of the same config with its model; ``resume``: a checkpoint of the
    same config; ``fresh``: anything else.
    """
    run = Path(run_dir)
    try:
        m = json.loads((run / METRICS).read_text())
        c = json.loads((run / CONFIG).read_text())
    except (OSError, ValueError):
        return "resume" if (run / CHECKPOINT).is_file() else "fresh"
    if c.get("train") != config.to_dict():
        return "fresh"
    if m.get("finished") and (run / MODEL).is_file():
        return "done"
    return "resume" if (run / CHECKPOINT).is_file() else "fresh"


def cv_state(run_dir: str | os.PathLike, config: TrainConfig, folds: int) -> str:
    """:func:`run_state` of k-fold cross-validation into ``run_dir/fold_<k>``: ``"done"``,
    ``"resume"`` or ``"fresh"``.

    Parameters
    ----------
    run_dir : path
        The parent of the fold folders (and of ``cv_metrics.json``).
    config : TrainConfig
        The options shared by all folds (each fold's own config is
        :func:`wsi_pipeline.specs.fold_config`).
    folds : int
        Number of folds.

    Returns
    -------
    str
        ``done``: every fold done and ``cv_metrics.json`` written; ``fresh``: no fold started,
        or a fold has a checkpoint of another config (every fold starts over); ``resume``:
        anything else.
    """
    dirs = [fold_dir(run_dir, k) for k in range(folds)]
    states = [run_state(d, fold_config(config, folds=folds, fold=k)) for k, d in enumerate(dirs)]
    if all(s == "done" for s in states) and (Path(run_dir) / CV_METRICS).is_file():
        return "done"
    # a fold whose checkpoint is of another config cannot be resumed: start every fold over
    stale = any(s == "fresh" and (d / CHECKPOINT).is_file() for d, s in zip(dirs, states))
    return "fresh" if stale or all(s == "fresh" for s in states) else "resume"


def check_resumable(
    run_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    tiling: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    splits: Sequence[tuple[str, str, str]] | None = None,
) -> None:
    """Refuse to resume ``run_dir`` without a checkpoint, or with other inputs than it started with.

    Parameters
    ----------
    run_dir : path
    config : TrainConfig
        The config the resumed run would continue with.
    tiling, classes, splits : optional
        The tiling of the stores, the class names and the ``(slide_id, label, split)`` rows the
        resumed run would continue with; each is compared with what the run recorded.

    Raises
    ------
    TrainingError
        No ``checkpoint.pt``; or ``config.json`` records a different config (names the changed
        options); or other classes, labels, splits or tiling (one line naming what changed).
    """
    run = Path(run_dir)
    if not (run / CHECKPOINT).is_file():
        raise TrainingError(f"{run}: nothing to resume (no {CHECKPOINT})")
    old = json.loads((run / CONFIG).read_text()) if (run / CONFIG).is_file() else {}
    if old.get("train") != config.to_dict():
        saved = old.get("train") or {}
        diff = sorted(k for k in config.to_dict() if saved.get(k) != getattr(config, k))
        raise TrainingError(
            f"{run}: cannot resume with a different config (changed: {', '.join(diff) or 'all'})"
        )
    why = _changed_inputs(run, tiling=tiling, classes=classes, splits=splits)
    if why:
        raise TrainingError(f"{run}: cannot resume: {why}; train again without --resume")


def _changed_inputs(
    run: Path,
    *,
    tiling: Mapping[str, Any] | None,
    classes: Sequence[str] | None,
    splits: Sequence[tuple[str, str, str]] | None,
) -> str | None:
    """What differs between the run's recorded inputs and the given ones, or None."""
    if classes is not None:
        old_classes = read_classes(run)
        if list(classes) != old_classes:
            return f"the classes changed ({', '.join(old_classes)} -> {', '.join(classes)})"
    if splits is not None:
        old = {s: (r["label"], r["split"]) for s, r in read_splits(run).items()}
        new = {s: (label, split) for s, label, split in splits}
        relabelled = sorted(s for s in new if s in old and new[s][0] != old[s][0])
        if relabelled:
            return f"labels changed for {len(relabelled)} slide(s) ({', '.join(relabelled[:3])})"
        moved = sorted(s for s in new if s in old and new[s][1] != old[s][1])
        if moved or set(new) != set(old):
            return f"the slides or their splits changed ({len(moved)} moved, {len(set(new) ^ set(old))} added or gone)"
    if tiling is not None and (run / TILING).is_file():
        why = tiling_mismatch(
            dict(tiling),
            json.loads((run / TILING).read_text()),
            reference_name="the run was trained",
        )
        if why:
            return f"the stores were re-tiled ({why})"
    return None


def fold_dir(run_dir: str | os.PathLike, fold: int) -> Path:
    """``run_dir/fold_<fold>``: the run folder of one cross-validation fold."""
    return Path(run_dir) / f"fold_{int(fold)}"


# --------------------------------------------------------------------------------------------
# writers (JSON and CSV, atomic)
# --------------------------------------------------------------------------------------------
def write_splits(run_dir: str | os.PathLike, rows: Sequence[tuple[str, str, str]]) -> Path:
    """Write ``splits.csv`` (``slide_id,label,split``), one row per slide, in the order given.

    Parameters
    ----------
    run_dir : path
    rows : sequence of (slide_id, label, split)

    Returns
    -------
    Path
        The file written.
    """
    lines = ["slide_id,label,split\n", *(f"{s},{lab},{sp}\n" for s, lab, sp in rows)]
    return atomic_write_text(Path(run_dir) / SPLITS, "".join(lines))


def write_run_start(
    run_dir: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    tiling: Mapping[str, Any],
    labels: Mapping[str, Any],
    splits: Sequence[tuple[str, str, str]],
) -> None:
    """Write what a run records when training starts: config, tiling, labels and splits.

    Parameters
    ----------
    run_dir : path
        An existing run folder.
    config : mapping
        ``config.json``: ``run_version``, ``package_version``, ``train`` (the training config),
        ``num_classes``, ``in_dim``, ``extractor``, ``torch_version``.
    tiling : mapping
        ``tiling.json``: the tiling shared by the training stores.
    labels : mapping
        ``labels.json``: ``classes``, ``labels_csv``, ``skipped_no_patches``.
    splits : sequence of (slide_id, label, split)
        ``splits.csv``.
    """
    run = Path(run_dir)
    atomic_write_json(run / CONFIG, dict(config))
    atomic_write_json(run / TILING, dict(tiling))
    atomic_write_json(run / LABELS, dict(labels))
    write_splits(run, splits)


def write_metrics(
    run_dir: str | os.PathLike,
    history: list[dict[str, Any]],
    best: Mapping[str, Any],
    test: Mapping[str, Any] | None,
    splits: Mapping[str, str],
    config: TrainConfig,
    *,
    finished: bool = False,
    warnings: Sequence[str] = (),
    stalled: bool | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json``: the training history, best epoch, split sizes and test metrics.

    A metric that cannot be computed is ``null`` with a ``<name>_reason`` next to it (e.g.
    ``"val_auc": null, "val_auc_reason": "validation set has a single class ('0')"``); the file
    and the returned dict never hold NaN.

    Parameters
    ----------
    run_dir : path
    history : list of dict
        One record per epoch (``epoch`` 0-based, ``train_loss``, ``val_auc``,
        ``val_auc_reason``, ...).
    best : mapping
        ``epoch`` (0-based, -1 before the first), ``auc`` (-1 when there is none) and ``by``
        (what chose it: ``val_auc``, ``val_loss`` or ``train_loss``).
    test : mapping or None
        Test-split evaluation (``auc``, ``auc_reason``, ``acc``, ``loss``, ``n``,
        ``calibrated``).
    splits : mapping of slide_id -> split
    config : TrainConfig
    finished : bool
        Training is over (``run_state`` reads it as "done").
    warnings : sequence of str
        What makes the result less trustworthy than it looks (``warnings``).
    stalled : bool, optional
        The train loss never left chance (``stalled``; written when given).
    calibration : mapping, optional
        ``calibration``: the method, ``skipped`` and Brier/ECE before and after on the
        validation and test slides (written when given).

    Returns
    -------
    dict
        The metrics as written (``null`` for what is missing, never NaN).
    """
    counts: dict[str, int] = {}
    for sp in splits.values():
        counts[sp] = counts.get(sp, 0) + 1
    metrics: dict[str, Any] = {
        "finished": finished,
        "epochs_run": len(history),
        "best_epoch": best["epoch"] + 1 if best["epoch"] >= 0 else None,
        "best_val_auc": best["auc"] if best["auc"] >= 0 else None,
    }
    if metrics["best_val_auc"] is None:
        metrics["best_val_auc_reason"] = _best_auc_reason(history, best)
    if best.get("by"):
        metrics["best_epoch_by"] = best["by"]
    metrics.update(
        history=history,
        splits=counts,
        mode=config.mode,
        model=config.model,
        backbone=config.backbone,
        warnings=list(warnings),
    )
    if stalled is not None:
        metrics["stalled"] = bool(stalled)
    if test is not None:
        keys = ("auc", "auc_reason", "acc", "loss", "n", "calibrated")
        metrics["test"] = {k: test[k] for k in keys if k in test}
    if calibration is not None:
        metrics["calibration"] = dict(calibration)
    metrics = json_ready(metrics)
    atomic_write_json(Path(run_dir) / METRICS, metrics)
    return metrics


def _best_auc_reason(history: Sequence[Mapping[str, Any]], best: Mapping[str, Any]) -> str:
    """Why a run has no best validation AUC (its best epoch's ``val_auc_reason``)."""
    if best["epoch"] < 0:
        return "no epoch finished"
    rec = next((h for h in history if h.get("epoch") == best["epoch"]), {})
    return str(rec.get("val_auc_reason") or "no validation AUC")


def write_calibration(run_dir: str | os.PathLike, calibration: Mapping[str, Any]) -> Path:
    """Write ``calibration.json`` (see :mod:`wsi_pipeline.calibration`); returns its path."""
    return atomic_write_json(Path(run_dir) / CALIBRATION, dict(calibration))


def write_cv_metrics(
    run_dir: str | os.PathLike, val_aucs: Sequence[float | None]
) -> dict[str, Any]:
    """Write ``cv_metrics.json``: per-fold best validation AUC, their mean and std.

    Parameters
    ----------
    run_dir : path
        The parent of the ``fold_<k>`` folders (created).
    val_aucs : sequence of float or None
        Best validation AUC of each fold (None where a fold had none).

    Returns
    -------
    dict
        ``folds``, ``val_auc``, ``val_auc_mean``, ``val_auc_std`` (``None`` without any AUC, then
        with ``val_auc_reason``); never NaN.
    """
    aucs = np.array([a for a in val_aucs if a is not None and not math.isnan(a)], float)
    res: dict[str, Any] = {
        "folds": len(val_aucs),
        "val_auc": list(val_aucs),
        "val_auc_mean": float(aucs.mean()) if aucs.size else None,
        "val_auc_std": float(aucs.std()) if aucs.size else None,
    }
    if not aucs.size:
        res["val_auc_reason"] = "no fold has a validation AUC"
    res = json_ready(res)
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CV_METRICS, res)
    return res


# --------------------------------------------------------------------------------------------
# readers of single files (for summaries)
# --------------------------------------------------------------------------------------------
def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``metrics.json`` of a run, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / METRICS).read_text())
    except (OSError, ValueError):
        return None


def read_cv_metrics(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``cv_metrics.json`` of a k-fold run (see :func:`write_cv_metrics`), or ``None`` when it is
    missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / CV_METRICS).read_text())
    except (OSError, ValueError):
        return None


def read_splits(run_dir: str | os.PathLike) -> dict[str, dict[str, str]]:
    """``splits.csv`` of a run as ``{slide_id: {"slide_id", "label", "split"}}``; ``{}`` without one."""
    p = Path(run_dir) / SPLITS
    if not p.is_file():
        return {}
    with open(p, newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def read_classes(run_dir: str | os.PathLike) -> list[str]:
    """Class names of a run (``labels.json``), in index order.

    Raises
    ------
    TrainingError
        No readable ``labels.json``.
    """
    p = Path(run_dir) / LABELS
    try:
        return list(json.loads(p.read_text())["classes"])
    except (OSError, ValueError, KeyError) as exc:
        raise TrainingError(f"{p}: unreadable ({exc}); train again") from exc
