#!/usr/bin/env bash
# GPU check of the CUDA paths, in a few minutes on one GPU, on a small synthetic cohort it makes.
#
#   benchmarks/gpu_check.sh [WORK]            on a CUDA machine (WORK default: /tmp/wsi-gpu-check)
#   benchmarks/gpu_check.sh --dry-run [WORK]  (or CPU=1) the same steps on the CPU, tiny, to show
#                                             that the script itself works; claims nothing
#
# Checks, each a row of the table printed at the end (status ok / FAIL):
#   pretrain-bf16   SimCLR pretraining, AMP bfloat16, channels-last         patches/s, peak GPU MB
#   pretrain-fp16   the same in float16 with loss scaling (GradScaler)      patches/s, peak GPU MB
#   train-e2e       abmil + smallcnn end to end, AMP, channels-last         patches/s, peak GPU MB
#   features        wsi-pipeline features, resnet18, batches of 256         patches/s, peak GPU MB
#   ddp-pretrain    pretrain under torchrun (NCCL on min(2, #GPUs) GPUs; gloo on the CPU with 2
#                   processes in a dry run or with one GPU, as NCCL cannot put two ranks on one GPU)
#   ddp-train       e2e training under torchrun, likewise
# Exit status: 0 when every row is ok, 1 otherwise.
set -uo pipefail

DRY=${CPU:-0}
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
WORK=${1:-/tmp/wsi-gpu-check}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
mkdir -p "$WORK"
export WORK DRY

if [[ "$DRY" == 1 ]]; then
    DEVICE=cpu; N=4; W=2048; H=1536; EPOCHS=1
else
    DEVICE=cuda; N=8; W=4096; H=3072; EPOCHS=1
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run" >&2
        exit 1
    }
fi
export DEVICE

cd "$HERE" || exit 1
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

if [[ ! -f "$WORK/stores/.done" ]]; then
    log "synthetic cohort: $N slides of ${W}x${H} px"
    rm -rf "$WORK/cohort" "$WORK/stores"
    "$PY" -m wsi_pipeline synth "$WORK/cohort" --n-slides "$N" --width "$W" --height "$H" \
        --lesion-fraction 0.05 --seed 3 -q || exit 1
    "$PY" -m wsi_pipeline tile "$WORK/cohort/slides" --out "$WORK/stores" --mpp 1.0 \
        --tile-size 128 -q || exit 1
    touch "$WORK/stores/.done"
fi

# the single-process rows, measured in Python (peak GPU memory from torch.cuda)
"$PY" - <<'EOF'
import json, os, sys, time, traceback
from pathlib import Path

import torch

work, device, dry = Path(os.environ["WORK"]), os.environ["DEVICE"], os.environ["DRY"] == "1"
stores = work / "stores"
cuda = device == "cuda"
rows = []


def peak_reset():
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mb():
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def check(name, fn):
    peak_reset()
    t0 = time.perf_counter()
    try:
        rate, note = fn()
        rows.append({"check": name, "status": "ok", "patches_per_s": rate, "peak_mb": peak_mb(),
                     "seconds": time.perf_counter() - t0, "note": note})
    except Exception as exc:  # one failing CUDA path must not hide the others
        traceback.print_exc()
        line = " ".join(f"{type(exc).__name__}: {exc}".split())[:150]
        rows.append({"check": name, "status": "FAIL", "patches_per_s": None, "peak_mb": None,
                     "seconds": time.perf_counter() - t0, "note": line})


from wsi_pipeline.pretrain import pretrain
from wsi_pipeline.specs import PretrainConfig, TrainConfig

batch = 32 if dry else 256
per_epoch = 128 if dry else 4096


def run_pretrain(dtype):
    def fn():
        out = work / f"pretrain-{dtype}.pt"
        wdir = work / f"pretrain-{dtype}.work"
        import shutil
        shutil.rmtree(wdir, ignore_errors=True)
        cfg = PretrainConfig(epochs=1, batch_size=batch, patches_per_epoch=per_epoch,
                             device=device, amp_dtype=dtype, channels_last=True)
        res = pretrain([stores], out, cfg, work=wdir)
        h = res.history[-1]
        if not (h["loss"] == h["loss"]):
            raise RuntimeError("loss is NaN")
        if cuda and dtype == "float16":
            ck = torch.load(wdir / "checkpoint.pt", weights_only=True)
            if not ck["scaler"]:
                raise RuntimeError("fp16 ran without a loss scaler")
        return h["patches_per_s"], f"loss {h['loss']:.3f}"
    return fn


