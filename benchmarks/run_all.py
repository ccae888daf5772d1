"""Run every benchmark in turn (``make bench``); each prints its own table of ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "bench_tiling.py",
    "bench_training.py",
    "bench_heatmap.py",
    "bench_features.py",
    "bench_pretrain.py",
]


def main() -> int:
    code = 0
    for name in BENCHES:
        print(f"\n===== {name} =====", flush=True)
        code |= subprocess.call([sys.executable, str(HERE / name), *sys.argv[1:]])
    return code


if __name__ == "__main__":
    raise SystemExit(main())
