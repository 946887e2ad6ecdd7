"""Measuring helpers shared by ``dtx bench`` and the benchmark scripts: median wall and CPU time of a callable,
callables timed side by side (interleaved rounds and their per-round ratio), peak tensor memory on CPU and CUDA,
activation memory."""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import torch


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


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (CUDA), else does nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved(fns: Sequence[Callable[[], Any]], sync: Callable[[], None], warmup: int,
                repeats: int) -> list[list[tuple[float, float]]]:
    """Time several callables side by side: ``warmup`` untimed calls of each, then ``repeats`` rounds that call
    each once, alternating the order every round (so neither always runs first or after the other). Returns, per
    callable, one (wall ms, process-CPU ms) pair per round; load changes hit every callable of a round alike."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    out: list[list[tuple[float, float]]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[i]()
            sync()
            out[i].append(((time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3))
    return out


def round_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: the ratio of two interleaved timings, robust to load that changes
    between rounds."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty timing lists, got {len(a)} and {len(b)}")
    return statistics.median(x / y for x, y in zip(a, b))


#: what torch's allocator prints when a tensor made before profiling is freed during it (its size is unknown to the
#: profiler, so that free is not counted): expected here, not news to the user
_UNKNOWN_BLOCK = "Memory block of unknown size was allocated before the profiling started"


@contextlib.contextmanager
def _without_stderr_lines(marker: str) -> Iterator[None]:
    """Hold back what is written to file descriptor 2 inside the block, then pass on every line without
    ``marker`` (torch's C++ warnings bypass Python's ``warnings``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if marker not in line))


def tensor_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak, in MiB, of the CPU memory held by the tensors that one call of ``fn`` allocates: the running sum of
    the allocations and frees that torch's profiler records (frees of tensors made before the call, such as the
    gradients a training step drops, are not seen). The process's resident set cannot show it: freed activations
    stay in the C heap and are reused, so a warmed-up call grows it by a few MiB whatever it allocates."""
    from torch.autograd import ProfilerConfig, ProfilerState, _disable_profiler_legacy, _enable_profiler_legacy

    config = ProfilerConfig(ProfilerState.CPU, False, True, False, False, False,  # profile_memory on, nothing else
                            torch._C._profiler._ExperimentalConfig())
    with _without_stderr_lines(_UNKNOWN_BLOCK):
        _enable_profiler_legacy(config)
        try:
            fn()
        finally:
            records = _disable_profiler_legacy()
    events = sorted((e.start_us(), e.cpu_memory_usage()) for thread in records for e in thread
                    if e.kind() == "memory_alloc")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak / 2 ** 20


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Peak memory of one call of ``fn`` in MiB: CUDA's allocator peak above what was allocated before; on CPU the
    peak of the tensors the call allocates (``tensor_peak_mb``)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return tensor_peak_mb(fn)


def saved_activations_mb(fn: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> float:
    """MiB of distinct tensor storages autograd saves for backward during one call of ``fn`` (its forward),
    leaving out the storages of ``exclude`` (e.g. the parameters): the activation memory of a training step,
    exact and the same on every device (what activation checkpointing trades for recomputation)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values()) / 2 ** 20


def pivot_table(rows: Sequence[dict[str, Any]], row_key: str, col_key: str, cell: Callable[[dict[str, Any]], str]) -> str:
    """A Markdown table of ``rows`` pivoted: one line per value of ``row_key`` (first-seen order), one column per
    sorted value of ``col_key``, each cell ``cell(row)`` of the matching row (empty where none)."""
    cols = sorted({r[col_key] for r in rows})
    lines = [f"| {row_key} | {' | '.join(f'{col_key} {c}' for c in cols)} |", "|---|" + "---|" * len(cols)]
    for name in dict.fromkeys(r[row_key] for r in rows):
        hits = [[r for r in rows if r[row_key] == name and r[col_key] == c] for c in cols]
        lines.append(f"| {name} | {' | '.join(cell(h[0]) if h else '' for h in hits)} |")
    return "\n".join(lines)
