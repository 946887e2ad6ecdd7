"""Attention dispatch: one entry point for dense attention and one for 2D neighborhood attention.

Dense: flash-attn when importable and the inputs are CUDA fp16/bf16 without a mask; on CPU, short sequences as
explicit products around a float32 softmax; else PyTorch SDPA. ``math`` is an explicit softmax reference in float32.
``DTX_ATTENTION=sdpa|flash|math`` forces a backend.
Neighborhood: NATTEN's kernels on CUDA; on CPU an exact dense-attention path with a window mask (small maps) or a
pure-PyTorch gather implementation with identical semantics (border-clamped windows of exactly k x k keys).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F

from .errors import ConfigError, ShapeError

BACKENDS = ("auto", "sdpa", "flash", "math")
NA_BACKENDS = ("auto", "natten", "torch", "masked")
#: neighborhood attention runs as dense attention with a window mask (BLAS-friendly, far faster on CPU than gathering
#: k x k windows, and exact) while its B x heads x n^2 logits stay within this many elements (512 MiB in fp32);
#: beyond that it gathers windows, whose memory grows with n k^2 instead of n^2
MASKED_MAX_LOGITS = 2 ** 27
#: on CPU, "auto" runs attention whose logits per head hold at most this many elements as
#: :func:`explicit_attention`: PyTorch's fused CPU kernel suits long sequences, but on short ones its forward +
#: backward is slower, most in bf16 (benchmarks/cpu_attention.py measures the switch points; docs/perf/cpu_attention.md)
CPU_EXPLICIT_MAX_LOGITS = {"float32": 128 * 128, "reduced": 256 * 256}


@lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:
        return None
    return flash_attn_func


@lru_cache(maxsize=None)
def _natten():
    try:
        import natten
    except Exception:
        return None
    return natten


def has_flash_attn() -> bool:
    return _flash_attn_func() is not None


def has_natten() -> bool:
    return _natten() is not None


def attention_backend(backend: str | None = None) -> str:
    """The dense backend to use: ``backend`` if given, else ``DTX_ATTENTION``, else "auto"; validated."""
    source = "backend" if backend is not None else "DTX_ATTENTION"
    value = (backend if backend is not None else os.environ.get("DTX_ATTENTION", "auto")).lower() or "auto"
    if value not in BACKENDS:
        raise ConfigError(f"{source}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def _mask_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _normalize_mask(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Accept a key-padding mask [B, Nk] or anything broadcastable to [B, H, Nq, Nk]; True/0.0 = attend."""
    if mask is None:
        return None
    b, nk = q.shape[0], k.shape[-2]
    if mask.ndim == 2 and mask.shape == (b, nk):
        mask = mask[:, None, None, :]
    if mask.shape[-1] != nk:
        raise ShapeError(f"attention mask {list(mask.shape)} does not match {nk} keys")
    return mask if mask.dtype == torch.bool else mask.to(q.dtype)  # SDPA wants bool or q's dtype


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """Reference softmax attention on [B, H, N, D] tensors, computed in at least float32."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    return explicit_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale).to(q.dtype)


def _cpu_explicit(q: torch.Tensor, k: torch.Tensor) -> bool:
    limit = CPU_EXPLICIT_MAX_LOGITS["reduced" if q.dtype in (torch.bfloat16, torch.float16) else "float32"]
    return q.device.type == "cpu" and q.shape[-2] * k.shape[-2] <= limit


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """Softmax attention as two batched products around a float32 softmax, the products in the inputs' dtype (what
    attention without a fused kernel computes under autocast). The CPU path for short sequences: see ``attention``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-2, -1)                                     # [B, H, Nq, Nk]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    if mask is not None:
        logits = logits + _mask_to_additive(mask, logits.dtype)
    weights = logits.softmax(-1)
    if mask is not None:  # a query with every key masked gets zeros (as SDPA), not NaN
        weights = weights.masked_fill(logits.amax(-1, keepdim=True) == float("-inf"), 0.0)
    return weights.to(v.dtype) @ v                                       # [B, H, Nq, Dv]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention on [B, H, N, D] (heads before tokens, as SDPA); returns [B, H, Nq, Dv].

    ``mask``: bool (True = attend) or additive float, broadcastable to [B, H, Nq, Nk], or a [B, Nk] key mask.
    ``scale`` defaults to D^-0.5.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"attention expects [B, H, N, D] tensors, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    mask = _normalize_mask(mask, q, k)
    backend = attention_backend(backend)
    if backend == "math":
        return math_attention(q, k, v, mask, scale)
    if backend == "auto" and _cpu_explicit(q, k):
        return explicit_attention(q, k, v, mask, scale)
    flash_ok = (mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                and q.shape[-1] <= 256 and q.shape[-1] == v.shape[-1])
    if backend == "flash" or (backend == "auto" and flash_ok):
        fn = _flash_attn_func()
        if fn is not None and flash_ok:
            out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
            return out.transpose(1, 2)
        if backend == "flash" and fn is None:
            raise ConfigError("DTX_ATTENTION=flash but flash-attn is not installed (pip install 'dtx-core[cuda]')")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# -- neighborhood attention -----------------------------------------------------------------------------------

