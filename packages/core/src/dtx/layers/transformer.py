"""Transformer sub-blocks with timm's state-dict names (``qkv``/``proj``, ``fc1``/``fc2``), over dtx attention dispatch."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..attention import attention
from ..errors import ConfigError, ShapeError
from .context_parallel import ContextGroup
from .linear import Linear, linear_gelu_tanh
from .rope import apply_rotary


Broadcast = Callable[[Callable[[], torch.Tensor], torch.Tensor], torch.Tensor]  # (compute, input) -> output


class Attention(nn.Module):
    """Multi-head self-attention; qkv rows are [q; k; v] with heads contiguous, softmax scale d_head^-0.5; optional
    rotary angles ``theta`` [N, d_head/2] (e.g. ``rope_angles``) rotate q and k, and optional ``context`` tokens
    [B, n, D] join the keys and values through the same projection (Latte's condition tokens; their queries and
    outputs are never used). ``mask`` covers every key, the context's last."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim, bias=proj_bias)
        self._broadcast: Broadcast | None = None
        self._context_group: ContextGroup | None = None

    def set_broadcast(self, broadcast: "Broadcast | None") -> None:
        """Let ``broadcast(compute, x)`` return this layer's output (computed, or reused from an earlier sampling step:
        ``dtx.layers.attention_broadcast``); None: always compute."""
        self._broadcast = broadcast

    def set_context_group(self, group: ContextGroup | None) -> None:
        """Attend over a sequence split across the ranks of ``group`` (Ulysses: one all-to-all from the sequence
        split to a head split and one back; ``dtx.layers.context_parallel``); None: the sequence is local."""
        if group is not None:
            group.check_split(self.num_heads, "num_heads")
        self._context_group = group

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, L, d_head] of tokens [B, L, D]."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, theta: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        if self._broadcast is not None:
            return self._broadcast(lambda: self._attend(x, mask, theta, context), x)
        return self._attend(x, mask, theta, context)

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None, theta: torch.Tensor | None,
                context: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.heads(x)  # [B, H, L, hd]
        group, heads = self._context_group, slice(None)
        if group is not None:  # this rank's L / N tokens of every head -> all L tokens of its H / N heads
            q, k, v = (group.all_to_all(z, scatter_dim=1, gather_dim=2) for z in (q, k, v))  # [B, H/N, L*N, hd]
            heads = slice(group.rank * q.shape[1], (group.rank + 1) * q.shape[1])
        if theta is not None:
            theta = theta[heads] if theta.ndim == 3 else theta  # per-head angles [H, L, ...]: this rank's heads
            q, k = apply_rotary(q, theta), apply_rotary(k, theta)
        if context is not None:
            _, kc, vc = self.heads(context)  # [B, H, n, hd]
            k, v = torch.cat([k, kc[:, heads]], dim=2), torch.cat([v, vc[:, heads]], dim=2)  # [B, H, L + n, hd]
        x = attention(q, k, v, mask=mask)  # [B, H, L, hd]
        if group is not None:
            x = group.all_to_all(x, scatter_dim=2, gather_dim=1)  # [B, H, L, hd] for this rank's L tokens
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Multi-head attention from tokens to a context sequence (``q``, ``kv``, ``proj``), with a key padding mask.

    ``names`` renames the query and key-value projections for a checkpoint layout that spells them otherwise (PixArt:
    ``("q_linear", "kv_linear")``); the computation is the same."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True,
                 names: tuple[str, str] = ("q", "kv")) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self._names = names
        self.add_module(names[0], Linear(dim, dim, bias=qkv_bias))
        self.add_module(names[1], Linear(context_dim or dim, dim * 2, bias=qkv_bias))
        self.proj = Linear(dim, dim)
        self._broadcast: Broadcast | None = None

    def set_broadcast(self, broadcast: "Broadcast | None") -> None:
        """As ``Attention.set_broadcast``."""
        self._broadcast = broadcast

    @property
    def query(self) -> nn.Module:
        """The query projection (``q``, or as ``names`` calls it)."""
        return getattr(self, self._names[0])

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """Keys and values [B, L, 2D] of ``context`` [B, L, context_dim]: they depend on the context alone, so a
        sampler can compute them once per run and pass them as ``kv``."""
        return getattr(self, self._names[1])(context)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                kv: torch.Tensor | None = None) -> torch.Tensor:
        """Attend ``x`` [B, N, D] to ``context`` [B, L, context_dim], or to precomputed ``kv`` [B, L, 2D]."""
        if self._broadcast is not None:
            return self._broadcast(lambda: self._attend(x, context, mask, kv), x)
        return self._attend(x, context, mask, kv)

    def _attend(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None,
                kv: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        if kv is None:
            if context is None:
                raise ShapeError("CrossAttention needs a context or its precomputed kv")
            kv = self.project_context(context)
        if kv.ndim != 3 or kv.shape[0] != b or kv.shape[2] != 2 * c:
            raise ShapeError(f"cross-attention kv must be [{b}, L, {2 * c}], got {list(kv.shape)}")
        q = self.query(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv.reshape(b, kv.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = attention(q, k, v, mask=mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Two-layer MLP ``fc1 -> act -> fc2`` (timm's Mlp keys)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] | None = None,
                 out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer() if act_layer is not None else nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden_features, out_features or in_features)
        self._fuse = act_layer is None  # fc1 + tanh-GELU may run as one product (linear_gelu_tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fuse and type(self.fc1) is Linear:  # not when an adapter has replaced fc1
            return self.fc2(linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))
