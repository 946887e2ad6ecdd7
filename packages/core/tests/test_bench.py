"""``dtx bench`` and its pieces: peak table and MFU recomputed by hand, interleaved timing order and per-round
ratios, recomputation policies (which blocks, same gradients), the compile switch and its eager fallback, the CLI
smoke run (no timing asserted) with FLOPs from the cost interface, and one-line errors naming the option."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from torch import nn

from dtx.benchmarking import interleaved, peak_memory_mb, round_ratio, saved_activations_mb
from dtx.cli import main
from dtx.costs import (GPU_PEAK_TFLOPS, achieved_tflops, device_peak_tflops, gpu_peak_tflops, mfu, model_cost)
from dtx.errors import ConfigError, ShapeError
from dtx.training.compile import CompiledModel, check_compile_mode, compile_model, eager_reason
from dtx.layers import BlockStack, recompute_policy, set_recompute

TINY = ["DiT-S/2", "--input-size", "8", "--set", "depth=2", "hidden_size=64", "num_heads=2"]


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# -- peaks and MFU ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0), ("NVIDIA A100-PCIE-40GB", "bf16", 312.0),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA L40S", "fp32", 91.6), ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("Tesla T4", "bf16", None)])
def test_gpu_peaks_match_device_names(name, precision, expected):
    assert gpu_peak_tflops(name, precision) == expected


def test_peak_table_covers_the_issue_gpus_and_cpu_has_none():
    assert {"A100", "H100", "H200", "L40S", "RTX 4090"} <= set(GPU_PEAK_TFLOPS)
    assert device_peak_tflops("cpu", "bf16") is None
    with pytest.raises(ConfigError, match="precision"):
        gpu_peak_tflops("NVIDIA H100", "int8")


def test_mfu_is_flops_over_time_over_peak():
    flops, seconds, peak = 3 * 118.6e9 * 256, 0.25, 989.4
    assert achieved_tflops(flops, seconds) == pytest.approx(flops / seconds / 1e12)
    assert mfu(flops, seconds, peak) == pytest.approx((flops / seconds) / (peak * 1e12))
    with pytest.raises(ValueError):
        mfu(flops, 0.0, peak)


# -- interleaved timing ----------------------------------------------------------------------------------------

def test_interleaved_alternates_order_and_times_every_round():
    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = interleaved(fns, lambda: None, warmup=1, repeats=4)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(t) for t in times] == [4, 4]
    assert all(w >= 0 and c >= 0 for t in times for w, c in t)
    with pytest.raises(ValueError):
        interleaved(fns, lambda: None, warmup=0, repeats=0)


def test_round_ratio_is_the_median_of_per_round_ratios():
    a, b = [10.0, 20.0, 40.0], [5.0, 8.0, 40.0]  # load doubles between rounds; per-round ratios .5, .4, 1
    assert round_ratio(b, a) == pytest.approx(statistics.median([0.5, 0.4, 1.0]))
    assert round_ratio(b, a) != pytest.approx(statistics.median(b) / statistics.median(a))
    with pytest.raises(ValueError):
        round_ratio([1.0], [1.0, 2.0])


def test_peak_memory_sees_a_large_allocation():
    grown = peak_memory_mb(lambda: torch.ones(64 * 2 ** 20 // 4).add_(1), "cpu")  # 64 MiB
    assert grown == 0.0 or 48 <= grown <= 200  # 0 where the kernel's peak mark cannot be reset


def test_saved_activations_count_what_backward_keeps():
    from torch.utils.checkpoint import checkpoint

    a = torch.randn(256, 1024, requires_grad=True)  # 1 MiB of float32
    assert saved_activations_mb(lambda: torch.tanh(a).sum()) == 1.0  # tanh keeps its output
    assert saved_activations_mb(lambda: torch.tanh(torch.tanh(a)).sum()) == 2.0
    twice = lambda t: torch.tanh(torch.tanh(t))  # noqa: E731
    assert saved_activations_mb(lambda: checkpoint(twice, a, use_reentrant=False).sum()) == 1.0  # input only
    lin = nn.Linear(1024, 1024)  # keeps its input and its 4 MiB weight
    assert saved_activations_mb(lambda: lin(a).sum()) == 5.0
    assert saved_activations_mb(lambda: lin(a).sum(), list(lin.parameters())) == 1.0


# -- activation recomputation policy ---------------------------------------------------------------------------

class Blocks(nn.Module):
    def __init__(self, n: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = BlockStack(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


@pytest.mark.parametrize("text, every", [("none", 0), ("all", 1), (True, 1), (False, 0), ("every-3", 3), ("2", 2),
                                         (4, 4)])
def test_recompute_policy_parses(text, every):
    assert recompute_policy(text) == every


@pytest.mark.parametrize("bad", ["some", "every-x", "-1", "1.5"])
def test_recompute_policy_rejects_with_the_option_name(bad):
    with pytest.raises(ConfigError, match="--recompute"):
        recompute_policy(bad, "--recompute")


@pytest.mark.parametrize("every, rerun", [(0, []), (1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3])])
def test_every_kth_block_is_recomputed_with_identical_gradients(every, rerun):
    ref, model = Blocks(), Blocks()
    set_recompute(model, every)
    calls: list[int] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    x = torch.randn(4, 8)
    ref(x).square().sum().backward()
    model(x).square().sum().backward()
    assert sorted(calls) == sorted([*range(5), *rerun])  # a recomputed block runs again in the backward pass
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_a_model_without_a_switch_is_refused_and_a_declared_switch_is_used():
    import dtx

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ConfigError, match="recompute"):
        set_recompute(Plain(), 1)
    set_recompute(Plain(), 0)  # nothing asked, nothing needed
    model = dtx.create_model("DiT-S/2", input_size=8, depth=4)
    set_recompute(model, 2)
    assert model.blocks.recompute_every == 2
    hdit = dtx.create_model("HDiT", input_size=16, patch_size=2, in_channels=1, depths=[2, 1], widths=[32, 64],
                            d_ffs=[48, 96], mapping_width=32, mapping_depth=1,
                            self_attns=[{"type": "global", "d_head": 16}] * 2)
    set_recompute(hdit, 2)  # HDiT's own switch: layers 0 and 2 in forward order (down 0, down 1, middle)
    assert [layer.checkpointing for level in [*hdit.down_levels, hdit.mid_level] for layer in level] == [True, False,
                                                                                                        True]


# -- compile switch --------------------------------------------------------------------------------------------

def test_compile_modes_and_reasons():
    assert check_compile_mode(True) == "on" and check_compile_mode(False) == "off"
    with pytest.raises(ConfigError, match="compile"):
        check_compile_mode("fast")
    assert "CUDA only" in eager_reason("auto", "cpu")
    assert eager_reason("off", "cpu") == "compile=off"
    model = nn.Linear(2, 2)
    same, reason = compile_model(model, "auto", "cpu")
    assert same is model and reason


def test_compiled_model_falls_back_to_eager_on_compiler_errors(monkeypatch, caplog):
    from torch._dynamo.exc import Unsupported

    def broken(*args, **kwargs):
        raise Unsupported("no kernels today")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: broken)
    model = nn.Linear(3, 2)
    wrapped = CompiledModel(model)
    x = torch.randn(4, 3)
    torch.testing.assert_close(wrapped(x), model(x))
    assert "no kernels today" in wrapped.eager_reason
    assert wrapped.weight is model.weight  # attributes come from the eager model
    assert "torch.compile failed" in caplog.text


def test_compiled_model_lets_model_errors_through(monkeypatch):
    def shape_error(*args, **kwargs):
        raise ShapeError("bad input")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: shape_error)
    wrapped = CompiledModel(nn.Linear(3, 2))
    with pytest.raises(ShapeError):
        wrapped(torch.randn(1, 3))
    assert wrapped.eager_reason is None


@pytest.mark.slow
def test_compile_on_cpu_matches_eager():
    if eager_reason("on", "cpu") is not None:
        pytest.skip(eager_reason("on", "cpu"))
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    runner, reason = compile_model(model, "on", "cpu")
    x = torch.randn(4, 8)
    torch.testing.assert_close(runner(x), model(x), rtol=1e-5, atol=1e-5)  # compiled or fallen back: same values
    assert reason is None
    if runner.eager_reason is not None:  # inductor itself failed here (e.g. no working C toolchain in this venv)
        pytest.skip(runner.eager_reason)


# -- the command -----------------------------------------------------------------------------------------------

def test_bench_quick_smoke_reports_cost_interface_flops(capsys):
    code = main(["bench", *TINY, "--quick"])
    out = capsys.readouterr().out
    assert code == 0
    rows = _json_lines(out)
    assert [r["mode"] for r in rows] == ["forward", "train"]
    cost = model_cost("DiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=2)
    fwd, train = rows
    assert fwd["gflops_per_sample"] == pytest.approx(cost.flops / 1e9)
    assert train["gflops_per_sample"] == pytest.approx(3 * cost.flops / 1e9)
    for r in rows:
        assert r["batch"] == 2 and r["repeats"] == 1 and r["input_shape"] == [4, 8, 8]
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["ms"] * 1e3, rel=1e-3)
        assert r["tflops"] == pytest.approx(r["gflops_per_sample"] * 1e9 * r["batch"] / (r["ms"] / 1e3) / 1e12,
                                            rel=1e-3)
        assert "mfu" not in r and r["compile"] == "off" and r["eager_reason"]
    assert "MFU omitted" in out and "samples/s" in out


def test_bench_recipe_takes_its_model_and_data_shape(capsys):
    assert main(["bench", "dit-digits", "--quick", "--mode", "forward", "--json"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert row["model"] == "DiT" and row["input_shape"] == [1, 8, 8] and row["batch"] == 2


def test_bench_compare_reports_the_interleaved_ratio(capsys):
    code = main(["bench", *TINY, "--quick", "--repeats", "3", "--mode", "train", "--json",
                 "--compare", "recompute=none", "recompute=every-2,batch=3"])
    rows = _json_lines(capsys.readouterr().out)
    assert code == 0
    a, b, ratio = rows
    assert (a["recompute"], b["recompute"]) == (0, 2) and (a["batch"], b["batch"]) == (2, 3)
    assert ratio["bench"] == "dtx-compare" and ratio["rounds"] == 3
    assert ratio["a"] == "recompute=none" and ratio["ratio"] > 0 and ratio["cpu_ratio"] > 0


def test_measurement_row_computes_mfu_against_the_peak(monkeypatch):
    import dtx.costs
    from dtx.commands.bench import Setup, Workload, measurement_row

    monkeypatch.setattr(dtx.costs, "device_peak_tflops", lambda device, precision: 100.0)
    work = Workload(Setup(batch=4), None, {}, flops_per_sample=2_000_000_000, flops_method="analytic",
                    input_shape=[4, 32, 32], precision="bf16", compiled=True, eager_reason=None)
    row = measurement_row("M", work, "train", [(40.0, 1.0), (50.0, 1.0), (60.0, 1.0)], 0.0, torch.device("cpu"), 1)
    flops = 3 * 2e9 * 4
    assert row["ms"] == 50.0 and row["peak_tflops"] == 100.0
    assert row["mfu"] == pytest.approx(flops / 0.05 / 100e12)


@pytest.mark.parametrize("argv, fragments", [
    (["--batch", "0"], ["--batch", "positive"]),
    (["--repeats", "0"], ["--repeats"]),
    (["--compile", "fast"], ["--compile", "auto, on, off"]),
    (["--precision", "fp8"], ["--precision"]),
    (["--recompute", "some"], ["--recompute"]),
    (["--checkpointing", "all"], ["--checkpointing", "renamed", "--recompute"]),
    (["--compare", "batch", "batch=2"], ["--compare", "key=value"]),
    (["--compare", "batch=0", "batch=2"], ["--compare batch", "positive"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], ["--device"]),
    (["--frames", "4"], ["num_frames", "--frames"]),
])
def test_bad_input_is_one_line_naming_the_option(capsys, argv, fragments):
    code = main(["bench", *TINY, "--quick", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("dtx: error:") and len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


def test_unknown_name_is_one_line(capsys):
    assert main(["bench", "NoSuchModel-X"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtx: error:") and "NoSuchModel-X" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda_reports_mfu(capsys):
    assert main(["bench", "DiT-S/2", "--quick", "--device", "cuda", "--json"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    known = gpu_peak_tflops(torch.cuda.get_device_name(), "bf16") is not None
    for r in rows:
        assert r["precision"] == "bf16" and r["compile"] == "on"
        if known:
            assert r["mfu"] == pytest.approx(r["tflops"] / r["peak_tflops"])
