"""wsi-pipeline: whole-slide images to tissue masks, zarr patch stores, MIL models and heatmaps.

``import wsi_pipeline`` stays light: it never imports torch. The torch stages
(:mod:`wsi_pipeline.train`, :mod:`wsi_pipeline.predict`, ...) are imported on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    ConfigError,
    SlideError,
    StoreError,
    TilingError,
    TrainingError,
    WSIPipelineError,
)
from .specs import MaskSpec, SlideMeta, TilingSpec

__all__ = [
    "ConfigError",
    "MaskSpec",
    "SlideError",
    "SlideMeta",
    "StoreError",
    "TilingError",
    "TilingSpec",
    "TrainingError",
    "WSIPipelineError",
    "__version__",
]
