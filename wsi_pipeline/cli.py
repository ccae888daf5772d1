"""The ``wsi-pipeline`` command line: thin commands over the stage functions.

Exit status: 0 when every slide succeeded, 1 when some failed (the rest were still processed and
each failure is in the manifest), 2 for bad usage. Errors print as one line; ``--debug`` shows
tracebacks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import EXIT_FAILED, EXIT_OK, ConfigError, error_report
from .specs import PretrainConfig, TilingSpec, TrainConfig
from .stitch import COMBINE
from .util import default_workers

log = logging.getLogger("wsi_pipeline")


class _Failed(Exception):
    """Some items failed; exit status 1 (details were already reported)."""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and notebooks swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class OneLineFormatter(logging.Formatter):
    """``LEVEL: message`` with line breaks in the message escaped, so a file name holding a
    newline can never forge a second log line (tracebacks with ``--debug`` stay readable)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        return text.replace("\r", "\\r").replace("\n", "\\n")


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(OneLineFormatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("wsi_pipeline")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _set_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    obj = ctx.ensure_object(dict)
    if value or param.name not in obj:
        obj[param.name] = bool(value) or obj.get(param.name, False)
    _setup_logging(obj.get("debug", False), obj.get("quiet", False))


# Options shared by several commands (one definition each).
run_option = click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="A training run folder.",
)
run_id_option = click.option(
    "--run-id",
    default=None,
    help="Name of the per-patch scores in the stores (scores/<run-id>); "
    "default: the run folder's name.",
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu or cuda."
)


def common_options(f: Any) -> Any:
    """``--debug`` and ``--quiet``, accepted before or after the command name."""
    f = click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        callback=_set_flag,
        help="Show tracebacks and debug logs.",
    )(f)
    return click.option(
        "--quiet",
        "-q",
        is_flag=True,
        expose_value=False,
        callback=_set_flag,
        help="No progress bars; warnings and errors only.",
    )(f)


def _train_help(field: str, text: str) -> str:
    """``text`` with the :class:`TrainConfig` default of ``field`` (training options default to
    None on the command line, so that a ``--config`` file can set them)."""
    return f"{text}  [default: {getattr(TrainConfig(), field)}]"


def _cv_line(folds: int, mean: float, std: float) -> str:
    return f"{folds}-fold validation AUC {mean:.3f} ± {std:.3f}"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="wsi-pipeline")
