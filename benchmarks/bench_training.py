"""Training throughput and evidence that the MIL model learns, on synthetic cohorts.

Measured in one run:

1. throughput of the same model and bags (abmil + smallcnn, 64 patches of 128 px per step) when
   the patches come from the store vs read on the fly with openslide (``read_region`` at level 0
   + resize, as patch datasets that keep no pixels do), with and without the model step;
2. end-to-end training on a 40-slide cohort (8192 x 6144 px slides, lesions 5% of the tissue) on
   the CPU, with three training seeds: wall time, held-out slide AUC, patch-level AUC of the
   per-patch scores against the planted lesions, and the IoU of the thresholded heatmap with the
   lesions -- on the held-out slides, and on a cohort "L" of larger slides with one or two larger
   lesions each that the model never saw (slides re-tiled with 50% overlap for denser heatmaps;
   the run takes any overlap of the same tile size and mpp);
3. features mode: epoch time against end-to-end, and held-out AUC on a second cohort with a
   frozen backbone -- the backbone trained end-to-end on the first cohort (transfer), and, for the
   record, a randomly initialised ResNet-18.

    python benchmarks/bench_training.py [--work bench-out/training] [--epochs 30] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measured, table

TILE = {"tile_px": 128, "mpp": 1.0}
SIZE = (8192, 6144)  # level-0 px at 0.5 mpp: 4 x 3 mm, ~230 patches of tissue per slide


def cohort(
    work: Path, name: str, seed: int, n: int, size: tuple[int, int] = SIZE, **options
) -> tuple[Path, Path, Path]:
    from wsi_pipeline.specs import TilingSpec
    from wsi_pipeline.synth import LABELS_FILE, SLIDES_DIR, write_cohort
    from wsi_pipeline.tile_batch import tile_slides

    root = work / name
    slides = root / "cohort" / SLIDES_DIR
    t0 = time.time()
    write_cohort(
        root / "cohort",
        n_slides=n,
        width=size[0],
        height=size[1],
        mpp=0.5,
        seed=seed,
        lesion_fraction=0.05,
        workers=2,
        **options,
    )
    res = tile_slides(
        sorted(slides.iterdir()),
        root / "stores",
        spec=TilingSpec(**TILE),
        workers=2,
        progress=False,
    )
    assert all(r.ok for r in res)
    print(f"cohort {name}: {n} slides ready in {time.time() - t0:.0f} s", flush=True)
    return root / "stores", root / "cohort" / LABELS_FILE, slides


def throughput(stores: Path, slides: Path, steps: int = 30, k: int = 64) -> list[dict]:
    import openslide
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from wsi_pipeline.data import BagDataset
    from wsi_pipeline.models import get_model
    from wsi_pipeline.store import SlideStore

    paths = sorted(stores.glob("*.zarr"))
    ds = BagDataset(paths, [0] * len(paths), max_patches=k, seed=0)
    torch.manual_seed(0)
    model = get_model("abmil", num_classes=2, backbone="smallcnn")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> None:
        out = model(x)
        loss = F.cross_entropy(out.logits[None], torch.tensor([0]))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def from_store(i: int) -> torch.Tensor:
        return ds[i % len(ds)][0]

    handles: dict[int, openslide.OpenSlide] = {}

    def from_openslide(i: int) -> torch.Tensor:
        j = i % len(ds)
        st = SlideStore(paths[j])
        coords = st.coords[ds.indices(j)]
        h = handles.get(j) or handles.setdefault(
            j, openslide.OpenSlide(str(slides / f"{st.slide_id}.svs"))
        )
        p = int(st.tiling["patch_l0"])
        arr = np.stack(
            [
                np.asarray(
                    h.read_region((int(x), int(y)), 0, (p, p))
                    .convert("RGB")
                    .resize((128, 128), Image.Resampling.BOX)
                )
                for x, y in coords
            ]
        )
        return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())

    rows = []
    for name, load in (
        ("store (PatchReader)", from_store),
        ("openslide on the fly", from_openslide),
    ):
        load(0)
        with measured() as m_io:
            n_io = sum(len(load(i)) for i in range(steps))
        model.train()
        with measured() as m_all:
            n_all = 0
            for i in range(steps):
                x = load(i)
                step(x)
                n_all += len(x)
        rows.append(
            {
                "row": name,
                "io": n_io / m_io["seconds"],
                "train": n_all / m_all["seconds"],
                "peak_mb": m_all["peak_mb"],
            }
        )
    base = rows[1]
    for r in rows:
        r["x_io"] = r["io"] / base["io"]
        r["x_train"] = r["train"] / base["train"]
    return rows


def held_out(run: Path, pred_csv: Path) -> tuple[float, int]:
    from wsi_pipeline.metrics import auc_score
    from wsi_pipeline.runs import read_splits

    split = read_splits(run)
    with open(pred_csv) as fh:
        rows = [r for r in csv.DictReader(fh) if split[r["slide_id"]]["split"] != "train"]
    y = [int(split[r["slide_id"]]["label"]) for r in rows]
    return auc_score(y, np.array([float(r["probability"]) for r in rows])), len(rows)


def patch_auc(stores: Path, run: Path, cohort_dir: Path, run_id: str) -> float:
    from wsi_pipeline.metrics import auc_score
    from wsi_pipeline.runs import read_splits
    from wsi_pipeline.store import SlideStore, scores_key
    from wsi_pipeline.synth import load_ground_truth
    from wsi_pipeline.tissue import rect_fractions

    rows = [r for r in read_splits(run).values() if r["split"] != "train" and r["label"] == "1"]
    ys, ss = [], []
    for r in rows:
        st = SlideStore(stores / f"{r['slide_id']}.zarr")
        _, lesion, ds = load_ground_truth(cohort_dir, r["slide_id"])
        c, p = st.coords, st.tiling["patch_l0"]
        frac = rect_fractions(
            lesion, np.c_[c, np.full(len(c), p), np.full(len(c), p)], downsample=ds
        )
        ys.append(frac >= 0.5)
        ss.append(np.asarray(st.group[scores_key(run_id)][...]))
    return auc_score(np.concatenate(ys).astype(int), np.concatenate(ss))


def localisation(rows: list[dict], cohort_dir: Path, run: Path, run_id: str, dense: Path) -> dict:
    """IoU of the thresholded heatmap (p >= 0.5) with the planted lesions on the positive slides
    of ``rows`` (``slide_id``, ``label``), and the tissue fraction above threshold on the negative
    ones. The slides are tiled again into ``dense`` with 50% overlap (same tile size and mpp as
    the run) for denser heatmaps."""
    from wsi_pipeline.heatmap import heatmaps, read_scores, stitch_store
    from wsi_pipeline.metrics import heatmap_iou
    from wsi_pipeline.prediction import predict
    from wsi_pipeline.specs import TilingSpec
    from wsi_pipeline.store import SlideStore
    from wsi_pipeline.synth import SLIDES_DIR, load_ground_truth
    from wsi_pipeline.tile_batch import tile_slides

    tile_slides(
        [cohort_dir / SLIDES_DIR / f"{r['slide_id']}.svs" for r in rows],
        dense,
        spec=TilingSpec(**TILE, overlap_px=TILE["tile_px"] // 2),
        workers=2,
        progress=False,
    )
    predict(dense, run, dense.parent / f"pred_{dense.name}", run_id=run_id, progress=False)
    res = heatmaps(dense, dense.parent / f"heatmaps_{dense.name}", run_id=run_id)
    ious, neg_area = [], []
    for r in rows:
        st = SlideStore(dense / f"{r['slide_id']}.zarr")
        ds = st.thumbnail_downsample
        values, _ = stitch_store(st, read_scores(st, run_id)[0])
        _, lesion, gt_ds = load_ground_truth(cohort_dir, r["slide_id"])
        if r["label"] == "1":
            ious.append(
                heatmap_iou(values, lesion, threshold=0.5, downsample=ds, truth_downsample=gt_ds)
            )
        else:
            tissue = np.isfinite(values)
            neg_area.append(float((values[tissue] >= 0.5).mean()) if tissue.any() else 0.0)
    return {
        "iou_mean": float(np.mean(ious)),
        "iou_median": float(np.median(ious)),
        "iou_min": float(np.min(ious)),
        "n_pos": len(ious),
        "neg_area_mean": float(np.mean(neg_area)),
        "n_neg": len(neg_area),
        "exported": sum(1 for r in res if r["ok"]),
    }


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV file (a cohort's labels)."""
    with open(path) as fh:
        return list(csv.DictReader(fh))


