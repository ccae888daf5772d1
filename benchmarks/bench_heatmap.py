"""Heatmap export of a gigapixel slide: our block-wise stitching vs a level-0 canvas (CLAM-style).

Builds once, in ``--work`` (default ``bench-out/heatmap``), a store with the real layout
(:func:`wsi_pipeline.store.create_store`) for a virtual 40,000 x 30,000 slide at 0.25 mpp: a
procedural tissue mask (~30 %) and lesions, a thumbnail and tissue mask at 32 level-0 px per pixel,
patches of 256 px at 0.5 mpp (512 level-0 px) with a 128-px overlap on a grid kept where tissue
covers >= 25 % of a patch, and ``scores/bench`` = each patch's lesion fraction plus noise. No
patch pixels are stored (heatmaps never read them), so nothing needs rendering or tiling.

Each variant runs in its own process, which reports its own peak RSS (``VmHWM`` from
``/proc/self/status``, including the interpreter and imports):

* ``ours``: :func:`wsi_pipeline.heatmap.export_heatmaps` (stitch + overlay TIFF at the slide's
  level-0 size + values TIFF + PNG + region and tile GeoJSON + summary) at a few downsamples;
* ``naive``: a level-0 float32 score canvas plus a uint16 count canvas (what CLAM's heatmap code
  builds), averaged and pooled to the same heatmap grid, then written with the same overlay TIFF
  and GeoJSON writers. When the canvases would not fit comfortably in the available memory, it runs on
  a horizontal band of the slide (a stated fraction of its area) and time and RSS above the import
  baseline are extrapolated linearly to the whole slide;
* ``baseline``: the imports alone.

Run: ``.venv/bin/python benchmarks/bench_heatmap.py [--work DIR] [--downsample 32 16 8]``;
``--width 100000 --height 60000 --variants ours`` times a 6-gigapixel slide without the naive
canvases (which would need 34 GB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RUN = "bench"


def _peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` (Linux; reset at exec, unlike ``ru_maxrss``, which a
    child inherits from the parent that spawned it), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# --------------------------------------------------------------------------------- the store
def make_store(work: Path, *, width: int, height: int, mpp: float, seed: int) -> Path:
    """Write (once) the benchmark store; returns its path."""
    from scipy.ndimage import gaussian_filter

    from wsi_pipeline.specs import SlideMeta
    from wsi_pipeline.store import (
        COORDS,
        THUMBNAIL,
        TISSUE_FRACTION,
        TISSUE_MASK,
        create_patches_array,
        create_store,
        is_complete,
        mark_complete,
        open_store,
        write_array,
        write_scores,
    )
    from wsi_pipeline.tissue import rect_fractions

    path = work / "bench_slide.zarr"
    key = {"width": width, "height": height, "mpp": mpp, "seed": seed}
    marker = work / "bench_slide.json"
    if is_complete(path) and marker.is_file() and json.loads(marker.read_text()) == key:
        return path
    rng = np.random.default_rng(seed)
    mds = 32  # level-0 px per thumbnail / mask pixel
    h, w = math.ceil(height / mds), math.ceil(width / mds)
    field = gaussian_filter(rng.normal(size=(h, w)), sigma=max(h, w) / 20, mode="constant")
    tissue = field > np.quantile(field, 0.70)
    lesion_field = gaussian_filter(rng.normal(size=(h, w)), sigma=max(h, w) / 60)
    lesion = tissue & (lesion_field > np.quantile(lesion_field[tissue], 0.95))
    texture = rng.normal(0, 8, size=(h, w, 1))
    thumb = np.full((h, w, 3), 242.0)
    thumb[tissue] = (225, 160, 205)
    thumb[lesion] = (170, 100, 170)
    thumb = np.clip(thumb + texture * tissue[..., None], 0, 255).astype(np.uint8)

    patch_px, target_mpp, overlap_px = 256, 0.5, 128
    ds = target_mpp / mpp
    patch_l0, stride_l0 = patch_px * ds, (patch_px - overlap_px) * ds
    ys, xs = np.mgrid[0 : height : int(stride_l0), 0 : width : int(stride_l0)]
    grid = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.int64)
    rects = np.column_stack([grid, np.full((len(grid), 2), patch_l0)])
    tfrac = rect_fractions(tissue, rects, downsample=mds)
    keep = tfrac >= 0.25
    coords, tfrac = grid[keep], tfrac[keep]
    lfrac = rect_fractions(lesion, rects[keep], downsample=mds)
    scores = np.clip(lfrac + rng.normal(0, 0.05, len(lfrac)), 0, 1).astype(np.float32)

    meta = SlideMeta(
        path=str(work / "virtual_slide.svs"),
        file_size=0,
        backend="none",
        vendor="synthetic",
        width=width,
        height=height,
        level_dimensions=((width, height),),
        level_downsamples=(1.0,),
        mpp_x=mpp,
        mpp_y=mpp,
        mpp_source="file",
    )
    tiling = {
        "tile_px": patch_px,
        "mpp": target_mpp,
        "downsample": ds,
        "patch_l0": patch_l0,
        "stride_l0": stride_l0,
        "overlap_px": overlap_px,
        "tissue_threshold": 0.25,
    }
    g = open_store(
        create_store(path, slide_id="bench_slide", meta=meta, tiling=tiling),
        require_complete=False,
        mode="r+",
    )
    for key, data in ((THUMBNAIL, thumb), (TISSUE_MASK, tissue)):
        write_array(g, key, data, chunks=data.shape, attrs={"downsample": float(mds)})
    for key, data in ((COORDS, coords), (TISSUE_FRACTION, tfrac.astype(np.float32))):
        write_array(g, key, data, chunks=data.shape)
    create_patches_array(
        g,
        n=len(coords),
        tile_px=patch_px,
        codec="jpeg",
        quality=90,
        patches_per_shard=256,
        attrs={},
    )  # empty: never read
    mark_complete(path, status="ok", n_patches=len(coords))
    write_scores(
        g,
        RUN,
        scores,
        {
            "run": RUN,
            "classes": ["normal", "tumour"],
            "negative_class": "normal",
            "probabilities": {"normal": 0.2, "tumour": 0.8},
            "abnormal_probability": 0.8,
            "predicted": "tumour",
        },
    )
    marker.write_text(json.dumps(key))
    return path


# ---------------------------------------------------------------------------------- variants
def run_ours(store: Path, out: Path, ds: float, sigma_um: float, mode: str) -> dict[str, Any]:
    from wsi_pipeline.heatmap import export_heatmaps

    t0 = time.perf_counter()
    paths = export_heatmaps(store, out, run_id=RUN, downsample=ds, sigma_um=sigma_um, mode=mode)
    total = time.perf_counter() - t0
    s = json.loads(paths["summary"].read_text())
    tiff_mb = paths["tiff"].stat().st_size / 2**20
    return {
        "seconds": total,
        "stages": s["seconds"],
        "grid_wh": s["heatmap_size_wh"],
        "tiff_mb": tiff_mb,
        "tiles_mb": paths["tiles_geojson"].stat().st_size / 2**20,
        "area_mm2": s["area_above_threshold_mm2"],
        "values_npy": str(_save_values(paths["values_tiff"], out)),
    }


def _save_values(values_tiff: Path, out: Path) -> Path:
    import tifffile

    p = out / "values.npy"
    np.save(p, tifffile.imread(values_tiff, key=0))
    return p


def run_naive(store: Path, out: Path, ds: float, fraction: float) -> dict[str, Any]:
    """Level-0 canvases over ``fraction`` of the slide's rows, pooled to the heatmap grid."""
    from wsi_pipeline.exports import overlay_lut, write_overlay_tiff
    from wsi_pipeline.heatmap import read_scores
    from wsi_pipeline.qupath import threshold_regions
    from wsi_pipeline.store import SlideStore
    from wsi_pipeline.util import sample_mask

    st = SlideStore(store)
    coords = st.coords
    scores, _ = read_scores(st, RUN)
    p = round(float(st.tiling["patch_l0"]))
    width, height = st.meta.width, st.meta.height
    rows = height if fraction >= 1 else round(height * fraction / ds) * int(ds)
    t0 = time.perf_counter()
    canvas = np.zeros((rows, width), np.float32)  # CLAM: overlay (float) + counter
    count = np.zeros((rows, width), np.uint16)
    for (x, y), s in zip(coords, scores):
        if y >= rows:
            continue
        canvas[y : y + p, x : x + p] += s
        count[y : y + p, x : x + p] += 1
    np.divide(canvas, count, out=canvas, where=count > 0)
    canvas[count == 0] = np.nan
    del count
    d = int(ds)
    gh, gw = math.ceil(rows / d), math.ceil(width / d)
    grid = np.full((gh, gw), np.nan, np.float32)
    for r in range(gh):  # NaN-aware mean pooling, one band of d rows at a time
        band = canvas[r * d : (r + 1) * d]
        band = np.pad(band, ((0, d - len(band)), (0, -width % d)), constant_values=np.nan)
        b = band.reshape(d, gw, d)
        ok = np.isfinite(b)
        n = ok.sum(axis=(0, 2))
        with np.errstate(invalid="ignore"):
            grid[r] = np.where(
                n > 0, np.where(ok, b, 0).sum(axis=(0, 2)) / np.maximum(n, 1), np.nan
            )
    del canvas
    mask = st.tissue_mask
    grid[~sample_mask(mask, st.mask_downsample, ds, (0, gh), (0, gw))] = np.nan
    stitch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_overlay_tiff(
        out / "naive_overlay.tif",
        grid,
        lut=overlay_lut(value_range=(0, 1), transparent_below=0.2),
        value_range=(0, 1),
        slide_wh=(width, rows),
        downsample=ds,
        mpp=st.meta.mpp,
    )
    tiff_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    regions = threshold_regions(grid, threshold=0.5, downsample=ds, mpp=st.meta.mpp)
    geo_s = time.perf_counter() - t0
    np.save(out / "naive_values.npy", grid)
    return {
        "seconds": stitch_s + tiff_s + geo_s,
        "stages": {"stitch": stitch_s, "tiff": tiff_s, "geojson": geo_s},
        "grid_wh": [gw, gh],
        "rows": rows,
        "n_regions": len(regions["features"]),
        "values_npy": str(out / "naive_values.npy"),
    }


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints one JSON line with its result and peak RSS."""
    import matplotlib  # the imports every variant pays for
    import scipy.ndimage  # noqa: F401
    import shapely  # noqa: F401
    import tifffile  # noqa: F401

    from wsi_pipeline import exports, heatmap, heatmap_summary, qupath, stitch  # noqa: F401

    matplotlib.use("Agg")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variant == "baseline":
        res: dict[str, Any] = {"seconds": 0.0}
    elif args.variant == "ours":
        res = run_ours(Path(args.store), out, args.ds, args.sigma_um, args.mode)
    else:
        res = run_naive(Path(args.store), out, args.ds, args.fraction)
    res["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(res))


def _spawn(argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"variant {argv} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _available_mb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench-out/heatmap", help="cache and output folder")
    ap.add_argument("--width", type=int, default=40_000)
    ap.add_argument("--height", type=int, default=30_000)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--downsample",
        type=float,
        nargs="+",
        default=[32.0, 16.0, 8.0],
        help="heatmap downsamples for our export (level-0 px per heatmap px)",
    )
    ap.add_argument(
        "--sigma-um",
        type=float,
        default=50.0,
        help="also time our export with this smoothing at the finest downsample",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=["ours", "naive"],
        default=["ours", "naive"],
        help="what to time (the import baseline always runs)",
    )
    ap.add_argument(
        "--mode",
        choices=["probability", "percentile"],
        default="probability",
        help="display mode of our export (percentile colours half of the tissue: the most tiles)",
    )
    ap.add_argument("--naive-downsample", type=float, default=8.0)
    ap.add_argument(
        "--naive-fraction",
        type=float,
        default=None,
        help="area fraction for the naive canvas (default: all of it if it fits "
        "in half the available memory, else 1/4)",
    )
    # child-process options
    ap.add_argument("--variant", choices=["ours", "naive", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        child(args)
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = make_store(work, width=args.width, height=args.height, mpp=args.mpp, seed=args.seed)
    from wsi_pipeline.store import SlideStore

    n = SlideStore(store).n_patches
    print(
        f"store {store} ({args.width} x {args.height} px at {args.mpp} mpp, "
        f"{args.width * args.height / 1e9:.2f} gigapixel, {n} patches of 512 level-0 px with "
        f"50 % overlap) ready in {time.perf_counter() - t0:.1f} s"
    )

    def ours(ds: float, sigma_um: float, out: str) -> dict[str, Any]:
        """Our variant in a fresh process, at downsample ``ds`` with ``sigma_um`` smoothing."""
        argv = ["--variant", "ours", "--store", str(store), "--ds", str(ds)]
        argv += ["--mode", args.mode, "--sigma-um", str(sigma_um)]
        return _spawn([*argv, "--out", str(work / out)])

    base = _spawn(["--variant", "baseline", "--out", str(work / "baseline")])
    rows: list[tuple[str, dict[str, Any]]] = []
    if "ours" in args.variants:
        for ds in args.downsample:
            rows.append((f"ours ds={ds:g}", ours(ds, 0, f"ours_ds{ds:g}")))
        if args.sigma_um > 0:
            ds = min(args.downsample)
            r = ours(ds, args.sigma_um, f"ours_ds{ds:g}_sigma")
            rows.append((f"ours ds={ds:g} sigma={args.sigma_um:g}um", r))
    naive = _naive(args, store, work, base) if "naive" in args.variants else None
    if naive is not None:
        rows.append((f"naive ds={args.naive_downsample:g} (level-0 canvas)", naive))

    print()
    print(
        f"import baseline (python + numpy/scipy/matplotlib/shapely/tifffile/zarr): "
        f"{base['peak_rss_mb']:.0f} MB peak RSS"
    )
    hdr = (
        f"{'variant':<34} {'grid (w x h)':>13} {'stitch s':>9} {'tiff s':>7} {'png s':>6} "
        f"{'geojson s':>9} {'tiles s':>8} {'total s':>8} {'peak RSS MB':>12}"
    )
    print(hdr)
    print("-" * len(hdr))
    nan = float("nan")
    for name, r in rows:
        st = r["stages"]
        print(
            f"{name:<34} {r['grid_wh'][0]:>6} x {r['grid_wh'][1]:<5} {st['stitch']:>9.2f} "
            f"{st['tiff']:>7.2f} {st.get('png', nan):>6.2f} {st['geojson']:>9.2f} "
            f"{st.get('tiles_geojson', nan):>8.2f} {r['seconds']:>8.2f} {r['peak_rss_mb']:>12.0f}"
        )
    print()
    print(
        f"ours: stitch + overlay TIFF ({args.width} x {args.height} px RGBA, the slide's level 0) "
        "+ float32 values TIFF + PNG + region GeoJSON + tile GeoJSON + summary "
        "(export_heatmaps); naive: level-0 canvas stitch + the same overlay TIFF writer "
        "(no values TIFF, no PNG, no tiles) + region GeoJSON"
    )
    for name, r in rows:
        if "tiff_mb" in r:
            print(
                f"{name}: overlay TIFF {r['tiff_mb']:.0f} MB, tiles GeoJSON {r['tiles_mb']:.0f} MB"
            )
    if naive is not None:
        _compare(args, rows, naive, base)
    return 0


def _naive(
    args: argparse.Namespace, store: Path, work: Path, base: dict[str, Any]
) -> dict[str, Any]:
    """The level-0 canvas variant, on a band of the slide when the canvases would not fit."""
    need_mb = args.width * args.height * 6 / 2**20  # float32 + uint16 canvases
    frac = args.naive_fraction
    if frac is None:
        frac = 1.0 if need_mb < 0.5 * _available_mb() else 0.25
    nds = args.naive_downsample
    naive = _spawn(
        [
            "--variant",
            "naive",
            "--store",
            str(store),
            "--ds",
            str(nds),
            "--fraction",
            str(frac),
            "--out",
            str(work / f"naive_ds{nds:g}"),
        ]
    )
    naive["fraction"], naive["need_mb"] = frac, need_mb
    if frac < 1:
        scale = args.height / naive["rows"]
        naive["measured_seconds"] = naive["seconds"]
        naive["measured_peak_rss_mb"] = naive["peak_rss_mb"]
        naive["seconds"] *= scale
        naive["stages"] = {k: v * scale for k, v in naive["stages"].items()}
        naive["peak_rss_mb"] = (
            base["peak_rss_mb"] + (naive["peak_rss_mb"] - base["peak_rss_mb"]) * scale
        )
        naive["grid_wh"] = [naive["grid_wh"][0], math.ceil(args.height / nds)]  # extrapolated
    return naive


def _compare(
    args: argparse.Namespace,
    rows: list[tuple[str, dict[str, Any]]],
    naive: dict[str, Any],
    base: dict[str, Any],
) -> None:
    """Print how the naive variant compares with ours at the same downsample."""
    nds = args.naive_downsample
    if naive["fraction"] < 1:
        print(
            f"naive: ran on {naive['rows']} of {args.height} rows ({naive['rows'] / args.height:.0%} "
            f"of the area: {naive['measured_seconds']:.2f} s, {naive['measured_peak_rss_mb']:.0f} MB "
            "peak RSS); time and RSS above the import baseline extrapolated linearly"
        )
    else:
        print(f"naive: full slide ({naive['need_mb'] / 1024:.1f} GiB of level-0 canvases)")
    ours_same = next((r for name, r in rows if name == f"ours ds={nds:g}"), None)
    if ours_same is None:
        return
    print(
        f"at ds={nds:g}: naive / ours  time {naive['seconds'] / ours_same['seconds']:.1f}x, "
        f"stitch {naive['stages']['stitch'] / ours_same['stages']['stitch']:.1f}x, "
        f"peak RSS {naive['peak_rss_mb'] / ours_same['peak_rss_mb']:.1f}x "
        f"(above the import baseline: "
        f"{(naive['peak_rss_mb'] - base['peak_rss_mb']) / max(1.0, ours_same['peak_rss_mb'] - base['peak_rss_mb']):.0f}x)"
    )
    a = np.load(ours_same["values_npy"])  # agreement of the two maps on the common rows
    b = np.load(naive["values_npy"])
    a = a[: b.shape[0]]
    both = np.isfinite(a) & np.isfinite(b)
    if both.any():
        print(
            f"mean |ours - naive| over common heatmap pixels: "
            f"{float(np.abs(a[both] - b[both]).mean()):.4f} "
            "(ours is area-weighted per heatmap pixel, naive averages per level-0 pixel)"
        )


if __name__ == "__main__":
    sys.exit(main())
