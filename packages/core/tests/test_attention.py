"""Dense attention dispatch (dtx.attention.attention) against a naive softmax attention written here."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import dtx.attention as A
from dtx.errors import ConfigError, ShapeError

B, H, NQ, NK, D, DV = 2, 3, 5, 7, 8, 6


def naive_attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v in float64; bool masks: True = attend; [B, Nk] masks pad keys."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if mask is not None:
        if mask.ndim == 2 and mask.shape == (q.shape[0], k.shape[2]):
            mask = mask[:, None, None, :]
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.double()
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, NQ, D, generator=g), torch.randn(B, H, NK, D, generator=g),
            torch.randn(B, H, NK, DV, generator=g))


def _masks():
    g = torch.Generator().manual_seed(1)
    full_bool = torch.rand(B, H, NQ, NK, generator=g) > 0.4
    full_bool[..., 0] = True  # every query keeps at least one key
    shared_bool = torch.rand(NQ, NK, generator=g) > 0.5
    shared_bool[:, -1] = True
    additive = torch.randn(B, 1, NQ, NK, generator=g) * 3
    additive[0, 0, 1, 2] = float("-inf")
    key_pad = torch.ones(B, NK, dtype=torch.bool)
    key_pad[0, 4:] = False
    key_pad[1, :2] = False
    key_pad_float = torch.zeros(B, NK).masked_fill(~key_pad, float("-inf"))
    return {"none": None, "bool[B,H,Nq,Nk]": full_bool, "bool[Nq,Nk]": shared_bool, "float[B,1,Nq,Nk]": additive,
            "keypad bool[B,Nk]": key_pad, "keypad float[B,Nk]": key_pad_float,
            "float64 additive": additive.double()}


@pytest.fixture
def no_flash(monkeypatch):
    """Make flash-attn unimportable whatever is installed, and forget the cached import attempt."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    A._flash_attn_func.cache_clear()
    yield
    A._flash_attn_func.cache_clear()


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@pytest.mark.parametrize("mask_name", list(_masks()))
def test_attention_matches_naive_softmax(monkeypatch, backend, mask_name):
    monkeypatch.setenv("DTX_ATTENTION", backend)
    q, k, v = _qkv()
    mask = _masks()[mask_name]
    out = A.attention(q, k, v, mask=mask)
    assert out.shape == (B, H, NQ, DV) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_explicit_backend_and_custom_scale(backend):
    q, k, v = _qkv(3)
    out = A.attention(q, k, v, scale=0.3, backend=backend)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, scale=0.3), atol=1e-5, rtol=0)


def test_padded_keys_do_not_influence_output():
    q, k, v = _qkv(4)
    key_pad = torch.ones(B, NK, dtype=torch.bool)
    key_pad[:, -3:] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -3:] += 100.0
    v2[:, :, -3:] -= 50.0
    for backend in ("math", "sdpa"):
        torch.testing.assert_close(A.attention(q, k, v, key_pad, backend=backend),
                                   A.attention(q, k2, v2, key_pad, backend=backend), atol=1e-6, rtol=0)


def _ops(fn) -> set[str]:
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.function_events}


@pytest.mark.parametrize("dtype, kind", [(torch.float32, "float32"), (torch.bfloat16, "reduced")])
def test_cpu_auto_runs_short_sequences_explicitly_and_long_ones_in_sdpa(monkeypatch, dtype, kind):
    monkeypatch.delenv("DTX_ATTENTION", raising=False)
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    side = int(A.CPU_EXPLICIT_MAX_LOGITS[kind] ** 0.5)
    short = [torch.randn(1, 2, side, 8, dtype=dtype) for _ in range(3)]
    long = [torch.randn(1, 2, side + 1, 8, dtype=dtype) for _ in range(3)]
    assert flash not in _ops(lambda: A.attention(*short)) and "aten::softmax" in _ops(lambda: A.attention(*short))
    assert flash in _ops(lambda: A.attention(*long))
    assert flash in _ops(lambda: A.attention(*short, backend="sdpa"))


