"""Declarative pipelines: one YAML file names the slides, labels, output folder and the options of
each stage; :func:`run_pipeline` runs ``synth -> tile -> train -> predict -> evaluate -> heatmap``
in order,
skipping stages whose outputs are complete and resuming the rest, and writes a run report.

The file is validated before any work starts: an unknown key, a wrong type, a bad value or a
missing path gives one :class:`~wsi_pipeline.errors.ConfigError` naming the key. The tile and
train sections use the command line's option names and are turned into specs by the same
functions the command line calls (:func:`~wsi_pipeline.specs.tiling_from_options`,
:func:`~wsi_pipeline.specs.train_config_from_options`), once, when the file is loaded. Relative
paths are taken from the folder the command runs in. See ``pipelines/*.yaml`` for documented
examples.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

import numpy as np

from . import runs
from .errors import ConfigError
from .specs import (
    PREDICT_OPTIONS,
    TILE_OPTIONS,
    TRAIN_OPTIONS,
    PretrainConfig,
    TilingSpec,
    TrainConfig,
    tiling_from_options,
    train_config_from_options,
)
from .util import atomic_write_json, check_output_path, input_file, output_dir

__all__ = ["REPORT", "STAGES", "Pipeline", "load_options", "load_pipeline", "run_pipeline"]

log = logging.getLogger(__name__)

STAGES = ("synth", "tile", "pretrain", "train", "predict", "evaluate", "heatmap")
REPORT = "report.json"  #: the run report, in the pipeline's output folder
_TOP_KEYS = {"name", "version", "out", "slides", "labels", "run", "stages", *STAGES}

Types: TypeAlias = type | tuple[type, ...]


def _parse_error(exc: Exception) -> str:
    """Where and why a YAML/JSON text failed to parse: ``"line L, column C: problem"`` when
    the parser says where (1-based, as editors count), else its message on one line."""
    mark = getattr(exc, "problem_mark", None)  # yaml.MarkedYAMLError
    if mark is not None:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
    return " ".join(str(exc).split())


def load_options(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON mapping from a file (for ``--config`` options).

    Raises
    ------
    ConfigError
        No such file, not YAML/JSON, or not a mapping.
    """
    p = input_file(path)
    try:
        import yaml

        text = p.read_text()
        data = yaml.safe_load(text) if p.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except Exception as exc:
        raise ConfigError(f"{p}: not valid YAML/JSON ({_parse_error(exc)})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must be a mapping of option: value")
    return data


@dataclass
class Pipeline:
    """A validated pipeline file.

    The ``synth``/``tile``/``train``/``predict``/``evaluate``/``heatmap`` mappings are the
    sections as written;
    ``tiling``, ``tile_batch``, ``train_config`` and ``folds`` are what they were turned into
    (and what runs).
    """

    path: str
    name: str
    out: Path
    slides: list[Path] = field(default_factory=list)
    labels: Path | None = None
    run: Path | None = None
    stages: tuple[str, ...] = STAGES
    synth: dict[str, Any] | None = None
    tile: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] | None = None
    pretrain_config: PretrainConfig | None = None
    train: dict[str, Any] | None = None
    predict: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] | None = None
    heatmap: dict[str, Any] | None = None
    tiling: TilingSpec = field(default_factory=TilingSpec)
    tile_batch: dict[str, Any] = field(default_factory=dict)
    train_config: TrainConfig | None = None
    folds: int | None = None

    @property
    def stores(self) -> Path:
        return self.out / "stores"

    @property
    def pretrained(self) -> Path:
        """The pretrain stage's weights file, which the train stage starts its backbone from."""
        return self.out / "pretrain" / "backbone.pt"

    @property
    def run_dir(self) -> Path:
        return self.run if self.run is not None else self.out / "run"

    @property
    def cohort(self) -> Path:
        return self.out / "cohort"

    @property
    def predictions(self) -> Path:
        """predict's output folder (``predictions.csv``)."""
        return self.out / "predictions"

    @property
    def heatmaps(self) -> Path:
        return self.out / "heatmaps"

    @property
    def evaluation(self) -> Path:
        """evaluate's output folder (``evaluation.json``, ...)."""
        return self.out / "evaluation"

    @property
    def evaluate_stores(self) -> Path:
        """The stores the evaluate stage scores (``evaluate.stores``, else the pipeline's)."""
        given = (self.evaluate or {}).get("stores")
        return Path(given) if given else self.stores

    @property
    def run_id(self) -> str:
        """The id of the run's scores in the stores (``predict.run_id`` or the run folder's)."""
        return runs.run_id(self.run_dir, self.predict.get("run_id"))


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _type_name(t: Types) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(
        "number" if x is float else x.__name__ for x in ts if x is not int or float not in ts
    )