def held_out_rows(run: Path) -> list[dict]:
    """The validation and test slides of a run (``slide_id``, ``label``, ``split``)."""
    from wsi_pipeline.runs import read_splits

    return [r for r in read_splits(run).values() if r["split"] != "train"]


def train_and_score(stores: Path, labels: Path, run: Path, config) -> dict:
    from wsi_pipeline.prediction import predict
    from wsi_pipeline.runs import PREDICTIONS
    from wsi_pipeline.training import train

    shutil.rmtree(run, ignore_errors=True)
    with measured() as m:
        metrics = train(stores, labels, run, config=config, progress=False)
    predict(stores, run, run / "pred", progress=False)
    auc, n = held_out(run, run / "pred" / PREDICTIONS)
    epochs = [h["seconds"] for h in metrics["history"]]
    return {
        "seconds": m["seconds"],
        "peak_mb": m["peak_mb"],
        "auc": auc,
        "n": n,
        "epoch_s": float(np.median(epochs)),
        "epochs": len(epochs),
        "test_auc": metrics.get("test", {}).get("auc"),
    }


def main(argv: list[str] | None = None) -> int:
    from wsi_pipeline.runs import MODEL
    from wsi_pipeline.specs import TrainConfig
    from wsi_pipeline.util import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench-out/training"))
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=30, help="end-to-end epochs")
    ap.add_argument(
        "--more-seeds",
        type=int,
        nargs="*",
        default=[1, 2],
        help="further training seeds of the e2e run on A (robustness)",
    )
    ap.add_argument("--quick", action="store_true", help="throughput only")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    stores_a, labels_a, slides_a = cohort(args.work, "A", seed=7, n=args.slides)

    f0 = lambda v: f"{v:,.0f}"  # noqa: E731
    f2 = lambda v: f"{v:.2f}"  # noqa: E731
    rows = throughput(stores_a, slides_a)
    print("\n1. training throughput, abmil + smallcnn, bags of 64 patches of 128 px, 1 process\n")
    print(
        table(
            rows,
            [
                ("row", "patches from", str),
                ("io", "read patches/s", f0),
                ("x_io", "x openslide", f2),
                ("train", "train patches/s", f0),
                ("x_train", "x openslide", f2),
                ("peak_mb", "peak RSS MB", f0),
            ],
        )
    )
    if args.quick:
        return 0

    e2e_cfg = TrainConfig(epochs=args.epochs, lr=1e-3, max_patches=64, patience=args.epochs)
    run_a = args.work / "A" / "run_e2e"
    e2e = train_and_score(stores_a, labels_a, run_a, e2e_cfg)
    pauc = patch_auc(stores_a, run_a, labels_a.parent, "run_e2e")
    loc = localisation(
        held_out_rows(run_a),
        labels_a.parent,
        run_a,
        "run_e2e",
        args.work / "A" / "stores_dense",
    )
    # Larger slides, one or two lesions each (5% of the tissue): lesions of ~0.3-1 mm^2, many
    # patches across, as on real slides. Predicted with A's run, never trained on.
    _, labels_l, _ = cohort(args.work, "L", seed=99, n=8, size=(12288, 9216), n_lesions=(1, 2))
    loc_l = localisation(
        read_rows(labels_l), labels_l.parent, run_a, "run_e2e", args.work / "L" / "stores_dense"
    )
    seeds = [
        train_and_score(
            stores_a, labels_a, args.work / "A" / f"run_e2e_seed{s}", replace(e2e_cfg, seed=s)
        )
        for s in args.more_seeds
    ]
    stores_b, labels_b, _ = cohort(args.work, "B", seed=8, n=args.slides)
    transfer_cfg = TrainConfig(
        mode="features",
        backbone="smallcnn",
        epochs=25,
        patience=25,
        backbone_weights=str(run_a / MODEL),
    )
    transfer = train_and_score(stores_b, labels_b, args.work / "B" / "run_features", transfer_cfg)
    e2e_b = train_and_score(stores_b, labels_b, args.work / "B" / "run_e2e", e2e_cfg)
    rand_cfg = TrainConfig(mode="features", backbone="resnet18", epochs=25, patience=25)
    rand = train_and_score(stores_b, labels_b, args.work / "B" / "run_random", rand_cfg)
    rows = [
        {"row": "A: e2e abmil+smallcnn (CPU), seed 0", **e2e},
        *({"row": f"A: e2e, seed {s}", **r} for s, r in zip(args.more_seeds, seeds)),
        {"row": "B: e2e abmil+smallcnn (CPU), seed 0", **e2e_b},
        {"row": "B: features, smallcnn from A's e2e run", **transfer},
        {"row": "B: features, random-init resnet18", **rand},
    ]
    for r in rows:
        r["x_epoch"] = e2e_b["epoch_s"] / r["epoch_s"]
    print(
        f"\n2./3. training on {args.slides}-slide cohorts of {SIZE[0]}x{SIZE[1]} px slides "
        "(lesions 5% of tissue), held-out = val + test slides\n"
    )
    print(
        table(
            rows,
            [
                ("row", "run", str),
                ("seconds", "wall s", f0),
                ("epochs", "epochs", str),
                ("epoch_s", "s/epoch", f2),
                ("x_epoch", "epoch speed-up", f2),
                ("auc", "held-out AUC", f2),
                ("n", "n", str),
                ("test_auc", "test AUC", f2),
                ("peak_mb", "peak RSS MB", f0),
            ],
        )
    )
    print(
        f"\npatch-level AUC of per-patch scores vs planted lesions (held-out positives of A): "
        f"{pauc:.3f}"
    )
    for name, res in (("held-out slides of A", loc), ("cohort L, 12288x9216, 1-2 lesions", loc_l)):
        print(
            f"heatmap localisation ({name}, p >= 0.5): IoU with the planted lesions mean "
            f"{res['iou_mean']:.2f}, median {res['iou_median']:.2f}, min {res['iou_min']:.2f} "
            f"over {res['n_pos']} positive slides; tissue above threshold on {res['n_neg']} "
            f"negative slides: {res['neg_area_mean']:.2%}"
        )
    atomic_write_json(
        args.work / "results.json",
        {
            "e2e_A": e2e,
            "e2e_B": e2e_b,
            "features_transfer": transfer,
            "features_random": rand,
            "patch_auc": pauc,
            "localisation": loc,
            "localisation_L": loc_l,
            "e2e_A_seeds": dict(zip(map(str, args.more_seeds), seeds)),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
