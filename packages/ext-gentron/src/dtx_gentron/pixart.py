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

Timestep features are DiT's (divisor 128), which is also what diffusers' PixArt and Latte compute
(``downscale_freq_shift=0``), so these models have no timestep-embedding difference with diffusers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange, repeat
from torch import nn

from dtx.config import check
from dtx.errors import ShapeError
from dtx.layers import (Attention, BlockStack, CrossAttention, Linear, Mlp, PatchEmbed, PatchGridConfig,
                        TimestepEmbedder, dit_base_init, frame_positions, grid_positions, layer_norm, modulate,
                        per_sample_timesteps, sincos_1d_torch, sincos_2d_torch, unpatchify)


@dataclass
class PixArtConfig(PatchGridConfig):
    """Architecture of one PixArt-alpha (``num_frames`` 0) or Latte-1-style text-to-video model; the defaults are
    PixArt-XL/2 at 512 px (64x64 latents, T5-XXL captions of 120 tokens)."""

    input_size: Any = 64
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28  # spatial blocks (text-to-video: as many temporal blocks again)
    num_heads: int = 16
    context_dim: int = 4096  # caption channels (T5-XXL)
    text_length: int = 120  # tokens per caption (the encoder's max_length)
    num_frames: int = 0  # 0: text-to-image; > 0: text-to-video clips of this many frames (Latte-1: 16)
    learn_sigma: bool = True
    grad_checkpointing: bool = False

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def validate(self) -> "PixArtConfig":
        self.validate_transformer()
        for name in ("context_dim", "text_length"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.num_frames >= 0, "num_frames", f"must be >= 0 (0 = text-to-image), got {self.num_frames}")
        return self


#: PixArt-XL/2 (512 px) and Latte-1 (16 frames of 512 px; 28 spatial + 28 temporal blocks).
PIXART_PRESETS: dict[str, dict[str, Any]] = {
    "PixArt-XL/2": {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2},
    "Latte-1": {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2, "num_frames": 16},
}


