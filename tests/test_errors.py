"""One exception family; every message is one line that names the file."""

from __future__ import annotations

from pathlib import Path

import pytest

import wsi_pipeline
from wsi_pipeline.errors import (
    ConfigError,
    SlideError,
    StoreError,
    TilingError,
    TrainingError,
    WSIPipelineError,
    short_reason,
)

FAMILY = [ConfigError, SlideError, StoreError, TilingError, TrainingError]


@pytest.mark.parametrize("cls", FAMILY)
def test_one_family_exported_from_the_top(cls: type[WSIPipelineError]) -> None:
    assert issubclass(cls, WSIPipelineError) and issubclass(cls, Exception)
    assert getattr(wsi_pipeline, cls.__name__) is cls


def test_message_is_one_line_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "s.svs"
    exc = SlideError("cannot open:\n  not a TIFF\t(bad magic)", path=path)
    assert str(exc) == f"{path}: cannot open: not a TIFF (bad magic)"
    assert exc.path == str(path) and "\n" not in str(exc)
    with pytest.raises(WSIPipelineError, match=r"s\.svs: cannot open"):
        raise exc


def test_path_is_not_repeated_and_is_optional(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    exc = StoreError(f"{path}: unfinished", path=path)
    assert str(exc) == f"{path}: unfinished"
    plain = ConfigError("tile size must be between 8 and 4096 px")
    assert plain.path is None and str(plain) == "tile size must be between 8 and 4096 px"


def test_error_report_is_the_one_exit_status_rule(tmp_path: Path) -> None:
    """Usage errors 2, other errors of the family 1; an OSError names its file; anything else
    is one line pointing at --debug."""
    from wsi_pipeline.errors import EXIT_FAILED, EXIT_USAGE, error_report

    assert error_report(ConfigError("bad value")) == ("bad value", EXIT_USAGE)
    assert error_report(StoreError("torn", path=tmp_path)) == (f"{tmp_path}: torn", EXIT_FAILED)
    denied = PermissionError(13, "Permission denied", str(tmp_path / "a\nb.csv"))
    assert error_report(denied) == (f"{tmp_path}/a\\nb.csv: Permission denied", EXIT_FAILED)
    msg, status = error_report(KeyError("x"))
    assert status == EXIT_FAILED and msg.startswith("internal error (KeyError: 'x')")
    assert "--debug" in msg and "\n" not in msg


def test_short_reason_is_the_first_sentence_on_one_line() -> None:
    torch_says = RuntimeError(
        "PytorchStreamReader failed reading zip archive: failed finding central directory. "
        "This is an internal miniz error. If you are seeing this error, there is a\nhigh "
        "likelihood that your checkpoint file is corrupted."
    )
    assert short_reason(torch_says) == (
        "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central "
        "directory."
    )
    assert short_reason(KeyError("model")) == "KeyError: 'model'"
    assert short_reason(ValueError("")) == "ValueError"
    long = short_reason(OSError("x" * 500), limit=40)
    assert long == "OSError: " + "x" * 39 + "…" and "\n" not in short_reason(OSError("a\nb"))