def _check_type(where: str, key: str, value: Any, t: Types) -> None:
    ts = t if isinstance(t, tuple) else (t,)
    ok = isinstance(value, ts) and not (isinstance(value, bool) and bool not in ts)
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


class _Rule(NamedTuple):
    """What a key of a section accepts: values of ``types`` (None: anything), or null."""

    types: Types | None
    null_ok: bool


def _typed(options: Mapping[str, Any], *, null_ok: bool = False) -> dict[str, _Rule]:
    """Rules of an option table (:data:`~wsi_pipeline.specs.TILE_OPTIONS` ...)."""
    return {name: _Rule(opt.types, null_ok) for name, opt in options.items()}


def _from_defaults(defaults: Mapping[str, Any]) -> dict[str, _Rule]:
    """Rules from default values: a value of the default's type, or null."""

    def types(default: Any) -> Types | None:
        if isinstance(default, bool | str):
            return type(default)
        if isinstance(default, float):
            return (int, float)
        return int if isinstance(default, int) else None

    return {name: _Rule(types(d), True) for name, d in defaults.items()}


def _keywords(fn: Callable[..., Any], skip: set[str]) -> dict[str, Any]:
    """Keyword parameters of ``fn`` and their defaults."""
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def _check_section(where: str, section: str, data: dict[str, Any], rules: dict[str, _Rule]) -> None:
    """Every key of ``data`` known, every value of its type."""
    for key, value in data.items():
        rule = rules.get(key)
        if rule is None:
            raise ConfigError(
                f"{where}: unknown key '{section}.{key}' (known: {', '.join(sorted(rules))})"
            )
        if rule.types is not None and not (value is None and rule.null_ok):
            _check_type(where, f"{section}.{key}", value, rule.types)


def _stage_section(
    p: Pipeline, data: dict[str, Any], where: str, name: str
) -> dict[str, Any] | None:
    """The section of a stage that needs one (synth, train, evaluate, heatmap), or None: the
    stage is not
    listed, or the file has no such section (the stage is then dropped from ``p.stages``)."""
    if name not in p.stages:
        return None
    if name not in data:
        p.stages = tuple(s for s in p.stages if s != name)
        return None
    return _section(where, data[name], name)


