"""CPU-dependent choices (bf16, oneDNN linear) follow the processor's flags; the thread governor gives up the cores
that other processes use and takes them back when they are free."""

from __future__ import annotations

import types

import pytest
import torch

import dtx.cpu as cpu
from dtx.errors import ConfigError

INTEL_XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu avx512_bf16
"""
AMD_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R45
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
"""
AMD_ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7R32
flags\t\t: fpu sse2 avx avx2 fma
"""
ARM_V9 = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm bf16 i8mm
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, bf16, onednn", [
    (INTEL_XEON, False, False),  # only the first processor's flags count (the second block is ignored)
    (AMD_EPYC, True, True),
    (AMD_ZEN2, False, False),
    (ARM_V9, True, False),
    ("", False, False),
])
def test_flags_decide_bf16_and_the_linear_kernel(text, bf16, onednn):
    info = cpu.parse_cpuinfo(text)
    assert (info.native_bf16, info.onednn_linear) == (bf16, onednn)


def test_cpu_bf16_auto_follows_the_flags_and_booleans_force(monkeypatch):
    for text, expected in ((INTEL_XEON, False), (AMD_EPYC, True)):
        monkeypatch.setattr(cpu, "cpu_info", lambda text=text: cpu.parse_cpuinfo(text))
        assert cpu.resolve_cpu_bf16("auto") is expected
        assert cpu.resolve_cpu_bf16(True) is True and cpu.resolve_cpu_bf16(False) is False
    with pytest.raises(ConfigError, match="cpu_bf16"):
        cpu.resolve_cpu_bf16("sometimes")


def test_requested_threads_from_flag_and_environment(monkeypatch):
    monkeypatch.delenv("DTX_THREADS", raising=False)
    assert cpu.requested_threads() is None
    assert cpu.requested_threads(3) == 3
    monkeypatch.setenv("DTX_THREADS", "auto")
    assert cpu.requested_threads() is None
    monkeypatch.setenv("DTX_THREADS", "2")
    assert cpu.requested_threads() == 2
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("DTX_THREADS", bad)
        with pytest.raises(ConfigError, match="DTX_THREADS"):
            cpu.requested_threads()
    with pytest.raises(ConfigError, match="--threads"):
        cpu.requested_threads(0)


def test_busy_seconds_reads_the_allowed_cpus_of_proc_stat(tmp_path, monkeypatch):
    """user+nice+system+irq+softirq+steal of the listed CPUs, idle and iowait excluded, in seconds."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  999 0 999 999 0 0 0 0 0 0\n"
                    "cpu0 100 10 20 5000 7 1 2 3 0 0\n"
                    "cpu1 50 0 30 4000 0 0 0 0 0 0\n"
                    "cpu2 1000 0 0 0 0 0 0 0 0 0\nintr 1 2 3\n")
    monkeypatch.setattr(cpu, "PROC_STAT", stat)
    hz = cpu.os.sysconf("SC_CLK_TCK")
    assert cpu._busy_seconds({0, 1}) == pytest.approx((100 + 10 + 20 + 1 + 2 + 3 + 50 + 30) / hz)


class FakeClock:
    """monotonic and process_time under the test's control."""

    def __init__(self) -> None:
        self.wall, self.own = 0.0, 0.0

    def namespace(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(monotonic=lambda: self.wall, process_time=lambda: self.own)


def test_governor_gives_up_a_core_to_a_busy_process_and_takes_it_back(monkeypatch):
    clock, busy = FakeClock(), [0.0]
    monkeypatch.setattr(cpu, "time", clock.namespace())
    monkeypatch.setattr(cpu, "_allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(cpu, "_busy_seconds", lambda cpus: busy[0])
    before = torch.get_num_threads()
    try:
        gov = cpu.ThreadGovernor(max_threads=2, interval=2.0)
        assert gov.threads == 2 and torch.get_num_threads() == 2

        def run(seconds: float, own_cores: float, other_cores: float) -> int:
            clock.wall += seconds
            clock.own += seconds * own_cores
            busy[0] += seconds * (own_cores + other_cores)
            return gov.update()

        assert run(1.0, 2.0, 1.0) == 2  # not yet an interval: no decision
        assert run(1.5, 1.3, 0.7) == 1 and torch.get_num_threads() == 1  # a busy process took most of a core
        assert run(2.5, 1.0, 1.0) == 1  # still there
        assert run(2.5, 1.0, 0.1) == 2 and torch.get_num_threads() == 2  # gone: both cores again
        assert run(2.5, 2.0, 0.3) == 2  # light load elsewhere (a shell, a short command) keeps both
    finally:
        torch.set_num_threads(before)


def test_governor_keeps_a_fixed_count_and_never_exceeds_its_share(monkeypatch):
    clock, busy = FakeClock(), [0.0]
    monkeypatch.setattr(cpu, "time", clock.namespace())
    monkeypatch.setattr(cpu, "_allowed_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(cpu, "_busy_seconds", lambda cpus: busy[0])
    before = torch.get_num_threads()
    try:
        fixed = cpu.ThreadGovernor(max_threads=4, fixed=3)
        clock.wall, busy[0] = 10.0, 30.0  # three cores' worth of other load
        assert fixed.update() == 3 and torch.get_num_threads() == 3
        share = cpu.ThreadGovernor(max_threads=2)  # e.g. one of two Ray workers on four cores
        clock.wall, busy[0] = 20.0, 30.0  # idle machine
        assert share.update() == 2
    finally:
        torch.set_num_threads(before)
