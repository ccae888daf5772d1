"""GeoJSON for QuPath: threshold regions as annotations, one detection per patch.

Both are FeatureCollections in level-0 pixel coordinates following QuPath's import conventions
(QuPath >= 0.4): ``properties.objectType`` (``"annotation"`` / ``"detection"``), a
``classification`` ``{name, color}`` and ``measurements`` as a flat ``{name: number}`` object.
Polygons are closed, exteriors counter-clockwise and holes clockwise as written (RFC 7946).
Nothing here reads a store; :mod:`wsi_pipeline.heatmap` decides what goes where.

Regions (:func:`threshold_regions`)
    The heatmap's 4-connected regions at or above a threshold, traced at the pixel edges, as
    annotations with ``score_mean``, ``score_max`` and areas; returned as a dict (the caller
    writes it).
Tiles (:func:`write_tiles_geojson`)
    One detection per patch (its square), with per-patch measurements, streamed to a file
    through :func:`wsi_pipeline.util.atomic_path` in memory bounded by a chunk of patches. In
    QuPath: *File → Import objects*, then *Measure → Show measurement maps*.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .util import atomic_path

__all__ = ["threshold_regions", "write_tiles_geojson"]


# --------------------------------------------------------------------------------------------
# regions (annotations)
# --------------------------------------------------------------------------------------------
def _ring_area(rc: np.ndarray) -> float:
    y, x = rc[:, 0], rc[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _polygons(g: Any) -> list[Any]:
    """The polygons of any geometry (lines and points from repairs are dropped)."""
    if g.is_empty:
        return []
    if g.geom_type == "Polygon":
        return [g]
    if g.geom_type in ("MultiPolygon", "GeometryCollection"):
        return [p for part in g.geoms for p in _polygons(part)]
    return []


def _region_geometry(sub: np.ndarray, origin_rc: tuple[int, int], simplify_px: float) -> Any:
    """One region's mask (its bounding box) as a valid polygon in heatmap-pixel (x, y), or None.

    Traced at the pixel edges (marching squares on the padded mask), holes included,
    simplified, repaired and dissolved if needed; exteriors counter-clockwise.
    """
    import shapely
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.polygon import orient
    from skimage.measure import find_contours

    rings = find_contours(np.pad(sub, 1).astype(np.float32), 0.5)
    if not rings:
        return None
    r0, c0 = origin_rc[0] - 1, origin_rc[1] - 1
    rings = [np.column_stack([r[:, 1] + c0, r[:, 0] + r0]) for r in rings if len(r) >= 4]
    areas = [abs(_ring_area(r[:, ::-1])) for r in rings]
    if not rings:
        return None
    outer = int(np.argmax(areas))
    geom: Any = Polygon(rings[outer], [r for i, r in enumerate(rings) if i != outer])
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if simplify_px > 0:
        simple = geom.simplify(float(simplify_px), preserve_topology=True)
        if simple.is_valid and not simple.is_empty:
            geom = simple
    parts = [p for p in _polygons(geom) if p.area > 0]
    if len(parts) > 1:  # pieces of a repair: dissolve shared edges
        parts = _polygons(shapely.union_all(parts))
    if not parts:
        return None
    parts = [orient(p, sign=1.0) for p in parts]
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def threshold_regions(
    values: np.ndarray,
    *,
    threshold: float,
    downsample: float,
    mpp: float | None = None,
    name: str = "Abnormal",
    color_rgb: tuple[int, int, int] = (255, 0, 0),
    simplify_px: float = 1.0,
    min_region_px: int = 1,
) -> dict[str, Any]:
    """Regions of the heatmap at or above ``threshold`` as a GeoJSON FeatureCollection.

    Each 4-connected region of pixels ``>= threshold`` is traced by marching squares at the pixel
    edges (``skimage.measure.find_contours`` on the padded mask), holes included, simplified by
    ``simplify_px`` heatmap pixels, repaired if needed, and scaled to level-0 pixels. Exteriors are
    counter-clockwise and holes clockwise in the (x, y) coordinates as written (RFC 7946).

    Parameters
    ----------
    values : (H, W) float ndarray
        Heatmap (NaN never counts).
    threshold : float
        In the heatmap's units.
    downsample : float
        Level-0 px per heatmap pixel.
    mpp : float, optional
        Level-0 µm per pixel, for ``area_um2``.
    name, color_rgb :
        The QuPath classification of every region.
    simplify_px : float
        Douglas-Peucker tolerance in heatmap pixels (0: none).
    min_region_px : int
        Regions with fewer heatmap pixels are left out.

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [...]}``; one Feature per region with a
        Polygon or MultiPolygon geometry in level-0 px and properties ``objectType: "annotation"``,
        ``classification: {name, color}`` and ``measurements``: ``score_mean``, ``score_max`` (in
        the heatmap's units), ``area_px`` (level-0 px²), ``area_um2`` (only with ``mpp``).
    """
    from scipy import ndimage
    from shapely.affinity import affine_transform
    from shapely.geometry import mapping

    v = np.asarray(values, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        above = v >= threshold
    try:  # 4-connected, like find_contours' default; 16-bit labels when they are enough
        labels, _ = ndimage.label(above, output=np.uint16)
    except RuntimeError:
        labels, _ = ndimage.label(above, output=np.int32)
    ds = float(downsample)
    features: list[dict[str, Any]] = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        sub = labels[sl] == k
        if int(sub.sum()) < max(1, int(min_region_px)):
            continue
        geom = _region_geometry(sub, (sl[0].start, sl[1].start), simplify_px)
        if geom is None:
            continue
        geom = affine_transform(geom, [ds, 0, 0, ds, 0.5 * ds, 0.5 * ds])
        vals = v[sl][sub]
        meas = {
            "score_mean": float(np.mean(vals)),
            "score_max": float(np.max(vals)),
            "area_px": float(geom.area),
        }
        if mpp:
            meas["area_um2"] = float(geom.area) * float(mpp) ** 2
        props = {
            "objectType": "annotation",
            "name": f"{name} {len(features) + 1}",
            "classification": {"name": name, "color": [int(c) for c in color_rgb]},
            "measurements": meas,
        }
        features.append({"type": "Feature", "geometry": mapping(geom), "properties": props})
    return {"type": "FeatureCollection", "features": features}


# --------------------------------------------------------------------------------------------
# tiles (detections)
# --------------------------------------------------------------------------------------------
def _numbers(a: np.ndarray, fmt: str) -> list[str]:
    """JSON numbers of a float array ("" for NaN/inf, which JSON cannot hold)."""
    return [format(v, fmt) if math.isfinite(v) else "" for v in a.tolist()]


def write_tiles_geojson(
    path: str | os.PathLike,
    coords_xy: np.ndarray,
    *,
    patch_l0: float,
    measurements: Mapping[str, np.ndarray],
    classified: np.ndarray | None = None,
    name: str = "Abnormal",
    color_rgb: tuple[int, int, int] = (255, 0, 0),
    chunk: int = 8192,
) -> Path:
    """Write one QuPath detection per patch, streamed: a GeoJSON FeatureCollection.

    Each patch is a Feature with a square Polygon ``[x, x + patch_l0] x [y, y + patch_l0]`` in
    level-0 pixels (closed, counter-clockwise as written, like :func:`threshold_regions`) and
    properties ``objectType: "detection"``, ``measurements`` as a flat ``{name: number}`` object
    (QuPath >= 0.4 reads it, 0.6 included; a NaN value is left out: QuPath shows it as missing)
    and, for the ``classified`` patches, ``classification: {name, color}``. In QuPath: *File →
    Import objects* (or drag the file onto the slide), then *Measure → Show measurement maps*.
    Features are written ``chunk`` at a time, one per line, so memory does not grow with the
    number of patches.

    Parameters
    ----------
    path : path
        Output file (written to a temporary name, then renamed).
    coords_xy : (N, 2) ndarray
        Level-0 ``(x, y)`` of each patch's top-left corner.
    patch_l0 : float
        Patch side in level-0 px.
    measurements : mapping of str to (N,) float ndarray
        Measurement name -> one value per patch.
    classified : (N,) bool ndarray, optional
        Patches that get the classification ``name``.
    name, color_rgb :
        The QuPath classification of the ``classified`` patches.
    chunk : int
        Patches formatted at a time.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        ``coords_xy``, ``measurements`` or ``classified`` of mismatched lengths.
    """
    import json

    xy = np.asarray(coords_xy, dtype=np.float64).reshape(-1, 2)
    n, p = len(xy), float(patch_l0)
    meas = {str(k): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in measurements.items()}
    cls = None if classified is None else np.asarray(classified, dtype=bool).reshape(-1)
    for key, arr in (*meas.items(), ("classified", cls)):
        if arr is not None and len(arr) != n:
            raise ValueError(f"{key} has {len(arr)} values for {n} patches")
    exact = bool(np.all(xy == np.round(xy)) and p == round(p))
    cfmt = ".0f" if exact else ".10g"  # level-0 px: integers written as integers
    keys = {k: json.dumps(k) for k in meas}
    klass = json.dumps({"name": name, "color": [int(c) for c in color_rgb]})
    head = '{"type":"Feature","geometry":{"type":"Polygon","coordinates":[['
    step = max(1, int(chunk))
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type":"FeatureCollection","features":[\n')
        for s in range(0, n, step):
            part = xy[s : s + step]
            x0, y0 = _numbers(part[:, 0], cfmt), _numbers(part[:, 1], cfmt)
            x1, y1 = _numbers(part[:, 0] + p, cfmt), _numbers(part[:, 1] + p, cfmt)
            vals = {k: _numbers(v[s : s + step], ".6g") for k, v in meas.items()}
            lines = []
            for i in range(len(x0)):
                ring = (
                    f"[{x0[i]},{y0[i]}],[{x1[i]},{y0[i]}],[{x1[i]},{y1[i]}],"
                    f"[{x0[i]},{y1[i]}],[{x0[i]},{y0[i]}]"
                )
                m = ",".join(f"{keys[k]}:{v[i]}" for k, v in vals.items() if v[i])
                c = f'"classification":{klass},' if cls is not None and cls[s + i] else ""
                lines.append(
                    f'{head}{ring}]]}},"properties":{{"objectType":"detection",{c}'
                    f'"measurements":{{{m}}}}}}}'
                )
            fh.write((",\n" if s else "") + ",\n".join(lines))
        fh.write("\n]}\n")
    return Path(path)
