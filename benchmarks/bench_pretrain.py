"""Self-supervised pretraining on a cohort's own patches, and what it buys features mode.

Measured in one run, on one of the training benchmark's cohorts (``--cohort``: T5, the demo's
cohort of ``pipelines/demo.yaml``, 40 slides of 8192 x 6144 px at 0.5 mpp, lesions 5% of the
tissue, seed 5; T8, another seed; M7, lesions that differ only in morphology; 128-px patches at
1 µm/px):

1. the wall time of ``wsi-pipeline pretrain`` (SimCLR, smallcnn) on every patch of the cohort;
2. features-mode training (train's default head on frozen features) with the pretrained backbone
   against the same backbone randomly initialised, in the same run: held-out (val + test) slide
   AUC of each, and the lesion-patch AUC of its per-patch scores on the held-out positives
   (against the planted lesions).

    python benchmarks/bench_pretrain.py [--cohort T5] [--work bench-out/pretrain] [--epochs E]
        [--crop-px PX]

Both steps use the defaults of ``wsi-pipeline pretrain`` and ``train --mode features`` (the
settings a user gets) unless an option here overrides them.

Targets (issue 13): features mode on the pretrained backbone >= 0.95 held-out AUC; pretraining
the demo cohort within 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import COHORTS, cohort, patch_auc, train_and_score
from common import measured, table


def main(argv: list[str] | None = None) -> int:
    from wsi_pipeline.pretrain import pretrain
    from wsi_pipeline.specs import PretrainConfig, TrainConfig
    from wsi_pipeline.util import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench-out/pretrain"))
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument(
        "--cohort",
        choices=sorted(COHORTS),
        default="T5",
        help="bench_training's cohort (T5: the demo's)",
    )
    pre_default, train_default = PretrainConfig(), TrainConfig()
    ap.add_argument("--epochs", type=int, default=pre_default.epochs, help="pretraining epochs")
    ap.add_argument(
        "--crop-px", type=int, default=None, help="side of the SimCLR views (default: the patch)"
    )
    ap.add_argument("--batch-size", type=int, default=pre_default.batch_size)
    ap.add_argument("--patches-per-epoch", type=int, default=None)
    ap.add_argument(
        "--head-epochs",
        type=int,
        default=train_default.epochs,
        help="features-mode training epochs (train's default)",
    )
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    root = args.work / args.cohort
    if (root / "cohort" / "labels.csv").is_file() and len(
        list((root / "stores").glob("*.zarr"))
    ) >= args.slides:
        stores, labels = root / "stores", root / "cohort" / "labels.csv"  # made by an earlier run
        print(f"cohort {args.cohort}: reusing {stores}", flush=True)
    else:
        cseed, options, _ = COHORTS[args.cohort]
        stores, labels, _ = cohort(args.work, args.cohort, seed=cseed, n=args.slides, **options)

    weights = root / "smallcnn-simclr.pt"
    config = PretrainConfig(
        backbone="smallcnn",
        epochs=args.epochs,
        batch_size=args.batch_size,
        crop_px=args.crop_px,
        patches_per_epoch=args.patches_per_epoch,
        device="cpu",
    )
    work = root / "pretrain-work"
    resume = (work / "checkpoint.pt").exists()
    with measured() as m:
        res = pretrain(
            [stores],
            weights,
            config,
            work=work,
            resume=resume,
            progress=False,
            on_epoch=lambda r: print(
                f"  pretrain epoch {r['epoch'] + 1}: loss {r['loss']:.3f}, {r['seconds']:.0f} s",
                flush=True,
            ),
        )
    n_patches = sum(h["patches_per_s"] * h["seconds"] for h in res.history)
    pre = {
        "row": f"pretrain smallcnn SimCLR, {len(res.history)} epochs, views "
        f"{args.crop_px or 'patch-size'} px",
        "seconds": m["seconds"],
        "peak_mb": m["peak_mb"],
        "patches_per_s": n_patches / max(1e-9, sum(h["seconds"] for h in res.history)),
        "final_loss": res.history[-1]["loss"],
    }
    print(
        table(
            [pre],
            [
                ("row", "step", str),
                ("seconds", "wall s", lambda v: f"{v:,.0f}"),
                ("patches_per_s", "patches/s", lambda v: f"{v:,.0f}"),
                ("final_loss", "final loss", lambda v: f"{v:.3f}"),
                ("peak_mb", "peak RSS MB", lambda v: f"{v:,.0f}"),
            ],
        ),
        flush=True,
    )

    head = {"mode": "features", "backbone": "smallcnn", "epochs": args.head_epochs}
    rows = []
    for name, w in (("pretrained (SimCLR)", str(weights)), ("random init", "none")):
        cfg = TrainConfig(**head, backbone_weights=w)
        run = root / f"run_{name.split()[0]}"
        r = train_and_score(stores, labels, run, cfg)
        r["patch_auc"] = patch_auc(stores, run, labels.parent, run.name)
        rows.append({"row": f"features, smallcnn {name}", **r})
        print(
            f"  {rows[-1]['row']}: held-out AUC {r['auc']:.3f} (n={r['n']}), "
            f"lesion-patch AUC {r['patch_auc']:.3f}",
            flush=True,
        )
    model = TrainConfig(**head).model
    about = COHORTS[args.cohort][2]
    print(
        f"\nfeatures mode on cohort {args.cohort} ({about}, {args.slides} slides), {model} head\n"
    )
    print(
        table(
            rows,
            [
                ("row", "run", str),
                ("seconds", "wall s", lambda v: f"{v:,.0f}"),
                ("auc", "held-out AUC", lambda v: f"{v:.3f}"),
                ("n", "n", str),
                ("test_auc", "test AUC", lambda v: f"{v:.3f}"),
                ("patch_auc", "lesion-patch AUC", lambda v: f"{v:.3f}"),
                ("peak_mb", "peak RSS MB", lambda v: f"{v:,.0f}"),
            ],
        )
    )
    atomic_write_json(
        root / "results.json", {"pretrain": pre, "features": rows, "config": config.to_dict()}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
