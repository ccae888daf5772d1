"""A real headless Chromium for the page tests (report, viewer), driven by Playwright.

Chromium comes from the Debian package (``apt-get install -y chromium``: ``make browser``) and
Playwright from PyPI (the ``test`` extra); ``playwright install`` (a download) is never used.
Tests that need it skip, saying why, when either is missing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

CHROMIUM = os.environ.get("WSI_CHROMIUM", "/usr/bin/chromium")


def launch_browser() -> Iterator[Any]:
    """Yield a launched headless Chromium (closed afterwards), or skip the test."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (make browser: apt-get install -y chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, url: str, *, width: int = 1200, height: int = 1400) -> tuple[Any, list]:
    """A page at ``url`` and the list its console errors, failed requests and page errors go to."""
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(url)
    page.wait_for_load_state("load")
    return page, errors


def assert_not_blank(png: bytes) -> np.ndarray:
    """The screenshot as an array, after checking it is not one flat colour."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert img.std() > 10 and colours > 100, (img.std(), colours)
    return img