@common_options
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Whole-slide images to tissue masks, zarr patch stores, MIL models and heatmaps.

    Stages: synth (demo cohort) -> tile -> train -> predict -> heatmap; `run` does them all from
    a pipeline file.
    """
    ctx.ensure_object(dict)


# ---------------------------------------------------------------------------------------------
@cli.command()
@common_options
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder for <slide_id>.zarr stores and manifest.csv.",
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help="Target resolution in µm per pixel (e.g. 0.5 for 20x). Default: --level 0.",
)
@click.option(
    "--level",
    type=int,
    default=None,
    help="Target pyramid level (its native pixels).  [default: 0 without --mpp]",
)
@click.option(
    "--tile-size",
    type=int,
    default=TilingSpec.tile_px,
    show_default=True,
    help="Patch side in pixels at the target resolution.",
)
@click.option(
    "--overlap",
    type=int,
    default=TilingSpec.overlap_px,
    show_default=True,
    help="Overlap of neighbouring patches in target pixels.",
)
@click.option(
    "--tissue-threshold",
    type=float,
    default=TilingSpec.min_tissue,
    show_default=True,
    help="Smallest tissue fraction for a patch to be kept.",
)
@click.option(
    "--edge",
    type=click.Choice(["pad", "drop"]),
    default=TilingSpec.edge,
    show_default=True,
    help="Patches reaching past the slide edge: keep (white outside) or drop.",
)
@click.option(
    "--codec",
    type=click.Choice(["jpeg", "zstd", "raw"]),
    default=TilingSpec.codec,
    show_default=True,
    help="Patch codec: jpeg (lossy; copies the file's own JPEG tiles when aligned), "
    "zstd (lossless), raw.",
)
@click.option(
    "--jpeg-quality",
    type=int,
    default=TilingSpec.jpeg_quality,
    show_default=True,
    help="JPEG quality (1-100) of patches that are encoded (not copied).",
)
@click.option(
    "--patches-per-shard",
    type=int,
    default=TilingSpec.patches_per_shard,
    show_default=True,
    help="Patches per shard file of the store's patches array.",
)
@click.option(
    "--mask-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Use this tissue mask (PNG, or GeoJSON polygons in level-0 px) for all slides.",
)
@click.option("--keep-pen", is_flag=True, help="Keep pen marks in the tissue mask.")
@click.option("--keep-dark", is_flag=True, help="Keep dark debris and folds in the tissue mask.")
@click.option(
    "--slide-mpp",
    type=float,
    default=None,
    help="Level-0 µm per pixel of slides whose files have none.",
)
@click.option(
    "--workers",
    type=int,
    default=default_workers(),
    show_default=True,
    help="Threads of this process tiling slides and their shards side by side (default: this "
    "machine's cores); for a batch of small slide files (each at most 64 MB), a worker "
    "process for every 64 of them, up to N, each tiling whole slides; 1 = one slide, one "
    "shard at a time, on one core.",
)
@click.option(
    "--scheduler",
    default=None,
    help="Address of a dask.distributed scheduler (e.g. tcp://host:8786); its workers "
    "must see the slides and the output folder.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "openslide", "tiffslide"]),
    default="auto",
    show_default=True,
    help="Slide reader; auto: openslide where it reads the file, else tiffslide.",
)
@click.option("--overwrite", is_flag=True, help="Redo slides whose stores are complete.")
@click.pass_context
def tile(ctx: click.Context, /, slides: tuple[Path, ...], out: Path, **options: Any) -> None:
    """Mask tissue and tile SLIDES (files and/or folders) into OUT/<slide_id>.zarr.

    Complete stores are skipped (unless --overwrite); unfinished ones are resumed. Writes
    OUT/manifest.csv (slide_id, path, status, n_patches, seconds, error).
    """
    from .slide import find_slides
    from .specs import tiling_from_options
    from .tile_batch import MANIFEST, tile_slides

    spec, batch = tiling_from_options(options)
    files, _ = find_slides(list(slides))
    if not files:
        raise ConfigError(f"no slide files found in {', '.join(map(str, slides))}")
    results = tile_slides(
        list(slides),
        out,
        spec=spec,
        progress=not ctx.obj.get("quiet"),
        debug=ctx.obj.get("debug", False),
        **batch,
    )
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    click.echo(f"tiled {len(results)} slide(s): {summary}; manifest: {out / MANIFEST}")
    if any(not r.ok for r in results):
        raise _Failed()


# ---------------------------------------------------------------------------------------------
@cli.command()
@common_options
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--backbone",
    default=None,
    help="Registered patch CNN: smallcnn, resnet18, resnet50 (needs --weights).",
)
@click.option(
    "--encoder",
    default=None,
    help="Pathology foundation-model preset: uni, conch, virchow2, h-optimus-0, phikon-v2 "
    "(weights from the local Hugging Face cache, or --weights).",
)
@click.option(
    "--weights",
    default=None,
    help="A torchvision weights name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT; read from "
    "torchvision's cache), a local file (.pt/.pth/.bin state dict, .safetensors, TorchScript) "
    "or model folder, or 'none' for a random initialisation. Nothing is downloaded.",
)
@click.option(
    "--batch-size", type=int, default=256, show_default=True, help="Patches per forward pass."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:<i>.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of a random init (--weights none)."
)
@click.option(
    "--export-h5",
    "export_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write DIR/h5_files/<slide_id>.h5 (features (N, D), coords (N, 2)) and "
    "DIR/pt_files/<slide_id>.pt, as CLAM and TRIDENT read them.",
)
@click.option(
    "--import-h5",
    "import_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Instead of computing: import DIR/<slide_id>.h5 (or DIR/h5_files/) into the stores "
    "as features/<--name>; their coords must be the store's.",
)
@click.option("--name", default=None, help="Extractor name of imported features (--import-h5).")
@click.option("--overwrite", is_flag=True, help="Recompute complete features (rewrite exports).")
@click.option(
    "--scheduler",
    default=None,
    help="Address of a dask.distributed scheduler (e.g. tcp://host:8786): its workers embed "
    "one store per task and must see the stores and the weights (torchrun shards the stores "
    "over its ranks without this).",
)
@click.pass_context
def features(
    ctx: click.Context,
    /,
    stores: tuple[Path, ...],
    import_dir: Path | None,
    name: str | None,
    **options: Any,
) -> None:
    """Embed every patch of STORES (stores and/or folders of stores) with a frozen encoder into
    features/<extractor> in each store.

    Complete features are skipped (unless --overwrite); a store that cannot be read fails on its
    own line and the others go on (exit status 1).
    """
    from .features import compute_features, import_features

    progress = not ctx.obj.get("quiet")
    if import_dir is not None:
        if name is None:
            raise ConfigError("--import-h5 needs --name, the extractor name to store them under")
        if options["scheduler"] is not None:
            raise ConfigError("--scheduler is for computing features, not for --import-h5")
        report = import_features(
            list(stores), import_dir, name=name, overwrite=options["overwrite"], progress=progress
        )
    else:
        if name is not None:
            raise ConfigError("--name is for --import-h5; computed features are named by weights")

        report = compute_features(list(stores), progress=progress, **options)
    for r in report.results:
        if not r.ok:
            click.echo(f"error: {r.error}", err=True)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(report.counts().items())) or "no stores"
    msg = f"features/{report.name} (D={report.dim}, weights {report.weights}): {summary}"
    if options.get("export_dir") is not None:
        msg += f"; exported to {options['export_dir']}"
    click.echo(msg)
    if any(not r.ok for r in report.results):
        raise _Failed()


# ---------------------------------------------------------------------------------------------
# pretrain: self-supervised pretraining of a backbone on the stores' own patches
_PRE = PretrainConfig()


@cli.command()
@common_options
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="The weights file to write (the backbone's state dict), for train --backbone-weights "
    "and features --weights.",
)
@click.option(
    "--backbone",
    default=_PRE.backbone,
    show_default=True,
    help="Registered patch CNN: smallcnn, resnet18, resnet50.",
)
@click.option(
    "--init-weights",
    default=None,
    help="Start from these weights (a torchvision weights name or a local file); default: "
    "random init.",
)
@click.option("--epochs", type=int, default=_PRE.epochs, show_default=True, help="Epochs.")
@click.option(
    "--batch-size",
    type=int,
    default=_PRE.batch_size,
    show_default=True,
    help="Patches per step (two views each).",
)
@click.option("--lr", type=float, default=_PRE.lr, show_default=True, help="AdamW peak rate.")
@click.option(
    "--patches-per-epoch",
    type=int,
    default=None,
    help="A seeded random subset of the patches per epoch; default: all of them.",
)
@click.option(
    "--crop-px",
    type=int,
    default=None,
    help="Side of the augmented views in px; default: the patch size.",
)
@click.option(
    "--temperature",
    type=float,
    default=_PRE.temperature,
    show_default=True,
    help="NT-Xent temperature.",
)
@click.option(
    "--stain-jitter",
    type=float,
    default=_PRE.stain_jitter,
    show_default=True,
    help="HED stain jitter (scale 1 ± s, shift ± s of each stain's optical density).",
)
@click.option(
    "--color-jitter",
    type=float,
    default=_PRE.color_jitter,
    show_default=True,
    help="Brightness/contrast/saturation jitter (factors 1 ± j).",
)
@click.option("--seed", type=int, default=_PRE.seed, show_default=True, help="Random seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:<i>.")
@click.option(
    "--amp-dtype",
    type=click.Choice(["auto", "bfloat16", "float16"]),
    default=_PRE.amp_dtype,
    show_default=True,
    help="Mixed precision on CUDA (auto: bf16 where supported, else fp16 with loss scaling).",
)
@click.option("--fp32", is_flag=True, help="No mixed precision on CUDA.")
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of the checkpoint, history and TensorBoard logs; default: <out>.pretrain.",
)
@click.option("--resume", is_flag=True, help="Continue from the work folder's checkpoint.")
@click.option(
    "--stop-after",
    type=int,
    default=None,
    help="Stop after this many epochs in all (checkpointed; continue with --resume).",
)
@click.pass_context
def pretrain(
    ctx: click.Context,
    /,
    stores: tuple[Path, ...],
    out: Path,
    work: Path | None,
    resume: bool,
    stop_after: int | None,
    fp32: bool,
    **options: Any,
) -> None:
    """Self-supervised (SimCLR) pretraining of a backbone on the patches of STORES (stores and/or
    folders of stores), with H&E augmentations: crops, flips and 90° rotations, HED stain and
    colour jitter, blur.

    Writes OUT (the backbone's state dict) when the last epoch is done, and OUT.json (what made
    it). Each epoch is checkpointed; --resume continues an interrupted run.
    """
    from .pretrain import pretrain as run_pretrain

    config = PretrainConfig(
        backbone=options["backbone"],
        init_weights=options["init_weights"],
        epochs=options["epochs"],
        batch_size=options["batch_size"],
        lr=options["lr"],
        patches_per_epoch=options["patches_per_epoch"],
        crop_px=options["crop_px"],
        temperature=options["temperature"],
        stain_jitter=options["stain_jitter"],
        color_jitter=options["color_jitter"],
        seed=options["seed"],
        device=options["device"],
        amp=not fp32,
        amp_dtype=options["amp_dtype"],
    )
    res = run_pretrain(
        list(stores),
        out,
        config,
        work=work,
        resume=resume,
        stop_after=stop_after,
        progress=not ctx.obj.get("quiet"),
    )
    last = res.history[-1]["loss"] if res.history else float("nan")
    if not res.main:  # another torchrun rank: rank 0 reports
        return
    if res.weights is None:
        click.echo(
            f"pretraining stopped after epoch {res.epochs_done} of {config.epochs} (loss "
            f"{last:.4f}); continue with --resume (checkpoint in {res.work})"
        )
    else:
        click.echo(
            f"pretrained {config.backbone} ({res.epochs_done} epochs, loss {last:.4f}, "
            f"{res.seconds:.0f} s): {res.weights}"
        )


# ---------------------------------------------------------------------------------------------
@cli.command()
@common_options
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n-slides", type=int, default=40, show_default=True, help="Number of slides.")
@click.option("--width", type=int, default=8192, show_default=True, help="Level-0 width (px).")
@click.option("--height", type=int, default=6144, show_default=True, help="Level-0 height (px).")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="Level-0 µm per pixel.")
@click.option(
    "--positive-fraction",
    type=float,
    default=0.5,
    show_default=True,
    help="Fraction of slides with lesions (label 1).",
)
@click.option(
    "--lesion-fraction",
    type=float,
    default=0.03,
    show_default=True,
    help="Lesion area as a fraction of tissue area on positive slides.",
)
@click.option(
    "--tissue-fraction",
    type=float,
    default=0.3,
    show_default=True,
    help="Tissue area as a fraction of the slide.",
)
@click.option(
    "--lesion-style",
    type=click.Choice(["tumour", "morphology"]),
    default=None,
    help="'tumour': large pale nuclei in dense cytoplasm, no fibres; 'morphology': only the "
    "nuclei differ (small, round, crowded), same stroma and stain.  [default: tumour]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the cohort.")
@click.option(
    "--workers", type=int, default=1, show_default=True, help="Slides written in parallel."
)
def synth(out: Path, lesion_style: str | None, **options: Any) -> None:
    """Write a synthetic cohort to OUT: pyramidal slides with planted lesions (OUT/slides/),
    labels.csv, ground-truth masks (OUT/masks/) and cohort.json."""
    from .synth import summarize_cohort, write_cohort

    if lesion_style is not None:  # given options are recorded in cohort.json; the default is not
        options["lesion_style"] = lesion_style
    write_cohort(out, **options)
    click.echo(summarize_cohort(out))


# ---------------------------------------------------------------------------------------------
@cli.command()
@common_options
@click.argument("stores", type=click.Path(path_type=Path))
@click.option(
    "--labels",
    "labels_csv",
    required=True,
    type=click.Path(path_type=Path),
    help="CSV with slide_id,label (optional split, case_id).",
)
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="YAML/JSON file of training options (command-line options override it).",
)
@click.option(
    "--model",
    default=None,
    help=_train_help("model", "MIL head: abmil, gated_abmil, clam_sb, maxmil, topk, meanmil."),
)
@click.option(
    "--backbone",
    default=None,
    help=_train_help("backbone", "Patch CNN: smallcnn, resnet18, resnet50."),
)
@click.option(
    "--mode",
    type=click.Choice(["e2e", "features"]),
    default=None,
    help=_train_help(
        "mode",
        "e2e: train the CNN through the MIL pooling; features: train the head on "
        "features of a frozen backbone cached in the stores.",
    ),
)
@click.option(
    "--backbone-weights",
    type=click.Path(path_type=Path),
    default=None,
    help="State-dict file for the backbone (torchvision names, or a run's model.pt).  "
    "[default: none: random initialisation]",
)
@click.option("--epochs", type=int, default=None, help=_train_help("epochs", "Training epochs."))
@click.option("--lr", type=float, default=None, help=_train_help("lr", "Peak learning rate."))
@click.option(
    "--weight-decay",
    type=float,
    default=None,
    help=_train_help("weight_decay", "AdamW weight decay."),
)
@click.option(
    "--max-patches",
    type=int,
    default=None,
    help=_train_help("max_patches", "Patches per bag per step."),
)
@click.option(
    "--slides-per-step",
    type=int,
    default=None,
    help=_train_help(
        "slides_per_step",
        "Slides per optimizer step, through the CNN together (class-balanced).",
    ),
)
@click.option(
    "--color-jitter",
    type=float,
    default=None,
    help=_train_help(
        "color_jitter", "Per-slide brightness/contrast/saturation jitter (factors 1 ± j)."
    ),
)
@click.option(
    "--instance-warmup-epochs",
    type=int,
    default=None,
    help=_train_help(
        "instance_warmup_epochs",
        "First epochs whose instance loss gives every patch its slide's label (naive MIL).",
    ),
)
@click.option(
    "--balance",
    type=click.Choice(["sampler", "loss", "none"]),
    default=None,
    help=_train_help("balance", "Class balance: weighted sampling, weighted loss, or none."),
)
@click.option(
    "--patience",
    type=int,
    default=None,
    help=_train_help("patience", "Early-stopping patience (epochs)."),
)
@click.option("--seed", type=int, default=None, help=_train_help("seed", "Random seed."))
@click.option("--device", default=None, help=_train_help("device", "auto, cpu or cuda."))
@click.option(
    "--precision",
    type=click.Choice(["amp", "fp32"]),
    default=None,
    help="amp: mixed precision on CUDA (ignored on CPU).  [default: amp]",
)
@click.option(
    "--grad-checkpoint",
    is_flag=True,
    default=None,
    help="Recompute backbone activations to save GPU memory.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="DataLoader workers.  [default: 1 on CPU, 4 on CUDA]",
)
@click.option(
    "--val-fraction",
    type=float,
    default=None,
    help=_train_help("val_fraction", "Validation fraction when labels.csv has no split column."),
)
@click.option(
    "--test-fraction",
    type=float,
    default=None,
    help=_train_help("test_fraction", "Test fraction when labels.csv has no split column."),
)
@click.option(
    "--folds",
    type=int,
    default=None,
    help="K-fold cross-validation grouped by case: trains OUT/fold_0..K-1.",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option(
    "--stop-after",
    type=int,
    default=None,
    help="Stop after this many epochs in this call (resume later).",
)
@click.pass_context
def train(
    ctx: click.Context,
    /,
    stores: Path,
    labels_csv: Path,
    out: Path,
    config_file: Path | None,
    resume: bool,
    stop_after: int | None,
    **options: Any,
) -> None:
    """Train a MIL model on the stores in STORES from slide labels only."""
    from .locks import run_lock
    from .pipeline import load_options
    from .specs import train_config_from_options
    from .training import train as run_train
    from .training import train_folds

    base = load_options(config_file) if config_file else {}
    config, folds = train_config_from_options(base, options)
    progress = not ctx.obj.get("quiet")
    with run_lock(out):  # one training per run folder
        if folds:
            res = train_folds(
                stores,
                labels_csv,
                out,
                config=config,
                folds=folds,
                resume=resume,
                progress=progress,
            )
            if res["val_auc_mean"] is None:
                line = f"{folds}-fold validation AUC n/a ({res.get('val_auc_reason')})"
            else:
                line = _cv_line(folds, res["val_auc_mean"], res["val_auc_std"])
            click.echo(f"{line}; runs in {out}/fold_*")
            return
        m = run_train(
            stores,
            labels_csv,
            out,
            config=config,
            resume=resume,
            stop_after=stop_after,
            progress=progress,
        )
    if not m:  # a non-zero rank under torchrun: rank 0 reports
        return
    # metrics hold null (with a "<name>_reason"), never NaN, for what could not be measured
    best = m["best_val_auc"]
    if best is None:
        msg = f"trained {m['epochs_run']} epoch(s); best validation AUC n/a"
        msg += f" ({m.get('best_val_auc_reason', 'none')})"
    else:
        msg = f"trained {m['epochs_run']} epoch(s); best validation AUC {best:.3f}"
    if "test" in m:
        t = m["test"]
        auc = "n/a" if t.get("auc") is None else f"{t['auc']:.3f}"
        reason = f", {t['auc_reason']}" if t.get("auc_reason") else ""
        msg += f"; test AUC {auc} (n={t['n']}{reason})"
    if m.get("stalled"):
        msg += "; STALLED: the train loss never left chance, the model learnt nothing"
    others = len(m.get("warnings", [])) - bool(m.get("stalled"))
    if others > 0:
        more = " more" if m.get("stalled") else ""
        msg += f"; {others}{more} warning(s) in {out}/metrics.json"
    click.echo(f"{msg}; run folder {out}")


@cli.command()
@common_options
@click.argument("stores", type=click.Path(path_type=Path))
@run_option
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for predictions.csv.",
)
@run_id_option
@device_option
@click.option("--slide", "slides", multiple=True, help="Only these slide ids (repeatable).")
@click.option(
    "--allow-unfinished",
    is_flag=True,
    show_default=True,
    help="Use a run whose training has not finished (best weights so far, uncalibrated).",
)
@click.pass_context
def predict(
    ctx: click.Context,
    /,
    stores: Path,
    run_dir: Path,
    out: Path,
    run_id: str | None,
    device: str,
    slides: tuple[str, ...],
    allow_unfinished: bool,
) -> None:
    """Predict every store in STORES (a folder of stores, or one store): OUT/predictions.csv
    and per-patch scores in each store."""
    from .prediction import predict as run_predict
    from .runs import PREDICTIONS

    rows = run_predict(
        stores,
        run_dir,
        out,
        device=device,
        slide_ids=list(slides) or None,
        run_id=run_id,
        progress=not ctx.obj.get("quiet"),
        allow_unfinished=allow_unfinished,
    )
    bad = [r for r in rows if not r.ok]
    click.echo(f"predicted {len(rows) - len(bad)} of {len(rows)} slide(s); {out / PREDICTIONS}")
    if bad:
        raise _Failed()


@cli.command()
@common_options
@click.argument("stores", type=click.Path(path_type=Path))
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The run whose scores to show (its folder; scores/<run-id> in the stores).",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder: OUT/<slide_id>/ per slide.",
)
@click.option("--run-id", default=None, help="Scores name if not the run folder's name.")
@click.option(
    "--which",
    type=click.Choice(["score", "attention"]),
    default="score",
    show_default=True,
    help="Per-patch abnormality probability, or the head's attention.",
)
@click.option(
    "--class",
    "class_name",
    default=None,
    metavar="NAME",
    help="Draw this class's per-patch probability instead (one of the run's classes; files "
    "OUT/<slide_id>/<slide_id>_score-NAME_*). Stores predicted before per-class "
    "probabilities were written need predict again.",
)
@click.option(
    "--mode",
    type=click.Choice(["probability", "percentile"]),
    default=None,
    help="probability: fixed 0..1 scale; percentile: within-slide ranks 0..100. "
    "[default: probability for score, percentile for attention]",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="GeoJSON regions and areas above this (in the mode's units). [default: 0.5 / 90]",
)
@click.option(
    "--downsample",
    type=float,
    default=None,
    help="Level-0 px per heatmap px. [default: the thumbnail's]",
)
@click.option(
    "--sigma-um", type=float, default=0.0, show_default=True, help="Gaussian smoothing in µm."
)
@click.option(
    "--combine",
    type=click.Choice(list(COMBINE)),
    default=COMBINE[0],
    show_default=True,
    help="Where patches overlap: a pixel takes the lower tercile of the scores of the patches "
    "over it (with 4 patches the second lowest: regions at the lesion), the lowest, or their "
    "mean (smoother, wider by up to a patch).",
)
@click.option(
    "--cmap",
    default=None,
    help="Matplotlib colormap, e.g. jet for a rainbow. [default: viridis, perceptually uniform]",
)
@click.option(
    "--alpha", type=float, default=None, help="Opacity at the top of the scale. [default: 0.7]"
)
@click.option(
    "--transparent-below",
    type=float,
    default=None,
    help="Values at or below this (mode units) leave the slide untinted; the opacity rises "
    "above it. [default: 0.2 / 50]",
)
@click.option("--slide", "slides", multiple=True, help="Only these slide ids (repeatable).")
@click.option("--overwrite", is_flag=True, help="Redo exports that are up to date.")
def heatmap(
    stores: Path,
    run_dir: Path,
    out: Path,
    run_id: str | None,
    which: str,
    class_name: str | None,
    mode: str | None,
    threshold: float | None,
    downsample: float | None,
    sigma_um: float,
    combine: str,
    cmap: str | None,
    alpha: float | None,
    transparent_below: float | None,
    slides: tuple[str, ...],
    overwrite: bool,
) -> None:
    """Per slide in STORES (a folder of stores, or one store): PNG overlay, overlay TIFF
    aligned with the slide, values TIFF, GeoJSON regions and per-patch tiles for QuPath, and a
    JSON summary. By default the per-patch abnormality probability; --class NAME draws one
    class's probability."""
    from .exports import DEFAULT_ALPHA, DEFAULT_CMAP
    from .heatmap import check_options, heatmaps
    from .runs import LABELS, model_id, read_classes
    from .runs import run_id as run_id_rule

    rid = run_id_rule(run_dir, run_id)
    if class_name is not None and (run_dir / LABELS).is_file():  # before any slide
        check_options(which, mode, threshold, class_name, classes=read_classes(run_dir))
    res = heatmaps(
        stores,
        out,
        run_id=rid,
        which=which,
        class_name=class_name,
        mode=mode,
        threshold=threshold,
        downsample=downsample,
        sigma_um=sigma_um,
        combine=combine,
        cmap=DEFAULT_CMAP if cmap is None else cmap,
        alpha=DEFAULT_ALPHA if alpha is None else alpha,
        transparent_below=transparent_below,
        slide_ids=list(slides) or None,
        overwrite=overwrite,
        model_id=model_id(run_dir),
    )
    for r in res:
        if r["status"] == "skipped" and r.get("reason") == "no patches":
            click.echo(f"{r['store']}: skipped (no patches)", err=True)
    bad = [r for r in res if not r["ok"]]
    click.echo(f"heatmaps for {len(res) - len(bad)} of {len(res)} slide(s) in {out}")
    if bad:
        raise _Failed()


