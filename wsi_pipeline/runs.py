"""The run folder: its file names, format version, id rule, reading, and the "finished?" check.

A run folder is what ``train`` writes and ``predict``/``heatmap`` read (layout in
docs/store.md). Every other module names run files through the constants here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, TrainingError
from .specs import TrainConfig
from .util import sanitize_id

__all__ = [
    "CALIBRATION",
    "CHECKPOINT",
    "CONFIG",
    "CV_METRICS",
    "EXTRACTOR",
    "LABELS",
    "METRICS",
    "MODEL",
    "PREDICTIONS",
    "RUN_VERSION",
    "SPLITS",
    "TILING",
    "load_run",
    "run_id",
    "run_state",
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


def run_id(run_dir: str | os.PathLike, explicit: str | None = None) -> str:
    """The id under which a run's scores are stored: ``explicit``, else the run folder's name,
    sanitised to one path component (``scores/<run_id>`` in each store)."""
    return sanitize_id(explicit or Path(run_dir).resolve().name)


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a run folder's config, tiling, classes and metrics.

    Raises
    ------
    TrainingError
        A missing folder or file, or a run written by an incompatible version.
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
    cal = d / CALIBRATION
    out["calibration"] = json.loads(cal.read_text()) if cal.is_file() else None
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
