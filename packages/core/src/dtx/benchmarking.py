"""Measuring helpers shared by the benchmark scripts: median wall and CPU time of a callable, peak resident memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any, Callable


def rss_peak_mb() -> float:
    """The process's peak resident set so far in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def timed(fn: Callable[[], Any], sync: Callable[[], None], warmup: int, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process-CPU milliseconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)
