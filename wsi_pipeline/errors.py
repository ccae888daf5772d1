"""One exception family for the whole pipeline.

Every error the pipeline raises on purpose derives from :class:`WSIPipelineError` and carries a
one-line message that names the file (or key) and the reason, so the CLI can print it as is.
"""

from __future__ import annotations

import errno
import os
import re

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ConfigError",
    "SlideError",
    "StoreError",
    "TilingError",
    "TrainingError",
    "WSIPipelineError",
    "disk_full_message",
    "error_report",
    "is_disk_full",
    "short_reason",
    "worker_message",
]

#: Exit status of the command line when every slide succeeded.
EXIT_OK = 0
#: Exit status when some slides failed (the others were processed) or a stage could not finish.
EXIT_FAILED = 1
#: Exit status for bad usage: an invalid option, configuration, labels or pipeline file, or an
#: output folder that cannot be written.
EXIT_USAGE = 2


class WSIPipelineError(Exception):
    """Base of every error raised on purpose by wsi_pipeline.

    ``exit_status`` is the command line's exit status for it (:data:`EXIT_FAILED`;
    :class:`ConfigError` is bad usage, :data:`EXIT_USAGE`).
    """

    exit_status: int = EXIT_FAILED

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
    """A configuration value, labels file or pipeline file is invalid (bad usage)."""

    exit_status = EXIT_USAGE


class TrainingError(WSIPipelineError):
    """Training or prediction cannot proceed with the given data or run folder."""


def is_disk_full(exc: BaseException) -> bool:
    """True for an ``OSError`` saying the disk (or the user's quota) is full (``ENOSPC``,
    ``EDQUOT``): a batch stops there instead of failing every slide after it."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(path: str | os.PathLike, done: int, total: int) -> str:
    """The one line of a batch that a full disk stopped: ``"disk full writing <path>; stopped
    after N of M slides"`` (``tile``, ``predict`` and ``heatmap`` say it alike)."""
    return _one_line(f"disk full writing {os.fspath(path)}; stopped after {done} of {total} slides")


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """What a library's exception says, for a one-line message: ``"<Type>: <first sentence>"``
    on one line, at most ``limit`` characters of text (a truncated checkpoint's torch error
    goes on about miniz for three more sentences)."""
    text = _one_line(str(exc))
    first = re.split(r"(?<=[.!?]) ", text, maxsplit=1)[0]
    if len(first) > limit:
        first = first[: limit - 1].rstrip() + "…"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _one_line(text: str) -> str:
    """``text`` on one line: line breaks escaped (a name holding a newline cannot forge a
    second line), whitespace runs collapsed."""
    return " ".join(text.replace("\r", "\\r").replace("\n", "\\n").split())


def error_report(exc: BaseException) -> tuple[str, int]:
    """The one-line message and the exit status of an error that reached the command line.

    The one place that maps errors to exit statuses: an error of this family has its own
    (``exc.exit_status``); an operating-system error (a file that cannot be read or written)
    names its file and the reason, exit :data:`EXIT_FAILED`; anything else is an internal error
    whose traceback ``--debug`` shows.

    Parameters
    ----------
    exc : BaseException
        The error.

    Returns
    -------
    message : str
        One line, without the ``"error: "`` prefix.
    status : int
        The exit status.
    """
    if isinstance(exc, WSIPipelineError):
        return str(exc), exc.exit_status
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return _one_line(f"{where}: {reason}" if where else reason), EXIT_FAILED
    text = _one_line(f"{type(exc).__name__}: {exc}")
    return f"internal error ({text}); rerun with --debug for the traceback", EXIT_FAILED


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
