"""The batch QC page (``wsi-pipeline report``), checked in a real headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import assert_not_blank, launch_browser, open_page

from wsi_pipeline.cli import main
from wsi_pipeline.report import REPORT_HTML, write_report


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


def test_report_page(scored_batch: Path, browser: Any, tmp_path: Path) -> None:
    page_path = write_report(scored_batch, dest=tmp_path / REPORT_HTML)
    text = page_path.read_text()
    assert "broken" in text and "unsupported or unreadable slide" in text  # failed, with reason
    assert "no heatmap: the store has no scores/run" in text  # the 2 unpredicted stores
    assert "no heatmap: the store has no patches" in text  # the blank slide
    assert "http://" not in text and "https://" not in text  # nothing fetched

    page, errors = open_page(browser, page_path.as_uri())
    widths = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
    # per slide: mask+grid (9 stores), heatmap and 4 top patches (6 predicted)
    assert len(widths) == 9 + 6 * 5 and all(w and w > 0 for w in widths), widths
    assert_not_blank(page.screenshot(full_page=False))

    def order() -> list[tuple[str, str]]:
        return page.evaluate(
            "Array.from(document.querySelectorAll('#cards > .card'))"
            ".map(c => [c.dataset.id, c.dataset.p])"
        )

    page.click("#sort-p-desc")
    got = order()
    ps = [float(p) for _, p in got if p]
    assert len(ps) == 6 and ps == sorted(ps, reverse=True)
    assert all(not p for _, p in got[6:])  # slides without a prediction last
    page.click("#sort-p-asc")
    ps = [float(p) for _, p in order() if p]
    assert ps == sorted(ps)
    page.click("#sort-id")
    assert [i for i, _ in order()] == sorted(i for i, _ in order())
    assert errors == []


def test_report_cli(scored_batch: Path, tmp_path: Path) -> None:
    dest = tmp_path / "qc.html"
    assert main(["report", str(scored_batch), "--dest", str(dest)]) == 0
    assert "wsi-pipeline batch report" in dest.read_text()
    assert main(["report", str(tmp_path / "nothing-here")]) == 1
