"""Slide predictions and per-patch scores from a trained run.

For each complete store: slide-level class probabilities and the predicted label (to
``predictions.csv``), and per-patch scores written into the store (keys from
:mod:`wsi_pipeline.store`, calibrated on the run's validation slides, see
:mod:`wsi_pipeline.calibration`):

- ``scores/<run_id>`` (N,) float32: the patch's abnormality probability, ``1 - p(negative
  class)`` from the head's instance classifier;
- ``scores/<run_id>-classes`` (N, C) float32: the patch's probability of each class, columns in
  the order of its ``classes`` attribute (what ``heatmap --class`` draws);
- ``scores/<run_id>-attention`` (N,) float32, for heads with attention.

Patches are embedded in chunks, so memory is bounded by the chunk and the (N, D) embeddings.

Each store's scores are written under the store's lock (:mod:`wsi_pipeline.locks`, the lock
file ``<store>.lock`` that ``tile`` also takes): a second ``predict`` (or a ``tile`` redoing the
store) waits for it (:data:`~wsi_pipeline.locks.STAGE_WAIT_S`), so two runs never interleave
their writes of one array; a store still locked after that fails its row with one line. A full
disk stops the batch with ``"disk full writing <store>; stopped after N of M slides"``: the
half-written scores of that store are removed (the store says "no scores": predict again),
earlier stores keep theirs, and ``predictions.csv`` is replaced (atomically) only if there is
room for it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import runs
from .data import negative_class
from .errors import StoreError, TrainingError, WSIPipelineError, disk_full_message, is_disk_full
from .locks import STAGE_WAIT_S, StoreLocked, locked
from .specs import tiling_mismatch
from .store import (
    COORDS,
    features_key,
    find_stores,
    open_store,
    read_array,
    remove_partial_writes,
    remove_scores,
    write_class_scores,
    write_scores,
)
from .util import atomic_path, output_dir, progress_bar

__all__ = ["Prediction", "predict", "predict_store", "read_predictions", "write_predictions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One row of ``predictions.csv``."""

    slide_id: str
    probabilities: dict[str, float] = field(default_factory=dict)
    predicted: str = ""
    n_patches: int = 0
    run_id: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        """Predicted, or left out for having no patches (not an error of the run)."""
        return not self.error or self.error.startswith("no patches")


class _OpenStore(NamedTuple):
    """A store opened once (read-write, for its scores) and what ``predict`` needs from it."""

    path: Path
    group: Any
    n_patches: int


def _embed_all(
    model: Any,
    store: Path,
    group: Any,
    *,
    device: Any,
    amp: bool,
    channels_last: bool,
    chunk: int,
    features: str | None,
) -> Any:
    """(N, D) float32 embeddings of every patch (cached features, or the backbone in chunks)."""
    import torch

    from .inference import store_embeddings

    if features is not None:
        feats = read_array(group, features_key(features), store, np.float32)
        return torch.from_numpy(feats).to(device)
    return store_embeddings(
        store, model.embed, device=device, amp=amp, channels_last=channels_last, chunk=chunk
    )


def _score_attrs(
    run_id: str,
    run_dir: str,
    classes: Sequence[str],
    neg: int,
    probs: np.ndarray,
    calibration: dict[str, Any] | None,
    model_id: str | None = None,
) -> dict[str, Any]:
    """Attributes of ``scores/<run_id>``: the slide's prediction and how the scores were made."""
    method = (calibration or {}).get("method", "none")
    return {
        "run": run_id,
        "run_dir": run_dir,
        "model_id": model_id or "",
        "classes": list(classes),
        "negative_class": classes[neg],
        "probabilities": {c: float(p) for c, p in zip(classes, probs)},
        "abnormal_probability": float(1.0 - probs[neg]),
        "predicted": classes[int(probs.argmax())],
        "score": "per-patch probability of abnormality, 1 - p(negative class), from the head's "
        "instance classifier",
        "calibration": method,
        "patch_calibration": "specificity-referenced: 0.5 = the 99th percentile of patches of "
        "negative validation slides"
        if calibration and "patch" in calibration
        else method,
    }