def _load_top(data: dict[str, Any], where: str, path: str | os.PathLike) -> Pipeline:
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"{where}: unknown key '{key}' (known: {', '.join(sorted(_TOP_KEYS))})"
            )
    if "out" not in data:
        raise ConfigError(f"{where}: 'out' (the output folder) is required")
    _check_type(where, "out", data["out"], str)
    try:
        check_output_path(data["out"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: 'out': {exc}") from None
    stages = data.get("stages", list(STAGES))
    if not isinstance(stages, list) or any(s not in STAGES for s in stages):
        raise ConfigError(f"{where}: 'stages' must be a list of {', '.join(STAGES)}")
    return Pipeline(
        path=where,
        name=str(data.get("name") or Path(path).stem),
        out=Path(data["out"]),
        stages=tuple(s for s in STAGES if s in stages),
    )


def _load_synth(p: Pipeline, data: dict[str, Any], where: str) -> None:
    p.synth = _stage_section(p, data, where, "synth")
    if p.synth is None:
        return
    from .synth import SLIDE_DEFAULTS, check_cohort_options, write_cohort

    defaults = {**_keywords(write_cohort, {"out_dir"}), **SLIDE_DEFAULTS}
    _check_section(where, "synth", p.synth, _from_defaults(defaults))
    try:
        check_cohort_options(**p.synth)  # the values, by the code write_cohort runs
    except ConfigError as exc:
        raise ConfigError(f"{where}: 'synth': {exc}") from None


def _load_paths(p: Pipeline, data: dict[str, Any], where: str) -> None:
    slides = data.get("slides")
    if slides is not None:
        items = slides if isinstance(slides, list) else [slides]
        for s in items:
            _check_type(where, "slides", s, str)
        p.slides = [Path(s) for s in items]
    elif p.synth is not None:
        from .synth import SLIDES_DIR

        p.slides = [p.cohort / SLIDES_DIR]
    if "labels" in data:
        _check_type(where, "labels", data["labels"], str)
        p.labels = Path(data["labels"])
    elif p.synth is not None:
        from .synth import LABELS_FILE

        p.labels = p.cohort / LABELS_FILE
    if "run" in data:
        _check_type(where, "run", data["run"], str)
        p.run = Path(data["run"])


def _load_tile(p: Pipeline, data: dict[str, Any], where: str) -> None:
    p.tile = _section(where, data.get("tile"), "tile")
    _check_section(where, "tile", p.tile, _typed(TILE_OPTIONS))
    try:
        p.tiling, p.tile_batch = tiling_from_options(p.tile)
    except ConfigError as exc:
        raise ConfigError(f"{where}: tile: {exc}") from exc


def _load_train(p: Pipeline, data: dict[str, Any], where: str) -> None:
    p.train = _stage_section(p, data, where, "train")
    if p.train is None:
        return
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    rules = {**_from_defaults(fields), **_typed(TRAIN_OPTIONS, null_ok=True)}
    _check_section(where, "train", p.train, rules)
    try:
        p.train_config, p.folds = train_config_from_options(p.train)
    except ConfigError as exc:
        raise ConfigError(f"{where}: train: {exc}") from exc
    _check_model(p.train_config, where)


def _load_pretrain(p: Pipeline, data: dict[str, Any], where: str) -> None:
    """The pretrain section: PretrainConfig's fields, checked by PretrainConfig itself; the
    train stage then starts from its weights (same backbone, no backbone_weights of its own)."""
    from .models import get_backbone

    p.pretrain = _stage_section(p, data, where, "pretrain")
    if p.pretrain is None:
        return
    fields = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    _check_section(where, "pretrain", p.pretrain, _from_defaults(fields))
    try:
        p.pretrain_config = PretrainConfig(**p.pretrain)
        get_backbone(p.pretrain_config.backbone)  # an unknown name lists the known ones
    except (ConfigError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: pretrain: {exc}") from None
    train = data.get("train") if "train" in p.stages else None
    if not isinstance(train, dict):
        return  # no train stage, or a section that _load_train refuses
    if train.get("backbone_weights") is not None:
        raise ConfigError(
            f"{where}: 'train.backbone_weights' and a 'pretrain' section both give the "
            "backbone's weights; keep one"
        )
    backbone = train.get("backbone", TrainConfig.backbone)
    if backbone != p.pretrain_config.backbone:
        raise ConfigError(
            f"{where}: 'pretrain.backbone' ({p.pretrain_config.backbone}) must be "
            f"'train.backbone' ({backbone}): train starts from the pretrained weights"
        )


def _check_model(config: TrainConfig, where: str) -> None:
    """Build the model (and, in features mode, the encoder) the train stage will build, by the
    stage's own code: unknown model or backbone, a weights file that is missing, refused or does
    not fit, fail now in one line."""
    from .errors import TrainingError
    from .inference import build_model

    try:
        if config.mode == "features":
            from .features import load_encoder
            from .weights import NO_WEIGHTS

            weights = config.backbone_weights or NO_WEIGHTS
            enc = load_encoder(backbone=config.backbone, weights=weights, seed=config.seed)
            build_model(config, 2, in_dim=enc.dim)
        else:
            build_model(config, 2)
    except (ConfigError, TrainingError) as exc:
        raise ConfigError(f"{where}: train: {exc}") from None


def _check_device(p: Pipeline, where: str) -> None:
    """The predict section's device, by the code predict resolves it with."""
    from .inference import resolve_device

    device = p.predict.get("device")
    if device is not None:
        try:
            resolve_device(str(device))
        except ConfigError as exc:
            raise ConfigError(f"{where}: predict.device: {exc}") from None


def _load_heatmap(p: Pipeline, data: dict[str, Any], where: str) -> None:
    p.heatmap = _stage_section(p, data, where, "heatmap")
    if p.heatmap is None:
        return
    from .heatmap import check_options, heatmaps
    from .stitch import COMBINE, check_combine

    defaults = _keywords(heatmaps, {"store_dir", "out_dir", "run_id", "model_id"})
    _check_section(where, "heatmap", p.heatmap, _from_defaults(defaults))
    h = p.heatmap
    classes = _known_classes(p) if h.get("class_name") is not None else None
    try:  # the values, by the code the heatmap stage runs
        check_options(
            h.get("which", "score"),
            h.get("mode"),
            h.get("threshold"),
            h.get("class_name"),
            classes=classes,
        )
        check_combine(h.get("combine", COMBINE[0]))
    except ConfigError as exc:
        raise ConfigError(f"{where}: 'heatmap': {exc}") from None


def _known_classes(p: Pipeline) -> list[str] | None:
    """The classes of the run the heatmap stage draws, when they can be known before it runs:
    the train stage's labels file, else the given run's ``labels.json``; None otherwise."""
    from .data import read_labels

    if "train" in p.stages:
        if p.labels is None or not p.labels.is_file():
            return None
        return list(read_labels(p.labels).classes)
    if p.run is not None and (p.run / runs.LABELS).is_file():
        return runs.read_classes(p.run)
    return None


#: Keys of the ``evaluate`` section that are not keywords of
#: :func:`~wsi_pipeline.evaluation.evaluate`: the labels (required) and the stores to score.
_EVALUATE_PATHS = {"labels": _Rule(str, False), "stores": _Rule(str, False)}
#: Parameters of :func:`~wsi_pipeline.evaluation.evaluate` the ``evaluate`` section cannot set.
_EVALUATE_FIXED = {"store_dir", "run_dir", "labels_csv", "out_dir", "run_id", "progress"}


def _load_evaluate(p: Pipeline, data: dict[str, Any], where: str) -> None:
    p.evaluate = _stage_section(p, data, where, "evaluate")
    if p.evaluate is None:
        return
    from .evaluation import check_options, evaluate

    rules = {**_from_defaults(_keywords(evaluate, _EVALUATE_FIXED)), **_EVALUATE_PATHS}
    _check_section(where, "evaluate", p.evaluate, rules)
    if "labels" not in p.evaluate:
        raise ConfigError(
            f"{where}: 'evaluate.labels' (the labels of the slides to score) is required"
        )
    given = {k: p.evaluate[k] for k in ("n_boot", "seed") if p.evaluate.get(k) is not None}
    try:
        check_options(**given)
    except ConfigError as exc:
        raise ConfigError(f"{where}: evaluate: {exc}") from exc


def _evaluate_options(p: Pipeline) -> dict[str, Any]:
    """Keywords of :func:`~wsi_pipeline.evaluation.evaluate` from the ``evaluate`` section."""
    return {
        k: v for k, v in (p.evaluate or {}).items() if k not in _EVALUATE_PATHS and v is not None
    }


def _train_labels(p: Pipeline) -> Path:
    if p.labels is None:
        raise ConfigError(f"{p.path}: 'labels' is required for the train stage")
    return p.labels


def _check_inputs(p: Pipeline, where: str) -> None:
    """The inputs each stage needs, checked now rather than half-way."""
    if "tile" in p.stages and not p.slides:
        raise ConfigError(f"{where}: 'slides' is required for the tile stage")
    if "tile" in p.stages and p.synth is None:
        for s in p.slides:
            if not s.exists():
                raise ConfigError(f"{where}: 'slides': {s} does not exist")
    uses_model = {"predict", "evaluate", "heatmap"} & set(p.stages)
    if p.evaluate is not None:
        labels = Path(p.evaluate["labels"])
        if not labels.is_file():
            raise ConfigError(f"{where}: 'evaluate.labels': {labels} does not exist")
        stores = p.evaluate_stores
        if stores != p.stores and not stores.is_dir():
            raise ConfigError(f"{where}: 'evaluate.stores': {stores} does not exist")
    if "train" in p.stages:
        labels = _train_labels(p)
        if p.synth is None and not labels.is_file():
            raise ConfigError(f"{where}: 'labels': {labels} does not exist")
        if p.folds and uses_model:
            raise ConfigError(
                f"{where}: 'train.folds' trains {p.folds} fold runs (cross-validation), no one "
                f"model for the {' and '.join(sorted(uses_model))} stage(s): list the stages "
                "without them, e.g. 'stages: [tile, train]', and predict with a fold's run in "
                "another pipeline"
            )
    elif uses_model:
        if p.run is None:
            raise ConfigError(
                f"{where}: 'run' (a trained run folder) is required when there is no train stage"
            )
        if not (p.run / runs.MODEL).is_file():
            raise ConfigError(f"{where}: 'run': {p.run} is not a trained run (no {runs.MODEL})")


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Read and validate a pipeline file, and build its specs (nothing runs).

    Raises
    ------
    ConfigError
        Unknown key, wrong type, bad value, missing path or stage inputs -- naming the key.
    """
    data = load_options(path)
    where = str(path)
    p = _load_top(data, where, path)
    _load_synth(p, data, where)
    _load_paths(p, data, where)
    _load_tile(p, data, where)
    _load_pretrain(p, data, where)  # before train: its weights are the pretrain stage's
    _load_train(p, data, where)
    p.predict = _section(where, data.get("predict"), "predict")
    _check_section(where, "predict", p.predict, _typed(PREDICT_OPTIONS))
    _check_device(p, where)
    _load_evaluate(p, data, where)
    _load_heatmap(p, data, where)
    _check_inputs(p, where)
    return p


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
class _Outcome(NamedTuple):
    status: str  # ran / resumed / skipped
    outputs: dict[str, Any]
    failed: bool = False


def _synth_stage(p: Pipeline, *, progress: bool, debug: bool) -> _Outcome:
    from .synth import COHORT_FILE, write_cohort

    marker = p.cohort / COHORT_FILE
    before = marker.read_text() if marker.exists() else None
    write_cohort(p.cohort, **(p.synth or {}))  # skips slides that are already written
    status = "skipped" if before == marker.read_text() else "ran"
    return _Outcome(status, {"cohort": str(p.cohort)})


def _tile_stage(p: Pipeline, *, progress: bool, debug: bool) -> _Outcome:
    from .tile_batch import MANIFEST, tile_slides

    res = tile_slides(
        p.slides, p.stores, spec=p.tiling, progress=progress, debug=debug, **p.tile_batch
    )
    counts: dict[str, int] = {}
    for r in res:
        counts[r.status] = counts.get(r.status, 0) + 1
    status = "skipped" if counts.get("skipped", 0) == len(res) else "ran"
    outputs = {
        "stores": str(p.stores),
        "slides": counts,
        "manifest": str(p.stores / MANIFEST),
    }
    return _Outcome(status, outputs, failed=any(not r.ok for r in res))


def _pretrain_stage(p: Pipeline, *, progress: bool, debug: bool) -> _Outcome:
    """Self-supervised pretraining on the stores' patches into ``out/pretrain/backbone.pt``:
    skipped when that file was made with these options from these stores, resumed from its
    checkpoint after an interruption, started over when the options changed."""
    import shutil

    from .features import find_stores
    from .pretrain import pretrain, pretrain_state, work_dir_for

    config = p.pretrain_config or PretrainConfig()
    out, work = p.pretrained, work_dir_for(p.pretrained)
    outputs = {"weights": str(out)}
    state = pretrain_state(out, config, find_stores([p.stores]))
    if state == "done":
        return _Outcome("skipped", outputs)
    resume = state == "resume"
    if not resume:  # other options or stores: what an earlier pretraining left goes
        shutil.rmtree(work, ignore_errors=True)
        out.unlink(missing_ok=True)
    pretrain([p.stores], out, config, work=work, resume=resume, progress=progress)
    return _Outcome("resumed" if resume else "ran", outputs)


def _train_stage(p: Pipeline, *, progress: bool, debug: bool) -> _Outcome:
    from .locks import run_lock

    with run_lock(p.run_dir):  # one training per run folder
        return _train_locked(p, progress=progress)


def _train_locked(p: Pipeline, *, progress: bool) -> _Outcome:
    from .training import train, train_folds

    config = p.train_config or TrainConfig()
    if p.pretrain is not None:  # start from the pretrain stage's weights
        config = dataclasses.replace(config, backbone_weights=str(p.pretrained))
    if p.folds:
        state = runs.cv_state(p.run_dir, config, p.folds)
    else:
        state = runs.run_state(p.run_dir, config)
    model = p.run_dir / runs.MODEL
    if (
        state == "done"
        and p.pretrain is not None
        and model.is_file()
        and p.pretrained.stat().st_mtime > model.stat().st_mtime
    ):
        state = "fresh"  # the same config, but the pretrained weights were made again since
    outputs = {"run": str(p.run_dir)}
    if state == "done":
        return _Outcome("skipped", outputs)
    resume = state == "resume"
    labels = _train_labels(p)
    if p.folds:
        train_folds(
            p.stores,
            labels,
            p.run_dir,
            config=config,
            folds=p.folds,
            resume=resume,
            progress=progress,
        )
    else:
        train(p.stores, labels, p.run_dir, config=config, resume=resume, progress=progress)
    return _Outcome("resumed" if resume else "ran", outputs)


def _all_scored(p: Pipeline) -> bool:
    """Every complete store with patches has finished scores and per-class probabilities of the
    run's current model (a store predicted before those were written, by a killed predict or by
    an earlier model of the run is predicted again)."""
    from .store import (
        COORDS,
        class_scores_key,
        has_complete_array,
        is_complete,
        list_stores,
        open_store,
        scores_key,
    )

    keys = (scores_key(p.run_id), class_scores_key(p.run_id))
    current = runs.model_id(p.run_dir)
    for sp in list_stores(p.stores):
        if not is_complete(sp):
            continue
        g = open_store(sp)
        if not int(g[COORDS].shape[0]):
            continue
        if not all(has_complete_array(g, k) for k in keys):
            return False
        if g[keys[0]].attrs.get("model_id") != current:
            return False
    return True


def _predict_stage(p: Pipeline, *, progress: bool, debug: bool) -> _Outcome:
    from .prediction import predict

    csv_path = p.predictions / runs.PREDICTIONS
    outputs = {"predictions": str(csv_path)}
    model = p.run_dir / runs.MODEL
    fresh = csv_path.is_file() and csv_path.stat().st_mtime >= model.stat().st_mtime
    if fresh and _all_scored(p):
        return _Outcome("skipped", outputs)
    rows = predict(p.stores, p.run_dir, p.predictions, progress=progress, **p.predict)
    return _Outcome("ran", outputs, failed=any(not r.ok for r in rows))


def _previous_evaluation(p: Pipeline) -> dict[str, Any] | None:
    """The evaluation.json of an earlier run of this stage when it is still current: newer than
    the model and the labels, for the same stores, labels and options."""
    from .evaluation import EVALUATION, evaluate

    path = p.evaluation / EVALUATION
    if p.evaluate is None or not path.is_file():
        return None
    labels = Path(p.evaluate["labels"])
    newest = max((p.run_dir / runs.MODEL).stat().st_mtime, labels.stat().st_mtime)
    if path.stat().st_mtime < newest:
        return None
    try:
        prev = json.loads(path.read_text())
    except ValueError:
        return None
    opts = {**_keywords(evaluate, _EVALUATE_FIXED), **_evaluate_options(p)}
    same = (
        prev.get("labels") == str(labels)
        and prev.get("stores") == str(p.evaluate_stores)
        and prev.get("run_id") == p.run_id
        and prev.get("bootstrap", {}).get("n_boot") == opts["n_boot"]
        and prev.get("bootstrap", {}).get("seed") == opts["seed"]
    )
    return prev if same else None


def _evaluate_stage(p: Pipeline, *, progress: bool, debug: bool) -> _Outcome:
    from .evaluation import EVALUATION, evaluate

    section = p.evaluate or {}
    outputs: dict[str, Any] = {"evaluation": str(p.evaluation / EVALUATION)}
    prev = _previous_evaluation(p)
    status = "skipped"
    if prev is None:
        status = "ran"
        prev = evaluate(
            p.evaluate_stores,
            p.run_dir,
            section["labels"],
            p.evaluation,
            run_id=p.run_id,
            progress=progress,
            **_evaluate_options(p),
        )
    outputs.update(auc=prev["metrics"]["auc"]["value"], n=prev["n"])
    return _Outcome(status, outputs, failed=bool(prev["failed"]))


def _heatmap_stage(p: Pipeline, *, progress: bool, debug: bool) -> _Outcome:
    from .heatmap import heatmaps

    res = heatmaps(
        p.stores,
        p.heatmaps,
        run_id=p.run_id,
        model_id=runs.model_id(p.run_dir),
        **(p.heatmap or {}),
    )
    pngs = sorted(r["files"]["png"] for r in res if "png" in r.get("files", {}))
    status = "skipped" if all(r["status"] == "skipped" for r in res) else "ran"
    outputs = {"heatmaps": str(p.heatmaps), "png": pngs}
    return _Outcome(status, outputs, failed=any(not r["ok"] for r in res))


_STAGE_FNS: dict[str, Callable[..., _Outcome]] = {
    "synth": _synth_stage,
    "tile": _tile_stage,
    "pretrain": _pretrain_stage,
    "train": _train_stage,
    "predict": _predict_stage,
    "evaluate": _evaluate_stage,
    "heatmap": _heatmap_stage,
}


def _has_section(p: Pipeline, stage: str) -> bool:
    """A stage that needs its section (synth, pretrain, train, evaluate, heatmap) runs only with
    one."""
    sections = {
        "synth": p.synth,
        "pretrain": p.pretrain,
        "train": p.train,
        "evaluate": p.evaluate,
        "heatmap": p.heatmap,
    }
    return sections.get(stage, {}) is not None


def run_pipeline(
    pipeline: Pipeline | str | os.PathLike, *, progress: bool = True, debug: bool = False
) -> dict[str, Any]:
    """Run a pipeline's stages in order, skipping complete ones; writes ``<out>/report.json``.

    Returns
    -------
    dict
        The report: per stage status (ran / resumed / skipped), seconds and outputs, whether
        any slide ``failed``, and a summary (held-out AUC, test AUC, cross-validation AUC) of
        what ran.
    """
    p = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
    output_dir(p.out)
    report: dict[str, Any] = {
        "pipeline": p.path,
        "name": p.name,
        "out": str(p.out),
        "stages": [],
        "failed": False,
    }
    started = time.time()
    for name in (s for s in p.stages if _has_section(p, s)):
        t0 = time.time()
        log.info("stage %s ...", name)
        outcome = _STAGE_FNS[name](p, progress=progress, debug=debug)
        rec = {"stage": name, "status": outcome.status, "seconds": round(time.time() - t0, 2)}
        report["stages"].append({**rec, **outcome.outputs})
        report["failed"] = report["failed"] or outcome.failed
        log.info("stage %s: %s (%.1f s)", name, outcome.status, rec["seconds"])
        atomic_write_json(p.out / REPORT, report)
    report["summary"] = _summary(p)
    report["seconds"] = round(time.time() - started, 2)
    atomic_write_json(p.out / REPORT, report)
    report["html"] = _write_html_report(p)
    atomic_write_json(p.out / REPORT, report)
    return report


def _write_html_report(p: Pipeline) -> str | None:
    """The batch QC page (``report.html``) at the end of a pipeline; a failure is a WARNING."""
    from .errors import WSIPipelineError
    from .report import write_report

    try:
        preds = p.predictions / runs.PREDICTIONS
        found = p.run_dir.is_dir()
        rid, run_dir = (p.run_id, p.run_dir) if found else (None, None)
        page = write_report(p.out, stores=p.stores, predictions=preds, run_id=rid, run_dir=run_dir)
        return str(page)
    except (WSIPipelineError, OSError) as exc:
        log.warning("report.html not written: %s", exc)
        return None


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _held_out(p: Pipeline) -> dict[str, Any]:
    """Slide-level AUC of predictions.csv on the run's val and test slides."""
    from .data import negative_class
    from .metrics import auc_score
    from .prediction import read_predictions

    splits = runs.read_splits(p.run_dir)
    if not splits:
        return {}
    rows = [r for r in read_predictions(p.predictions / runs.PREDICTIONS) if r.get("probability")]
    held = [r for r in rows if splits.get(r["slide_id"], {}).get("split") in ("val", "test")]
    if not held:
        return {}
    classes = runs.read_classes(p.run_dir)
    neg = classes[negative_class(classes)]
    y = [int(splits[r["slide_id"]]["label"] != neg) for r in held]
    auc = auc_score(y, np.asarray([float(r["probability"]) for r in held]))
    return {"held_out_auc": None if math.isnan(auc) else auc, "held_out_n": len(held)}


def _summary(p: Pipeline) -> dict[str, Any]:
    """Test metrics of the run, cross-validation AUC, held-out AUC of the predictions, and the
    AUC of the evaluate stage."""
    out: dict[str, Any] = {}
    metrics = runs.read_metrics(p.run_dir)
    if metrics is not None:
        if "test" in metrics:
            out["test_auc"] = metrics["test"]["auc"]
            out["test_n"] = metrics["test"]["n"]
        out["best_val_auc"] = metrics.get("best_val_auc")
    res = runs.read_cv_metrics(p.run_dir) if p.folds else None
    if res is not None:
        out.update(
            folds=res["folds"],
            cv_val_auc_mean=res["val_auc_mean"],
            cv_val_auc_std=res["val_auc_std"],
        )
    out.update(_held_out(p))
    if p.evaluate is not None and "evaluate" in p.stages:
        from .evaluation import EVALUATION

        try:
            ev = json.loads((p.evaluation / EVALUATION).read_text())
            out.update(evaluation_auc=ev["metrics"]["auc"]["value"], evaluation_n=ev["n"])
        except (OSError, ValueError, KeyError):
            pass
    return out
