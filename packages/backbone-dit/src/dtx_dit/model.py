"""The DiT backbone (Peebles & Xie, 2023) with the official state-dict layout, its four block designs and presets.

Key names, initialisation and numerics follow facebookresearch/DiT so released checkpoints load bit-for-bit; unlike
the original, latents may be non-square and of any size divisible by the patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from dtx.config import check
from dtx.layers.context_parallel import ContextGroup
from dtx.layers import (AdaLNBlock, Attention, BlockStack, CrossAttention, FinalLayer, Mlp, PatchTransformer,
                        TransformerConfig, layer_norm, per_sample_timesteps, residual, size_presets)

BlockType = Literal["adaln-zero", "adaln", "cross-attention", "in-context"]
BLOCK_TYPES: tuple[str, ...] = get_args(BlockType)
#: what the timestep embedding is fed: DDPM timesteps (DiT), or flow time (SiT: t in [0, 1], 1 at the data)
TimeInput = Literal["timestep", "flow_time", "sit_time", "flow_timestep"]
TIME_INPUTS: tuple[str, ...] = get_args(TimeInput)


@dataclass
class DiTConfig(TransformerConfig):
    """Architecture of one DiT; the defaults are DiT-XL/2 for 256x256 images (32x32 latents, ImageNet classes)."""

    num_classes: int = 1000  # 0 = unconditional (no label table)
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row used by classifier-free guidance
    block: BlockType = "adaln-zero"
    noise_input: TimeInput = "timestep"  # SiT: "sit_time" (the same network fed flow time, no x1000)

    def validate_options(self) -> None:
        self.check_min(0, "num_classes")
        check(0.0 <= self.class_dropout_prob < 1.0, "class_dropout_prob",
              f"must be in [0, 1), got {self.class_dropout_prob}")


#: The paper's 12 configurations (Table 1): S/B/L/XL widths and depths times patch sizes 2/4/8.
DIT_PRESETS: dict[str, dict[str, Any]] = size_presets("DiT")

#: SiT (Ma et al. 2024): DiT's network and sizes trained as interpolants, its time embedding fed t in [0, 1] with
#: the data at t = 1
SIT_PRESETS: dict[str, dict[str, Any]] = {name.replace("DiT-", "SiT-"): {**preset, "noise_input": "sit_time"}
                                          for name, preset in DIT_PRESETS.items()}


# -- blocks ------------------------------------------------------------------------------------------------------

class CrossAttentionBlock(nn.Module):
    """Pre-norm block with cross-attention to the conditioning tokens between self-attention and the MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = layer_norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = layer_norm(hidden_size, affine=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qkv_bias=True)
        self.norm3 = layer_norm(hidden_size, affine=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = residual(x, self.norm1, self.attn)
        x = residual(x, self.norm2, lambda h: self.cross_attn(h, context))
        return residual(x, self.norm3, self.mlp)


def build_block(cfg: DiTConfig) -> nn.Module:
    """One block of the design ``cfg.block``: adaLN(-Zero) (DiT's own), cross-attention to the (t, y) tokens, or a
    plain block over the sequence with the (t, y) tokens appended (in-context)."""
    if cfg.block == "cross-attention":
        return CrossAttentionBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio)
    return AdaLNBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, gated=cfg.block == "adaln-zero",
                      modulated=cfg.block != "in-context")


# -- model -------------------------------------------------------------------------------------------------------

class DiT(PatchTransformer):
    """Diffusion transformer over patchified latents: ``forward(x, t, y)`` -> [N, out_channels, H, W].

    With ``learn_sigma`` the output is [eps (in_channels), variance interpolation v (in_channels)]. The model is
    conditioned on DDPM timesteps in [0, 1000) (``noise_input``; dtx's EDM and flow objectives map their noise
    levels into that range), or on flow time as SiT (``config.noise_input``).
    Labels are used as given: condition dropout for guidance is the conditioning stage's job (``class_dropout_prob``
    > 0 still adds the null-class row, and ``y_embedder.token_drop`` drops labels as the official model does).
    """

    config_class = DiTConfig
    #: linear layers by role, for LoRA targets (``finetune.lora.targets``)
    lora_groups = {"attention": [r"blocks\.\d+\.attn\.(qkv|proj)"], "mlp": [r"blocks\.\d+\.mlp\.fc[12]"],
                   "adaln": [r"blocks\.\d+\.adaLN_modulation\.1"],
                   "cross-attention": [r"blocks\.\d+\.cross_attn\.\w+"],
                   "embedding": [r"t_embedder\.mlp\.[02]", r"final_layer\.linear"]}

    def __init__(self, config: DiTConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.noise_input, self.num_classes, self.block_type = cfg.noise_input, cfg.num_classes, cfg.block
        self.add_embedders(cfg.num_classes, cfg.class_dropout_prob)
        self.blocks = BlockStack([build_block(cfg) for _ in range(cfg.depth)],
                                 recompute_every=int(cfg.grad_checkpointing))
        modulated = cfg.block in ("adaln-zero", "adaln")
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, self.out_channels, modulated=modulated)
        self.init_dit_weights(zero_adaln=cfg.block == "adaln-zero")

    def set_context_parallel(self, group: ContextGroup | None) -> None:
        """Split each image's tokens across ``group`` (Ulysses attention); not the in-context design."""
        check(group is None or self.block_type != "in-context", "parallel.context",
              "DiT's in-context block appends its condition tokens to the token sequence, which context parallelism "
              "does not split; use another block")
        super().set_context_parallel(group)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, in_channels, H, W] latents; t: [N] timestep indices; y: [N] class labels (null class allowed)."""
        n = x.shape[0]
        h, grid = self.embed_patches(x)  # [N, T, D]
        t_emb = self.t_embedder(per_sample_timesteps(t, n, x.device, "DiT"))  # [N, D]
        y_emb = None if self.y_embedder is None else self.y_embedder.embed(y, (n,), "DiT")  # [N, D]
        c = t_emb if y_emb is None else t_emb + y_emb  # [N, D]
        tokens = torch.stack([t_emb] if y_emb is None else [t_emb, y_emb], dim=1)  # [N, 1 or 2, D]
        if self.block_type == "in-context":
            h = self.blocks(torch.cat([h, tokens.to(h.dtype)], dim=1), c)[:, :h.shape[1]]  # [N, T, D]
        else:
            h = self.blocks(h, tokens if self.block_type == "cross-attention" else c)  # [N, T, D]
        return self.output(self.final_layer(h, c), n, grid)  # [N, out_channels, H, W]
