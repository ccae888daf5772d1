"""The few frozen dataclasses that cross stages, and the rules that build and compare them.

Slide metadata, mask and tiling specs, the training config; the one "same tiling" check
(:func:`tiling_mismatch`); the one map from the option names users write (``--tile-size`` on
the command line, ``tile_size:`` in a pipeline file) to spec fields (:data:`TILE_OPTIONS`,
:data:`TRAIN_OPTIONS`) and the functions that turn those options into specs
(:func:`tiling_from_options`, :func:`train_config_from_options`).

Everything else that crosses stages is an array, a tensor, or the store.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError
from .util import input_file

__all__ = [
    "PREDICT_OPTIONS",
    "PRETRAIN_METHODS",
    "TILE_OPTIONS",
    "TILING_TOLERANCE",
    "TRAIN_OPTIONS",
    "MaskSpec",
    "Option",
    "PretrainConfig",
    "SlideMeta",
    "TilingSpec",
    "TrainConfig",
    "fold_config",
    "tiling_from_options",
    "tiling_mismatch",
    "train_config_from_options",
]

#: Relative difference of resolution (mpp or downsample) under which two tilings are the same.
TILING_TOLERANCE = 0.02

Codec = Literal["jpeg", "zstd", "raw"]
EdgePolicy = Literal["pad", "drop"]


@dataclass(frozen=True)
class SlideMeta:
    """What is known about one slide file.

    Attributes
    ----------
    path : str
        The slide file (absolute).
    file_size : int
        Size of the file in bytes (used to notice a changed file on resume).
    backend : {"openslide", "tiffslide"}
        Reader that opened the file.
    vendor : str or None
        Format/vendor as the reader reports it (``"aperio"``, ``"generic-tiff"``, ``"ome"`` ...).
    width, height : int
        Level-0 size in pixels.
    level_dimensions : tuple of (int, int)
        ``(width, height)`` of every pyramid level.
    level_downsamples : tuple of float
        Level-0 pixels per level pixel, per level.
    mpp_x, mpp_y : float or None
        Level-0 micrometres per pixel; ``None`` when the file has no trustworthy value.
    mpp_source : {"file", "user"} or None
        Where ``mpp_x``/``mpp_y`` come from.
    objective_power : float or None
        Nominal objective magnification.
    tile_wh : (int, int) or None
        Level-0 tile size of the file, ``None`` for untiled files or unknown.
    """

    path: str
    file_size: int
    backend: str
    vendor: str | None
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None = None
    mpp_y: float | None = None
    mpp_source: str | None = None
    objective_power: float | None = None
    tile_wh: tuple[int, int] | None = None

    @property
    def mpp(self) -> float | None:
        """Mean level-0 micrometres per pixel, or ``None`` when unknown."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return (self.mpp_x + self.mpp_y) / 2.0

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["level_dimensions"] = [list(wh) for wh in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        d["tile_wh"] = None if self.tile_wh is None else list(self.tile_wh)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlideMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["level_dimensions"] = tuple(tuple(int(v) for v in wh) for wh in d["level_dimensions"])
        kw["level_downsamples"] = tuple(float(v) for v in d["level_downsamples"])
        tile_wh = d.get("tile_wh")
        kw["tile_wh"] = None if tile_wh is None else (int(tile_wh[0]), int(tile_wh[1]))
        return cls(**kw)


@dataclass(frozen=True)
class MaskSpec:
    """How the tissue mask is computed from the thumbnail.

    Attributes
    ----------
    method : {"otsu", "user"}
        ``"otsu"``: Otsu threshold on a blurred saturation image, with a floor
        ``min_saturation`` so a blank slide yields no tissue. ``"user"``: read ``user_mask``.
    thumb_mpp : float
        Resolution of the thumbnail the mask is computed on (µm per pixel); used when the slide
        has an mpp. Otherwise ``thumb_max_px`` sets the thumbnail's longest side. Within 5 %,
        the thumbnail is a whole number of pixels of the pyramid level it is read from (its
        exact box average: 8.09 µm/px for a 0.2527 µm/px scan); the store records it.
    thumb_max_px : int
        Longest side of the thumbnail when the slide has no mpp, and an upper bound always.
    min_saturation : float
        Lowest saturation (0..1) ever called tissue.
    min_object_um2 : float
        Tissue pieces smaller than this (µm²) are dropped.
    max_hole_um2 : float
        Holes smaller than this (µm²) inside tissue are filled.
    remove_pen : bool
        Exclude pen marks (saturated blue/green/black ink).
    remove_dark : bool
        Exclude very dark debris and folds.
    user_mask : str or None
        A PNG mask (non-zero = tissue, any size: it is scaled to the slide) or a GeoJSON file of
        tissue polygons in level-0 pixels. Used when ``method="user"``.
    """

    method: str = "otsu"
    thumb_mpp: float = 8.0
    thumb_max_px: int = 4096
    min_saturation: float = 0.07
    min_object_um2: float = 4_000.0
    max_hole_um2: float = 5_000.0
    remove_pen: bool = True
    remove_dark: bool = True
    user_mask: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("otsu", "user"):
            raise ConfigError(f"mask method must be 'otsu' or 'user', not {self.method!r}")
        if self.method == "user" and not self.user_mask:
            raise ConfigError("mask method 'user' needs a user_mask file (PNG or GeoJSON)")
        if self.thumb_mpp <= 0 or self.thumb_max_px < 16:
            raise ConfigError("thumb_mpp must be > 0 and thumb_max_px >= 16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TilingSpec:
    """Where patches are cut and how they are stored.

    Exactly one of ``mpp`` and ``level`` is set: with neither, ``level`` is 0 (the one place
    that rule lives); giving both is an error.

    Attributes
    ----------
    tile_px : int
        Patch side in pixels at the target resolution.
    mpp : float or None
        Target resolution in µm per pixel.
    level : int or None
        Target pyramid level (patches at that level's native resolution); 0 when ``mpp`` is
        not given.
    overlap_px : int
        Overlap between neighbouring patches, in target pixels; stride is ``tile_px - overlap_px``.
    min_tissue : float
        Smallest fraction (0..1) of a patch covered by tissue for the patch to be kept.
    edge : {"pad", "drop"}
        Patches that reach past the slide's right/bottom edge: ``"pad"`` keeps them (outside
        pixels are white), ``"drop"`` leaves them out.
    codec : {"jpeg", "zstd", "raw"}
        Patch codec. ``"jpeg"`` (default, lossy) copies the file's own JPEG tiles when the grid
        lines up with them and encodes at ``jpeg_quality`` otherwise; ``"zstd"`` is lossless.
    jpeg_quality : int
        JPEG quality when patches are encoded.
    scaled_decode : bool
        When the patches are about twice as coarse as the pyramid level they are read from or
        more (within 2 %, :data:`wsi_pipeline.tiling.RESOLUTION_SLACK`), decode the file's JPEG
        tiles at 1/2, 1/4 or 1/8 scale in the DCT domain and finish with one small resample (less
        work; within 3 grey levels of openslide + area resize on average). False always decodes at full
        resolution. Never changes which patches are kept.
    patches_per_shard : int
        Patches per shard file of the ``patches`` array.
    mask : MaskSpec
        Tissue mask parameters.
    """

    tile_px: int = 256
    mpp: float | None = None
    level: int | None = None
    overlap_px: int = 0
    min_tissue: float = 0.25
    edge: str = "pad"
    codec: str = "jpeg"
    jpeg_quality: int = 90
    scaled_decode: bool = True
    patches_per_shard: int = 256
    mask: MaskSpec = field(default_factory=MaskSpec)

    def __post_init__(self) -> None:
        if self.mpp is not None and self.level is not None:
            raise ConfigError(
                f"give one target resolution, mpp ({self.mpp!r}) or level ({self.level!r}), "
                "not both"
            )
        if self.mpp is None and self.level is None:
            object.__setattr__(self, "level", 0)  # no resolution given: the slide's own pixels
        if self.mpp is not None and not (0.01 <= float(self.mpp) <= 1000):
            raise ConfigError(f"mpp must be a resolution in µm per pixel, not {self.mpp!r}")
        if self.level is not None and int(self.level) < 0:
            raise ConfigError(f"level must be >= 0, not {self.level!r}")
        if not (8 <= int(self.tile_px) <= 4096):
            raise ConfigError(f"tile size must be between 8 and 4096 px, not {self.tile_px!r}")
        if not (0 <= int(self.overlap_px) < int(self.tile_px)):
            raise ConfigError(
                f"overlap must be >= 0 and smaller than the tile size ({self.tile_px}), "
                f"not {self.overlap_px!r}"
            )
        if not (0.0 <= float(self.min_tissue) <= 1.0):
            raise ConfigError(f"tissue threshold must be in [0, 1], not {self.min_tissue!r}")
        if self.edge not in ("pad", "drop"):
            raise ConfigError(f"edge must be 'pad' or 'drop', not {self.edge!r}")
        if self.codec not in ("jpeg", "zstd", "raw"):
            raise ConfigError(f"codec must be 'jpeg', 'zstd' or 'raw', not {self.codec!r}")
        if not (1 <= int(self.jpeg_quality) <= 100):
            raise ConfigError(f"jpeg quality must be in 1..100, not {self.jpeg_quality!r}")
        if not (1 <= int(self.patches_per_shard) <= 65536):
            raise ConfigError("patches_per_shard must be in 1..65536")

    @property
    def stride_px(self) -> int:
        """Step between neighbouring patches in target pixels."""
        return self.tile_px - self.overlap_px

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mask"] = self.mask.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TilingSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("mask"), dict):
            mnames = {f.name for f in dataclasses.fields(MaskSpec)}
            kw["mask"] = MaskSpec(**{k: v for k, v in kw["mask"].items() if k in mnames})
        return cls(**kw)


def tiling_mismatch(
    tiling: dict[str, Any],
    reference: dict[str, Any],
    *,
    reference_name: str = "the run was trained",
) -> str | None:
    """Why ``tiling`` differs from ``reference`` (tile size or resolution), or ``None``.

    The one "same tiling" rule: the same patch size in pixels and a resolution within
    :data:`TILING_TOLERANCE` -- mpp when both have one, else the level-0 downsample.

    Parameters
    ----------
    tiling, reference : dict
        ``tile_px``, ``mpp`` (or ``None``) and ``downsample`` of a store's ``tiling``
        attributes or a run's ``tiling.json``.
    reference_name : str
        How the message names ``reference`` (``"the run was trained"``, ``"'slide_7' was tiled"``).

    Returns
    -------
    str or None
        One clause for a message, e.g. ``"tiled at 2 mpp, the run was trained at 1 mpp"``.
    """
    if int(tiling["tile_px"]) != int(reference["tile_px"]):
        return f"tile size {tiling['tile_px']} px, {reference_name} on {reference['tile_px']} px"
    a, b = tiling.get("mpp"), reference.get("mpp")
    if a is not None and b is not None:
        x, y, unit = float(a), float(b), "mpp"
    else:
        x, y, unit = float(tiling["downsample"]), float(reference["downsample"]), "downsample"
    if abs(x - y) <= TILING_TOLERANCE * y:
        return None
    if unit == "mpp":
        return f"tiled at {x:g} mpp, {reference_name} at {y:g} mpp"
    return f"tiled at downsample {x:g}, {reference_name} at downsample {y:g} (no mpp to compare)"


@dataclass(frozen=True)
class TrainConfig:
    """Model and training options (saved to ``config.json``).

    Attributes
    ----------
    model : str
        MIL head (see ``wsi_pipeline.models.list_models()``).
    backbone : str
        Patch CNN (``smallcnn``, ``resnet18``, ``resnet50``).
    mode : {"e2e", "features"}
        Train the CNN through the MIL pooling, or train the head on features of a frozen backbone
        cached in the stores (``features/<extractor>``).
    backbone_weights : str or None
        State-dict file for the backbone (torchvision names accepted); random init otherwise.
    epochs, lr, weight_decay, warmup_epochs
        AdamW with linear warm-up then cosine decay (per step).
    max_patches : int
        Patches per bag per training step (a seeded random subset of the slide's patches).
    slides_per_step : int
        Bags (slides) per optimizer step, embedded in one backbone pass so that BatchNorm
        normalises over several slides of both classes (class-balanced steps with
        ``balance="sampler"``). With 1, BatchNorm sees one slide per step: it inflates the
        most abnormal-looking patches of normal slides and end-to-end MIL from scratch then
        stalls on some seeds (``docs/notes/mil-stall-findings.md``).
    color_jitter : float
        Per-bag brightness/contrast/saturation jitter (±) in end-to-end training, with random
        flips and 90° rotations of each patch. Mild by default: at ±0.15 the naive-MIL warm-up
        did not find lesions that are darker than normal tissue on some seeds (their cue drowns
        in the jitter between slides; ``docs/notes/mil-stall-findings.md``).
    eval_max_patches : int or None
        Patches per bag in evaluation (None = all, in chunks).
    hidden_dim, dropout, attn_dim
        Head sizes.
    balance : {"sampler", "loss", "none"}
        Class balance: weighted bag sampling, weighted loss, or nothing.
    patience, min_epochs
        Early stopping on validation AUC. The default patience (30, the default number of
        epochs) does not stop early: end-to-end MIL from scratch often shows no validation gain
        for 10-18 epochs before the lesions are found, and patience 10 stopped such runs at
        chance in ``benchmarks/bench_training.py``.
    instance_weight : float
        Weight of the instance loss next to the slide loss (``(1 - w) * slide + w * instance``):
        CLAM's instance clustering loss for ``clam_sb`` (CLAM's paper uses 0.3), the MIL
        instance loss of :func:`~wsi_pipeline.losses.topk_instance_loss` for the other heads; 0
        turns it off. With small lesions and a CNN trained from scratch, 0.6 (with
        ``instance_k=8``) found them where 0.3 with ``k=4`` often did not.
    instance_k : int
        Patches per bag in the top-k instance loss.
    instance_warmup_epochs : int
        First epochs in which the instance loss takes every patch of a bag with its slide's
        label (naive MIL: the patches of a negative slide are all normal; those of a positive
        one share its label), before the top-``instance_k`` loss. Every lesion patch then
        gets a gradient from the first step, instead of only the few that a random model
        happens to rank in its top ``k``. 15 of the 30 epochs: on morphology-only lesions the
        naive phase may need more than 10 epochs to settle on them, and a top-k phase that
        starts from a half-found detector (lesion-patch AUC ~0.8) locks onto other tissue
        (``docs/notes/mil-stall-findings.md``, fifth fix).
    seed : int
    device : {"auto", "cpu", "cuda"}
    amp : bool
        Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling).
    channels_last, grad_checkpoint
        CUDA memory-format and activation-memory options (end-to-end mode).
    num_workers : int or None
        DataLoader workers (None: 1 on CPU, 4 on CUDA).
    val_fraction, test_fraction, folds, fold
        Split options when labels.csv has no ``split`` column.
    """

    model: str = "topk"
    backbone: str = "smallcnn"
    mode: str = "e2e"
    backbone_weights: str | None = None
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    max_patches: int = 64
    slides_per_step: int = 4
    color_jitter: float = 0.05
    eval_max_patches: int | None = None
    hidden_dim: int = 128
    dropout: float = 0.25
    attn_dim: int = 128
    balance: str = "sampler"
    patience: int = 30
    min_epochs: int = 5
    instance_weight: float = 0.6
    instance_k: int = 8
    instance_warmup_epochs: int = 15
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    grad_checkpoint: bool = False
    num_workers: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    folds: int | None = None
    fold: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("e2e", "features"):
            raise ConfigError(f"mode must be 'e2e' or 'features', not {self.mode!r}")
        if self.balance not in ("sampler", "loss", "none"):
            raise ConfigError(f"balance must be 'sampler', 'loss' or 'none', not {self.balance!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, not {self.device!r}")
        for name in ("epochs", "max_patches", "slides_per_step", "hidden_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, not {getattr(self, name)!r}")
        if not (self.lr > 0):
            raise ConfigError(f"lr must be > 0, not {self.lr!r}")
        if int(self.instance_warmup_epochs) < 0:
            raise ConfigError(
                f"instance_warmup_epochs must be >= 0, not {self.instance_warmup_epochs!r}"
            )
        if not 0 <= self.color_jitter < 1:
            raise ConfigError(f"color_jitter must be in [0, 1), not {self.color_jitter!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)


def fold_config(config: TrainConfig, *, folds: int, fold: int) -> TrainConfig:
    """The config that trains fold ``fold`` of ``folds``-fold cross-validation.

    Every slide is in the validation split of exactly one fold, so there is no test split.

    Parameters
    ----------
    config : TrainConfig
        The options shared by all folds.
    folds, fold : int
        Number of folds (>= 2) and this fold's index (``0 <= fold < folds``).
    """
    if int(folds) < 2 or not 0 <= int(fold) < int(folds):
        raise ConfigError(f"folds must be >= 2 and 0 <= fold < folds, not {folds!r}, {fold!r}")
    return dataclasses.replace(config, folds=int(folds), fold=int(fold), test_fraction=0.0)


# ---------------------------------------------------------------------------------------------
# self-supervised pretraining (wsi_pipeline.pretrain)
# ---------------------------------------------------------------------------------------------
#: pretraining methods :func:`wsi_pipeline.pretrain.pretrain` implements
PRETRAIN_METHODS = ("simclr",)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Options of self-supervised pretraining (saved to the work folder's ``config.json``).

    Attributes
    ----------
    backbone : str
        Registered patch CNN (``smallcnn``, ``resnet18``, ``resnet50``).
    init_weights : str or None
        Weights to start from (what ``--weights`` takes, e.g. ``IMAGENET1K_V1``); random init
        when None.
    method : {"simclr"}
    epochs, batch_size, lr, weight_decay, warmup_epochs
        AdamW with linear warm-up then cosine decay (per step); ``batch_size`` patches per step
        (two views each).
    patches_per_epoch : int or None
        A seeded random subset of the patches per epoch (None: all of them).
    temperature : float
        NT-Xent temperature.
    proj_dim : int
        Output size of the projection head (dropped after pretraining).
    crop_px : int or None
        Side of the views (None: the patch size).
    crop_scale : (float, float)
        Area fraction range of the random resized crop.
    stain_jitter : float
        HED jitter: each stain's optical density scaled by ``1 ± s`` and shifted by ``± s``.
    color_jitter : float
        Brightness, contrast and saturation factors in ``1 ± j``.
    blur_p : float
        Probability of a Gaussian blur (sigma 0.1-1.5 px).
    seed : int
    device : {"auto", "cpu", "cuda"}
    amp : bool
        Mixed precision on CUDA.
    amp_dtype : {"auto", "bfloat16", "float16"}
        ``auto``: bf16 where supported, else fp16 (with loss scaling).
    channels_last : bool
        Channels-last memory format on CUDA.
    """

    backbone: str = "smallcnn"
    init_weights: str | None = None
    method: str = "simclr"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    patches_per_epoch: int | None = None
    temperature: float = 0.2
    proj_dim: int = 64
    crop_px: int | None = None
    crop_scale: tuple[float, float] = (0.35, 1.0)
    stain_jitter: float = 0.05
    color_jitter: float = 0.3
    blur_p: float = 0.5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    amp_dtype: str = "auto"
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.method not in PRETRAIN_METHODS:
            raise ConfigError(
                f"pretraining method must be one of {', '.join(PRETRAIN_METHODS)}, not "
                f"{self.method!r}"
            )
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.amp_dtype not in ("auto", "bfloat16", "float16"):
            raise ConfigError(
                f"amp_dtype must be auto, bfloat16 or float16, not {self.amp_dtype!r}"
            )
        for name in ("epochs", "batch_size", "proj_dim"):
            if int(getattr(self, name)) < (2 if name == "batch_size" else 1):
                raise ConfigError(f"{name} must be >= {2 if name == 'batch_size' else 1}")
        if self.patches_per_epoch is not None and int(self.patches_per_epoch) < 2:
            raise ConfigError("patches_per_epoch must be >= 2")
        if self.crop_px is not None and int(self.crop_px) < 8:
            raise ConfigError(f"crop_px must be >= 8, not {self.crop_px!r}")
        lo, hi = (float(v) for v in self.crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale must be 0 < min <= max <= 1, not {self.crop_scale!r}")
        object.__setattr__(self, "crop_scale", (lo, hi))
        if not (self.lr > 0 and self.temperature > 0):
            raise ConfigError("lr and temperature must be > 0")
        if not 0 <= self.blur_p <= 1 or self.stain_jitter < 0 or not 0 <= self.color_jitter < 1:
            raise ConfigError("blur_p must be in [0, 1], stain_jitter >= 0, color_jitter in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown pretraining option(s): {', '.join(unknown)}")
        d = dict(d)
        if "crop_scale" in d:
            d["crop_scale"] = tuple(d["crop_scale"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# User options -> specs. The command line (``--tile-size``) and pipeline files (``tile_size:``)
# name options the same way; this is the one map from those names to the fields they set.
# ---------------------------------------------------------------------------------------------
_NUMBER = (int, float)


@dataclass(frozen=True)
class Option:
    """One option as users write it, and what it sets.

    Attributes
    ----------
    types : tuple of type
        Value types a pipeline file may give (``bool`` is never an ``int`` here).
    target : {"tiling", "mask", "batch", "train", "folds", "predict"}
        What the option sets: a :class:`TilingSpec` or :class:`MaskSpec` field, a keyword of
        ``tile_slides`` (``batch``), a :class:`TrainConfig` field, the number of
        cross-validation folds, or a keyword of ``predict``.
    field : str
        The field or keyword name there.
    negate : bool
        The field is the negation of the option (``keep_pen`` sets ``remove_pen``).
    """

    types: tuple[type, ...]
    target: str
    field: str
    negate: bool = False


#: Options of the ``tile`` command and of a pipeline file's ``tile`` section.
TILE_OPTIONS: dict[str, Option] = {
    "mpp": Option(_NUMBER, "tiling", "mpp"),
    "level": Option((int,), "tiling", "level"),
    "tile_size": Option((int,), "tiling", "tile_px"),
    "overlap": Option((int,), "tiling", "overlap_px"),
    "tissue_threshold": Option(_NUMBER, "tiling", "min_tissue"),
    "edge": Option((str,), "tiling", "edge"),
    "codec": Option((str,), "tiling", "codec"),
    "jpeg_quality": Option((int,), "tiling", "jpeg_quality"),
    "patches_per_shard": Option((int,), "tiling", "patches_per_shard"),
    "mask_file": Option((str, os.PathLike), "mask", "user_mask"),  # also sets method="user"
    "keep_pen": Option((bool,), "mask", "remove_pen", negate=True),
    "keep_dark": Option((bool,), "mask", "remove_dark", negate=True),
    "workers": Option((int,), "batch", "workers"),
    "scheduler": Option((str,), "batch", "scheduler"),
    "slide_mpp": Option(_NUMBER, "batch", "slide_mpp"),
    "backend": Option((str,), "batch", "backend"),
    "overwrite": Option((bool,), "batch", "overwrite"),
}

#: Training options whose user name is not the :class:`TrainConfig` field name (every field is
#: also accepted under its own name). ``folds`` asks for k-fold cross-validation
#: (``train_folds``), as ``train --folds`` does.
TRAIN_OPTIONS: dict[str, Option] = {
    "workers": Option((int,), "train", "num_workers"),
    "precision": Option((str,), "train", "amp"),
    "folds": Option((int,), "folds", "folds"),
}

#: Options of a pipeline file's ``predict`` section (keywords of ``predict``).
PREDICT_OPTIONS: dict[str, Option] = {
    "device": Option((str,), "predict", "device"),
    "run_id": Option((str,), "predict", "run_id"),
    "chunk": Option((int,), "predict", "chunk"),
}

_PRECISION = {"amp": True, "fp32": False}


def _given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with a value (``None`` means "not given"), paths as strings."""
    return {
        k: os.fspath(v) if isinstance(v, os.PathLike) else v
        for k, v in options.items()
        if v is not None
    }


def tiling_from_options(options: Mapping[str, Any]) -> tuple[TilingSpec, dict[str, Any]]:
    """A :class:`TilingSpec` and the ``tile_slides`` keywords from user tile options.

    Parameters
    ----------
    options : mapping
        Names of :data:`TILE_OPTIONS` (``tile_size``, ``keep_pen``, ``workers`` ...); ``None``
        values count as not given. Neither ``mpp`` nor ``level``: level 0.

    Returns
    -------
    spec : TilingSpec
    batch : dict
        Keywords of ``tile_slides``: ``workers``, ``scheduler``, ``slide_mpp``, ``backend``,
        ``overwrite`` (those given).

    Raises
    ------
    ConfigError
        An unknown option or a bad value (the spec's own checks).
    """
    given = _given(options)
    unknown = sorted(set(given) - set(TILE_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown tile option(s): {', '.join(unknown)}")
    fields: dict[str, dict[str, Any]] = {"tiling": {}, "mask": {}, "batch": {}}
    for name, value in given.items():
        opt = TILE_OPTIONS[name]
        fields[opt.target][opt.field] = (not value) if opt.negate else value
    if "user_mask" in fields["mask"]:
        fields["mask"]["method"] = "user"
        input_file(fields["mask"]["user_mask"], "mask file")  # one line now, not one per slide
    workers = fields["batch"].get("workers", 1)
    if int(workers) < 1:
        raise ConfigError(f"workers must be >= 1, not {workers!r}")
    spec = TilingSpec(mask=MaskSpec(**fields["mask"]), **fields["tiling"])
    return spec, fields["batch"]


def _train_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """User training options renamed to :class:`TrainConfig` fields (``folds`` kept as is)."""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for name, value in _given(options).items():
        opt = TRAIN_OPTIONS.get(name)
        key = opt.field if opt is not None else name
        if key in given_as:
            raise ConfigError(f"'{given_as[key]}' and '{name}' set the same option: give one")
        if name == "precision":
            if value not in _PRECISION:
                raise ConfigError(f"precision must be 'amp' or 'fp32', not {value!r}")
            value = _PRECISION[value]
        out[key], given_as[key] = value, name
    return out


def train_config_from_options(
    *options: Mapping[str, Any],
) -> tuple[TrainConfig, int | None]:
    """A :class:`TrainConfig` and the number of cross-validation folds from user options.

    Parameters
    ----------
    *options : mapping
        Layers of options, later ones overriding earlier ones (a ``--config`` file, then the
        command line). Names are :class:`TrainConfig` fields or :data:`TRAIN_OPTIONS`
        (``workers``, ``precision`` = ``"amp"``/``"fp32"``, ``folds``); ``None`` values count
        as not given.

    Returns
    -------
    config : TrainConfig
    folds : int or None
        ``folds`` when k-fold cross-validation is asked for (train with ``train_folds``).

    Raises
    ------
    ConfigError
        An unknown option or a bad value.
    """
    merged: dict[str, Any] = {}
    for layer in options:
        merged.update(_train_fields(layer))
    folds = merged.pop("folds", None)
    if folds is not None and int(folds) < 2:
        raise ConfigError(f"folds must be >= 2 for cross-validation, not {folds!r}")
    return TrainConfig.from_dict(merged), None if folds is None else int(folds)