@cli.command()
@common_options
@click.argument("stores", type=click.Path(path_type=Path))
@run_option
@click.option(
    "--labels",
    "labels_csv",
    required=True,
    type=click.Path(path_type=Path),
    help="CSV with slide_id,label of the slides to score (labels must be the run's classes).",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for evaluation.json, evaluation.csv, roc.png, reliability.png.",
)
@run_id_option
@device_option
@click.option(
    "--n-boot",
    type=int,
    default=1000,
    show_default=True,
    help="Bootstrap resamples of the 95% confidence intervals.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.pass_context
def evaluate(
    ctx: click.Context,
    /,
    stores: Path,
    run_dir: Path,
    labels_csv: Path,
    out: Path,
    run_id: str | None,
    device: str,
    n_boot: int,
    seed: int,
) -> None:
    """Score the run on the labelled slides in STORES (an external test set): AUC, balanced
    accuracy, sensitivity/specificity, Brier and ECE with bootstrap 95% CIs."""
    from .evaluation import EVALUATION, check_options
    from .evaluation import evaluate as run_evaluate

    check_options(n_boot=n_boot, seed=seed)
    res = run_evaluate(
        stores,
        run_dir,
        labels_csv,
        out,
        device=device,
        run_id=run_id,
        n_boot=n_boot,
        seed=seed,
        progress=not ctx.obj.get("quiet"),
    )
    auc = res["metrics"]["auc"]
    if auc["value"] is None:
        shown = f"AUC n/a ({auc['reason']})"
    elif auc["ci95"] is None:
        shown = f"AUC {auc['value']:.3f} (no CI: {auc['reason']})"
    else:
        lo, hi = auc["ci95"]
        shown = f"AUC {auc['value']:.3f} (95% CI {lo:.3f}-{hi:.3f})"
    failed = f"; {len(res['failed'])} failed" if res["failed"] else ""
    click.echo(f"evaluated {res['n']} slide(s): {shown}, n={res['n']}{failed}; {out / EVALUATION}")
    if res["failed"]:
        raise _Failed()


@cli.command("run")
@common_options
@click.argument("pipeline_file", type=click.Path(path_type=Path))
@click.option("--check", is_flag=True, help="Only validate the pipeline file.")
@click.pass_context
def run_cmd(ctx: click.Context, /, pipeline_file: Path, check: bool) -> None:
    """Run the stages a pipeline file names (synth, tile, train, predict, heatmap), skipping
    those whose outputs are complete. Writes <out>/report.json."""
    from .pipeline import REPORT, load_pipeline, run_pipeline

    p = load_pipeline(pipeline_file)
    if check:
        click.echo(f"{pipeline_file}: valid; stages {', '.join(p.stages)}; output {p.out}")
        return
    report = run_pipeline(p, progress=not ctx.obj.get("quiet"), debug=ctx.obj.get("debug", False))
    for st in report["stages"]:
        click.echo(f"  {st['stage']:<8} {st['status']:<8} {st['seconds']:>8.1f} s")
    _echo_summary(report.get("summary", {}))
    pngs = next((st.get("png") for st in report["stages"] if st["stage"] == "heatmap"), None)
    if pngs:
        _echo_heatmaps(pngs)
    click.echo(f"report: {p.out / REPORT}")
    if report.get("failed"):
        raise _Failed()


def _echo_summary(summ: dict[str, Any]) -> None:
    if summ.get("held_out_auc") is not None:
        click.echo(
            f"slide-level AUC on held-out slides (val+test, n={summ['held_out_n']}): "
            f"{summ['held_out_auc']:.3f}"
        )
    if summ.get("test_auc") is not None:
        click.echo(
            f"slide-level AUC on the test split (n={summ['test_n']}): {summ['test_auc']:.3f}"
        )
    if summ.get("cv_val_auc_mean") is not None:
        click.echo(_cv_line(summ["folds"], summ["cv_val_auc_mean"], summ["cv_val_auc_std"]))


def _echo_heatmaps(pngs: list[str]) -> None:
    click.echo(
        f"heatmaps ({len(pngs)} slides; PNG overlay, pyramidal TIFF, GeoJSON, summary "
        f"in each folder):"
    )
    for png in pngs[:10]:
        click.echo(f"  {png}")
    if len(pngs) > 10:
        click.echo(f"  ... and {len(pngs) - 10} more in {Path(pngs[0]).parent.parent}")


# --- export, report, view (issue 15) --------------------------------------------------------
@cli.command()
@common_options
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["wsinfer"]),
    default="wsinfer",
    show_default=True,
    help="wsinfer: torchscript.pt + config.json for the WSInfer QuPath extension.",
)
@click.option(
    "--out", "-o", required=True, type=click.Path(path_type=Path), help="Model folder to write."
)
def export(run_dir: Path, fmt: str, out: Path) -> None:
    """Export the patch-level scorer of RUN (backbone + instance classifier, calibrated)."""
    from .wsinfer import export_run

    paths = export_run(run_dir, out, fmt=fmt)
    click.echo(f"exported {run_dir} as {fmt}: {paths['torchscript']}, {paths['config']}")