def predict_store(
    model: Any,
    store: Path,
    *,
    classes: Sequence[str],
    run_id: str,
    device: Any,
    amp: bool = True,
    channels_last: bool = False,
    chunk: int = 512,
    features: str | None = None,
    run_dir: str = "",
    calibration: dict[str, Any] | None = None,
    group: Any = None,
    model_id: str | None = None,
) -> Prediction:
    """Predict one complete store and write its per-patch scores into it.

    Slide probabilities and per-patch scores go through the run's calibration (fitted on its
    validation slides; plain softmax when there is none).

    Parameters
    ----------
    model : MILModel
        In eval mode on ``device``.
    store : Path
        A complete store.
    classes : sequence of str
        The run's class names.
    run_id : str
        Scores go to ``scores/<run_id>``, ``scores/<run_id>-classes`` (and
        ``scores/<run_id>-attention``).
    device : torch.device
    amp, channels_last : bool
        See :func:`wsi_pipeline.inference.autocast` and :func:`~wsi_pipeline.inference.to_device`.
    chunk : int
        Patches per backbone pass.
    features : str, optional
        Extractor name: read ``features/<features>`` instead of embedding the patches.
    run_dir : str
        Recorded in the scores' attributes (``predict`` gives the absolute path, where the
        report and the viewer find the run's current model).
    calibration : dict, optional
        The run's ``calibration.json``.
    group : zarr.Group, optional
        ``store`` already opened with ``mode="r+"`` (opened here when None).
    model_id : str
        The run's :func:`wsi_pipeline.runs.model_id`, recorded in the scores' attributes.

    Returns
    -------
    Prediction
    """
    import torch

    from .calibration import apply_calibration, apply_patch_calibration

    g = open_store(store, mode="r+") if group is None else group
    sid = g.attrs.get("slide_id") or store.stem
    n = int(g[COORDS].shape[0])
    if n == 0:
        return Prediction(sid, {}, "", 0, run_id, "no patches in the store (no tissue)")
    h = _embed_all(
        model,
        store,
        g,
        device=device,
        amp=amp,
        channels_last=channels_last,
        chunk=chunk,
        features=features,
    )
    with torch.inference_mode():
        out = model.head_forward(h)
    probs = apply_calibration(out.logits.float().cpu().numpy(), calibration)
    neg = negative_class(classes)
    patch = apply_patch_calibration(out.patch_logits.float().cpu().numpy(), calibration)
    attrs = _score_attrs(run_id, run_dir, classes, neg, probs, calibration, model_id)
    # the run's earlier arrays go first: none of an earlier model (e.g. the attention a head
    # without attention would not overwrite) stays next to these
    remove_scores(g, run_id)
    write_scores(g, run_id, (1.0 - patch[:, neg]).astype(np.float32), attrs)
    write_class_scores(
        g,
        run_id,
        patch.astype(np.float32),
        classes,
        {
            "run": run_id,
            "negative_class": classes[neg],
            "score": "per-patch probability of each class (columns in the order of 'classes') "
            "from the head's instance classifier",
            "calibration": attrs["patch_calibration"],
            "model_id": attrs["model_id"],
        },
    )
    if out.attention is not None:
        write_scores(
            g,
            run_id,
            out.attention.float().cpu().numpy().astype(np.float32),
            {
                "run": run_id,
                "score": "attention weight (sums to 1 over the slide)",
                "model_id": attrs["model_id"],
            },
            attention=True,
        )
    return Prediction(sid, attrs["probabilities"], attrs["predicted"], n, run_id, "")


def write_predictions(path: Path, rows: Sequence[Prediction], classes: Sequence[str]) -> Path:
    """``predictions.csv``: slide_id, p_<class>..., probability (abnormal), predicted_label,
    n_patches, run_id, error (written atomically)."""
    neg = negative_class(classes)
    fields = [
        "slide_id",
        *[f"p_{c}" for c in classes],
        "probability",
        "predicted_label",
        "n_patches",
        "run_id",
        "error",
    ]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            row: dict[str, Any] = {
                "slide_id": r.slide_id,
                "predicted_label": r.predicted,
                "n_patches": r.n_patches,
                "run_id": r.run_id,
                "error": r.error,
            }
            for c in classes:
                row[f"p_{c}"] = f"{r.probabilities[c]:.6f}" if r.probabilities else ""
            row["probability"] = (
                f"{1.0 - r.probabilities[classes[neg]]:.6f}" if r.probabilities else ""
            )
            w.writerow(row)
    return path