class PixArtBlock(nn.Module):
    """adaLN-single block: gated self-attention, (spatial only) ungated cross-attention, gated MLP."""

    def __init__(self, d: int, num_heads: int, cross: bool) -> None:
        super().__init__()
        self.norm1 = layer_norm(d, affine=False)
        self.attn = Attention(d, num_heads, qkv_bias=True)
        self.cross_attn = CrossAttention(d, num_heads, names=("q_linear", "kv_linear")) if cross else None
        self.norm2 = layer_norm(d, affine=False)
        self.mlp = Mlp(d, 4 * d)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d ** 0.5)

    def forward(self, x: torch.Tensor, t0: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        mod = self.scale_shift_table[None] + t0.reshape(t0.shape[0], 6, -1)  # [B, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class CaptionEmbedder(nn.Module):
    """PixArt's caption projection ``y_proj`` (fc1 -> GELU(tanh) -> fc2), without the stored null caption."""

    def __init__(self, context_dim: int, d: int) -> None:
        super().__init__()
        self.y_proj = Mlp(context_dim, d, out_features=d)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.y_proj(context)


class T2IFinalLayer(nn.Module):
    """PixArt's final layer: norm, (shift, scale) = table (2, D) + timestep embedding, linear to p*p*out."""

    def __init__(self, d: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = layer_norm(d, affine=False)
        self.linear = Linear(d, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d ** 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(1)  # [B, D] each
        return self.linear(modulate(self.norm_final(x), shift, scale))




class PixArt(nn.Module):
    """Text-to-image PixArt-alpha: ``forward(x, t, context, context_mask)`` -> [B, out_channels, H, W]."""

    channel_dim = 1
    noise_input = "timestep"
    num_timesteps = 1000
    num_classes = 0
    #: linear layers by role, for LoRA targets (``finetune.lora.targets``); Latte-1's temporal blocks apart
    lora_groups = {"attention": [r"blocks\.\d+\.attn\.(qkv|proj)"], "mlp": [r"blocks\.\d+\.mlp\.fc[12]"],
                   "cross-attention": [r"blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)"],
                   "temporal": [r"temporal_blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"]}

    def __init__(self, config: PixArtConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config, **overrides) if config is not None else PixArtConfig(**overrides)
        self.config = cfg.validate()
        d, p = cfg.hidden_size, cfg.patch_size
        self.in_channels, self.out_channels, self.learn_sigma = cfg.in_channels, cfg.out_channels, cfg.learn_sigma
        self.patch_size, self.grid_size = p, cfg.grid
        self.context_dim = cfg.context_dim
        self.x_embedder = PatchEmbed(p, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(cfg.context_dim, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], d), requires_grad=False)
        every = int(cfg.grad_checkpointing)
        self.blocks = BlockStack([PixArtBlock(d, cfg.num_heads, cross=True) for _ in range(cfg.depth)], every)
        video = cfg.num_frames > 0
        self.temporal_blocks = (BlockStack([PixArtBlock(d, cfg.num_heads, cross=False)
                                            for _ in range(cfg.depth)], every) if video else None)
        if video:
            self.register_buffer("temp_pos_embed", sincos_1d_torch(d, cfg.num_frames), persistent=False)
        self.final_layer = T2IFinalLayer(d, p, self.out_channels)
        self.initialize_weights()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.config.input_hw)

    def initialize_weights(self) -> None:
        """PixArt's init (7.7): xavier linears, zero biases, sin-cos positions, N(0, 0.02) timestep and caption
        MLPs and ``t_block``, zero cross-attention projections and final linear."""
        dit_base_init(self, self.x_embedder.proj)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_torch(self.config.hidden_size, *self.grid_size))
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1], self.y_embedder.y_proj.fc1,
                       self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def example_conditions(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Caption inputs of the configured shapes (for ``dtx flops`` and the conformance checks)."""
        n = self.config.text_length
        return {"context": torch.zeros(batch, n, self.context_dim, device=device),
                "context_mask": torch.ones(batch, n, dtype=torch.bool, device=device)}

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W] (text-to-video: [B, F, C, H, W]); t: [B] timesteps; context [B, L, context_dim] encoder
        tokens with context_mask [B, L] (True = token). ``pooled`` (from text conditioners) is not used."""
        video = self.temporal_blocks is not None
        if x.ndim != 3 + self.channel_dim or x.shape[self.channel_dim] != self.in_channels:
            raise ShapeError(f"{type(self).__name__} expects {'[B, F, C, H, W]' if video else '[B, C, H, W]'} with "
                             f"C = {self.in_channels}, got {list(x.shape)}")
        b = x.shape[0]
        if context is None or context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
            got = None if context is None else list(context.shape)
            raise ShapeError(f"{type(self).__name__} needs context [{b}, L, {self.context_dim}] (run a text "
                             f"conditioner), got {got}")
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ShapeError(f"context_mask must be {list(context.shape[:2])}, got {list(context_mask.shape)}")
        frames = x.shape[1] if video else 1
        clips = rearrange(x, "b f c h w -> (b f) c h w") if video else x  # [(B F), C, H, W]
        p = self.patch_size
        grid_h, grid_w = clips.shape[-2] // p, clips.shape[-1] // p
        h = self.x_embedder(clips)  # [(B F), N, D]
        h = h + grid_positions(self.pos_embed, self.grid_size, grid_h, grid_w)  # [(B F), N, D]
        t_emb = self.t_embedder(per_sample_timesteps(t, b, x.device, type(self).__name__))  # [B, D]
        t0 = self.t_block(t_emb)  # [B, 6D]
        text = self.y_embedder(context)  # [B, L, D]
        t0_s, text_s = t0, text
        mask_s = context_mask
        if video:
            t0_s = repeat(t0, "b d -> (b f) d", f=frames)
            text_s = repeat(text, "b l d -> (b f) l d", f=frames)
            mask_s = None if context_mask is None else repeat(context_mask, "b l -> (b f) l", f=frames)
            t0_t = repeat(t0, "b d -> (b n) d", n=grid_h * grid_w)
        for i in range(len(self.blocks)):
            h = self.blocks.call(i, h, t0_s, text_s, mask_s)  # [(B F), N, D]
            if video:
                h = rearrange(h, "(b f) n d -> (b n) f d", b=b)  # [(B N), F, D]
                if i == 0 and frames > 1:
                    h = h + frame_positions(self.temp_pos_embed, frames)  # [(B N), F, D]
                h = self.temporal_blocks.call(i, h, t0_t)  # [(B N), F, D]
                h = rearrange(h, "(b n) f d -> (b f) n d", b=b)  # [(B F), N, D]
        t_final = repeat(t_emb, "b d -> (b f) d", f=frames) if video else t_emb
        out = unpatchify(self.final_layer(h, t_final), p, self.out_channels, grid_h, grid_w)  # [(B F), out, H, W]
        return rearrange(out, "(b f) c h w -> b f c h w", b=b) if video else out


class PixArtT2V(PixArt):
    """Latte-1-style text-to-video: PixArt's spatial blocks interleaved with temporal blocks, [B, F, C, H, W]."""

    channel_dim = 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.config.num_frames, self.in_channels, *self.config.input_hw)


def build_pixart(config: PixArtConfig | None = None, **overrides: Any) -> PixArt:
    """``PixArtT2V`` when ``num_frames > 0``, else the text-to-image ``PixArt``."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else PixArtConfig(**overrides)
    return (PixArtT2V if cfg.num_frames > 0 else PixArt)(cfg)