@cli.command()
@common_options
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--stores",
    type=click.Path(path_type=Path),
    default=None,
    help="Stores folder (with manifest.csv). [default: OUT_DIR/stores, or OUT_DIR]",
)
@click.option(
    "--predictions",
    type=click.Path(path_type=Path),
    default=None,
    help="A predictions.csv. [default: OUT_DIR/predictions/predictions.csv]",
)
@click.option(
    "--run",
    "run_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="The run folder whose scores to draw: scores an earlier model of it wrote are not "
    "drawn. [default: the folder predict recorded with the scores]",
)
@click.option(
    "--run-id",
    default=None,
    help="Whose scores to draw. [default: --run's name, else that of the predictions, or the "
    "stores' only one]",
)
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
    default=None,
    help="The page to write. [default: OUT_DIR/report.html]",
)
def report(
    out_dir: Path,
    stores: Path | None,
    predictions: Path | None,
    run_dir: Path | None,
    run_id: str | None,
    dest: Path | None,
) -> None:
    """One self-contained HTML page for the batch in OUT_DIR: status counts, timings, failures,
    and per slide the mask and tiles, prediction, heatmap and top patches (sortable)."""
    from .report import write_report
    from .runs import run_id as run_id_rule

    rid = run_id_rule(run_dir, run_id) if run_dir is not None else run_id
    path = write_report(
        out_dir, stores=stores, predictions=predictions, run_id=rid, run_dir=run_dir, dest=dest
    )
    click.echo(f"report: {path}")


