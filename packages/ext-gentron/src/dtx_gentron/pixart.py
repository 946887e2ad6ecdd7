"""PixArt-alpha's text-conditioned DiT (PixArt-alpha/PixArt-alpha ``PixArt.py``) and, with temporal blocks, Latte-1's
text-to-video model (Vchitect/Latte ``latte_t2v.py``): the adaLN-single design that diffusers'
``PixArtTransformer2DModel`` and ``LatteTransformer3DModel`` hold, with PixArt's original state-dict names.

- **adaLN-single**: one ``t_block`` (SiLU -> Linear(D, 6D)) of the timestep embedding, plus each block's
  learnable ``scale_shift_table`` (6, D); the final layer adds its own table (2, D) to the raw timestep embedding.
- **Block** (``PixArtBlock``): gated self-attention, then cross-attention to the projected caption (no norm, no gate:
  ``cross_attn.q_linear``/``kv_linear``/``proj``), then the gated MLP. Norms are non-affine, eps 1e-6.
- **Caption** (``CaptionEmbedder``): ``y_embedder.y_proj`` (fc1 -> GELU(tanh) -> fc2) maps encoder tokens (T5-XXL:
  4096) to D. There is no learned null caption: as in diffusers, guidance uses the encoder's output for "" (the text
  conditioner's null).
- **Text-to-video** (``num_frames > 0``, Latte-1): ``blocks.{i}`` are the spatial blocks, each followed by
  ``temporal_blocks.{i}`` (self-attention over the frames of each patch position, adaLN-single on the clip's
  timestep, no cross-attention); a 1D sin-cos table over frames is added before the first temporal block (a
  buffer, not stored, as Latte's ``temp_pos_embed``). Videos are [B, F, C, H, W] (``channel_dim`` 2).

Timestep features are DiT's (divisor 128), as diffusers' PixArt and Latte compute them (``downscale_freq_shift=0``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange, repeat
from torch import nn

from dtx.config import check
from dtx.layers import (Attention, BlockStack, CrossAttention, FinalLayer, Linear, Mlp, PatchTransformer,
                        TransformerConfig, frame_positions, layer_norm, per_sample_timesteps, residual,
                        sincos_1d_torch, text_tokens)
from dtx.layers.context_parallel import ContextGroup


@dataclass
class PixArtConfig(TransformerConfig):
    """Architecture of one PixArt-alpha (``num_frames`` 0) or Latte-1-style text-to-video model; the defaults are
    PixArt-XL/2 at 512 px (64x64 latents, T5-XXL captions of 120 tokens)."""

    input_size: Any = 64
    depth: int = 28  # spatial blocks (text-to-video: as many temporal blocks again)
    context_dim: int = 4096  # caption channels (T5-XXL)
    text_length: int = 120  # tokens per caption (the encoder's max_length)
    num_frames: int = 0  # 0: text-to-image; > 0: text-to-video clips of this many frames (Latte-1: 16)

    def validate_options(self) -> None:
        self.check_min(1, "context_dim", "text_length")
        self.check_min(0, "num_frames")


#: PixArt-XL/2 (512 px) and Latte-1 (16 frames of 512 px; 28 spatial + 28 temporal blocks).
PIXART_PRESETS: dict[str, dict[str, Any]] = {
    "PixArt-XL/2": {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2},
    "Latte-1": {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2, "num_frames": 16},
}


class PixArtBlock(nn.Module):
    """adaLN-single block: gated self-attention, (spatial only) ungated cross-attention, gated MLP."""

    def __init__(self, cfg: PixArtConfig, cross: bool) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = layer_norm(d, affine=False)
        self.attn = Attention(d, cfg.num_heads, qkv_bias=True)
        self.cross_attn = CrossAttention(d, cfg.num_heads, names=("q_linear", "kv_linear")) if cross else None
        self.norm2 = layer_norm(d, affine=False)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d ** 0.5)

    def forward(self, x: torch.Tensor, t0: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        mod = (self.scale_shift_table[None] + t0.reshape(t0.shape[0], 6, -1)).unbind(1)  # 6 x [B, D]
        x = residual(x, self.norm1, self.attn, mod[:3])  # [B, N, D]
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, mask)  # [B, N, D]
        return residual(x, self.norm2, self.mlp, mod[3:])  # [B, N, D]


class CaptionEmbedder(nn.Module):
    """PixArt's caption projection ``y_proj`` (fc1 -> GELU(tanh) -> fc2), without the stored null caption."""

    def __init__(self, context_dim: int, d: int) -> None:
        super().__init__()
        self.y_proj = Mlp(context_dim, d, out_features=d)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.y_proj(context)


