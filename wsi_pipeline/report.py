"""The batch QC report: one self-contained HTML page for a folder of stores and their results.

``report.html`` shows the batch at a glance: counts by status (from ``manifest.csv``), timings
(per slide from the manifest, per stage from the pipeline's ``report.json``), the failures with
their one-line reason, and one card per slide: the thumbnail with the tissue mask and the tile
grid, patch counts, the prediction, the heatmap overlay (the colour table of
:mod:`wsi_pipeline.exports`) and the top-scoring patches. Every image is inlined as a PNG data URI
and the sorting is a few lines of inline JavaScript, so the page works opened as a file, with no
server and nothing fetched. A store without scores shows its slide without a heatmap and says why;
a slide that failed to tile appears with its reason.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError
from .util import atomic_write_text, output_dir, sanitize_id

__all__ = ["REPORT_HTML", "SlideCard", "slide_card", "write_report"]

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"  #: the page, in the folder given to ``wsi-pipeline report``
#: Widest image in a card (px): thumbnails are shrunk to it.
CARD_PX = 360
#: Top-scoring patches shown per slide.
TOP_PATCHES = 4
#: Heatmap look: the ``heatmap`` command's defaults for probability scores.
_RANGE = (0.0, 1.0)
_TRANSPARENT_BELOW = 0.2


@dataclass
class SlideCard:
    """What the report shows for one slide (text fields are plain; the page escapes them)."""

    slide_id: str
    status: str = ""
    error: str = ""
    n_patches: int | None = None
    tissue_pct: float | None = None
    seconds: float | None = None
    predicted: str = ""
    probability: float | None = None
    heatmap_note: str = ""
    images: dict[str, str] = field(default_factory=dict)  # caption -> data URI
    top: list[tuple[str, float]] = field(default_factory=list)  # (data URI, score)


def _data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _shrink(rgb: np.ndarray, max_px: int) -> tuple[np.ndarray, float]:
    """``rgb`` fitted to ``max_px`` (shrunk, or enlarged by a whole factor when it is less than
    half of it); the factor applied."""
    from .util import resize_rgb

    h, w = rgb.shape[:2]
    if 2 * max(h, w) <= max_px:  # a small thumbnail: enlarged by a whole factor, pixels kept
        k = max_px // max(h, w)
        return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1), float(k)
    f = min(1.0, max_px / max(h, w))
    if f >= 1.0:
        return rgb, 1.0
    return resize_rgb(rgb, (max(1, round(w * f)), max(1, round(h * f))), resample="area"), f


def _mask_and_grid(store: Any) -> np.ndarray:
    """The thumbnail with non-tissue dimmed, the mask's outline and each patch's square."""
    from PIL import Image, ImageDraw

    thumb = store.thumbnail
    img, f = _shrink(thumb, CARD_PX)
    h, w = img.shape[:2]
    mask = Image.fromarray(store.tissue_mask.astype(np.uint8) * 255).resize((w, h))
    m = np.asarray(mask) > 127
    out = img.astype(np.float32)
    out[~m] = out[~m] * 0.45 + 255 * 0.55  # outside tissue: faded
    pil = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    ys, xs = np.nonzero(edge)
    for x, y in zip(xs.tolist(), ys.tolist()):
        draw.point((x, y), fill=(0, 90, 200))
    scale = f / store.thumbnail_downsample  # level-0 px -> card px
    side = float(store.tiling["patch_l0"]) * scale
    for x0, y0 in store.coords.tolist():
        x, y = x0 * scale, y0 * scale
        draw.rectangle((x, y, x + side, y + side), outline=(20, 20, 20))
    return np.asarray(pil)


def _heatmap(store: Any, scores: np.ndarray) -> np.ndarray:
    """The scores over the thumbnail with the heatmap command's colours and transparency."""
    from .exports import DEFAULT_ALPHA, DEFAULT_CMAP, overlay_lut, overlay_rgb
    from .stitch import stitch_scores

    thumb, _ = _shrink(store.thumbnail, CARD_PX)
    h, w = thumb.shape[:2]
    meta = store.meta
    values, _ = stitch_scores(
        store.coords,
        scores,
        patch_l0=float(store.tiling["patch_l0"]),
        slide_wh=(meta.width, meta.height),
        downsample=meta.width / w,
        tissue_mask=np.asarray(store.tissue_mask, bool),
        mask_downsample=store.mask_downsample,
    )
    values = values[:h, :w]
    if values.shape != (h, w):  # rounding of the grid: pad with "no value"
        full = np.full((h, w), np.nan, np.float32)
        full[: values.shape[0], : values.shape[1]] = values
        values = full
    lut = overlay_lut(
        DEFAULT_CMAP, value_range=_RANGE, alpha=DEFAULT_ALPHA, transparent_below=_TRANSPARENT_BELOW
    )
    return overlay_rgb(values, thumb, value_range=_RANGE, lut=lut)