@cli.command()
@common_options
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--slide", "slides", multiple=True, help="Only these slide ids (repeatable).")
@click.option(
    "--run",
    "run_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="The run whose scores to overlay (its folder). [default: none, the slides alone]",
)
@click.option("--run-id", default=None, help="Scores name if not the run folder's name.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (anything else than localhost exposes the slides).",
)
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0: any free one).")
@click.option(
    "--threshold", type=float, default=0.5, show_default=True, help="Regions at or above this."
)
@click.option(
    "--openseadragon",
    "osd_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="OpenSeadragon's build folder. [default: $WSI_OPENSEADRAGON or node_modules/ from "
    "'make viewer']",
)
def view(
    stores: tuple[Path, ...],
    slides: tuple[str, ...],
    run_dir: Path | None,
    run_id: str | None,
    host: str,
    port: int,
    threshold: float,
    osd_dir: Path | None,
) -> None:
    """Serve the slides in STORES on localhost with their heatmap (toggleable, adjustable
    opacity) and regions, in OpenSeadragon. Ctrl-C stops it."""
    from .runs import run_id as run_id_rule
    from .viewer import make_server, serve

    rid = run_id_rule(run_dir, run_id) if run_dir is not None else run_id
    server = make_server(
        list(stores),
        slide_ids=list(slides) or None,
        run_id=rid,
        run_dir=run_dir,
        host=host,
        port=port,
        threshold=threshold,
        osd_dir=osd_dir,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("view: listening on %s: anyone who can reach it sees the slides", host)
    h, p = server.server_address[:2]
    n = len(getattr(server.RequestHandlerClass, "slides", {}))
    click.echo(f"viewing {n} slide(s) at http://{h!s}:{p}/")
    serve(server)


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 some failed, 2 bad usage).

    Every error ends here as one ``error: ...`` line on stderr (:func:`errors.error_report`
    gives the line and the status); ``--debug`` re-raises it, with its traceback.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="wsi-pipeline", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_FAILED
    except click.UsageError as exc:  # an unknown option, a bad value, a missing argument
        where = exc.ctx.command_path if exc.ctx is not None else "wsi-pipeline"
        message = " ".join(exc.format_message().split())
        click.echo(f"error: {where}: {message} (see '{where} --help')", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        return exc.exit_code
    except _Failed:
        return EXIT_FAILED
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:
        if debug:
            raise
        message, status = error_report(exc)
        click.echo(f"error: {message}", err=True)
        return status
    return EXIT_OK
