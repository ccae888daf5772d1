"""Shared helpers of the benchmarks: peak-RSS sampling of a process tree, timing, tables."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: The sampler's own process: it sums the RSS of the measured process and its descendants
#: (itself left out) every ``interval`` s until a line comes on its stdin, then prints the peak.
_SAMPLER = """
import os, select, sys, psutil
me, interval = psutil.Process(int(sys.argv[1])), float(sys.argv[2])
peak = 0
print("ready", flush=True)
while True:
    total = 0
    try:
        procs = [me, *me.children(recursive=True)]
    except psutil.Error:
        procs = [me]
    for p in procs:
        if p.pid != os.getpid():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    peak = max(peak, total)
    if select.select([sys.stdin], [], [], interval)[0]:
        break
print(peak, flush=True)
"""


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants every ``interval`` s.

    The sampling runs in a child process. As a thread of the measured process it took ~5 % of
    a core and turns at the interpreter there: tiling the benchmark slide at 0.5 µm/px, 3
    rounds, median wall s with it as a thread / in a child / without: one process 3.06 / 2.98 /
    2.95, two threads 2.02 / 1.89 / 1.91 (the peaks agree).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> PeakRSS:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SAMPLER, str(os.getpid()), str(self.interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        ready = self._proc.stdout.readline().strip()  # its first sample is taken
        if ready != "ready":
            raise RuntimeError(f"the peak-RSS sampler did not start: {ready!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate("stop\n", timeout=60)
        self.peak = int(out.split()[-1])


@contextmanager
def measured() -> Iterator[dict[str, float]]:
    """``with measured() as m:`` ... then ``m["seconds"]``, ``m["peak_mb"]`` (process tree) and
    ``m["cpu_s"]`` (CPU seconds of this process, all its threads; not of other processes)."""
    out: dict[str, float] = {}
    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        yield out
        out["seconds"] = time.perf_counter() - t0
        out["cpu_s"] = time.process_time() - c0
    out["peak_mb"] = rss.peak / 2**20


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[Any], str]]]) -> str:
    """A plain-text table: ``columns`` = (key, header, format function)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([fmt(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(columns))
        )
        for c in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