def slide_card(
    store_path: Path,
    run_id: str | None,
    card: SlideCard | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
) -> SlideCard:
    """Fill a slide's card from its store (a store that cannot be read says so in ``error``).

    Scores are read and checked as ``heatmap`` reads them
    (:func:`wsi_pipeline.heatmap.read_scores`, :func:`~wsi_pipeline.heatmap.check_scores_model`):
    unfinished scores, or scores of an earlier model of a run trained again since, are not
    drawn; the card says why (rerun predict) and shows no prediction.

    Parameters
    ----------
    store_path : Path
        A store.
    run_id : str or None
        Whose ``scores/<run_id>`` to draw; None: no heatmap.
    card : SlideCard, optional
        A card already holding the manifest's and predictions' fields.
    run_dir : path, optional
        The run folder of ``run_id`` (its current model is checked against the scores'); default
        the folder ``predict`` recorded with the scores, while it exists.

    Returns
    -------
    SlideCard
    """
    from .heatmap import check_scores_model, current_model_id, read_scores
    from .store import SlideStore, score_runs, scores_key

    card = card or SlideCard(store_path.stem)
    try:
        store = SlideStore(store_path)
    except (StoreError, OSError, KeyError) as exc:
        card.error = card.error or f"{store_path}: store cannot be read ({exc})"
        return card
    n = store.n_patches
    card.n_patches = n
    mask = store.tissue_mask
    card.tissue_pct = 100.0 * float(np.mean(mask)) if mask.size else 0.0
    card.images["tissue mask and tiles"] = _data_uri(_mask_and_grid(store))
    if n == 0:
        card.heatmap_note = "no heatmap: the store has no patches (no tissue found)"
        return card
    if run_id is None:
        card.heatmap_note = "no heatmap: no run given and the store has no scores (run predict)"
        return card
    key = scores_key(run_id)
    if run_id not in score_runs(store.group):
        card.heatmap_note = (
            f"no heatmap: the store has no {key} (run 'wsi-pipeline predict' with that run)"
        )
        return card
    try:
        scores, attrs = read_scores(store, run_id)
        check_scores_model(store, run_id, attrs, current_model_id(run_dir, attrs))
    except StoreError as exc:  # unfinished, torn, or another model's: not this run's result
        card.heatmap_note = f"no heatmap: {exc}"
        card.predicted, card.probability = "", None
        return card
    if not card.predicted:
        card.predicted = str(attrs.get("predicted", ""))
    if card.probability is None and attrs.get("abnormal_probability") is not None:
        card.probability = float(attrs["abnormal_probability"])
    card.images[
        "heatmap: P abnormal per patch (viridis; transparent <= 0.2, opacity to 0.7 at 1)"
    ] = _data_uri(_heatmap(store, scores))
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:TOP_PATCHES]
    patches = store.reader().read(np.sort(top))
    by_index = dict(zip(np.sort(top).tolist(), patches))
    for i in top.tolist():
        img, _ = _shrink(by_index[i], 96)
        card.top.append((_data_uri(img), float(scores[i])))
    return card


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _pick_run_id(preds: list[dict[str, str]], stores: list[Path]) -> str | None:
    """The run id of predictions.csv, else the one score run all stores share."""
    from .store import open_store, score_runs

    ids = {r.get("run_id") for r in preds if r.get("run_id")}
    if len(ids) == 1:
        return ids.pop()
    found: set[str] = set()
    for sp in stores:
        try:
            found.update(score_runs(open_store(sp)))
        except (StoreError, OSError):
            continue
    return found.pop() if len(found) == 1 else None


