"""Normalisation, modulation and gated feed-forward pieces: adaLN modulate, RMSNorm, AdaRMSNorm, GEGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample [N, D] vectors broadcast over tokens.

    One fused ``addcmul``: one pass over the activations and no intermediate instead of a multiply and an add."""
    scale = 1 + scale.unsqueeze(1)
    return x * scale if shift is None else torch.addcmul(shift.unsqueeze(1), x, scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's gated residual ``x + gate * y`` with a per-sample [N, D] gate, as one fused ``addcmul``."""
    return torch.addcmul(x, gate.unsqueeze(1), y)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x * scale / rms(x)`` computed in at least float32, returned in x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale.to(dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable ``scale`` (init 1), eps 1e-6."""

    def __init__(self, shape: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


class AdaRMSNorm(nn.Module):
    """RMSNorm whose scale is ``1 + Linear(cond)`` (zero-initialised, no bias), broadcast over spatial axes."""

    def __init__(self, features: int, cond_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.linear = Linear(cond_features, features, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale = self.linear(cond) + 1
        scale = scale.reshape(scale.shape[0], *([1] * (x.ndim - 2)), scale.shape[-1])
        return rms_norm(x, scale, self.eps)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """Split the last axis into [value, gate] halves and return ``value * GELU(gate)`` (exact GELU)."""
    value, gate = x.chunk(2, dim=-1)
    return value * F.gelu(gate)


class LinearGEGLU(Linear):
    """One Linear to 2*out features followed by GEGLU (rows [value; gate])."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features * 2, bias=bias)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return geglu(super().forward(x))
