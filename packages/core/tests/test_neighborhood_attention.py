"""2D neighborhood attention: the PyTorch path against a brute-force loop over queries, NATTEN, and the dispatcher."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

import dtx.attention as A
from dtx.errors import ConfigError, ShapeError

HAS_NATTEN = importlib.util.find_spec("natten") is not None
# NATTEN on CPU runs unfused FlexAttention, which warns about it on every first call
quiet_flex = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def clamped_start(i: int, kernel: int, length: int) -> int:
    """NATTEN's window start along one axis (dilation 1): clamp(i - floor(k/2), 0, L - k)."""
    return min(max(i - kernel // 2, 0), length - kernel)


def brute_force_na(q, k, v, kernel, scale=None):
    """Loop over every query; each attends to the k_h x k_w keys of its border-clamped window. Differentiable."""
    b, h, w, heads, d = q.shape
    kh, kw = kernel
    scale = d ** -0.5 if scale is None else scale
    rows = []
    for i in range(h):
        si = clamped_start(i, kh, h)
        cols = []
        for j in range(w):
            sj = clamped_start(j, kw, w)
            keys = k[:, si:si + kh, sj:sj + kw].reshape(b, kh * kw, heads, d)
            vals = v[:, si:si + kh, sj:sj + kw].reshape(b, kh * kw, heads, v.shape[-1])
            logits = torch.einsum("bhd,bnhd->bhn", q[:, i, j], keys) * scale
            weights = torch.exp(logits - logits.amax(-1, keepdim=True))
            weights = weights / weights.sum(-1, keepdim=True)
            cols.append(torch.einsum("bhn,bnhd->bhd", weights, vals))
        rows.append(torch.stack(cols, dim=1))
    return torch.stack(rows, dim=1)


def global_attention(q, k, v, scale=None):
    b, h, w, heads, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    qf, kf, vf = (t.reshape(b, h * w, heads, -1) for t in (q, k, v))
    weights = (torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale).softmax(-1)
    return torch.einsum("bhnm,bmhd->bnhd", weights, vf).reshape(b, h, w, heads, -1)


def _qkv(shape, dtype=torch.float32, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    b, h, w, heads, d = shape
    return (torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype),
            torch.randn(b, h, w, heads, dv or d, generator=g, dtype=dtype))


def test_window_starts_hand_computed():
    # L=5, k=3: queries 0..4 start at 0,0,1,2,2; L=6, k=4 (even: left radius 2, right radius 1): 0,0,0,1,2,2
    assert A.window_starts(5, 3).tolist() == [0, 0, 1, 2, 2]
    assert A.window_starts(6, 4).tolist() == [0, 0, 0, 1, 2, 2]
    assert A.window_starts(4, 4).tolist() == [0, 0, 0, 0]


CASES = {  # name: (map H, W, kernel)
    "odd square": (5, 5, 3),
    "even square": (6, 6, 4),
    "odd non-square": (4, 7, 3),
    "even non-square": (7, 5, (2, 4)),
    "mixed kernel": (6, 5, (5, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torch_path_equals_brute_force(name):
    h, w, kernel = CASES[name]
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    q, k, v = _qkv((2, h, w, 3, 4), torch.float64, dv=5)
    out = A.neighborhood_attention_torch(q, k, v, kernel, scale=0.7)
    assert out.shape == (2, h, w, 3, 5)
    torch.testing.assert_close(out, brute_force_na(q, k, v, kernel, scale=0.7), atol=1e-12, rtol=0)


def test_kernel_equal_to_map_is_global_attention():
    q, k, v = _qkv((1, 4, 6, 2, 8), torch.float64)
    torch.testing.assert_close(A.neighborhood_attention_torch(q, k, v, (4, 6)), global_attention(q, k, v),
                               atol=1e-12, rtol=0)


def test_kernel_larger_than_map_is_clamped_to_global_attention():
    q, k, v = _qkv((1, 3, 5, 2, 8), torch.float64)
    expected = global_attention(q, k, v)
    torch.testing.assert_close(A.neighborhood_attention_torch(q, k, v, 7), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(A.neighborhood_attention(q, k, v, (9, 5), backend="torch"), expected,
                               atol=1e-12, rtol=0)
    # clamped per axis: a 7x3 kernel on a 5x6 map is a 5x3 neighborhood
    q, k, v = _qkv((1, 5, 6, 2, 4), torch.float64, seed=1)
    torch.testing.assert_close(A.neighborhood_attention_torch(q, k, v, (7, 3)), brute_force_na(q, k, v, (5, 3)),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", [3, (2, 4)])
def test_torch_path_gradients_equal_brute_force(kernel):
    kernel_t = (kernel, kernel) if isinstance(kernel, int) else kernel
    q, k, v = (t.requires_grad_() for t in _qkv((1, 5, 6, 2, 4), torch.float64, seed=2))
    probe = torch.randn(1, 5, 6, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((A.neighborhood_attention_torch(q, k, v, kernel, 0.8) * probe).sum(), (q, k, v))
    expected = torch.autograd.grad((brute_force_na(q, k, v, kernel_t, 0.8) * probe).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_low_precision_inputs_come_back_in_their_dtype():
    q, k, v = _qkv((1, 4, 4, 2, 8))
    out = A.neighborhood_attention_torch(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), brute_force_na(q, k, v, (3, 3)), atol=3e-2, rtol=0)


@quiet_flex
@pytest.mark.skipif(not HAS_NATTEN, reason="natten is not installed")
@pytest.mark.parametrize("shape,kernel", [((5, 6), (3, 3)), ((6, 5), (4, 2)), ((4, 5), (4, 5))])
def test_torch_path_equals_natten_forward(shape, kernel):
    import natten

    q, k, v = _qkv((1, *shape, 2, 8), seed=5)
    expected = natten.na2d(q, k, v, kernel_size=kernel, scale=0.6)
    torch.testing.assert_close(A.neighborhood_attention_torch(q, k, v, kernel, 0.6), expected, atol=1e-5, rtol=0)


class _Recorder:
    """Wraps a function and counts calls, to see which path the dispatcher took."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.fixture
def fake_natten(monkeypatch):
    """An installed-looking NATTEN (>= 0.20 API) whose na2d records its calls and computes the brute force."""
    def na2d(q, k, v, kernel_size, scale):
        return brute_force_na(q, k, v, kernel_size, scale)

    recorder = _Recorder(na2d)
    monkeypatch.setattr(A, "_natten", lambda: types.SimpleNamespace(na2d=recorder))
    torch_path = _Recorder(A.neighborhood_attention_torch)
    monkeypatch.setattr(A, "neighborhood_attention_torch", torch_path)
    monkeypatch.setattr(A, "MASKED_MAX_LOGITS", 0)  # these tests follow NATTEN vs the gather path
    return recorder, torch_path


def test_dispatcher_keeps_natten_off_on_cpu_unless_asked(fake_natten):
    """On CPU NATTEN's path is slower than the core's and has no backward: auto never takes it; backend="natten" does,
    with the kernel clamped to the map first."""
    natten_calls, torch_calls = fake_natten
    q, k, v = _qkv((1, 5, 4, 2, 8))
    with torch.no_grad():
        auto = A.neighborhood_attention(q, k, v, 9)
    assert not natten_calls.calls and len(torch_calls.calls) == 1
    out = A.neighborhood_attention(q, k, v, 9, backend="natten")
    assert len(natten_calls.calls) == 1 and natten_calls.calls[0][1] == {"kernel_size": (5, 4), "scale": 8 ** -0.5}
    for result in (auto, out):
        torch.testing.assert_close(result, global_attention(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_dispatcher_uses_torch_on_cpu_when_any_input_needs_grad(fake_natten, which):
    natten_calls, torch_calls = fake_natten
    qkv = dict(zip("qkv", _qkv((1, 5, 4, 2, 8))))
    qkv[which].requires_grad_()
    out = A.neighborhood_attention(qkv["q"], qkv["k"], qkv["v"], 3)
    out.sum().backward()
    assert len(torch_calls.calls) == 1 and not natten_calls.calls
    assert qkv[which].grad is not None


def test_dispatcher_backend_choice_and_errors(fake_natten, monkeypatch):
    natten_calls, torch_calls = fake_natten
    q, k, v = _qkv((1, 4, 4, 2, 8))
    A.neighborhood_attention(q, k, v, 1)  # NATTEN needs kernel >= 2
    A.neighborhood_attention(q, k, v, 3, backend="torch")
    assert len(torch_calls.calls) == 2 and not natten_calls.calls
    with pytest.raises(ConfigError, match="'flex' is not one of auto, natten, torch"):
        A.neighborhood_attention(q, k, v, 3, backend="flex")
    with pytest.raises(ConfigError, match="kernel size must be positive"):
        A.neighborhood_attention(q, k, v, 0)
    with pytest.raises(ShapeError, match=r"\[B, H, W, heads, D\]"):
        A.neighborhood_attention(q[0], k[0], v[0], 3)
    monkeypatch.setattr(A, "_natten", lambda: None)
    with pytest.raises(ConfigError, match="natten is required"):
        A.neighborhood_attention(q, k, v, 3, backend="natten")
    torch.testing.assert_close(A.neighborhood_attention(q, k, v, 3), brute_force_na(q, k, v, (3, 3)),
                               atol=1e-5, rtol=0)


@quiet_flex
@pytest.mark.skipif(not HAS_NATTEN, reason="natten is not installed")
def test_dispatcher_with_real_natten_picks_both_paths(monkeypatch):
    natten_path = _Recorder(A._natten_na2d)
    monkeypatch.setattr(A, "_natten_na2d", natten_path)
    q, k, v = _qkv((1, 6, 5, 2, 8), seed=7)
    out = A.neighborhood_attention(q, k, v, 3, backend="natten")
    assert len(natten_path.calls) == 1
    torch.testing.assert_close(out, brute_force_na(q, k, v, (3, 3)), atol=1e-5, rtol=0)
    q.requires_grad_()
    A.neighborhood_attention(q, k, v, 3).sum().backward()  # auto on CPU: the core's path (NATTEN's has no backward)
    assert len(natten_path.calls) == 1 and q.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_NATTEN), reason="needs CUDA and natten")
def test_cuda_dispatcher_uses_natten_with_grad_and_matches_brute_force(monkeypatch):
    natten_path = _Recorder(A._natten_na2d)
    monkeypatch.setattr(A, "_natten_na2d", natten_path)
    q, k, v = _qkv((1, 6, 5, 2, 32), seed=8)
    qc, kc, vc = (t.cuda().half().requires_grad_() for t in (q, k, v))
    out = A.neighborhood_attention(qc, kc, vc, 3)
    out.float().sum().backward()
    assert len(natten_path.calls) == 1 and qc.grad is not None
    expected = brute_force_na(*(t.half().double() for t in (q, k, v)), (3, 3))
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-2, rtol=0)


@pytest.mark.parametrize("shape,kernel", [((2, 8, 8, 2, 8), (7, 7)), ((1, 5, 9, 3, 4), (3, 5)), ((1, 4, 4, 1, 8), (9, 9))])
def test_masked_path_equals_brute_force_with_gradients(shape, kernel):
    q, k, v = (t.double().requires_grad_() for t in _qkv(shape, seed=3))
    out = A.neighborhood_attention_masked(q, k, v, kernel, 0.7)
    ref = brute_force_na(q, k, v, tuple(min(a, b) for a, b in zip(kernel, shape[1:3])), 0.7)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0)


def test_auto_uses_the_masked_path_on_small_maps_and_gathers_on_large(monkeypatch):
    masked, gather = _Recorder(A.neighborhood_attention_masked), _Recorder(A.neighborhood_attention_torch)
    monkeypatch.setattr(A, "neighborhood_attention_masked", masked)
    monkeypatch.setattr(A, "neighborhood_attention_torch", gather)
    monkeypatch.setattr(A, "_natten", lambda: None)
    q, k, v = _qkv((1, 8, 8, 2, 8))
    A.neighborhood_attention(q, k, v, 3)
    monkeypatch.setattr(A, "MASKED_MAX_LOGITS", 2 * 64 * 64 - 1)  # [1, 8, 8, 2 heads]: 2 x 64^2 logits
    A.neighborhood_attention(q, k, v, 3)
    A.neighborhood_attention(q, k, v, 3, backend="masked")
    assert (len(masked.calls), len(gather.calls)) == (2, 1)