def _cards(
    stores_dir: Path,
    preds: list[dict[str, str]],
    manifest: list[dict[str, str]],
    rid: str | None,
    run_dir: str | os.PathLike | None = None,
) -> list[SlideCard]:
    from .store import store_path

    cards: dict[str, SlideCard] = {}
    for row in manifest:
        sid = row.get("slide_id") or Path(row.get("path", "?")).stem
        c = cards.setdefault(sid, SlideCard(sid))
        c.status = row.get("status", "")
        c.error = row.get("error", "")
        c.seconds = _float(row.get("seconds"))
    for row in preds:
        c = cards.setdefault(row["slide_id"], SlideCard(row["slide_id"]))
        c.predicted = row.get("predicted_label", "")
        c.probability = _float(row.get("probability"))
        if row.get("error") and not c.error:
            c.error = row["error"]
    known = {sanitize_id(s) for s in cards}
    for sp in sorted(stores_dir.glob("*.zarr")) if stores_dir.is_dir() else []:
        if sp.stem not in known:
            cards[sp.stem] = SlideCard(sp.stem, status="(not in manifest)")
    for sid, c in sorted(cards.items()):
        sp = store_path(stores_dir, sid)
        if c.status == "failed" or not sp.exists():
            if not c.error and not sp.exists():
                c.error = f"no store {sp}"
            continue
        slide_card(sp, rid, c, run_dir=run_dir)
    return [cards[k] for k in sorted(cards)]


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.5em;margin:0 0 .3em} h2{font-size:1.15em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.3em 0} td,th{border:1px solid #ccc;padding:2px 8px;
text-align:left} .fail{color:#b00020} .note{color:#8a5a00}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;margin:.8em 0;padding:.6em .9em}
.card.failed{border-color:#b00020} .imgs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0} figcaption{font-size:12px;color:#555} .top img{margin-right:4px}
.badge{display:inline-block;padding:0 6px;border-radius:8px;background:#eee;font-size:12px}
button{margin-right:6px}
"""

_JS = """
function sortCards(key, dir){
  var box=document.getElementById('cards');
  var cards=Array.prototype.slice.call(box.children);
  cards.sort(function(a,b){
    if(key==='id'){return dir*a.dataset.id.localeCompare(b.dataset.id);}
    var x=parseFloat(a.dataset.p), y=parseFloat(b.dataset.p);
    var nx=isNaN(x), ny=isNaN(y);
    if(nx||ny){return nx===ny ? a.dataset.id.localeCompare(b.dataset.id) : (nx?1:-1);}
    return dir*(x-y) || a.dataset.id.localeCompare(b.dataset.id);
  });
  cards.forEach(function(c){box.appendChild(c);});
  document.getElementById('sorted').textContent=key+(dir>0?' ascending':' descending');
}
"""


def _fmt(v: float | None, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def _card_html(c: SlideCard) -> str:
    e = html.escape
    failed = bool(c.error) and (c.status == "failed" or c.n_patches is None)
    p = "" if c.probability is None else f"{c.probability:.6f}"
    parts = [
        f'<div class="card{" failed" if failed else ""}" data-id="{e(c.slide_id)}" data-p="{p}">',
        f"<h3>{e(c.slide_id)} <span class='badge'>{e(c.status or 'no manifest row')}</span></h3>",
        "<p>",
        f"patches: {_fmt(c.n_patches, 'd')} · tissue in the mask: {_fmt(c.tissue_pct, '.1f')} %"
        f" · tiling: {_fmt(c.seconds, '.1f')} s<br>",
        "prediction: "
        + (
            f"<b>{e(c.predicted)}</b> (P abnormal {c.probability:.3f})"
            if c.probability is not None
            else "none"
        ),
        "</p>",
    ]
    if c.error:
        parts.append(f'<p class="fail">{e(c.error)}</p>')
    if c.heatmap_note:
        parts.append(f'<p class="note">{e(c.heatmap_note)}</p>')
    if c.images or c.top:
        parts.append('<div class="imgs">')
        for cap, uri in c.images.items():
            parts.append(
                f'<figure><img src="{uri}" alt="{e(cap)}"><figcaption>{e(cap)}'
                "</figcaption></figure>"
            )
        if c.top:
            imgs = "".join(
                f'<img src="{uri}" alt="patch score {s:.3f}" title="score {s:.3f}">'
                for uri, s in c.top
            )
            scores = ", ".join(f"{s:.3f}" for _, s in c.top)
            parts.append(
                f'<figure class="top">{imgs}<figcaption>top-scoring patches ({scores})'
                "</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</div>")
    return "\n".join(parts)


def _summary_html(
    cards: list[SlideCard], manifest: list[dict[str, str]], pipeline_report: dict[str, Any] | None
) -> str:
    e = html.escape
    counts: dict[str, int] = {}
    for row in manifest:
        counts[row.get("status") or "?"] = counts.get(row.get("status") or "?", 0) + 1
    out = ["<h2>Batch</h2>"]
    if counts:
        out.append("<table><tr><th>status</th><th>slides</th></tr>")
        out += [f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in sorted(counts.items())]
        out.append("</table>")
    else:
        out.append('<p class="note">no manifest.csv in the stores folder</p>')
    secs = [c.seconds for c in cards if c.seconds is not None]
    if secs:
        out.append(
            f"<p>tiling: {sum(secs):.1f} s in all, median {float(np.median(secs)):.1f} s per "
            f"slide, slowest {max(secs):.1f} s</p>"
        )
    predicted = [c for c in cards if c.probability is not None]
    out.append(f"<p>predicted: {len(predicted)} of {len(cards)} slide(s)</p>")
    if pipeline_report and pipeline_report.get("stages"):
        out.append("<table><tr><th>stage</th><th>status</th><th>seconds</th></tr>")
        for st in pipeline_report["stages"]:
            out.append(
                f"<tr><td>{e(str(st.get('stage')))}</td><td>{e(str(st.get('status')))}</td>"
                f"<td>{float(st.get('seconds', 0)):.1f}</td></tr>"
            )
        out.append("</table>")
    fails = [c for c in cards if c.error and c.status != "no_tissue"]  # no tissue: not a failure
    out.append(f"<h2>Failures ({len(fails)})</h2>")
    if fails:
        out.append("<table><tr><th>slide</th><th>reason</th></tr>")
        out += [
            f'<tr><td>{e(c.slide_id)}</td><td class="fail">{e(c.error)}</td></tr>' for c in fails
        ]
        out.append("</table>")
    else:
        out.append("<p>none</p>")
    return "\n".join(out)


def write_report(
    out_dir: str | os.PathLike,
    *,
    stores: str | os.PathLike | None = None,
    predictions: str | os.PathLike | None = None,
    run_id: str | None = None,
    run_dir: str | os.PathLike | None = None,
    dest: str | os.PathLike | None = None,
) -> Path:
    """Write the batch QC page.

    Parameters
    ----------
    out_dir : path
        A pipeline's output folder (``stores/``, ``predictions/predictions.csv``,
        ``report.json``), or any folder when the others are given.
    stores : path, optional
        The stores folder (with ``manifest.csv``); default ``out_dir/stores``, or ``out_dir``
        itself when it holds stores.
    predictions : path, optional
        A ``predictions.csv``; default ``out_dir/predictions/predictions.csv`` if present.
    run_id : str, optional
        Whose scores to draw; default the run id of the predictions, else the one score run the
        stores share.
    run_dir : path, optional
        The run folder whose scores are drawn: scores that an earlier model of it wrote (it was
        trained again since) are not drawn; default the folder ``predict`` recorded with each
        store's scores, while it exists.
    dest : path, optional
        The page; default ``out_dir/report.html``.

    Returns
    -------
    Path
        The page written (atomically).

    Raises
    ------
    StoreError
        ``out_dir`` is not a folder.
    """
    from .runs import PREDICTIONS
    from .store import list_stores
    from .tile_batch import MANIFEST

    out = Path(out_dir)
    if not out.is_dir():
        raise StoreError("no such folder to report on", path=out)
    path = Path(dest) if dest is not None else out / REPORT_HTML
    output_dir(path.parent)  # one line before the work
    if stores is None:
        stores = out / "stores" if (out / "stores").is_dir() else out
    sd = Path(stores)
    preds = _read_csv(
        Path(predictions) if predictions is not None else out / "predictions" / PREDICTIONS
    )
    manifest = _read_csv(sd / MANIFEST)
    try:
        store_list = list_stores(sd)
    except Exception:  # no stores at all: the page still lists the manifest's failures
        store_list = []
    rid = run_id or _pick_run_id(preds, store_list)
    rep_path = out / "report.json"
    try:
        pipeline_report = json.loads(rep_path.read_text()) if rep_path.is_file() else None
    except (OSError, ValueError):
        pipeline_report = None
    t0 = time.time()
    cards = _cards(sd, preds, manifest, rid, run_dir)
    e = html.escape
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>wsi-pipeline report: {e(str(out))}</title>",
            # nothing outside this file may load: no network, no CDN
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
            f"<style>{_CSS}</style><script>{_JS}</script></head><body>",
            "<h1>wsi-pipeline batch report</h1>",
            f"<p>{e(str(out))} · stores {e(str(sd))} · run {e(rid or 'none')} · "
            f"{len(cards)} slide(s) · written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
            _summary_html(cards, manifest, pipeline_report),
            "<h2>Slides</h2>",
            "<p>sort: <button id='sort-p-desc' onclick=\"sortCards('p',-1)\">prediction ↓</button>"
            "<button id='sort-p-asc' onclick=\"sortCards('p',1)\">prediction ↑</button>"
            "<button id='sort-id' onclick=\"sortCards('id',1)\">slide id</button>"
            " <span id='sorted'>slide id ascending</span></p>",
            '<div id="cards">',
            *(_card_html(c) for c in cards),
            "</div></body></html>",
        ]
    )
    atomic_write_text(path, page)
    log.info("report: %d slide(s) in %.1f s: %s", len(cards), time.time() - t0, path)
    return path
