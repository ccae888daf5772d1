"""``wsi-pipeline view``: DeepZoom tiles, heatmap overlay and regions in a real headless Chromium,
and only the given slides and OpenSeadragon's folder served."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import assert_not_blank, launch_browser, open_page

from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.viewer import find_openseadragon, make_server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


@pytest.fixture(scope="module")
def server(scored_batch: Path) -> Iterator[tuple[str, int, list[str]]]:
    """A viewer of two slides of :func:`scored_batch`: one scored, one without scores."""
    try:
        find_openseadragon()
    except ConfigError as exc:
        pytest.skip(str(exc))
    shown = ["synth_000", "synth_007"]  # predicted / not predicted (see scored_batch)
    srv = make_server([scored_batch / "stores"], slide_ids=shown, run_id="run")
    host, port = srv.server_address[:2]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield str(host), int(port), shown
    finally:
        srv.shutdown()
        srv.server_close()


def get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """A raw GET (the path exactly as given: no client-side normalisation of ``..``)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


def test_viewer_pan_zoom_and_overlay(server: tuple[str, int, list[str]], browser: Any) -> None:
    host, port, (scored, _) = server
    assert host == "127.0.0.1"
    tiles: list[str] = []
    page = browser.new_page(viewport={"width": 500, "height": 400})
    page.on("request", lambda r: tiles.append(r.url) if "_files/" in r.url else None)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://{host}:{port}/slide/{scored}")
    page.wait_for_function("window.heat !== null && window.regionCount !== undefined")
    page.wait_for_timeout(1000)
    assert tiles, "opening the slide requested no tiles"
    first = len(tiles)
    assert_not_blank(page.screenshot())
    page.evaluate(
        "viewer.viewport.zoomBy(8); viewer.viewport.panBy(new OpenSeadragon.Point(0.1, 0))"
    )
    page.wait_for_timeout(1500)
    assert len(tiles) > first, "zooming in requested no new tiles"
    deepest = max(int(u.split("_files/")[1].split("/")[0]) for u in tiles)
    assert deepest >= max(int(u.split("_files/")[1].split("/")[0]) for u in tiles[:first])
    assert page.evaluate("heat.getOpacity()") == 1
    page.click("#heat")  # overlay off
    assert page.evaluate("heat.getOpacity()") == 0
    page.click("#heat")  # on again, then lighter
    page.fill("#opacity", "0.3")
    page.dispatch_event("#opacity", "input")
    assert page.evaluate("heat.getOpacity()") == pytest.approx(0.3)
    assert page.evaluate("regionCount") >= 0
    page.click("#regions")
    assert page.evaluate("document.getElementById('region-svg').style.display") == "none"
    assert errors == []


def test_viewer_slide_without_scores(server: tuple[str, int, list[str]], browser: Any) -> None:
    host, port, (_, unscored) = server
    page, errors = open_page(browser, f"http://{host}:{port}/slide/{unscored}")
    assert "no heatmap: the store has no scores/run" in page.inner_text("#note")
    page.wait_for_timeout(500)
    assert page.evaluate("window.heat") is None
    assert get(host, port, f"/heatmap/{unscored}.png")[0] == 404
    assert errors == []


def test_viewer_serves_only_its_slides(
    server: tuple[str, int, list[str]], scored_batch: Path
) -> None:
    host, port, (scored, _) = server
    assert get(host, port, f"/dzi/{scored}.dzi")[0] == 200
    assert get(host, port, f"/dzi/{scored}_files/0/0_0.jpeg")[0] == 200
    assert get(host, port, "/osd/openseadragon.min.js")[0] == 200
    other = "synth_003"  # a store there, but not given
    for path in [
        f"/slide/{other}",
        f"/dzi/{other}.dzi",
        "/slide/nope",
        f"/dzi/{scored}_files/99/0_0.jpeg",
        "/osd/../package.json",
        "/osd/../../pyproject.toml",
        "/osd/%2e%2e/%2e%2e/pyproject.toml",
        "/osd/..%2f..%2fpyproject.toml",
        f"/slide/..%2f{scored}",
        "/../../../../etc/passwd",
        "/stores/manifest.csv",
    ]:
        status, body = get(host, port, path)
        assert status == 404, (path, status)
        assert b"slide_id" not in body and b"root:" not in body


def test_view_cli_refuses_unknown_slides(scored_batch: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["view", str(scored_batch / "stores"), "--slide", "nope", "--port", "0"])
    assert rc == 2
    assert "no complete store for slide id(s) 'nope'" in capsys.readouterr().err
