"""Shared fixtures: the real test slides in ../shared and small synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_SHARED", ROOT.parent / "shared"))
TESTDATA = SHARED / "testdata" / "slides"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The folder of real slides (``../shared/testdata/slides``)."""
    if not TESTDATA.is_dir():
        pytest.skip(f"real test slides not found at {TESTDATA} (set WSI_SHARED)")
    return TESTDATA
