"""Helpers shared by the benchmarks: interleaved repeated timing, so both sides see the same machine noise, and
this process's memory figures from ``/proc``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def timeit_pair(a: Callable[[], object], b: Callable[[], object], repeats: int = 5, warmup: int = 1):
    """Median seconds of ``a`` and ``b``, run alternately ``repeats`` times after ``warmup`` runs of each."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), ta, tb


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` figure in kB (``VmRSS``, ``VmHWM``: the peak since the last ``clear_refs``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)