def read_predictions(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a :func:`write_predictions` file as read by ``csv.DictReader`` (all values
    strings; ``probability`` is empty for a slide that was not predicted).

    Parameters
    ----------
    path : path
        A ``predictions.csv``.

    Returns
    -------
    list of dict
        One per slide, in file order; ``[]`` when there is no such file.
    """
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


def _open_ready(
    stores: Sequence[Path], tiling: dict[str, Any], rid: str
) -> tuple[list[_OpenStore], list[Prediction]]:
    """Open each store once: the complete ones tiled like the run, and error rows for the rest."""
    ready: list[_OpenStore] = []
    rows: list[Prediction] = []
    for sp in stores:
        try:
            g = open_store(sp, mode="r+")
        except StoreError:
            msg = f"{sp}: store is unfinished; rerun 'wsi-pipeline tile'"
            rows.append(Prediction(sp.stem, run_id=rid, error=msg))
            continue
        why = tiling_mismatch(dict(g.attrs["tiling"]), tiling)
        if why:
            msg = f"{sp}: {why}; tile the slide like the training slides"
            rows.append(Prediction(sp.stem, run_id=rid, error=msg))
            continue
        ready.append(_OpenStore(sp, g, int(g[COORDS].shape[0])))
    return ready, rows


def _run_features(
    ready: Sequence[_OpenStore], run: dict[str, Any], device: Any, *, progress: bool
) -> tuple[str, dict[Path, str]]:
    """Cache the run's frozen-backbone features in the stores: the extractor name, and the
    one-line error of each store that failed (the others go on)."""
    from .features import ensure_features

    run_dir = Path(run["dir"])
    failed: dict[Path, str] = {}
    features, _ = ensure_features(
        [s.path for s in ready if s.n_patches > 0],
        backbone=run["train_config"].backbone,
        weights=run_dir / runs.EXTRACTOR,
        device=device,
        progress=progress,
        failed=failed,
    )
    if features != run["config"].get("extractor"):
        raise TrainingError(
            f"{run_dir / runs.EXTRACTOR}: does not match the features the run "
            "was trained on; train again"
        )
    return features, failed


def predict(
    store_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    slide_ids: Sequence[str] | None = None,
    run_id: str | None = None,
    chunk: int = 512,
    progress: bool = True,
    allow_unfinished: bool = False,
) -> list[Prediction]:
    """Predict every complete store in ``store_dir`` with the run in ``run_dir``.

    Parameters
    ----------
    store_dir : path
        Folder of stores, or one store (:func:`~wsi_pipeline.store.find_stores`).
    run_dir : path
        A training run folder.
    out_dir : path
        Where ``predictions.csv`` goes.
    device : {"auto", "cpu", "cuda"}
    slide_ids : sequence of str, optional
        Only these slides.
    run_id : str, optional
        Name of the scores (``scores/<run_id>``); default: the run folder's name.
    chunk : int
        Patches per backbone pass.
    progress : bool
    allow_unfinished : bool
        Use a run whose training has not finished (refused otherwise); a WARNING says so.

    Returns
    -------
    list of Prediction
        One per store; failed ones carry an ``error`` (also in the CSV).

    Raises
    ------
    ConfigError
        ``store_dir`` is neither a store nor a folder holding any, or a slide id has no store
        (one line; never "0 of 0").
    TrainingError
        A missing or incompatible run folder, or a full disk: ``"disk full writing <file>;
        stopped after N of M slides"`` (the stores predicted before keep their scores; the
        slide being written has none; ``predictions.csv`` lists the slides not reached when
        there was room to write it, else it is the earlier file, untouched).
    """
    from .inference import load_model, resolve_device

    run = runs.load_run(run_dir, allow_unfinished=allow_unfinished)
    if not run["finished"]:
        log.warning(
            "%s: training has not finished; predicting with the best weights so far, "
            "uncalibrated (--allow-unfinished)",
            run_dir,
        )
    cfg = run["train_config"]
    classes = list(run["labels"]["classes"])
    rid = runs.run_id(run_dir, run_id)
    dev = resolve_device(device)
    model = load_model(run, device=dev)
    out = output_dir(out_dir)
    stores = find_stores(store_dir, slide_ids=slide_ids)
    ready, rows = _open_ready(stores, run["tiling"], rid)
    features = None
    if cfg.mode == "features" and ready:
        features, failed = _run_features(ready, run, dev, progress=progress)
        rows += [
            Prediction(s.path.stem, run_id=rid, error=failed[s.path])
            for s in ready
            if s.path in failed
        ]
        ready = [s for s in ready if s.path not in failed]
    t0 = time.time()
    options = {
        "classes": classes,
        "run_id": rid,
        "device": dev,
        "amp": cfg.amp,
        "channels_last": cfg.channels_last,
        "chunk": chunk,
        "features": features,
        "run_dir": str(Path(run["dir"]).absolute()),
        "calibration": run.get("calibration"),
        "model_id": run["model_id"],
    }
    bar = progress_bar(ready, desc="predict", unit="slide", progress=progress)
    for i, st in enumerate(bar):
        try:
            rows.append(_predict_locked(model, st, options))
        except OSError as exc:
            if not is_disk_full(exc):
                rows.append(Prediction(st.path.stem, run_id=rid, error=f"{st.path}: {exc}"))
                continue
            where = exc.filename or st.path
            _stop_disk_full(out, st, where, ready[i + 1 :], rows, classes, rid=rid, n=len(stores))
        except WSIPipelineError as exc:
            rows.append(Prediction(st.path.stem, run_id=rid, error=str(exc)))
    for r in rows:
        if r.error and not r.ok:
            log.error("%s", r.error)
    rows.sort(key=lambda r: r.slide_id)
    csv_path = out / runs.PREDICTIONS
    try:
        write_predictions(csv_path, rows, classes)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise TrainingError(disk_full_message(csv_path, len(rows), len(stores))) from exc
    log.info("predicted %d slide(s) in %.1f s", len(ready), time.time() - t0)
    return rows


def _predict_locked(model: Any, st: _OpenStore, options: dict[str, Any]) -> Prediction:
    """:func:`predict_store` under the store's lock (waiting for another writer of it)."""
    try:
        with locked(st.path, wait_s=STAGE_WAIT_S, name=str(st.path)):
            remove_partial_writes(st.path)  # left by a predict killed mid-write
            try:
                return predict_store(model, st.path, group=st.group, **options)
            except OSError as exc:  # the old scores are gone: leave none half-written
                if is_disk_full(exc):
                    with contextlib.suppress(OSError, WSIPipelineError):
                        remove_scores(st.group, options["run_id"])
                raise
    except StoreLocked as exc:
        raise StoreLocked(
            f"{exc}; not predicted: rerun predict when that run has ended", holder=exc.holder
        ) from None


def _stop_disk_full(
    out: Path,
    st: _OpenStore,
    where: str | os.PathLike,
    rest: Sequence[_OpenStore],
    rows: list[Prediction],
    classes: Sequence[str],
    *,
    rid: str,
    n: int,
) -> None:
    """The disk filled up writing ``where`` (``st``'s scores or lock): record the slides not
    reached in ``predictions.csv`` if there is room, and stop with one line."""
    msg = disk_full_message(where, len(rows), n)
    done = [
        *rows,
        Prediction(st.path.stem, run_id=rid, error=msg),
        *(Prediction(s.path.stem, run_id=rid, error=f"not predicted: {msg}") for s in rest),
    ]
    with contextlib.suppress(OSError):
        write_predictions(out / runs.PREDICTIONS, sorted(done, key=lambda r: r.slide_id), classes)
    raise TrainingError(msg)
