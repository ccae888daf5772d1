"""The few frozen dataclasses that cross stages: slide metadata, mask and tiling specs.

Everything else that crosses stages is an array, a tensor, or the store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["MaskSpec", "SlideMeta", "TilingSpec"]

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
        has an mpp. Otherwise ``thumb_max_px`` sets the thumbnail's longest side.
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

    Exactly one of ``mpp`` and ``level`` is set.

    Attributes
    ----------
    tile_px : int
        Patch side in pixels at the target resolution.
    mpp : float or None
        Target resolution in µm per pixel.
    level : int or None
        Target pyramid level (patches at that level's native resolution).
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
    patches_per_shard : int
        Patches per shard file of the ``patches`` array.
    mask : MaskSpec
        Tissue mask parameters.
    """

    tile_px: int = 256
    mpp: float | None = None
    level: int | None = 0
    overlap_px: int = 0
    min_tissue: float = 0.25
    edge: str = "pad"
    codec: str = "jpeg"
    jpeg_quality: int = 90
    patches_per_shard: int = 256
    mask: MaskSpec = field(default_factory=MaskSpec)

    def __post_init__(self) -> None:
        if self.mpp is not None and self.level is not None:
            object.__setattr__(self, "level", None)  # an explicit mpp wins over the default level
        if self.mpp is None and self.level is None:
            raise ConfigError("give a target resolution: mpp or level")
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
