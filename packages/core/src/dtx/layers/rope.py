"""Rotary position embeddings: axial on 2D token grids (k-diffusion image_transformer_v2 convention) and 1D over a
sequence index (Latte's and GenTron's temporal attention)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError


ROPE_THETA = 10000.0


def rope_angles(head_dim: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """[length, head_dim/2] rotary angles ``i * 10000^(-2k/head_dim)`` over positions i (pairs (k, k + hd/2), as
    ``apply_rotary`` rotates them)."""
    inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    return torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None]


def _centers(start: float, stop: float, num: int, device: torch.device | None = None) -> torch.Tensor:
    edges = torch.linspace(start, stop, num + 1, device=device)
    return (edges[:-1] + edges[1:]) / 2


def make_axial_pos(h: int, w: int, pixel_aspect_ratio: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
    """[h, w, 2] bin-centre positions (y, x); the longer axis spans [-1, 1], the shorter keeps the aspect ratio."""
    ar = h / (w * pixel_aspect_ratio)
    if ar >= 1:
        y0, y1, x0, x1 = -1.0, 1.0, -1 / ar, 1 / ar
    else:
        y0, y1, x0, x1 = -ar, ar, -1.0, 1.0
    ys, xs = _centers(y0, y1, h, device), _centers(x0, x1, w, device)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


def axial_rope_freqs(d_head: int, n_heads: int) -> torch.Tensor:
    """[n_heads, d_head/8] log-spaced frequencies over [pi, 10 pi), interleaved across heads."""
    freqs = torch.linspace(math.log(math.pi), math.log(10 * math.pi), n_heads * d_head // 8 + 1)[:-1].exp()
    return freqs.view(d_head // 8, n_heads).T.contiguous()


def apply_rotary(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i+d) of the first 2d dims of ``x`` by ``theta`` [..., d] in float32; the rest pass through."""
    d = theta.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2, rest = x[..., :d].to(dtype), x[..., d:2 * d].to(dtype), x[..., 2 * d:]
    cos, sin = theta.cos().to(dtype), theta.sin().to(dtype)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    return torch.cat([y1.to(x.dtype), y2.to(x.dtype), rest], dim=-1)


class AxialRoPE(nn.Module):
    """Axial RoPE for heads of size ``d_head``: a quarter of each head rotates with y, a quarter with x."""

    def __init__(self, d_head: int, n_heads: int) -> None:
        super().__init__()
        if d_head % 8:
            raise ConfigError(f"axial RoPE needs d_head divisible by 8, got {d_head}")
        self.register_buffer("freqs", axial_rope_freqs(d_head, n_heads))

    def theta(self, pos: torch.Tensor) -> torch.Tensor:
        """Angles [..., n_heads, d_head/4] for positions [..., 2] (y, x)."""
        ty = pos[..., None, 0:1] * self.freqs.to(pos.dtype)
        tx = pos[..., None, 1:2] * self.freqs.to(pos.dtype)
        return torch.cat([ty, tx], dim=-1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``x`` [..., n_heads, d_head] heads-last with ``pos`` [..., 2] matching its leading axes."""
        return apply_rotary(x, self.theta(pos.float()))
