"""Declarative pipelines: one YAML file names the slides, labels, output folder and the options of
each stage; :func:`run_pipeline` runs ``synth -> tile -> train -> predict -> heatmap`` in order,
skipping stages whose outputs are complete and resuming the rest, and writes a run report.

The file is validated before any work starts: an unknown key, a wrong type or a missing path gives
one :class:`~wsi_pipeline.errors.ConfigError` naming the key. Relative paths are taken from the
folder the command runs in. See ``pipelines/*.yaml`` for documented examples.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["STAGES", "Pipeline", "load_options", "load_pipeline", "run_pipeline"]

log = logging.getLogger(__name__)

STAGES = ("synth", "tile", "train", "predict", "heatmap")

# tile options of a pipeline file -> (type, TilingSpec/MaskSpec/batch field)
_TILE_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "mpp": ((int, float), "spec"),
    "level": (int, "spec"),
    "tile_size": (int, "spec"),
    "overlap": (int, "spec"),
    "tissue_threshold": ((int, float), "spec"),
    "edge": (str, "spec"),
    "codec": (str, "spec"),
    "jpeg_quality": (int, "spec"),
    "patches_per_shard": (int, "spec"),
    "mask_file": (str, "mask"),
    "keep_pen": (bool, "mask"),
    "keep_dark": (bool, "mask"),
    "workers": (int, "batch"),
    "scheduler": (str, "batch"),
    "slide_mpp": ((int, float), "batch"),
    "backend": (str, "batch"),
    "overwrite": (bool, "batch"),
}
_PREDICT_KEYS: dict[str, type | tuple[type, ...]] = {"device": str, "run_id": str, "chunk": int}
_TOP_KEYS = {"name", "version", "out", "slides", "labels", "run", "stages", *STAGES}


def load_options(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON mapping from a file (for ``--config`` options)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    try:
        import yaml

        data = (
            yaml.safe_load(p.read_text())
            if p.suffix.lower() in (".yaml", ".yml")
            else json.loads(p.read_text())
        )
    except Exception as exc:
        raise ConfigError(f"{p}: not valid YAML/JSON ({' '.join(str(exc).split())})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must be a mapping of option: value")
    return data


@dataclass
class Pipeline:
    """A validated pipeline file."""

    path: str
    name: str
    out: Path
    slides: list[Path] = field(default_factory=list)
    labels: Path | None = None
    run: Path | None = None
    stages: tuple[str, ...] = STAGES
    synth: dict[str, Any] | None = None
    tile: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] | None = None
    predict: dict[str, Any] = field(default_factory=dict)
    heatmap: dict[str, Any] | None = None

    @property
    def stores(self) -> Path:
        return self.out / "stores"

    @property
    def run_dir(self) -> Path:
        return self.run if self.run is not None else self.out / "run"

    @property
    def cohort(self) -> Path:
        return self.out / "cohort"


def _type_name(t: type | tuple[type, ...]) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(
        "number" if x is float else x.__name__ for x in ts if x is not int or float not in ts
    )


def _check_type(where: str, key: str, value: Any, t: type | tuple[type, ...]) -> None:
    ts = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool) and bool not in ts:
        ok = False
    else:
        ok = isinstance(value, ts)
    if not ok:
        raise ConfigError(
            f"{where}: '{key}' must be {_type_name(t)}, not {type(value).__name__} ({value!r})"
        )


def _section(where: str, data: Any, name: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{name}' must be a mapping of options")
    return dict(data)


def _signature_types(fn: Callable[..., Any], skip: set[str]) -> dict[str, Any]:
    """Keyword-only parameters of ``fn`` and their defaults (for validating a section)."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in skip or p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        out[name] = p.default
    return out


