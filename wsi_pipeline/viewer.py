"""A small slide viewer on localhost: DeepZoom tiles of a slide with its heatmap and regions.

``wsi-pipeline view STORES --slide ID [--run RUN]`` serves, with the standard library's
``http.server`` (bound to 127.0.0.1 unless told otherwise):

``/``                                   the slides (links)
``/slide/<id>``                         the viewer page (OpenSeadragon)
``/dzi/<id>.dzi``                       the DeepZoom descriptor of the slide
``/dzi/<id>_files/<level>/<col>_<row>.jpeg``  its tiles, read through :mod:`wsi_pipeline.slide`
                                        (openslide or tiffslide, whichever opened the file)
``/heatmap/<id>.png``                   the scores as an RGBA image (the colour table of
                                        :mod:`wsi_pipeline.exports`), laid over the slide
``/regions/<id>.geojson``               the regions at or above the threshold
``/osd/<file>``                         OpenSeadragon's files, from the folder ``make viewer``
                                        installs from the npm registry (``node_modules/``)

Only those routes answer: a slide id is looked up among the stores given (never used as a path),
an OpenSeadragon file must resolve inside its folder, and everything else is a 404.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import numpy as np

from .errors import ConfigError, StoreError

__all__ = ["DZI_OVERLAP", "DZI_TILE", "ViewerSlide", "find_openseadragon", "make_server", "serve"]

log = logging.getLogger(__name__)

DZI_TILE = 254  #: DeepZoom tile side (px)
DZI_OVERLAP = 1  #: DeepZoom tile overlap (px)
_OSD_ENV = "WSI_OPENSEADRAGON"
_ID = r"[A-Za-z0-9._-]+"
_TILE_RE = re.compile(rf"^/dzi/({_ID})_files/(\d+)/(\d+)_(\d+)\.jpeg$")


def find_openseadragon(folder: str | os.PathLike | None = None) -> Path:
    """The folder holding ``openseadragon.min.js`` (and its ``images/``).

    Looked for in ``folder``, else ``$WSI_OPENSEADRAGON``, else ``node_modules/openseadragon/``
    next to the package's source tree (``make viewer``: ``npm install``).

    Raises
    ------
    ConfigError
        Not found (one line saying how to install it).
    """
    cands = []
    if folder is not None:
        cands.append(Path(folder))
    if os.environ.get(_OSD_ENV):
        cands.append(Path(os.environ[_OSD_ENV]))
    root = Path(__file__).resolve().parent.parent
    cands.append(root / "node_modules" / "openseadragon" / "build" / "openseadragon")
    for c in cands:
        if (c / "openseadragon.min.js").is_file():
            return c.resolve()
    raise ConfigError(
        "OpenSeadragon not found (looked in "
        + ", ".join(str(c) for c in cands)
        + "); install it with 'make viewer' (npm install) or set "
        + _OSD_ENV
    )


@dataclass
class ViewerSlide:
    """One slide the viewer serves: its store, its slide file and its scores' name.

    ``run_dir`` is the run folder of ``run_id`` (default: the one ``predict`` recorded with the
    scores): scores that an earlier model of it wrote are not drawn (:meth:`scores_note`).
    """

    slide_id: str
    store: Path
    run_id: str | None
    run_dir: Path | None = None

    def __post_init__(self) -> None:
        from .store import SlideStore

        self.data = SlideStore(self.store)
        self.meta = self.data.meta
        self.lock = threading.Lock()
        self._slide: Any = None
        self._values: np.ndarray | None = None

    def slide(self) -> Any:
        """The open slide (opened once, with the backend that tiled it)."""
        from .slide import open_slide

        if self._slide is None:
            self._slide = open_slide(self.meta.path, backend=self.meta.backend, check_pixels=False)
        return self._slide

    def levels(self) -> list[tuple[int, int]]:
        """DeepZoom level sizes, 1 x 1 first, the slide's level 0 last."""
        w, h = self.meta.width, self.meta.height
        n = math.ceil(math.log2(max(w, h))) + 1
        return [
            (max(1, math.ceil(w / 2 ** (n - 1 - i))), max(1, math.ceil(h / 2 ** (n - 1 - i))))
            for i in range(n)
        ]

    def dzi(self) -> bytes:
        """The DeepZoom descriptor."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" '
            f'Overlap="{DZI_OVERLAP}" TileSize="{DZI_TILE}">'
            f'<Size Width="{self.meta.width}" Height="{self.meta.height}"/></Image>'
        ).encode()

    def tile(self, level: int, col: int, row: int) -> bytes | None:
        """One DeepZoom tile as JPEG, or None outside the pyramid."""
        from PIL import Image

        levels = self.levels()
        if not 0 <= level < len(levels):
            return None
        lw, lh = levels[level]
        if col * DZI_TILE >= lw or row * DZI_TILE >= lh:
            return None
        x0 = max(0, col * DZI_TILE - DZI_OVERLAP)
        y0 = max(0, row * DZI_TILE - DZI_OVERLAP)
        x1 = min(lw, (col + 1) * DZI_TILE + DZI_OVERLAP)
        y1 = min(lh, (row + 1) * DZI_TILE + DZI_OVERLAP)
        scale = 2 ** (len(levels) - 1 - level)  # level-0 px per DeepZoom px
        with self.lock:
            rgb = self.slide().read_region_ds((x0 * scale, y0 * scale), (x1 - x0, y1 - y0), scale)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def scores_note(self) -> str:
        """Why there is no heatmap ("" when there is one).

        The scores are read and checked as ``heatmap`` reads them: unfinished ones, or those an
        earlier model of a run trained again since wrote, are not drawn (rerun predict).
        """
        from .heatmap import check_scores_model, current_model_id, read_scores
        from .store import score_runs, scores_key

        if self.data.n_patches == 0:
            return "no heatmap: the store has no patches (no tissue found)"
        if self.run_id is None:
            return "no heatmap: no --run given and the store has no scores"
        if self.run_id not in score_runs(self.data.group):
            return (
                f"no heatmap: the store has no {scores_key(self.run_id)} "
                "(run 'wsi-pipeline predict' with that run)"
            )
        try:
            _, attrs = read_scores(self.data, self.run_id)
            check_scores_model(self.data, self.run_id, attrs, current_model_id(self.run_dir, attrs))
        except StoreError as exc:
            return f"no heatmap: {exc}"
        return ""

    def values(self) -> np.ndarray:
        """The stitched scores on the thumbnail's grid (NaN outside tissue); made once."""
        from .heatmap import read_scores
        from .stitch import stitch_scores

        if self._values is not None:
            return self._values

        scores, _ = read_scores(self.data, str(self.run_id))
        values, _ = stitch_scores(
            self.data.coords,
            scores,
            patch_l0=float(self.data.tiling["patch_l0"]),
            slide_wh=(self.meta.width, self.meta.height),
            downsample=self.data.thumbnail_downsample,
            tissue_mask=np.asarray(self.data.tissue_mask, bool),
            mask_downsample=self.data.mask_downsample,
        )
        self._values = values
        return values

    def heatmap_png(self) -> bytes:
        """The scores as RGBA (transparent where low or outside tissue)."""
        from PIL import Image

        from .exports import DEFAULT_ALPHA, DEFAULT_CMAP, lut_index, overlay_lut

        lut = overlay_lut(
            DEFAULT_CMAP, value_range=(0.0, 1.0), alpha=DEFAULT_ALPHA, transparent_below=0.2
        )
        rgba = lut[lut_index(self.values(), value_range=(0.0, 1.0))]
        buf = io.BytesIO()
        Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
        return buf.getvalue()

    def regions(self, threshold: float) -> bytes:
        """GeoJSON regions at or above ``threshold`` (level-0 px)."""
        from .qupath import threshold_regions

        fc = threshold_regions(
            self.values(),
            threshold=threshold,
            downsample=self.data.thumbnail_downsample,
            mpp=self.meta.mpp,
        )
        return json.dumps(fc).encode()


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{margin:0;font:14px system-ui,sans-serif}} #bar{{padding:6px 10px;background:#f4f4f4}}
#osd{{position:absolute;top:40px;bottom:0;left:0;right:0;background:#fff}}
.note{{color:#8a5a00;margin-left:1em}}</style>
<script src="/osd/openseadragon.min.js"></script></head><body>
<div id="bar"><a href="/">slides</a> · <b>{title}</b>
<label><input type="checkbox" id="heat" {heat_on}> heatmap</label>
<label>opacity <input type="range" id="opacity" min="0" max="1" step="0.05" value="1"></label>
<label><input type="checkbox" id="regions" {heat_on}> regions ≥ {threshold}</label>
<span class="note" id="note">{note}</span></div>
<div id="osd"></div>
<script>
var W={width}, H={height}, HAS_HEAT={has_heat};
var viewer=OpenSeadragon({{id:'osd', prefixUrl:'/osd/images/', tileSources:'/dzi/{sid}.dzi',
  showNavigator:true, drawer:'canvas'}});
window.viewer=viewer; window.heat=null;
var svgNS='http://www.w3.org/2000/svg';
var svg=document.createElementNS(svgNS,'svg');
svg.setAttribute('viewBox','0 0 '+W+' '+H); svg.setAttribute('preserveAspectRatio','none');
svg.style.width='100%'; svg.style.height='100%'; svg.id='region-svg';
function setOpacity(){{
  if(window.heat){{window.heat.setOpacity(document.getElementById('heat').checked ?
    parseFloat(document.getElementById('opacity').value) : 0);}}
}}
viewer.addHandler('open', function(){{
  viewer.addOverlay({{element:svg, location:new OpenSeadragon.Rect(0,0,1,H/W)}});
  if(!HAS_HEAT){{return;}}
  viewer.addTiledImage({{tileSource:{{type:'image', url:'/heatmap/{sid}.png'}}, x:0, y:0, width:1,
    success:function(e){{window.heat=e.item; setOpacity();}}}});
  fetch('/regions/{sid}.geojson').then(function(r){{return r.json();}}).then(function(fc){{
    fc.features.forEach(function(f){{
      var polys=f.geometry.type==='Polygon'?[f.geometry.coordinates]:f.geometry.coordinates;
      polys.forEach(function(rings){{
        var p=document.createElementNS(svgNS,'path');
        p.setAttribute('d', rings.map(function(r){{return 'M'+r.map(function(c){{
          return c[0]+','+c[1];}}).join('L')+'Z';}}).join(' '));
        p.setAttribute('fill','none'); p.setAttribute('stroke','#ff2d2d');
        p.setAttribute('stroke-width', String(Math.max(W,H)/800)); p.setAttribute('fill-rule','evenodd');
        svg.appendChild(p);
      }});
    }});
    window.regionCount=fc.features.length;
  }});
}});
document.getElementById('heat').addEventListener('change', setOpacity);
document.getElementById('opacity').addEventListener('input', setOpacity);
document.getElementById('regions').addEventListener('change', function(e){{
  svg.style.display=e.target.checked?'':'none';}});
</script></body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    slides: ClassVar[dict[str, ViewerSlide]] = {}
    osd_dir: Path = Path()
    threshold: float = 0.5

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("view: " + format, *args)

    def _send(self, body: bytes, ctype: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _404(self) -> None:
        self._send(b"not found\n", "text/plain; charset=utf-8", HTTPStatus.NOT_FOUND)

    def do_GET(self) -> None:
        try:
            self._route(unquote(urlsplit(self.path).path))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # one slide's problem answers 500, the server stays up
            log.error("view: %s: %s", self.path, " ".join(str(exc).split())[:300])
            self._send(b"server error\n", "text/plain; charset=utf-8", 500)

    def _slide(self, sid: str) -> ViewerSlide | None:
        return self.slides.get(sid)

    def _route(self, path: str) -> None:
        if ".." in path.split("/") or "\\" in path or "\x00" in path:
            return self._404()
        if path == "/favicon.ico":
            return self._send(b"", "image/x-icon", HTTPStatus.NO_CONTENT)
        if path == "/":
            return self._send(self._index(), "text/html; charset=utf-8")
        m = re.match(rf"^/slide/({_ID})$", path)
        if m and (s := self._slide(m[1])):
            return self._send(self._page(s), "text/html; charset=utf-8")
        m = re.match(rf"^/dzi/({_ID})\.dzi$", path)
        if m and (s := self._slide(m[1])):
            return self._send(s.dzi(), "application/xml")
        m = _TILE_RE.match(path)
        if m and (s := self._slide(m[1])):
            tile = s.tile(int(m[2]), int(m[3]), int(m[4]))
            return self._send(tile, "image/jpeg") if tile else self._404()
        m = re.match(rf"^/heatmap/({_ID})\.png$", path)
        if m and (s := self._slide(m[1])) and not s.scores_note():
            return self._send(s.heatmap_png(), "image/png")
        m = re.match(rf"^/regions/({_ID})\.geojson$", path)
        if m and (s := self._slide(m[1])) and not s.scores_note():
            return self._send(s.regions(self.threshold), "application/geo+json")
        if path.startswith("/osd/"):
            f = (self.osd_dir / path[len("/osd/") :]).resolve()
            if f.is_file() and f.is_relative_to(self.osd_dir):
                ctype = {".js": "text/javascript", ".png": "image/png"}.get(f.suffix, "")
                if ctype:
                    return self._send(f.read_bytes(), ctype)
        return self._404()

    def _index(self) -> bytes:
        items = "".join(
            f'<li><a href="/slide/{html.escape(s)}">{html.escape(s)}</a></li>'
            for s in sorted(self.slides)
        )
        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>wsi-pipeline view</title>"
            f"</head><body><h1>Slides</h1><ul>{items}</ul></body></html>"
        ).encode()

    def _page(self, s: ViewerSlide) -> bytes:
        note = s.scores_note()
        return _PAGE.format(
            title=html.escape(s.slide_id),
            sid=s.slide_id,
            width=s.meta.width,
            height=s.meta.height,
            has_heat="false" if note else "true",
            heat_on="" if note else "checked",
            note=html.escape(note),
            threshold=f"{self.threshold:g}",
        ).encode()


def make_server(
    stores: Sequence[str | os.PathLike],
    *,
    slide_ids: Sequence[str] | None = None,
    run_id: str | None = None,
    run_dir: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    threshold: float = 0.5,
    osd_dir: str | os.PathLike | None = None,
) -> ThreadingHTTPServer:
    """A viewer server (not yet serving: call ``serve_forever``; ``server_address`` has the port).

    Parameters
    ----------
    stores : sequence of path
        Folders of stores; only their slides are served.
    slide_ids : sequence of str, optional
        Only these slides (sanitised as store names are); default all.
    run_id : str, optional
        Whose scores to overlay.
    run_dir : path, optional
        The run folder of ``run_id``: scores an earlier model of it wrote (it was trained again
        since) are not overlaid, the page says so; default the folder ``predict`` recorded.
    host, port : str, int
        Where to listen (port 0: any free port).
    threshold : float
        The regions' threshold (probability).
    osd_dir : path, optional
        OpenSeadragon's build folder (see :func:`find_openseadragon`).

    Raises
    ------
    ConfigError
        No slides, an unknown slide id, or OpenSeadragon missing.
    StoreError
        A folder of stores that does not exist.
    """
    from .store import list_stores

    slides: dict[str, ViewerSlide] = {}
    for folder in stores:
        paths = list_stores(folder)
        if slide_ids is not None:
            from .util import sanitize_id

            wanted = {sanitize_id(s) for s in slide_ids}
            paths = [p for p in paths if p.stem in wanted]
        for p in paths:
            try:
                rd = None if run_dir is None else Path(run_dir)
                slides.setdefault(p.stem, ViewerSlide(p.stem, p, run_id, rd))
            except StoreError as exc:
                log.warning("view: %s", exc)
    if slide_ids is not None:
        from .util import sanitize_id

        missing = [s for s in slide_ids if sanitize_id(s) not in slides]
        if missing:
            raise ConfigError(f"no complete store for slide id(s) {', '.join(map(repr, missing))}")
    if not slides:
        raise ConfigError(f"no complete stores in {', '.join(map(str, stores))}")
    handler = type(
        "ViewerHandler",
        (_Handler,),
        {"slides": slides, "osd_dir": find_openseadragon(osd_dir), "threshold": float(threshold)},
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(server: ThreadingHTTPServer) -> None:
    """Serve until interrupted (Ctrl-C), then close."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
