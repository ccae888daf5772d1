"""One exception family for the whole pipeline.

Every error the pipeline raises on purpose derives from :class:`WSIPipelineError` and carries a
one-line message that names the file (or key) and the reason, so the CLI can print it as is.
"""

from __future__ import annotations

import os

__all__ = [
    "ConfigError",
    "SlideError",
    "StoreError",
    "TilingError",
    "TrainingError",
    "WSIPipelineError",
]


class WSIPipelineError(Exception):
    """Base of every error raised on purpose by wsi_pipeline."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        message = " ".join(str(message).split())  # always one line
        if self.path is not None and not message.startswith(self.path):
            shown = self.path.replace("\r", "\\r").replace("\n", "\\n")  # never a forged line
            message = f"{shown}: {message}"
        super().__init__(message)


class SlideError(WSIPipelineError):
    """A slide file cannot be opened, is not a supported brightfield slide, or fails to decode."""


class StoreError(WSIPipelineError):
    """A per-slide zarr store is missing, incomplete, of another version or inconsistent."""


class TilingError(WSIPipelineError):
    """Tiling parameters do not fit a slide (e.g. ``mpp`` asked for but unknown)."""


class ConfigError(WSIPipelineError):
    """A configuration value, labels file or pipeline file is invalid."""


class TrainingError(WSIPipelineError):
    """Training or prediction cannot proceed with the given data or run folder."""
