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
    "worker_message",
]


class WSIPipelineError(Exception):
    """Base of every error raised on purpose by wsi_pipeline."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        message = " ".join(worker_message(str(message), type(self).__name__).split())  # one line
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


def worker_message(message: str, name: str) -> str:
    """The original one-line message of an error re-raised from a torch DataLoader worker.

    torch re-raises a worker's exception in the main process as ``type(exc)(text)`` where
    ``text`` is ``"Caught <name> in DataLoader worker process N." + the worker's traceback``;
    the message is the last line of that traceback, after ``"<module>.<name>: "``. Any other
    ``message`` is returned as is.
    """
    if not message.startswith(f"Caught {name} in DataLoader worker"):
        return message
    lines = [line for line in message.splitlines() if line.strip()]
    last = lines[-1] if lines else message
    head, sep, tail = last.partition(f"{name}: ")
    return tail if sep and head.strip().replace(".", "").replace("_", "").isalnum() else last
