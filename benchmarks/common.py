"""Shared helpers of the benchmarks: peak-RSS sampling of a process tree, timing, tables."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants every ``interval`` s."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            total = 0
            try:
                procs = [me, *me.children(recursive=True)]
            except psutil.Error:
                procs = [me]
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


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
