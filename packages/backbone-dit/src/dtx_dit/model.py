"""The DiT backbone (Peebles & Xie, 2023) with the official state-dict layout, its four block designs and presets.

Key names, initialisation and numerics follow facebookresearch/DiT so released checkpoints load bit-for-bit; unlike
the original, latents may be non-square and of any size divisible by the patch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from dtx.config import check
from dtx.diffusion.guidance import combine_guidance
from dtx.errors import ShapeError
from dtx.layers import (AdaLNBlock, Attention, BlockStack, CrossAttention, FinalLayer, LabelEmbedder, Mlp, PatchEmbed,
                        PatchGridConfig, TimestepEmbedder, check_label_range, dit_base_init, grid_positions, layer_norm,
                        per_sample_timesteps, sincos_2d_torch, unpatchify)

BlockType = Literal["adaln-zero", "adaln", "cross-attention", "in-context"]
BLOCK_TYPES: tuple[str, ...] = get_args(BlockType)
#: what the timestep embedding is fed: DDPM timesteps (DiT), or flow time (SiT: t in [0, 1], 1 at the data)
TimeInput = Literal["timestep", "flow_time", "sit_time", "flow_timestep"]
TIME_INPUTS: tuple[str, ...] = get_args(TimeInput)


@dataclass
class DiTConfig(PatchGridConfig):
    """Architecture of one DiT; the defaults are DiT-XL/2 for 256x256 images (32x32 latents, ImageNet classes)."""

    input_size: Any = 32  # latent side, or [height, width] for non-square latents
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0 = unconditional (no label table)
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row used by classifier-free guidance
    learn_sigma: bool = True
    block: BlockType = "adaln-zero"
    grad_checkpointing: bool = False  # recompute every block's activations in the backward pass
    noise_input: TimeInput = "timestep"  # SiT: "sit_time" (the same network fed flow time, no x1000)

    def validate(self) -> "DiTConfig":
        self.validate_transformer()
        check(self.num_classes >= 0, "num_classes", f"must be >= 0, got {self.num_classes}")
        check(0.0 <= self.class_dropout_prob < 1.0, "class_dropout_prob",
              f"must be in [0, 1), got {self.class_dropout_prob}")
        check(self.block in BLOCK_TYPES, "block", f"{self.block!r} is not one of {', '.join(BLOCK_TYPES)}")
        check(self.noise_input in TIME_INPUTS, "noise_input",
              f"{self.noise_input!r} is not one of {', '.join(TIME_INPUTS)}")
        return self


#: The paper's 12 configurations (Table 1): S/B/L/XL widths and depths times patch sizes 2/4/8.
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": patch}
    for size, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                        "XL": (28, 1152, 16)}.items()
    for patch in (2, 4, 8)
}

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
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class InContextBlock(nn.Module):
    """Plain pre-norm ViT block; the conditioning travels as extra tokens in the sequence, so ``c`` is unused."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = layer_norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = layer_norm(hidden_size, affine=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# -- model -------------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion transformer over patchified latents: ``forward(x, t, y)`` -> [N, out_channels, H, W].

    With ``learn_sigma`` the output is [eps (in_channels), variance interpolation v (in_channels)]. The model is
    conditioned on DDPM timesteps in [0, 1000) (``noise_input``; dtx's EDM and flow objectives map their noise
    levels into that range), or on flow time as SiT (``config.noise_input``).
    Labels are used as given: condition dropout for guidance is the conditioning stage's job (``class_dropout_prob``
    > 0 still adds the null-class row, and ``y_embedder.token_drop`` drops labels as the official model does).
    """

    channel_dim = 1  # [N, C, H, W]
    noise_input = "timestep"
    num_timesteps = 1000
    #: linear layers by role, for LoRA targets (``finetune.lora.targets``)
    lora_groups = {"attention": [r"blocks\.\d+\.attn\.(qkv|proj)"], "mlp": [r"blocks\.\d+\.mlp\.fc[12]"],
                   "adaln": [r"blocks\.\d+\.adaLN_modulation\.1"],
                   "cross-attention": [r"blocks\.\d+\.cross_attn\.\w+"],
                   "embedding": [r"t_embedder\.mlp\.[02]", r"final_layer\.linear"]}

    def __init__(self, config: DiTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config, **overrides) if config is not None else DiTConfig(**overrides)
        self.config = cfg.validate()
        d, p = cfg.hidden_size, cfg.patch_size
        self.in_channels = cfg.in_channels
        self.learn_sigma = cfg.learn_sigma
        self.out_channels = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
        self.patch_size = p
        self.noise_input = cfg.noise_input
        self.num_classes = cfg.num_classes
        self.block_type = cfg.block
        self.grid_size = cfg.grid

        self.x_embedder = PatchEmbed(p, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob) if cfg.num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], d), requires_grad=False)
        if cfg.block in ("adaln-zero", "adaln"):
            blocks = [AdaLNBlock(d, cfg.num_heads, cfg.mlp_ratio, gated=cfg.block == "adaln-zero")
                      for _ in range(cfg.depth)]
        elif cfg.block == "cross-attention":
            blocks = [CrossAttentionBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        else:
            blocks = [InContextBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        self.blocks = BlockStack(blocks, recompute_every=int(cfg.grad_checkpointing))
        self.final_layer = FinalLayer(d, p, self.out_channels, modulated=cfg.block in ("adaln-zero", "adaln"))
        self.initialize_weights()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-sample input shape the model was built for: (in_channels, H, W)."""
        return (self.in_channels, *self.config.input_hw)

    @property
    def null_class(self) -> int | None:
        """Label of the unconditional (dropped) class used for guidance, or None when the model has none."""
        return self.y_embedder.null_class if self.y_embedder is not None else None

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears with zero bias, N(0, 0.02) embeddings, sin-cos positions, zeroed output layer.

        adaLN-Zero also zeroes every modulation linear, so each block starts as the identity and the output is 0.
        """
        dit_base_init(self, self.x_embedder.proj)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_torch(self.config.hidden_size, *self.grid_size))
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.block_type == "adaln-zero":
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _label_embedding(self, y: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        if self.y_embedder is None:  # unconditional model: labels, if any, are ignored
            return None
        if y is None:
            if self.num_classes != 1:
                raise ShapeError(f"this DiT has num_classes={self.num_classes} and needs class labels y "
                                 f"(use y={self.null_class} for unconditional outputs)")
            y = torch.zeros(n, dtype=torch.long, device=device)
        if y.shape != (n,) or y.dtype.is_floating_point:
            raise ShapeError(f"DiT expects integer class labels y of shape [{n}], got {y.dtype} {list(y.shape)}")
        check_label_range(y, self.y_embedder.embedding_table.num_embeddings)
        return self.y_embedder(y, train=False)  # labels arrive already dropped (dtx.conditioning)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, in_channels, H, W] latents; t: [N] timestep indices; y: [N] class labels (null class allowed)."""
        n = x.shape[0]
        h = self.x_embedder(x)
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        h = h + grid_positions(self.pos_embed, self.grid_size, grid_h, grid_w)
        t_emb = self.t_embedder(per_sample_timesteps(t, n, x.device, "DiT"))
        y_emb = self._label_embedding(y, n, x.device)
        c = t_emb if y_emb is None else t_emb + y_emb
        cond_tokens = (t_emb,) if y_emb is None else (t_emb, y_emb)
        if self.block_type == "in-context":
            h = torch.cat([h, torch.stack(cond_tokens, dim=1).to(h.dtype)], dim=1)
            cond = c
        elif self.block_type == "cross-attention":
            cond = torch.stack(cond_tokens, dim=1)
        else:
            cond = c
        h = self.blocks(h, cond)
        if self.block_type == "in-context":
            h = h[:, : grid_h * grid_w]
        h = self.final_layer(h, c)
        return unpatchify(h, self.patch_size, self.out_channels, grid_h, grid_w)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance in DiT's batch layout: y = [labels; null labels], only x's first half is used.

        ``guide_channels=None`` guides every eps channel (the default for new work); ``guide_channels=3`` is DiT's
        legacy behaviour (needed to reproduce its FIDs). Remaining channels (the 4th eps channel in legacy mode and
        the learned-variance channels) pass through unguided. Returns [N, out_channels, H, W], the guided result in
        both halves like the official model, whose second half keeps its own unconditional remainder.
        """
        half = x[: len(x) // 2]
        cond, uncond = self.forward(torch.cat([half, half]), t, y).chunk(2)
        k = self.in_channels if guide_channels is None else guide_channels
        guided = combine_guidance([uncond, cond], [cfg_scale], channels=k)
        return torch.cat([guided, torch.cat([guided[:, :k], uncond[:, k:]], dim=1)])