def test_explicit_attention_bf16_values_and_gradients_match_float64():
    """bf16 products (float32 accumulation) around a float32 softmax: within bf16 rounding of the exact result."""
    q, k, v = (t.bfloat16().requires_grad_(True) for t in _qkv(6))
    g = torch.randn(B, H, NQ, DV).bfloat16()
    out = A.explicit_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    out.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = naive_attention(q64, k64, v64)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=2e-2)
    for a, b in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_query_with_every_key_masked_gets_zeros(backend):
    q, k, v = _qkv(5)
    mask = torch.ones(B, 1, NQ, NK, dtype=torch.bool)
    mask[1, 0, 2] = False
    out = A.attention(q, k, v, mask, backend=backend)
    assert torch.equal(out[1, :, 2], torch.zeros(H, DV))
    keep = torch.ones(B, H, NQ, dtype=torch.bool)
    keep[1, :, 2] = False
    torch.testing.assert_close(out[keep].double(), naive_attention(q, k, v)[keep], atol=1e-5, rtol=0)


def test_flash_without_flash_attn_is_a_config_error(monkeypatch, no_flash):
    monkeypatch.setenv("DTX_ATTENTION", "flash")
    assert not A.has_flash_attn()
    with pytest.raises(ConfigError, match="flash-attn is not installed"):
        A.attention(*_qkv())


@pytest.mark.parametrize("value", ["fast", "xformers"])
def test_invalid_backend_value_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("DTX_ATTENTION", value)
    with pytest.raises(ConfigError, match=f"DTX_ATTENTION='{value}' is not one of auto, sdpa, flash, math"):
        A.attention(*_qkv())
    monkeypatch.delenv("DTX_ATTENTION")
    with pytest.raises(ConfigError, match=f"backend='{value}'"):
        A.attention(*_qkv(), backend=value)


def test_backend_env_is_case_insensitive_and_empty_means_auto(monkeypatch):
    monkeypatch.setenv("DTX_ATTENTION", "MATH")
    assert A.attention_backend() == "math"
    monkeypatch.setenv("DTX_ATTENTION", "")
    assert A.attention_backend() == "auto"


def test_shape_errors():
    q, k, v = _qkv()
    with pytest.raises(ShapeError, match=r"expects \[B, H, N, D\]"):
        A.attention(q[0], k[0], v[0])
    with pytest.raises(ShapeError, match=f"does not match {NK} keys"):
        A.attention(q, k, v, mask=torch.ones(B, NK + 1, dtype=torch.bool))


@pytest.mark.slow
@pytest.mark.integration
def test_imports_and_runs_without_flash_attn_natten_or_gpu():
    """A fresh interpreter where flash_attn and natten cannot be imported and CUDA is hidden."""
    script = textwrap.dedent("""
        import sys
        sys.modules["flash_attn"] = None
        sys.modules["natten"] = None
        import torch, dtx, dtx.attention as A, dtx.layers
        assert not A.has_flash_attn() and not A.has_natten() and not torch.cuda.is_available()
        q = torch.randn(1, 2, 4, 8)
        assert A.attention(q, q, q).shape == (1, 2, 4, 8)
        x = torch.randn(1, 4, 4, 2, 8, requires_grad=True)
        A.neighborhood_attention(x, x, x, 3).sum().backward()
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_auto_backend_matches_naive(dtype):
    """On CUDA without a mask "auto" may take flash-attn (when installed) or SDPA; both must match the reference."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(B, H, n, 64, generator=g) for n in (NQ, NK, NK))
    out = A.attention(*(t.cuda().to(dtype) for t in (q, k, v)))
    assert out.dtype == dtype and out.is_cuda
    reference = naive_attention(*(t.to(dtype).double() for t in (q, k, v)))
    torch.testing.assert_close(out.double().cpu(), reference, atol=2e-2, rtol=0)
