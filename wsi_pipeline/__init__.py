"""wsi-pipeline: whole-slide images to tissue masks, zarr patch stores, MIL models and heatmaps.

The stage functions are exported here with their numpydoc docstrings; they are the code paths the
CLI uses. ``import wsi_pipeline`` stays light and never imports torch: the torch stages
(:func:`train`, :func:`predict`, ...) and the heavier modules are imported on first use.

Examples
--------
>>> import wsi_pipeline as wp
>>> with wp.open_slide("slide.svs") as s:  # doctest: +SKIP
...     thumb = s.read_thumbnail(32.0)
>>> wp.tile_slides(["slides/"], "stores/", spec=wp.TilingSpec(mpp=0.5))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import (
    ConfigError,
    SlideError,
    StoreError,
    TilingError,
    TrainingError,
    WSIPipelineError,
)
from .specs import MaskSpec, SlideMeta, TilingSpec, TrainConfig

# name -> module, imported on first attribute access (PEP 562)
_LAZY = {
    "open_slide": "slide",
    "find_slides": "slide",
    "Slide": "slide",
    "tissue_mask": "tissue",
    "tile_slide": "tile_batch",
    "tile_slides": "tile_batch",
    "tile_grid": "tiling",
    "SlideStore": "store",
    "open_store": "store",
    "list_stores": "store",
    "find_stores": "store",
    "PatchReader": "store",
    "write_cohort": "synth",
    "write_slide": "synth",
    "train": "training",
    "train_folds": "training",
    "predict": "prediction",
    "evaluate": "evaluation",
    "stitch_scores": "stitch",
    "export_heatmaps": "heatmap",
    "heatmaps": "heatmap",
    "load_pipeline": "pipeline",
    "run_pipeline": "pipeline",
}

__all__ = [
    "ConfigError",
    "MaskSpec",
    "SlideError",
    "SlideMeta",
    "StoreError",
    "TilingError",
    "TilingSpec",
    "TrainConfig",
    "TrainingError",
    "WSIPipelineError",
    "__version__",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
