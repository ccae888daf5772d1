"""Paired A/B of two source trees on one tiling path: does a change make ``tile`` faster?

On a shared 2-core machine whole benchmark runs drift by 10-20 % within minutes, so a best-of
figure taken a few minutes apart cannot show a 5-10 % change. Here two long-lived processes,
one per tree (each imports its tree, and tiles the slide once untimed), take turns: every pair
of runs is back to back, the order flips every round, and the ratio of each pair is what is
reported (its median and range), beside each tree's best and median and its ``--workers N`` /
``--workers 1`` ratios. At the end the two trees' stores of the last run are compared byte by
byte (a speed change should not change what is written).

    python benchmarks/ab_tiling.py --base /tmp/old-tree [--head .] [--path "overlap 50%"]
        [--reps 10] [--workers 1,2] [--work bench-out/tiling]

``--base`` / ``--head``: source trees (e.g. ``git worktree add /tmp/old-tree <rev>``); the paths
are those of ``bench_tiling.py`` (its 40,000 x 30,000 slide, written once into ``--work``).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import PATHS, ensure_slide
from common import table


def serve(tree: str, label: str, slide: str, out: str) -> None:
    """Server side: import ``tree``'s package, tile once untimed, then for each ``N`` read from
    stdin tile the slide afresh with ``workers=N`` and print the seconds."""
    sys.path.insert(0, tree)
    from wsi_pipeline.specs import TilingSpec
    from wsi_pipeline.tile_batch import tile_slides

    _, mpp, overlap, codec, scan_mpp = next(p for p in PATHS if p[0] == label)
    spec = TilingSpec(tile_px=256, mpp=mpp, overlap_px=overlap, codec=codec)

    def run(workers: int) -> float:
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        res = tile_slides(
            [slide], out, spec=spec, slide_mpp=scan_mpp, workers=workers, progress=False
        )
        seconds = time.perf_counter() - t
        assert res[0].status == "ok", res[0].error
        return seconds

    run(1)
    print("ready", flush=True)
    for line in sys.stdin:
        print(run(int(line)), flush=True)


def _start(tree: Path, label: str, slide: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # each server imports its own tree, nothing else
    cmd = [sys.executable, __file__, "--serve", str(tree), label, str(slide), str(out)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", f"{tree}: no start"
    return p


def _ask(p: subprocess.Popen, workers: int) -> float:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(f"{workers}\n")
    p.stdin.flush()
    return float(p.stdout.readline())


def _same_stores(a: Path, b: Path) -> bool:
    """Whether two stores' patch files are byte-identical."""
    fa = sorted(f.relative_to(a) for f in (a / "patches").rglob("*") if f.is_file())
    fb = sorted(f.relative_to(b) for f in (b / "patches").rglob("*") if f.is_file())
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:6])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="source tree before the change")
    ap.add_argument("--head", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--path", default="overlap 50%", choices=[p[0] for p in PATHS])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--workers", default="1,2", help="comma-separated, e.g. 1,2")
    ap.add_argument("--work", type=Path, default=Path("bench-out/tiling"))
    args = ap.parse_args(argv)
    ws = [int(w) for w in args.workers.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    slide = ensure_slide(args.work, 40_000, 30_000)
    trees = {"base": args.base.resolve(), "head": args.head.resolve()}
    outs = {k: args.work / f"ab_{k}" for k in trees}
    procs = {k: _start(trees[k], args.path, slide, outs[k]) for k in trees}
    times: dict[tuple[str, int], list[float]] = {(k, w): [] for k in trees for w in ws}
    try:
        for rep in range(args.reps):
            order = list(trees) if rep % 2 == 0 else list(reversed(trees))
            for w in ws:
                for k in order:
                    times[k, w].append(_ask(procs[k], w))
    finally:
        for p in procs.values():
            assert p.stdin is not None
            p.stdin.close()
            p.wait()
    f3 = lambda v: f"{v:.3f}"  # noqa: E731
    f2 = lambda v: f"{v:.2f}"  # noqa: E731
    rows = []
    for w in ws:
        b, h = times["base", w], times["head", w]
        pairs = [x / y for x, y in zip(b, h)]
        rows.append(
            {
                "workers": str(w),
                "base_best": min(b),
                "base_med": statistics.median(b),
                "head_best": min(h),
                "head_med": statistics.median(h),
                "pair_med": statistics.median(pairs),
                "pair_range": f"{min(pairs):.2f}-{max(pairs):.2f}",
            }
        )
    print(f"\n{args.path}, {slide.name}: base {trees['base']} against head {trees['head']}, ")
    print(f"{args.reps} rounds, runs alternated in pairs\n")
    columns = [
        ("workers", "--workers", str),
        ("base_best", "base best s", f3),
        ("base_med", "base median s", f3),
        ("head_best", "head best s", f3),
        ("head_med", "head median s", f3),
        ("pair_med", "base / head, pairs' median", f3),
        ("pair_range", "pairs' range", str),
    ]
    print(table(rows, columns))
    if len(ws) > 1:
        w1, wn = ws[0], ws[-1]
        ratio_rows = []
        for k in trees:
            a, b = times[k, w1], times[k, wn]
            ratio_rows.append(
                {
                    "tree": k,
                    "best": min(a) / min(b),
                    "median": statistics.median(a) / statistics.median(b),
                    "pairs": statistics.median(x / y for x, y in zip(a, b)),
                }
            )
        print(f"\n--workers {wn} / --workers {w1}\n")
        print(
            table(
                ratio_rows,
                [
                    ("tree", "tree", str),
                    ("best", "best / best", f2),
                    ("median", "median / median", f2),
                    ("pairs", "pairs' median", f2),
                ],
            )
        )
    same = _same_stores(outs["base"] / f"{slide.stem}.zarr", outs["head"] / f"{slide.stem}.zarr")
    print(f"\nstores of the last runs byte-identical: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