def window_starts(length: int, kernel: int, device: torch.device | None = None) -> torch.Tensor:
    """Start of each position's window along one axis: clamp(i - k//2, 0, L - k) (NATTEN, dilation 1)."""
    i = torch.arange(length, device=device)
    return (i - kernel // 2).clamp(0, length - kernel)


def _check_kernel(kernel_size: int | tuple[int, int], h: int, w: int) -> tuple[int, int]:
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if kh < 1 or kw < 1:
        raise ConfigError(f"neighborhood kernel size must be positive, got {kernel_size}")
    return min(kh, h), min(kw, w)


def neighborhood_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 kernel_size: int | tuple[int, int], scale: float | None = None) -> torch.Tensor:
    """Pure-PyTorch 2D neighborhood attention on heads-last [B, H, W, heads, D]; O(n k^2) memory, full autograd."""
    b, h, w, nh, d = q.shape
    kh, kw = _check_kernel(kernel_size, h, w)
    scale = d ** -0.5 if scale is None else scale
    iy = window_starts(h, kh, q.device)[:, None] + torch.arange(kh, device=q.device)  # [H, kh]
    ix = window_starts(w, kw, q.device)[:, None] + torch.arange(kw, device=q.device)  # [W, kw]
    flat = (iy[:, None, :, None] * w + ix[None, :, None, :]).reshape(h * w, kh * kw)  # [HW, kh*kw]
    kf, vf = k.reshape(b, h * w, nh, d), v.reshape(b, h * w, nh, -1)
    k_win = kf[:, flat]  # [B, HW, kk, heads, D]
    v_win = vf[:, flat]
    qf = q.reshape(b, h * w, nh, d)
    dtype = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("bnhd,bnkhd->bnhk", qf.to(dtype), k_win.to(dtype)) * scale
    attn = logits.softmax(-1)
    out = torch.einsum("bnhk,bnkhd->bnhd", attn, v_win.to(dtype))
    return out.to(q.dtype).reshape(b, h, w, nh, -1)


@lru_cache(maxsize=32)
def neighborhood_mask(h: int, w: int, kh: int, kw: int, device: torch.device) -> torch.Tensor:
    """[HW, HW] bool: True where key j lies in query i's border-clamped kh x kw window (NATTEN's semantics)."""
    iy = window_starts(h, kh, device)[:, None] + torch.arange(kh, device=device)  # [H, kh]
    ix = window_starts(w, kw, device)[:, None] + torch.arange(kw, device=device)  # [W, kw]
    flat = (iy[:, None, :, None] * w + ix[None, :, None, :]).reshape(h * w, kh * kw)  # [HW, kh*kw]
    mask = torch.zeros(h * w, h * w, dtype=torch.bool, device=device)
    return mask.scatter_(1, flat, True)


def neighborhood_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  kernel_size: int | tuple[int, int], scale: float | None = None) -> torch.Tensor:
    """Neighborhood attention as dense SDPA with a window mask on heads-last [B, H, W, heads, D]; exact, autograd."""
    b, h, w, nh, d = q.shape
    kh, kw = _check_kernel(kernel_size, h, w)
    scale = d ** -0.5 if scale is None else scale
    mask = neighborhood_mask(h, w, kh, kw, q.device)
    qf, kf, vf = (t.reshape(b, h * w, nh, -1).transpose(1, 2) for t in (q, k, v))  # [B, heads, HW, D]
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)  # [B, heads, HW, Dv]
    return out.transpose(1, 2).reshape(b, h, w, nh, -1)


def natten_can_run(q: torch.Tensor, *others: torch.Tensor) -> bool:
    """NATTEN is used when installed and either on CUDA or, on CPU, when no input (q, and k, v if given) needs grad."""
    if not has_natten():
        return False
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, *others))
    return q.is_cuda or not needs_grad


def _natten_na2d(q, k, v, kernel: tuple[int, int], scale: float):
    natten = _natten()
    if hasattr(natten, "na2d"):  # NATTEN >= 0.20, heads-last layout
        return natten.na2d(q, k, v, kernel_size=kernel, scale=scale)
    if getattr(natten, "has_fused_na", lambda: False)():
        return natten.functional.na2d(q, k, v, kernel, scale=scale)
    qp, kp, vp = (t.permute(0, 3, 1, 2, 4) for t in (q, k, v))  # old unfused API: [B, heads, H, W, D], unscaled
    a = natten.functional.na2d_qk(qp * scale, kp, kernel).softmax(-1).to(v.dtype)
    return natten.functional.na2d_av(a, vp, kernel).permute(0, 2, 3, 1, 4)


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int | tuple[int, int],
                           scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """2D neighborhood attention on heads-last [B, H, W, heads, D] tensors.

    Each query attends to the k x k keys of its border-clamped window; a kernel larger than the map is clamped
    to the map (then it equals global attention). ``backend``: None/"auto", "natten", "masked" (dense SDPA with a
    window mask) or "torch" (gathered windows). Auto: NATTEN's kernels on CUDA; on CPU the masked path while its
    dense logits fit ``MASKED_MAX_LOGITS`` elements, else the gather path (NATTEN 0.21's CPU path has no backward
    and its forward is slower: the HDiT package README gives the measurement).
    """
    if q.ndim != 5 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ShapeError(f"neighborhood attention expects [B, H, W, heads, D] q/k/v, got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    kernel = _check_kernel(kernel_size, q.shape[1], q.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = backend or "auto"
    if backend not in NA_BACKENDS:
        raise ConfigError(f"neighborhood attention backend {backend!r} is not one of {', '.join(NA_BACKENDS)}")
    if backend == "natten" or (backend == "auto" and q.is_cuda and natten_can_run(q, k, v) and min(kernel) >= 2):
        if not has_natten():
            raise ConfigError("natten is required for backend='natten' (pip install 'dtx-core[natten]')")
        return _natten_na2d(q, k, v, kernel, scale)
    n = q.shape[1] * q.shape[2]
    if backend == "masked" or (backend == "auto" and q.shape[0] * q.shape[3] * n * n <= MASKED_MAX_LOGITS):
        return neighborhood_attention_masked(q, k, v, kernel, scale)
    return neighborhood_attention_torch(q, k, v, kernel, scale)