def run_train():
    from wsi_pipeline.training import train
    import shutil

    run = work / "run-e2e"
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(epochs=1, max_patches=32 if dry else 128, device=device, amp=True,
                      channels_last=True, num_workers=0 if dry else 4, patience=5)
    t0 = time.perf_counter()
    m = train(stores, work / "cohort" / "labels.csv", run, config=cfg, progress=False)
    sec = m["history"][-1]["seconds"]
    n_train = sum(1 for line in open(run / "splits.csv") if ",train" in line)
    return n_train * cfg.max_patches / sec, f"epoch {sec:.1f} s, {time.perf_counter() - t0:.0f} s in all"


def run_features():
    from wsi_pipeline.features import compute_features
    from wsi_pipeline.store import PatchReader

    name = "smallcnn" if dry else "resnet18"
    t0 = time.perf_counter()
    rep = compute_features([stores], backbone=name, weights="none", device=device,
                           overwrite=True, progress=False)
    if not all(r.ok for r in rep.results):
        raise RuntimeError("; ".join(r.error for r in rep.results if not r.ok))
    n = sum(PatchReader(p).n for p in sorted(stores.glob("*.zarr")))
    return n / (time.perf_counter() - t0), f"{name}, {n} patches"


check("pretrain-bf16", run_pretrain("bfloat16"))
check("pretrain-fp16", run_pretrain("float16"))
check("train-e2e", run_train)
check("features", run_features)
(work / "rows.json").write_text(json.dumps(rows))
EOF

# DDP rows under torchrun
NGPU=0
[[ "$DRY" == 1 ]] || NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if (( NGPU >= 2 )); then NPROC=2; DDP_DEVICE=cuda; else NPROC=2; DDP_DEVICE=cpu; fi
ddp_row() {  # name, seconds, status, note
    "$PY" - "$@" <<'EOF'
import json, os, sys
from pathlib import Path
p = Path(os.environ["WORK"]) / "rows.json"
rows = json.loads(p.read_text()) if p.exists() else []
rows.append({"check": sys.argv[1], "status": sys.argv[3], "patches_per_s": None, "peak_mb": None,
             "seconds": float(sys.argv[2]), "note": sys.argv[4]})
p.write_text(json.dumps(rows))
EOF
}
for step in pretrain train; do
    rm -rf "$WORK/ddp-$step" "$WORK/ddp-$step.pt" "$WORK/ddp-$step.pt.pretrain"
    if [[ $step == pretrain ]]; then
        args=(pretrain "$WORK/stores" --out "$WORK/ddp-pretrain.pt" --epochs 1 --batch-size 16
              --patches-per-epoch 128 --device "$DDP_DEVICE" -q)
    else
        args=(train "$WORK/stores" --labels "$WORK/cohort/labels.csv" --out "$WORK/ddp-train"
              --epochs 1 --max-patches 16 --device "$DDP_DEVICE" --workers 0 -q)
    fi
    t0=$(date +%s)
    log "ddp-$step: torchrun --nproc_per_node $NPROC ($DDP_DEVICE)"
    if "$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m wsi_pipeline "${args[@]}"; then
        ddp_row "ddp-$step" $(( $(date +%s) - t0 )) ok "$NPROC ranks on $DDP_DEVICE"
    else
        ddp_row "ddp-$step" $(( $(date +%s) - t0 )) FAIL "torchrun exited non-zero ($NPROC ranks on $DDP_DEVICE)"
    fi
done

"$PY" - <<'EOF'
import json, os, sys
from pathlib import Path
import torch
rows = json.loads((Path(os.environ["WORK"]) / "rows.json").read_text())
dev = torch.cuda.get_device_name(0) if os.environ["DEVICE"] == "cuda" else "CPU (dry run: no GPU figure)"
print(f"\ngpu_check on {dev}, torch {torch.__version__}\n")
fmt = "{:<15} {:<6} {:>10} {:>12} {:>8}  {}"
print(fmt.format("check", "status", "patches/s", "peak GPU MB", "wall s", "note"))
for r in rows:
    rate = f"{r['patches_per_s']:,.0f}" if r["patches_per_s"] else "-"
    mb = f"{r['peak_mb']:,.0f}" if r["peak_mb"] else "-"
    print(fmt.format(r["check"], r["status"], rate, mb, f"{r['seconds']:.0f}", r["note"]))
sys.exit(0 if rows and all(r["status"] == "ok" for r in rows) else 1)
EOF
