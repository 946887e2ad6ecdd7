"""What the CPU does well, and how many threads a run can use while other processes share the machine.

Kernel choices on CPU depend on the processor, not on the recipe:
- bfloat16 arithmetic is fast only where the processor has native bf16 instructions (x86 ``avx512_bf16`` or
  ``amx_bf16``, Arm ``bf16``); elsewhere oneDNN emulates it and a bf16 product runs several times slower than float32,
  although ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` still says True. ``cpu_bf16: auto`` follows the flags.
- PyTorch's official x86 wheels send float32 ``linear`` to MKL, whose sgemm keeps non-Intel processors on AVX2
  kernels; oneDNN (in the same wheel) uses AVX-512 there. On Intel processors MKL is at least as fast, so
  ``DTX_LINEAR=auto`` takes oneDNN only on non-Intel x86 processors with AVX-512.

:class:`ThreadGovernor` keeps torch's thread count at the cores that other processes leave free: with as many
threads as cores, one busy process elsewhere makes every parallel region wait for a descheduled thread, and the run
slows several-fold instead of by half.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
PROC_STAT = Path("/proc/stat")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512 / AMX, Arm (Features: bf16)


@dataclass(frozen=True)
class CpuInfo:
    """The first processor's vendor, model name and feature flags, as /proc/cpuinfo states them."""

    vendor: str = ""
    model: str = ""
    flags: frozenset[str] = frozenset()

    @property
    def x86(self) -> bool:
        return self.vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine")

    @property
    def native_bf16(self) -> bool:
        """Whether bfloat16 products run natively (not emulated through float32)."""
        return bool(self.flags & BF16_FLAGS)

    @property
    def onednn_linear(self) -> bool:
        """Whether oneDNN's float32 products beat PyTorch's BLAS: non-Intel x86 processors with AVX-512."""
        return self.x86 and self.vendor != "GenuineIntel" and "avx512f" in self.flags

    def describe(self) -> str:
        return f"{self.model or self.vendor or 'unknown CPU'} (native bf16: {'yes' if self.native_bf16 else 'no'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """``CpuInfo`` of the first processor block of a /proc/cpuinfo text (x86 ``flags`` or Arm ``Features``)."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = fields.get("flags") or fields.get("features") or ""
    vendor = fields.get("vendor_id") or ("ARM" if "features" in fields else "")
    model = fields.get("model name") or fields.get("cpu model") or ""
    return CpuInfo(vendor, model, frozenset(flags.split()))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's ``CpuInfo`` (empty where /proc/cpuinfo is missing: no native bf16, PyTorch's own BLAS)."""
    try:
        return parse_cpuinfo(CPUINFO.read_text(errors="replace"))
    except OSError:
        return CpuInfo()


def resolve_cpu_bf16(value: str | bool) -> bool:
    """``cpu_bf16`` as configured (true, false or "auto") -> whether CPU training autocasts to bfloat16."""
    if isinstance(value, bool):
        return value
    if str(value).lower() == "auto":
        return cpu_info().native_bf16
    raise ConfigError(f"cpu_bf16 must be true, false or auto, got {value!r}")


# -- threads --------------------------------------------------------------------------------------------------------

def requested_threads(flag: int | None = None) -> int | None:
    """A fixed thread count from ``--threads`` or ``DTX_THREADS`` (None or "auto": the governor chooses)."""
    if flag is not None:
        if flag < 1:
            raise ConfigError(f"--threads must be >= 1, got {flag}")
        return flag
    value = os.environ.get("DTX_THREADS", "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"DTX_THREADS={value!r} must be a positive integer or auto")
    return int(value)


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU-seconds spent busy (not idle, not waiting on I/O) since boot on ``cpus``, from /proc/stat."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = [int(v) for v in values]
            busy += sum(fields[:8]) - fields[3] - fields[4]  # user..steal, less idle and iowait
    return busy / ticks


class ThreadGovernor:
    """Sets torch's CPU threads to the cores that other processes leave free, re-checked every ``interval`` s.

    Other processes' load is this process's CPUs' busy time (from /proc/stat) less its own CPU time; a core counts
    as taken from half a core of other load. ``fixed`` (``--threads`` / ``DTX_THREADS``) turns the governor off.
    """

    def __init__(self, max_threads: int, fixed: int | None = None, interval: float = 2.0) -> None:
        import torch

        self.cpus = _allowed_cpus()
        self.max_threads = max(1, fixed or min(max_threads, len(self.cpus)))
        self.fixed, self.interval = fixed, interval
        self.threads = self.max_threads
        torch.set_num_threads(self.threads)
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float, float | None]:
        return time.monotonic(), time.process_time(), _busy_seconds(self.cpus)

    def others(self, mark: tuple[float, float, float | None], now: tuple[float, float, float | None]) -> float:
        """Cores' worth of CPU time other processes used between two samples."""
        if mark[2] is None or now[2] is None or now[0] <= mark[0]:
            return 0.0
        return max(0.0, (now[2] - mark[2]) - (now[1] - mark[1])) / (now[0] - mark[0])

    def update(self) -> int:
        """Call once per step: every ``interval`` seconds, re-chooses the thread count; returns the current one."""
        if self.fixed is not None or self.max_threads == 1 or time.monotonic() - self._mark[0] < self.interval:
            return self.threads
        now = self._sample()
        others = self.others(self._mark, now)
        self._mark = now
        want = max(1, min(self.max_threads, int(len(self.cpus) - others + 0.5)))
        if want != self.threads:
            import torch

            log.info("other processes use %.1f of %d cores: %d torch threads (was %d)", others, len(self.cpus),
                     want, self.threads)
            torch.set_num_threads(want)
            self.threads = want
        return self.threads
