"""Crash recovery of ``wsi-pipeline run``: kill -9 at random points, rerun, compare.

A small demo-like pipeline (``synth`` of a few tiny slides -> tile -> train -> predict ->
heatmap) is run once cleanly as the reference. Then, until ``--kills`` runs were killed, a fresh
``wsi-pipeline run`` is started in an empty output folder and its whole process group is killed
with SIGKILL after a delay drawn (fixed ``--seed``) over 95% of the reference's duration,
stratified: the k-th kill falls uniformly within the k-th of ``--kills`` equal slices, so
every stage longer than two slices (the short ``tile`` stage too) is hit (a run that ends
first injects nothing: another point is drawn in that slice, of that run's shorter duration);
the pipeline is
rerun to completion and its outputs are compared with the reference:

- the same set of files (``report.json``/``report.html``, TensorBoard logs and lock files
  aside);
- every store marked complete;
- files byte-identical, or equal by content where bytes may legitimately differ: CSV and JSON
  values equal (numbers within ``--atol``, timings, dates and pids ignored; a manifest's
  ``skipped``, a store a rerun found complete, equals ``ok``), zarr chunks by the
  values of their array, PNG/TIFF by their pixels, ``.pt`` files tensor by tensor.

Prints ``N faults injected, N recovered, K outputs differ``, one row per kill (kill point in s,
the stage that was running, recovered, differs and what) and the peak memory of the process
tree.

    python benchmarks/bench_faults.py [--kills 20] [--seed 0] [--work bench-out/faults]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measured, table

ROOT = Path(__file__).resolve().parents[1]

#: The pipeline: 8 slides of 1536 x 1024 px, 64-px patches at 1 mpp, 2 epochs (as the
#: end-to-end pipeline test); one run takes seconds on an idle laptop CPU.
PIPELINE = """\
name: faults
out: {out}
synth: {{n_slides: 8, width: 1536, height: 1024, mpp: 0.5, seed: 21, lesion_fraction: 0.05}}
tile: {{mpp: 1.0, tile_size: 64, overlap: 32, workers: 2}}
train: {{epochs: 2, max_patches: 16, num_workers: 0, seed: 0}}
predict: {{device: cpu}}
heatmap: {{which: score, mode: probability, threshold: 0.5}}
"""

#: Files that record the run rather than its results (timings, logs) or lock it.
SKIP = re.compile(r"(^|/)(report\.json|report\.html|tensorboard/.*|.*\.lock)$")
#: JSON/CSV keys whose values are timings, dates, hosts or pids.
VOLATILE = re.compile(r"second|time|date|started|created|elapsed|duration|wall|host|pid|per_s")


def command(pipeline: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "wsi_pipeline", "run", str(pipeline), *extra]


def environment() -> dict[str, str]:
    """This checkout first on the path; one thread of BLAS/OpenMP in every run alike."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(k, "1")
    return env


def run_to_end(pipeline: Path, log: Path, timeout: float) -> int:
    """Run the pipeline to its end (stderr to ``log``); its exit status (-9 on a timeout)."""
    with open(log, "a") as fh:
        try:
            return subprocess.run(
                command(pipeline, "-q"),
                stdout=fh,
                stderr=fh,
                env=environment(),
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            return -9


def run_and_kill(pipeline: Path, log: Path, delay: float) -> tuple[bool, str]:
    """Start the pipeline, SIGKILL its process group after ``delay`` s.

    Returns
    -------
    killed : bool
        False when it ended before the delay.
    stage : str
        The stage running at the kill: the last ``stage X ...`` line of its log ("start" before
        the first, "report" after the last stage ended).
    """
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            command(pipeline),
            stdout=fh,
            stderr=fh,
            env=environment(),
            start_new_session=True,
        )
        try:
            proc.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
    return killed, running_stage(log.read_text(errors="replace"))


def running_stage(text: str) -> str:
    """The stage a log stopped in (see :func:`run_and_kill`)."""
    stage, ended = "start", False
    for m in re.finditer(r"stage (\w+)( \.\.\.|: )", text):
        stage, ended = m.group(1), m.group(2) == ": "
    return "report" if ended and stage == "heatmap" else stage


# ---------------------------------------------------------------------------------------------
# comparing an output tree with the reference
# ---------------------------------------------------------------------------------------------
def files_of(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not SKIP.search(p.relative_to(root).as_posix())
    }


