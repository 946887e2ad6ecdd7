"""adaLN transformer blocks shared by every DiT-style family (DiT, Latte, GenTron): the adaLN(-Zero) block and the
adaLN-modulated final layer, with DiT's official state-dict names (``adaLN_modulation``, ``norm_final``, ``linear``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .linear import Linear
from .norms import gated_residual, modulate
from .transformer import Attention, Mlp


def layer_norm(dim: int, affine: bool) -> nn.LayerNorm:
    """DiT's LayerNorm: eps 1e-6, affine only where no adaLN modulation replaces it."""
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)


def residual(x: torch.Tensor, norm: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
             mod: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """One pre-norm residual sub-layer: ``x + gate * fn(modulate(norm(x), shift, scale))`` with ``mod`` = (shift,
    scale, gate) [N, D] each (adaLN-Zero), ``x + fn(modulate(norm(x)))`` with (shift, scale) (adaLN), or
    ``x + fn(norm(x))`` without ``mod`` (plain pre-norm)."""
    if mod is None:
        return x + fn(norm(x))
    h = fn(modulate(norm(x), mod[0], mod[1]))
    return gated_residual(x, mod[2], h) if len(mod) == 3 else x + h


class AdaLNBlock(nn.Module):
    """DiT's transformer block: self-attention and MLP sub-layers conditioned through adaptive LayerNorm on ``c``;
    ``gated`` adds adaLN-Zero's residual gates, ``modulated=False`` makes it a plain pre-norm block (affine norms,
    no ``adaLN_modulation``; ``c`` unused).

    The modulation vector is chunked as (shift, scale, gate) for attention, then for the MLP (gates only if gated).
    ``between`` (a residual sub-layer ``x -> x'``, e.g. GenTron's cross- and temporal attention) runs between the
    attention and the MLP, so families extend the block without copying it. ``theta`` (rotary angles) and
    ``context`` (tokens joining the keys and values, through the same pre-norm) go to the attention.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, gated: bool = True,
                 modulated: bool = True) -> None:
        super().__init__()
        self.gated = gated
        self.norm1 = layer_norm(hidden_size, affine=not modulated)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = layer_norm(hidden_size, affine=not modulated)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        chunks = 6 if gated else 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, chunks * hidden_size)) if modulated \
            else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None,
                between: Callable[[torch.Tensor], torch.Tensor] | None = None, theta: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        mod, split = None, 3 if self.gated else 2
        if self.adaLN_modulation is not None:
            mod = self.adaLN_modulation(c).chunk(2 * split, dim=1)  # (shift, scale[, gate]) for attention, MLP
        context = None if context is None else self.norm1(context)
        x = residual(x, self.norm1, lambda h: self.attn(h, theta=theta, context=context), mod and mod[:split])
        x = between(x) if between is not None else x
        return residual(x, self.norm2, self.mlp, mod and mod[split:])


class FinalLayer(nn.Module):
    """Norm, (shift, scale) modulation and a linear map to p*p*out_channels per token. The modulation is DiT's
    ``adaLN_modulation`` of ``c`` (``modulated``), PixArt's adaLN-single ``scale_shift_table`` (2, D) plus the
    timestep embedding ``c`` (``table``), or none (affine norm)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, modulated: bool = True,
                 table: bool = False) -> None:
        super().__init__()
        self.modulated = modulated and not table
        self.norm_final = layer_norm(hidden_size, affine=not (modulated or table))
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels)
        if self.modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size))
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5) if table else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm_final(x)
        if self.modulated:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        elif self.scale_shift_table is not None:
            shift, scale = (self.scale_shift_table[None] + c[:, None]).unbind(1)  # [B, D] each
            x = modulate(x, shift, scale)
        return self.linear(x)


def dit_base_init(model: nn.Module, patch_proj: nn.Module) -> None:
    """DiT's base initialisation of a whole model: xavier-uniform linears with zero biases (in ``model.apply``'s
    order, so seeds give DiT's weights), then the patch projection xavier-uniform on its (D, -1) view, zero bias.
    Families add their own special cases (N(0, 0.02) tables, zeroed adaLN and output layers) after it."""
    def linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(linear)
    w = patch_proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(patch_proj.bias)
