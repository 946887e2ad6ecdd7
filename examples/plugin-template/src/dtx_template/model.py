"""TemplateViT: a small DiT-style denoiser, written as a spec over the core's patch-transformer pieces.

Patch tokens with sin-cos positions, adaLN-Zero blocks conditioned on the noise level plus the class label, and an
adaLN final layer; every modulation and the output layer start at zero, so the model outputs exactly 0 at
initialisation (EDM preconditioning then starts from the skip connection).

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
from dtx.layers import (AdaLNBlock, BlockStack, FinalLayer, LabelEmbedder, PatchEmbed, PatchGridConfig,
                        TimestepEmbedder, check_label_range, dit_base_init, grid_positions, per_sample_timesteps,
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


class TemplateViT(nn.Module):
    """``forward(x, c_noise, y=None)`` -> ``[B, C, H, W]``, the network F of EDM preconditioning."""

    channel_dim = 1
    noise_input = "c_noise"
    learn_sigma = False

    def __init__(self, config: TemplateConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = (config or TemplateConfig()).validate()
        d = cfg.hidden_size
        self.in_channels = self.out_channels = cfg.in_channels
        self.num_classes = cfg.num_classes
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, dropout_prob=0.1) if cfg.num_classes else None
        # filled in place, so that a model built on the meta device (`dtx flops`) stays there
        self.register_buffer("pos_embed", torch.zeros(1, cfg.grid[0] * cfg.grid[1], d), persistent=False)
        self.blocks = BlockStack([AdaLNBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.in_channels)
        dit_base_init(self, self.x_embedder.proj)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_torch(d, *cfg.grid))
        for modulation in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                           self.final_layer.linear]:
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.config.input_hw)

    @property
    def null_class(self) -> int | None:
        return self.y_embedder.null_class if self.y_embedder is not None else None

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W]; c_noise: [B] (or a scalar) = ln(sigma) / 4; y: [B] labels (``null_class`` = none)."""
        b, (grid_h, grid_w) = x.shape[0], self.x_embedder.grid(*x.shape[2:])
        h = self.x_embedder(x) + grid_positions(self.pos_embed, self.config.grid, grid_h, grid_w)  # [B, T, D]
        # c_noise spans about [-1.5, 1.1]; the sinusoidal embedding was made for DDPM's 0..999 timesteps
        c = self.t_embedder(per_sample_timesteps(c_noise, b, x.device, "TemplateViT") * 250)  # [B, D]
        if self.y_embedder is not None:
            if y is None or y.shape != (b,):
                raise ShapeError(f"this TemplateViT has {self.num_classes} classes and needs labels y of shape [{b}]")
            check_label_range(y, self.num_classes + 1, f" ({self.num_classes} = null)")
            c = c + self.y_embedder(y, train=False)  # [B, D]; labels arrive already dropped
        h = self.final_layer(self.blocks(h, c), c)  # [B, T, p * p * C]
        return unpatchify(h, self.config.patch_size, self.out_channels, grid_h, grid_w)  # [B, C, H, W]