def same_value(a: Any, b: Any, atol: float) -> bool:
    """JSON values equal, numbers within ``atol``, volatile keys ignored."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {k for k in a.keys() | b.keys() if not VOLATILE.search(k)}
        return all(same_value(a.get(k), b.get(k), atol) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, bool) or isinstance(b, bool):
            return a is b
        return math.isclose(a, b, rel_tol=0, abs_tol=atol) or (math.isnan(a) and math.isnan(b))
    return a == b


#: Manifest statuses that say the same about a store: tiled now, or found complete by a rerun.
SAME_STATUS = {"skipped": "ok"}


def same_csv(a: Path, b: Path, atol: float) -> bool:
    def rows(p: Path) -> list[dict[str, Any]]:
        with open(p, newline="") as fh:
            out = []
            for r in csv.DictReader(fh):
                row: dict[str, Any] = {}
                for k, v in r.items():
                    if k == "status":
                        v = SAME_STATUS.get(v, v)
                    try:
                        row[k] = float(v)
                    except (TypeError, ValueError):
                        row[k] = v
                out.append(row)
            return sorted(out, key=lambda r: json.dumps(r, sort_keys=True, default=str))

    return same_value(rows(a), rows(b), atol)


def same_zarr_chunk(a: Path, b: Path, ref_root: Path, out_root: Path, atol: float) -> bool:
    """The arrays holding two differing chunk files have the same values (a resumed write may
    encode a chunk differently, never hold other values)."""
    import zarr

    rel = b.relative_to(ref_root).parts
    i = rel.index("c") if "c" in rel else len(rel) - 1
    arr_path = Path(*rel[:i])
    try:
        x = zarr.open_array(str(out_root / arr_path), mode="r")[...]
        y = zarr.open_array(str(ref_root / arr_path), mode="r")[...]
    except Exception:
        return False
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if np.issubdtype(x.dtype, np.floating):
        return bool(np.allclose(x, y, rtol=0, atol=atol, equal_nan=True))
    return bool(np.array_equal(x, y))


def same_image(a: Path, b: Path) -> bool:
    if a.suffix == ".png":
        from PIL import Image

        return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    import tifffile

    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        if len(ta.pages) != len(tb.pages):
            return False
        return all(np.array_equal(pa.asarray(), pb.asarray()) for pa, pb in zip(ta.pages, tb.pages))


def same_torch(a: Path, b: Path, atol: float) -> bool:
    import torch

    def flat(obj: Any, key: str = "") -> dict[str, Any]:
        if isinstance(obj, dict):
            out: dict[str, Any] = {}
            for k, v in obj.items():
                out.update(flat(v, f"{key}/{k}"))
            return out
        if isinstance(obj, (list, tuple)):
            out = {}
            for i, v in enumerate(obj):
                out.update(flat(v, f"{key}/{i}"))
            return out
        return {key: obj}

    x = flat(torch.load(a, weights_only=True, map_location="cpu"))
    y = flat(torch.load(b, weights_only=True, map_location="cpu"))
    if x.keys() != y.keys():
        return False
    for k in x:
        u, v = x[k], y[k]
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor):
            if u.shape != v.shape or not torch.equal(u, v):
                return False
        elif isinstance(u, str) and isinstance(v, str) and u[:1] in "[{" and v[:1] in "[{":
            if not same_value(json.loads(u), json.loads(v), atol):  # e.g. the history
                return False
        elif not VOLATILE.search(k) and u != v and not (isinstance(u, float) and u != u):
            return False
    return True


def compare(out: Path, ref: Path, atol: float) -> list[str]:
    """What differs between the output tree ``out`` and the reference ``ref`` (empty: none)."""
    from wsi_pipeline.store import is_complete

    diffs: list[str] = []
    got, want = files_of(out), files_of(ref)
    for rel in sorted(want - got)[:3]:
        diffs.append(f"missing {rel}")
    for rel in sorted(got - want)[:3]:
        diffs.append(f"extra {rel}")
    for store in sorted(out.rglob("*.zarr")):
        if store.is_dir() and not is_complete(store):
            diffs.append(f"incomplete store {store.relative_to(out)}")
    for rel in sorted(got & want):
        a, b = out / rel, ref / rel
        if a.read_bytes() == b.read_bytes():
            continue
        try:
            if ".zarr/" in rel and not rel.endswith("zarr.json"):
                ok = same_zarr_chunk(a, b, ref, out, atol)
            elif rel.endswith(".json"):
                ok = same_value(json.loads(a.read_text()), json.loads(b.read_text()), atol)
            elif rel.endswith(".geojson"):
                ok = same_value(json.loads(a.read_text()), json.loads(b.read_text()), atol)
            elif rel.endswith(".csv"):
                ok = same_csv(a, b, atol)
            elif rel.endswith((".png", ".tif", ".tiff")):
                ok = same_image(a, b)
            elif rel.endswith(".pt"):
                ok = same_torch(a, b, atol)
            else:
                ok = False
        except Exception as exc:  # an unreadable output differs
            diffs.append(f"{rel} unreadable ({type(exc).__name__}: {exc})")
            continue
        if not ok:
            diffs.append(f"{rel} differs")
    return diffs


# ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="Runs to kill (>= 20 for the issue).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the kill delays.")
    ap.add_argument("--work", type=Path, default=Path("bench-out/faults"), help="Work folder.")
    ap.add_argument("--atol", type=float, default=1e-6, help="Tolerance of float values.")
    ap.add_argument("--timeout", type=float, default=1800.0, help="Longest a rerun may take (s).")
    args = ap.parse_args()

    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out, ref = work / "out", work / "ref"
    pipeline = work / "faults.yaml"
    pipeline.write_text(PIPELINE.format(out=out))

    rows: list[dict[str, Any]] = []
    with measured() as m:
        t0 = time.perf_counter()
        rc = run_to_end(pipeline, work / "reference.log", args.timeout)
        ref_s = time.perf_counter() - t0
        if rc != 0:
            print(f"the reference run failed (exit {rc}); see {work / 'reference.log'}")
            return 1
        out.rename(ref)
        print(f"reference run: {ref_s:.1f} s; {len(files_of(ref))} output files", flush=True)
        rng = np.random.default_rng(args.seed)
        i, span = 0, ref_s
        while sum(r["killed"] for r in rows) < args.kills and i < 2 * args.kills:
            # the k-th kill in the k-th slice of the run (stratified: every stage is hit); a
            # run that ends before its kill point injects nothing: draw another point
            k = sum(r["killed"] for r in rows)
            delay = float((k + rng.uniform()) / args.kills * 0.95 * span)
            shutil.rmtree(out, ignore_errors=True)
            log = work / f"kill_{i:02d}.log"
            t1 = time.perf_counter()
            killed, stage = run_and_kill(pipeline, log, float(delay))
            if not killed:  # the reference ran slower (a cold start): draw within this run
                span = min(span, time.perf_counter() - t1)
            rc = run_to_end(pipeline, log, args.timeout)
            text = log.read_text(errors="replace")
            recovered = rc == 0 and "Traceback" not in text
            diffs = compare(out, ref, args.atol) if recovered else ["not recovered"]
            rows.append(
                {
                    "i": i,
                    "at": float(delay),
                    "stage": stage if killed else f"({stage}: ended first)",
                    "killed": killed,
                    "recovered": recovered,
                    "rc": rc,
                    "differs": bool(diffs),
                    "what": "; ".join(diffs[:3]) if diffs else "",
                }
            )
            print(
                f"kill point {i + 1} at {delay:.1f} s ({stage}): exit {rc} on the "
                f"rerun{'; ' + rows[-1]['what'] if diffs else ''}",
                flush=True,
            )
            if diffs:  # keep the evidence
                shutil.copytree(out, work / f"differs_{i:02d}", dirs_exist_ok=True)
            i += 1

    n = sum(r["killed"] for r in rows)
    rec = sum(r["killed"] and r["recovered"] for r in rows)
    bad = sum(r["killed"] and r["differs"] for r in rows)
    yn = lambda v: "y" if v else "n"  # noqa: E731
    print(
        "\n"
        + table(
            rows,
            [
                ("i", "#", str),
                ("at", "kill at s", lambda v: f"{v:.1f}"),
                ("stage", "stage running", str),
                ("recovered", "recovered", yn),
                ("differs", "differs", yn),
                ("what", "what differs", str),
            ],
        )
    )
    print(
        f"\nreference {ref_s:.1f} s; {len(rows)} kill points (seed {args.seed}); "
        f"peak RSS of the process tree {m['peak_mb']:.0f} MB; total {m['seconds']:.0f} s"
    )
    print(f"{n} faults injected, {rec} recovered, {bad} outputs differ")
    return 0 if n == rec and bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
