"""adaLN transformer blocks shared by every DiT-style family (DiT, Latte, GenTron): the adaLN(-Zero) block and the
adaLN-modulated final layer, with DiT's official state-dict names (``adaLN_modulation``, ``norm_final``, ``linear``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .linear import Linear
from .norms import gated_residual, modulate
from .transformer import Attention, Mlp


def layer_norm(dim: int, affine: bool) -> nn.LayerNorm:
    """DiT's LayerNorm: eps 1e-6, affine only where no adaLN modulation replaces it."""
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)


class AdaLNBlock(nn.Module):
    """Transformer block conditioned through adaptive LayerNorm; ``gated`` adds adaLN-Zero's residual gates.

    The modulation vector is chunked as (shift, scale, gate) for attention, then for the MLP (gates only if gated).
    ``between`` (a residual sub-layer ``x -> x'``, e.g. GenTron's cross- and temporal attention) runs between the
    attention and the MLP, so families extend the block without copying it.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, gated: bool = True) -> None:
        super().__init__()
        self.gated = gated
        self.norm1 = layer_norm(hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = layer_norm(hidden_size, affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, (6 if gated else 4) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                between: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
            x = between(x) if between is not None else x
            return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = between(x) if between is not None else x
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Norm (adaLN-modulated by (shift, scale) when ``modulated``) and a linear map to p*p*out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, modulated: bool = True) -> None:
        super().__init__()
        self.modulated = modulated
        self.norm_final = layer_norm(hidden_size, affine=not modulated)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm_final(x)
        if self.modulated:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
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