class PixArt(PatchTransformer):
    """Text-to-image PixArt-alpha: ``forward(x, t, context, context_mask)`` -> [B, out_channels, H, W]."""

    config_class = PixArtConfig
    #: linear layers by role, for LoRA targets (``finetune.lora.targets``); Latte-1's temporal blocks apart
    lora_groups = {"attention": [r"blocks\.\d+\.attn\.(qkv|proj)"], "mlp": [r"blocks\.\d+\.mlp\.fc[12]"],
                   "cross-attention": [r"blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)"],
                   "temporal": [r"temporal_blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"]}

    def __init__(self, config: PixArtConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg, d = self.config, self.config.hidden_size
        self.context_dim = cfg.context_dim
        self.add_embedders()
        self.t_block = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(cfg.context_dim, d)
        every = int(cfg.grad_checkpointing)
        self.blocks = BlockStack([PixArtBlock(cfg, cross=True) for _ in range(cfg.depth)], every)
        video = cfg.num_frames > 0
        self.temporal_blocks = BlockStack([PixArtBlock(cfg, cross=False) for _ in range(cfg.depth)],
                                          every) if video else None
        if video:
            self.register_buffer("temp_pos_embed", sincos_1d_torch(d, cfg.num_frames), persistent=False)
        self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels, table=True)
        self.init_dit_weights(zero_adaln=False)
        for linear in (self.t_block[1], self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)  # PixArt: N(0, 0.02) t_block and caption MLP
        for block in self.blocks:  # and zero cross-attention projections
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def set_context_parallel(self, group: ContextGroup | None) -> None:
        """Split each image's tokens across ``group`` (Ulysses attention); Latte-1-style clips are not split."""
        check(group is None or self.temporal_blocks is None, "parallel.context",
              "PixArt's text-to-video (Latte-1) model does not split its clips across ranks; use Latte or GenTron")
        super().set_context_parallel(group)

    def example_conditions(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Caption inputs of the configured shapes (for ``dtx flops`` and the conformance checks)."""
        n = self.config.text_length
        return {"context": torch.zeros(batch, n, self.context_dim, device=device),
                "context_mask": torch.ones(batch, n, dtype=torch.bool, device=device)}

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W] (text-to-video: [B, F, C, H, W]); t: [B] timesteps; context [B, L, context_dim] encoder
        tokens with context_mask [B, L] (True = token). ``pooled`` (from text conditioners) is not used."""
        self.check_input(x)
        b = x.shape[0]
        context, mask = text_tokens(context, context_mask, b, self.context_dim)  # [B, L, C_txt], [B, L]
        h, grid = self.embed_patches(x)  # [(B F), N, D]
        t_emb = self.t_embedder(per_sample_timesteps(t, b, x.device, type(self).__name__))  # [B, D]
        t0, text = self.t_block(t_emb), self.y_embedder(context)  # [B, 6D], [B, L, D]
        if self.temporal_blocks is None:
            return self.output(self.final_layer(self.blocks(h, t0, text, mask), t_emb), b, grid)  # [B, out, H, W]
        frames = x.shape[1]
        t0_s, text_s, mask_s, t_final = (repeat(z, "b ... -> (b f) ...", f=frames) for z in (t0, text, mask, t_emb))
        t0_t = repeat(t0, "b d -> (b n) d", n=h.shape[1])  # [(B N), 6D]
        for i in range(len(self.blocks)):
            h = self.blocks.call(i, h, t0_s, text_s, mask_s)  # [(B F), N, D]
            h = rearrange(h, "(b f) n d -> (b n) f d", b=b)  # [(B N), F, D]
            if i == 0 and frames > 1:
                h = h + frame_positions(self.temp_pos_embed, frames)  # [(B N), F, D]
            h = self.temporal_blocks.call(i, h, t0_t)  # [(B N), F, D]
            h = rearrange(h, "(b n) f d -> (b f) n d", b=b)  # [(B F), N, D]
        return self.output(self.final_layer(h, t_final), b, grid)  # [B, F, out, H, W]


class PixArtT2V(PixArt):
    """Latte-1-style text-to-video: PixArt's spatial blocks interleaved with temporal blocks, [B, F, C, H, W]."""

    channel_dim = 2


def build_pixart(config: PixArtConfig | None = None, **overrides: Any) -> PixArt:
    """``PixArtT2V`` when ``num_frames > 0``, else the text-to-image ``PixArt``."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else PixArtConfig(**overrides)
    return (PixArtT2V if cfg.num_frames > 0 else PixArt)(cfg)
