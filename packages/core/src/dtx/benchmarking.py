"""Measuring helpers shared by the benchmark scripts: median wall and CPU time of a callable, peak resident memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any, Callable


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_rss_peak() -> float:
    """Reset the kernel's peak-RSS mark to the current RSS where Linux allows it (``/proc/self/clear_refs``, value 5)
    and return the current RSS in MiB, so that ``rss_peak_mb() - reset_rss_peak()`` is the peak growth from here
    (without it, an import's transient peak would hide smaller later ones)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    current = _status_mb("VmRSS")
    return current if current is not None else rss_peak_mb()


def rss_peak_mb() -> float:
    """The process's peak resident set in MiB: VmHWM on Linux (resettable), else ``ru_maxrss``."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
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