def _check_section(where: str, section: str, data: dict[str, Any], allowed: dict[str, Any]) -> None:
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key '{section}.{key}' (known: {', '.join(sorted(allowed))})"
            )
        t = allowed[key]
        if isinstance(t, type | tuple):
            _check_type(where, f"{section}.{key}", value, t)
        elif t is not None and t is not inspect.Parameter.empty and value is not None:
            expect: Any = type(t)
            if expect is float:
                expect = (int, float)
            if expect in (int, float, str, bool) or isinstance(expect, tuple):
                _check_type(where, f"{section}.{key}", value, expect)


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Read and validate a pipeline file (nothing runs).

    Raises
    ------
    ConfigError
        Unknown key, wrong type, missing path or stage inputs -- naming the key.
    """
    from .specs import TrainConfig

    data = load_options(path)
    where = str(path)
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"{where}: unknown key '{key}' (known: {', '.join(sorted(_TOP_KEYS))})"
            )
    if "out" not in data:
        raise ConfigError(f"{where}: 'out' (the output folder) is required")
    _check_type(where, "out", data["out"], str)
    stages = data.get("stages", list(STAGES))
    if not isinstance(stages, list) or any(s not in STAGES for s in stages):
        raise ConfigError(f"{where}: 'stages' must be a list of {', '.join(STAGES)}")
    p = Pipeline(
        path=where,
        name=str(data.get("name") or Path(path).stem),
        out=Path(data["out"]),
        stages=tuple(s for s in STAGES if s in stages),
    )

    if "synth" in data and "synth" in p.stages:
        from .synth import _SLIDE_DEFAULTS, write_cohort

        p.synth = _section(where, data["synth"], "synth")
        allowed = {**_signature_types(write_cohort, {"out_dir"}), **_SLIDE_DEFAULTS}
        _check_section(where, "synth", p.synth, allowed)
    elif "synth" in p.stages:
        p.stages = tuple(s for s in p.stages if s != "synth")

    slides = data.get("slides")
    if slides is not None:
        items = slides if isinstance(slides, list) else [slides]
        for s in items:
            _check_type(where, "slides", s, str)
        p.slides = [Path(s) for s in items]
    elif p.synth is not None:
        p.slides = [p.cohort / "slides"]
    if "labels" in data:
        _check_type(where, "labels", data["labels"], str)
        p.labels = Path(data["labels"])
    elif p.synth is not None:
        p.labels = p.cohort / "labels.csv"
    if "run" in data:
        _check_type(where, "run", data["run"], str)
        p.run = Path(data["run"])

    p.tile = _section(where, data.get("tile"), "tile")
    _check_section(where, "tile", p.tile, {k: t for k, (t, _) in _TILE_KEYS.items()})
    if "train" in p.stages:
        if "train" not in data:
            p.stages = tuple(s for s in p.stages if s != "train")
        else:
            p.train = _section(where, data["train"], "train")
            allowed = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
            allowed["folds"] = None
            _check_section(where, "train", p.train, allowed)
            try:
                TrainConfig.from_dict({k: v for k, v in p.train.items()})
            except ConfigError as exc:
                raise ConfigError(f"{where}: train: {exc}") from exc
    p.predict = _section(where, data.get("predict"), "predict")
    _check_section(where, "predict", p.predict, dict(_PREDICT_KEYS))
    if "heatmap" in p.stages:
        if "heatmap" in data:
            from .heatmap import heatmaps

            p.heatmap = _section(where, data["heatmap"], "heatmap")
            _check_section(
                where,
                "heatmap",
                p.heatmap,
                _signature_types(heatmaps, {"store_dir", "out_dir", "run_id"}),
            )
        else:
            p.stages = tuple(s for s in p.stages if s != "heatmap")

    # inputs each stage needs, checked now rather than half-way
    if "tile" in p.stages and not p.slides:
        raise ConfigError(f"{where}: 'slides' is required for the tile stage")
    if "tile" in p.stages and p.synth is None:
        for s in p.slides:
            if not s.exists():
                raise ConfigError(f"{where}: 'slides': {s} does not exist")
    if "train" in p.stages:
        if p.labels is None:
            raise ConfigError(f"{where}: 'labels' is required for the train stage")
        if p.synth is None and not p.labels.is_file():
            raise ConfigError(f"{where}: 'labels': {p.labels} does not exist")
    if "train" not in p.stages and ({"predict", "heatmap"} & set(p.stages)):
        if p.run is None:
            raise ConfigError(
                f"{where}: 'run' (a trained run folder) is required when there is no train stage"
            )
        if not (p.run / "model.pt").is_file():
            raise ConfigError(f"{where}: 'run': {p.run} is not a trained run (no model.pt)")
    return p


def _tiling_spec(opts: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from .specs import MaskSpec, TilingSpec

    spec_kw: dict[str, Any] = {}
    mask_kw: dict[str, Any] = {}
    batch: dict[str, Any] = {}
    rename = {"tile_size": "tile_px", "overlap": "overlap_px", "tissue_threshold": "min_tissue"}
    for k, v in opts.items():
        kind = _TILE_KEYS[k][1]
        if kind == "spec":
            spec_kw[rename.get(k, k)] = v
        elif kind == "mask":
            if k == "mask_file":
                mask_kw.update(method="user", user_mask=v)
            else:
                mask_kw["remove_pen" if k == "keep_pen" else "remove_dark"] = not v
        else:
            batch[k] = v
    if "mpp" not in spec_kw and "level" not in spec_kw:
        spec_kw["level"] = 0
    return TilingSpec(mask=MaskSpec(**mask_kw), **spec_kw), batch


def run_pipeline(
    pipeline: Pipeline | str | os.PathLike, *, progress: bool = True, debug: bool = False
) -> dict[str, Any]:
    """Run a pipeline's stages in order, skipping complete ones; writes ``<out>/report.json``.

    Returns
    -------
    dict
        The report: per stage status (ran / skipped / failed), seconds and outputs, and a
        summary (held-out AUC, heatmap paths) when those stages ran.
    """
    p = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
    p.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "pipeline": p.path,
        "name": p.name,
        "out": str(p.out),
        "stages": [],
        "failed": False,
    }
    started = time.time()

    def stage(name: str, fn: Callable[[], tuple[str, dict[str, Any]]]) -> None:
        t0 = time.time()
        log.info("stage %s ...", name)
        status, outputs = fn()
        rec = {"stage": name, "status": status, "seconds": round(time.time() - t0, 2), **outputs}
        report["stages"].append(rec)
        log.info("stage %s: %s (%.1f s)", name, status, rec["seconds"])
        _write_report(p, report)

    if "synth" in p.stages and p.synth is not None:

        def do_synth() -> tuple[str, dict[str, Any]]:
            from .synth import write_cohort

            marker = p.cohort / "cohort.json"
            before = marker.read_text() if marker.exists() else None
            write_cohort(p.cohort, **p.synth)  # skips slides that are already written
            return ("skipped" if before == marker.read_text() else "ran"), {"cohort": str(p.cohort)}

        stage("synth", do_synth)

    if "tile" in p.stages:

        def do_tile() -> tuple[str, dict[str, Any]]:
            from .tiling import tile_slides

            spec, batch = _tiling_spec(p.tile)
            res = tile_slides(
                p.slides, p.stores, spec=spec, progress=progress, debug=debug, **batch
            )
            failed = [r for r in res if not r.ok]
            if failed:
                report["failed"] = True
            counts: dict[str, int] = {}
            for r in res:
                counts[r.status] = counts.get(r.status, 0) + 1
            status = "skipped" if counts.get("skipped", 0) == len(res) else "ran"
            return status, {
                "stores": str(p.stores),
                "slides": counts,
                "manifest": str(p.stores / "manifest.csv"),
            }

        stage("tile", do_tile)

    if "train" in p.stages and p.train is not None:

        def do_train() -> tuple[str, dict[str, Any]]:
            from .specs import TrainConfig
            from .training import train

            opts = dict(p.train)
            opts.pop("folds", None)
            config = TrainConfig.from_dict(opts)
            from .runs import run_state

            state = run_state(p.run_dir, config)
            if state == "done":
                return "skipped", {"run": str(p.run_dir)}
            train(
                p.stores,
                p.labels,
                p.run_dir,
                config=config,
                resume=state == "resume",
                progress=progress,
            )
            return ("resumed" if state == "resume" else "ran"), {"run": str(p.run_dir)}

        stage("train", do_train)

    if "predict" in p.stages:

        def do_predict() -> tuple[str, dict[str, Any]]:
            from .prediction import predict

            pred_dir = p.out / "predictions"
            csv_path = pred_dir / "predictions.csv"
            model = p.run_dir / "model.pt"
            if (
                csv_path.is_file()
                and csv_path.stat().st_mtime >= model.stat().st_mtime
                and _all_scored(p)
            ):
                return "skipped", {"predictions": str(csv_path)}
            rows = predict(p.stores, p.run_dir, pred_dir, progress=progress, **p.predict)
            if any(not r.ok for r in rows):
                report["failed"] = True
            return "ran", {"predictions": str(csv_path)}

        stage("predict", do_predict)

    if "heatmap" in p.stages and p.heatmap is not None:

        def do_heatmap() -> tuple[str, dict[str, Any]]:
            from .heatmap import heatmaps

            heat_dir = p.out / "heatmaps"
            res = heatmaps(p.stores, heat_dir, run_id=_run_id(p), **p.heatmap)
            if any(not r["ok"] for r in res):
                report["failed"] = True
            pngs = sorted(r["files"]["png"] for r in res if "png" in r.get("files", {}))
            status = "skipped" if all(r["status"] == "skipped" for r in res) else "ran"
            return status, {"heatmaps": str(heat_dir), "png": pngs}

        stage("heatmap", do_heatmap)

    report["summary"] = _summary(p)
    report["seconds"] = round(time.time() - started, 2)
    _write_report(p, report)
    return report


def _run_id(p: Pipeline) -> str:

    from .runs import run_id

    return run_id(p.run_dir, p.predict.get("run_id"))


def _all_scored(p: Pipeline) -> bool:
    from .store import is_complete, list_stores, open_store

    rid = _run_id(p)
    for sp in list_stores(p.stores):
        if not is_complete(sp):
            continue
        g = open_store(sp)
        if int(g["coords"].shape[0]) and f"scores/{rid}" not in g:
            return False
    return True


def _summary(p: Pipeline) -> dict[str, Any]:
    """Held-out slide-level AUC from predictions.csv and the run's splits, and test metrics."""
    import csv

    from .metrics import auc_score

    out: dict[str, Any] = {}
    run = p.run_dir
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        if "test" in metrics:
            out["test_auc"] = metrics["test"]["auc"]
            out["test_n"] = metrics["test"]["n"]
        out["best_val_auc"] = metrics.get("best_val_auc")
    except (OSError, ValueError):
        pass
    pred = p.out / "predictions" / "predictions.csv"
    if pred.is_file() and (run / "splits.csv").is_file():
        with open(run / "splits.csv") as fh:
            splits = {r["slide_id"]: r for r in csv.DictReader(fh)}
        with open(pred) as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("probability")]
        held = [r for r in rows if splits.get(r["slide_id"], {}).get("split") in ("val", "test")]
        labels = json.loads((run / "labels.json").read_text())["classes"]
        from .data import negative_class

        neg = labels[negative_class(labels)]
        y = [int(splits[r["slide_id"]]["label"] != neg) for r in held]
        s = [float(r["probability"]) for r in held]
        if held:
            auc = auc_score(y, np.asarray(s))
            out["held_out_auc"] = None if math.isnan(auc) else auc
            out["held_out_n"] = len(held)
    return out


def _write_report(p: Pipeline, report: dict[str, Any]) -> None:
    tmp = p.out / f".report.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, p.out / "report.json")
