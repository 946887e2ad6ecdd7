"""TemplateViT: a small DiT-style denoiser, written as a spec over the core's patch-transformer pieces.

Patch tokens with sin-cos positions, adaLN-Zero blocks conditioned on the noise level plus the class label, and an
adaLN final layer; every modulation and the output layer start at zero, so the model outputs exactly 0 at
initialisation (EDM preconditioning then starts from the skip connection).

What dtx reads from the class (``dtx.interface``): ``channel_dim`` 1 (images ``[B, C, H, W]``), ``noise_input``
``"c_noise"`` (EDM's ``ln(sigma) / 4``), ``in_channels``, ``out_channels``, ``learn_sigma``, ``input_shape``,
``num_classes`` and ``null_class`` (the label the conditioning stage uses for classifier-free guidance); the
skeleton, ``dtx.layers.PatchTransformer``, provides all but the last two's values and the shared layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dtx.layers import AdaLNBlock, BlockStack, FinalLayer, PatchTransformer, TransformerConfig, per_sample_timesteps


@dataclass
class TemplateConfig(TransformerConfig):
    """Every option of a TemplateViT (what ``dtx.create_model`` and a recipe's ``model.options`` set); the shared
    ones (patch grid, width, depth, heads, ...) and their checks come from ``TransformerConfig``."""

    input_size: Any = 8  # side, or [height, width]
    in_channels: int = 1
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    learn_sigma: bool = False  # EDM's F predicts the data term alone
    num_classes: int = 0  # 0: unconditional; else labels 0..num_classes-1 plus the null label num_classes

    def validate_options(self) -> None:
        self.check_min(0, "num_classes")


PRESETS: dict[str, dict[str, Any]] = {
    "TemplateViT-S": {"patch_size": 2, "hidden_size": 96, "depth": 4, "num_heads": 4},
}


class TemplateViT(PatchTransformer):
    """``forward(x, c_noise, y=None)`` -> ``[B, C, H, W]``, the network F of EDM preconditioning."""

    config_class = TemplateConfig
    noise_input = "c_noise"

    def __init__(self, config: TemplateConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.num_classes = cfg.num_classes
        self.add_embedders(cfg.num_classes, class_dropout_prob=0.1)  # patches, noise level, labels, positions
        self.blocks = BlockStack([AdaLNBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, self.out_channels)
        self.init_dit_weights()  # DiT's init, adaLN-Zero: the output is exactly 0

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W]; c_noise: [B] (or a scalar) = ln(sigma) / 4; y: [B] labels (``null_class`` = none)."""
        self.check_input(x)
        h, grid = self.embed_patches(x)  # [B, T, D] with positions
        # c_noise spans about [-1.5, 1.1]; the sinusoidal embedding was made for DDPM's 0..999 timesteps
        c = self.t_embedder(per_sample_timesteps(c_noise, x.shape[0], x.device, "TemplateViT") * 250)  # [B, D]
        if self.y_embedder is not None:
            c = c + self.y_embedder.embed(y, (x.shape[0],), "TemplateViT")  # [B, D]; labels arrive already dropped
        return self.output(self.final_layer(self.blocks(h, c), c), x.shape[0], grid)  # [B, C, H, W]
