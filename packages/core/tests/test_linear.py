"""dtx's Linear: nn.Linear's parameters and values, with CPU float32 products in oneDNN (forward and backward),
checked against float64 closed forms; every other input takes PyTorch's own F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtx.errors import ConfigError
from dtx.layers import Linear, linear, linear_backend, onednn_available, use_linear_backend
from dtx.training.compile import compile_model, eager_reason

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN linear")


def _reference_grads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, g: torch.Tensor):
    """y = x W^T + b in float64 and the closed-form gradients for an upstream gradient g."""
    x64, w64, g64 = x.double(), w.double(), g.double()
    y = x64 @ w64.T + (b.double() if b is not None else 0)
    gx = g64 @ w64
    gw = g64.reshape(-1, g.shape[-1]).T @ x64.reshape(-1, x.shape[-1])
    gb = g64.reshape(-1, g.shape[-1]).sum(0) if b is not None else None
    return y, gx, gw, gb


@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_the_float64_closed_form(shape, bias):
    torch.manual_seed(0)
    layer = Linear(16, 24, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 24)
    y = layer(x)
    y.backward(g)
    ref_y, gx, gw, gb = _reference_grads(x.detach(), layer.weight.detach(), layer.bias, g)
    assert y.shape == (*shape[:-1], 24) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), gw, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), gb, rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_frozen_operands():
    torch.manual_seed(1)
    w = torch.randn(6, 9)
    x = torch.randn(4, 9, 3).transpose(1, 2)  # (4, 3, 9), not contiguous
    g = torch.randn(4, 3, 6)
    ref_y, gx, gw, _ = _reference_grads(x, w, None, g)
    xr = x.clone().requires_grad_(True)
    y = linear(xr, w)  # frozen weight: only the input's gradient
    y.backward(g)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr.grad.double(), gx, rtol=1e-5, atol=1e-5)
    wr = w.clone().requires_grad_(True)
    linear(x, wr).backward(g)  # input without grad: only the weight's
    torch.testing.assert_close(wr.grad.double(), gw, rtol=1e-5, atol=1e-5)


def test_is_an_nn_linear_with_its_state_dict_and_init():
    torch.manual_seed(2)
    ours = Linear(5, 3)
    torch.manual_seed(2)
    plain = nn.Linear(5, 3)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)


def _op_names(fn) -> list[str]:
    with torch.autograd.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.function_events]


@needs_onednn
def test_cpu_float32_products_run_in_onednn_and_aten_backend_keeps_pytorch_dispatch():
    layer = Linear(32, 48)
    x = torch.randn(10, 32, requires_grad=True)
    with use_linear_backend("onednn"):
        names = _op_names(lambda: layer(x).sum().backward())
    assert names.count("mkldnn::_linear_pointwise") == 3  # forward, input grad, weight grad
    assert not {"aten::addmm", "aten::mm"} & set(names)
    with use_linear_backend("aten"):
        assert linear_backend() == "aten"
        names = _op_names(lambda: layer(x).sum().backward())
        y = layer(x)
    assert "mkldnn::_linear_pointwise" not in names
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))


@needs_onednn
@pytest.mark.parametrize("onednn_wins", [True, False])
def test_auto_takes_onednn_only_where_the_processor_favours_it(monkeypatch, onednn_wins):
    """auto follows the CPU's flags (non-Intel x86 with AVX-512: oneDNN; Intel: PyTorch's MKL dispatch)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("dtx.layers.linear"), "_AUTO_ONEDNN", onednn_wins)
    layer, x = Linear(16, 8), torch.randn(4, 16, requires_grad=True)
    with use_linear_backend("auto"):
        names = _op_names(lambda: layer(x).sum().backward())
    assert ("mkldnn::_linear_pointwise" in names) == onednn_wins
    assert bool({"aten::addmm", "aten::mm"} & set(names)) != onednn_wins


def test_autocast_and_other_dtypes_take_f_linear():
    layer = Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):
        expected = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(y, expected)
    double = Linear(8, 4).double()
    xd = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(double(xd), F.linear(xd, double.weight, double.bias))


def test_bad_backend_names_are_config_errors(monkeypatch):
    monkeypatch.setenv("DTX_LINEAR", "blas")
    with pytest.raises(ConfigError, match="DTX_LINEAR='blas'"):
        Linear(2, 2)(torch.randn(1, 2))
    monkeypatch.setenv("DTX_LINEAR", "aten")
    assert linear_backend() == "aten"
    with pytest.raises(ConfigError, match="linear backend 'mkl'"):
        with use_linear_backend("mkl"):
            pass


@pytest.mark.slow
def test_compiled_model_matches_eager_values_and_gradients():
    if eager_reason("on", "cpu") is not None:
        pytest.skip(eager_reason("on", "cpu"))
    torch.manual_seed(3)
    model = nn.Sequential(Linear(8, 16), nn.GELU(), Linear(16, 8))
    twin = nn.Sequential(Linear(8, 16), nn.GELU(), Linear(16, 8))
    twin.load_state_dict(model.state_dict())
    runner, _ = compile_model(twin, "on", "cpu")
    x = torch.randn(2, 5, 8)
    model(x).square().sum().backward()
    runner(x).square().sum().backward()
    if runner.eager_reason is not None:  # inductor itself failed here (e.g. no working C toolchain in this venv)
        pytest.skip(runner.eager_reason)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)


def test_fc1_and_tanh_gelu_fuse_only_when_sampling_and_match_the_separate_pass():
    from dtx.layers.linear import fused_activations, linear_gelu_tanh, onednn_available, use_linear_backend

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 7, 16, generator=g), torch.randn(24, 16, generator=g) * 0.3, torch.randn(24, generator=g)
    separate = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
    with use_linear_backend("aten"):
        assert torch.equal(linear_gelu_tanh(x, w, b), separate)  # outside fused_activations: the plain pass
    with torch.no_grad(), fused_activations(), use_linear_backend("onednn" if onednn_available() else "aten"):
        fused = linear_gelu_tanh(x, w, b)
    assert fused.shape == (3, 7, 24)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
