"""Feature-extraction throughput: patches read from the store vs through openslide, and where
``wsi-pipeline features`` spends its time on the CPU (reading patches vs the CNN).

Measured in one run, on the same patches:

1. reading: :class:`~wsi_pipeline.store.PatchReader` in batches of 256, against openslide
   ``read_region`` at level 0 + box resize to the patch size (what extractors that keep no
   pixels do per patch); patches/s and the ratio (target >= 5x);
2. the CNN alone (eval, no grad, batches of 256 already in memory) for smallcnn and resnet18;
3. ``compute_features`` end to end (smallcnn and resnet18, random init, --overwrite): patches/s,
   and the share of its time that reading takes (read time at rate 1 / its wall time).

    python benchmarks/bench_features.py [--cohort bench-out/pretrain/demo] [--stores 8]

Without ``--cohort`` (a folder with ``stores/`` and ``cohort/slides/``, as bench_training and
bench_pretrain make them), a small cohort of 8 slides is made in ``--work``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measured, table


def read_openslide(stores: list[Path], slides: Path, limit: int) -> tuple[int, float]:
    """Read (up to ``limit``) patches of ``stores`` with openslide; (count, seconds)."""
    import openslide
    from PIL import Image

    from wsi_pipeline.store import SlideStore

    n, t0 = 0, time.perf_counter()
    for sp in stores:
        st = SlideStore(sp)
        p = int(st.tiling["patch_l0"])
        px = int(st.tiling.get("tile_px", 128))
        h = openslide.OpenSlide(str(next(slides.glob(f"{st.slide_id}.*"))))
        for x, y in st.coords[: max(0, limit - n)]:
            arr = np.asarray(
                h.read_region((int(x), int(y)), 0, (p, p))
                .convert("RGB")
                .resize((px, px), Image.Resampling.BOX)
            )
            n += arr.shape[0] > 0
        h.close()
        if n >= limit:
            break
    return n, time.perf_counter() - t0


def read_store(stores: list[Path], limit: int, batch: int = 256) -> tuple[int, float]:
    """Read (up to ``limit``) patches of ``stores`` with PatchReader; (count, seconds)."""
    from wsi_pipeline.store import PatchReader

    n, t0 = 0, time.perf_counter()
    for sp in stores:
        r = PatchReader(sp)
        for i in range(0, min(r.n, limit - n), batch):
            n += len(r.read(np.arange(i, min(i + batch, r.n, i + limit - n))))
        if n >= limit:
            break
    return n, time.perf_counter() - t0


def cnn_rate(name: str, px: int, batch: int = 256, reps: int = 4) -> float:
    """Patches/s of backbone ``name`` alone on the CPU (eval, no grad)."""
    import torch

    from wsi_pipeline.models import get_backbone

    net, _ = get_backbone(name, weights="none")
    net.eval()
    x = torch.randn(batch, 3, px, px)
    with torch.no_grad():
        net(x[:16])
        t0 = time.perf_counter()
        for _ in range(reps):
            net(x)
    return batch * reps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    import torch

    from wsi_pipeline.features import compute_features

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort", type=Path, default=None, help="folder with stores/ and cohort/")
    ap.add_argument("--work", type=Path, default=Path("bench-out/features"))
    ap.add_argument("--stores", type=int, default=8, help="stores used")
    ap.add_argument("--limit", type=int, default=2000, help="patches per reading row")
    args = ap.parse_args(argv)
    if args.cohort is None:
        from bench_training import cohort

        stores_dir, _, slides = cohort(args.work, "F", seed=11, n=args.stores)
    else:
        stores_dir, slides = args.cohort / "stores", args.cohort / "cohort" / "slides"
    stores = sorted(stores_dir.glob("*.zarr"))[: args.stores]
    print(f"{len(stores)} stores, {torch.get_num_threads()} torch threads", flush=True)

    read_store(stores[:1], 256)  # warm the page cache of both paths alike
    read_openslide(stores[:1], slides, 64)
    with measured() as m_s:
        n_s, t_s = read_store(stores, args.limit)
    with measured() as m_o:
        n_o, t_o = read_openslide(stores, slides, args.limit)
    rate_s, rate_o = n_s / t_s, n_o / t_o
    rows = [
        {"row": "store (PatchReader)", "rate": rate_s, "x": rate_s / rate_o, "mb": m_s["peak_mb"]},
        {"row": "openslide read_region", "rate": rate_o, "x": 1.0, "mb": m_o["peak_mb"]},
    ]
    print(f"\n1. reading {n_s} patches\n")
    f0 = lambda v: f"{v:,.0f}"  # noqa: E731
    f2 = lambda v: f"{v:.2f}"  # noqa: E731
    print(
        table(
            rows,
            [
                ("row", "patches from", str),
                ("rate", "patches/s", f0),
                ("x", "x openslide", f2),
                ("mb", "peak RSS MB", f0),
            ],
        ),
        flush=True,
    )

    from wsi_pipeline.store import PatchReader

    px = PatchReader(stores[0]).shape_hwc[0]
    n_all = sum(PatchReader(s).n for s in stores)
    rows2 = []
    for name in ("smallcnn", "resnet18"):
        cnn = cnn_rate(name, px)
        with measured() as m:
            rep = compute_features(
                stores,
                backbone=name,
                weights="none",
                device="cpu",
                overwrite=True,
                progress=False,
            )
        assert all(r.ok for r in rep.results), rep.results
        rate = n_all / m["seconds"]
        rows2.append(
            {
                "row": f"features {name}",
                "cnn": cnn,
                "rate": rate,
                "read_share": (n_all / rate_s) / m["seconds"],
                "cnn_share": (n_all / cnn) / m["seconds"],
                "mb": m["peak_mb"],
            }
        )
    print(f"\n2./3. CPU feature extraction of {n_all} patches of {px} px, batches of 256\n")
    pct = lambda v: f"{v:.0%}"  # noqa: E731
    print(
        table(
            rows2,
            [
                ("row", "run", str),
                ("cnn", "CNN alone p/s", f0),
                ("rate", "features p/s", f0),
                ("read_share", "time reading", pct),
                ("cnn_share", "time in CNN", pct),
                ("mb", "peak RSS MB", f0),
            ],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
