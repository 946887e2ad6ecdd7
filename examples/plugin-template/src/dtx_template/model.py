"""TemplateViT: a small in-context vision transformer denoiser.

The noise level and the class label become two extra tokens in front of the patch tokens (as in U-ViT); pre-norm
transformer blocks from ``dtx.layers`` follow, then a zero-initialised linear head, so the model outputs exactly 0
at initialisation (EDM preconditioning then starts from the skip connection).

What dtx reads from the class (``dtx.interface``): ``channel_dim`` 1 (images ``[B, C, H, W]``), ``noise_input``
``"c_noise"`` (EDM's ``ln(sigma) / 4``), ``in_channels``, ``out_channels``, ``learn_sigma``, ``input_shape``,
``num_classes`` and ``null_class`` (the label the conditioning stage uses for classifier-free guidance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtx.config import check
from dtx.errors import ShapeError
from dtx.layers import (Attention, BlockStack, Mlp, PatchEmbed, PatchGridConfig, TimestepEmbedder, per_sample_timesteps,
                        sincos_2d_torch, unpatchify)


@dataclass
class TemplateConfig(PatchGridConfig):
    """Every option of a TemplateViT (what ``dtx.create_model`` and a recipe's ``model.options`` set)."""

    input_size: Any = 8  # side, or [height, width]
    patch_size: int = 2
    in_channels: int = 1
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: unconditional; else labels 0..num_classes-1 plus the null label num_classes

    def validate(self) -> "TemplateConfig":
        self.validate_transformer()  # grid, channels, depth, heads, width, mlp_ratio
        check(self.num_classes >= 0, "num_classes", f"must be >= 0, got {self.num_classes}")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "TemplateViT-S": {"patch_size": 2, "hidden_size": 96, "depth": 4, "num_heads": 4},
}


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TemplateViT(nn.Module):
    """``forward(x, c_noise, y=None)`` -> ``[B, C, H, W]``, the network F of EDM preconditioning."""

    channel_dim = 1
    noise_input = "c_noise"
    learn_sigma = False

    def __init__(self, config: TemplateConfig | None = None) -> None:
        super().__init__()
        cfg = (config or TemplateConfig()).validate()
        self.config = cfg
        d = cfg.hidden_size
        self.in_channels = self.out_channels = cfg.in_channels
        self.num_classes = cfg.num_classes
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        # fixed sin-cos positions; filled in place so that a model built on the meta device (`dtx flops`) stays there
        self.register_buffer("pos_embed", torch.zeros(1, cfg.grid[0] * cfg.grid[1], d), persistent=False)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_torch(d, *cfg.grid))
        self.blocks = BlockStack([Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])  # recompute switch
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.patch_size ** 2 * cfg.in_channels)
        nn.init.normal_(self.x_embedder.proj.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.config.input_hw)

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.num_classes else None

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W]; c_noise: [B] (or a scalar) = ln(sigma) / 4; y: [B] labels (``null_class`` = none)."""
        b = x.shape[0]
        grid = self.config.grid
        if tuple(x.shape[2:]) != self.config.input_hw:
            raise ShapeError(f"TemplateViT was built for {self.config.input_hw} inputs, got {list(x.shape)}")
        # c_noise spans about [-1.5, 1.1]; the sinusoidal embedding was made for DDPM's 0..999 timesteps
        tokens = [self.t_embedder(per_sample_timesteps(c_noise, b, x.device, "TemplateViT") * 250)[:, None]]
        if self.y_embedder is not None:
            if y is None or y.shape != (b,):
                raise ShapeError(f"this TemplateViT has {self.num_classes} classes and needs labels y of shape [{b}]")
            tokens.append(self.y_embedder(y)[:, None])
        h = torch.cat([*tokens, self.x_embedder(x) + self.pos_embed.to(x.dtype)], dim=1)
        h = self.blocks(h)  # [B, n + T, D]
        h = self.head(self.norm(h[:, len(tokens):]))
        return unpatchify(h, self.config.patch_size, self.out_channels, *grid)
