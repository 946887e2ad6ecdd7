"""GenTron (Chen et al., CVPR 2024): text-to-image and text-to-video diffusion transformers built from DiT's blocks.

GenTron has no official code, so every choice the paper leaves open is made here and documented in the README:

- **Blocks**: DiT's adaLN-Zero block (``dtx.layers.AdaLNBlock``, DiT's names) with, between attention and MLP,
  ``cross_attn`` (PixArt-alpha's form: no norm, no gate, zero-initialised projection; conditioning
  "cross-attention", the paper's winner) and in T2V ``temp_norm`` + ``temp_attn`` = TempSelfAttn, pre-LN attention
  over the frames of each token position with temporal positions the paper is silent on (RoPE over the frame index,
  ``temporal_pos: rope``, default; or a sin-cos frame table added to its input, ``sincos``, as AnimateDiff's motion
  module; or both). ``frame_embed: tokens`` adds a learned map of the frame's sin-cos table to its tokens. Every
  temporal addition starts at zero, so a T2V model built from a T2I model starts as it, frame by frame.
- **Condition** c = t_emb + pooled_embedder(pooled text) drives adaLN; conditioning "adaln" has no cross-attention
  (the paper's adaLN-Zero-with-text baseline). Text handling (``y_proj``, two encoders, the learned null caption,
  the per-run ``TextCache``) is in ``dtx_gentron.text_inputs``.
- **Motion-free mask** (``motion_free`` [B] bool): TempSelfAttn attends each frame to itself only (the layer is not
  skipped: softmax over one key is 1). A clip's frames share its text, so they attend to it as one query sequence.

Shapes: T2I ``x`` [B, C, H, W] (``GenTron``); T2V ``x`` [B, F, C, H, W] (``GenTronT2V``), built when
``num_frames > 0``. Timesteps are DDPM indices in [0, 1000), as DiT's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from einops import rearrange, repeat
from torch import nn

from dtx.errors import ShapeError
from dtx.layers.context_parallel import ContextGroup
from dtx.layers import (AdaLNBlock, Attention, BlockStack, CrossAttention, FinalLayer, Linear, Mlp, PatchTransformer,
                        TransformerConfig, frame_positions, layer_norm, per_sample_timesteps, rope_angles,
                        sincos_1d_torch)

from . import text_inputs
from .text_inputs import Text, TextCache

Conditioning = Literal["cross-attention", "adaln"]
TemporalPos = Literal["rope", "sincos", "rope+sincos", "none"]
FrameEmbed = Literal["none", "tokens"]


@dataclass
class GenTronConfig(TransformerConfig):
    """Architecture of one GenTron; the defaults are GenTron-XL/2 on 32x32x4 latents with the offline MiniLM text
    encoder's width (384)."""

    context_dim: int = 384  # width of the text tokens (MiniLM 384, CLIP-L 768, T5-XXL 4096)
    context_dim_2: int = 0  # > 0: a second text sequence (CLIP + T5); odd blocks attend to it
    text_length: int = 32  # tokens per caption (the encoder's max_length): the learned null's length
    conditioning: Conditioning = "cross-attention"
    learned_null: bool = False  # a learned null caption, substituted where ``text_null`` is True
    num_frames: int = 0  # 0: text-to-image; > 0: text-to-video clips of this many frames (TempSelfAttn)
    temporal_pos: TemporalPos = "rope"  # RoPE over frames in TempSelfAttn; "sincos": absolute frame table on its input
    frame_embed: FrameEmbed = "none"  # "tokens": a learned map of the frame's sin-cos table added to its tokens

    @property
    def cross_attention(self) -> bool:
        return self.conditioning == "cross-attention"

    def validate_options(self) -> None:
        self.check_min(1, "context_dim", "text_length")
        self.check_min(0, "context_dim_2", "num_frames")
        if "rope" in self.temporal_pos:
            self.check_head_split(2, "rope rotates pairs of head dimensions")


#: The paper's two sizes (G/2: depth, width and MLP scaled together) and two small ones for CPU.
GENTRON_PRESETS: dict[str, dict[str, int]] = {
    "GenTron-S/2": {"depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 2},
    "GenTron-B/2": {"depth": 12, "hidden_size": 768, "num_heads": 12, "patch_size": 2},
    "GenTron-XL/2": {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2},
    "GenTron-G/2": {"depth": 48, "hidden_size": 1664, "num_heads": 16, "patch_size": 2},
}


# -- what one forward pass shares -------------------------------------------------------------------------------------

@dataclass
class Frames:
    """T2V layout: clips, frames, the rotary angles and absolute table over frames, the motion-free mask."""

    batch: int
    frames: int
    theta: torch.Tensor | None  # [F, head_dim / 2]
    mask: torch.Tensor | None  # [(B n), 1, F, F] bool: identity for motion-free samples, all True otherwise
    pos: torch.Tensor | None = None  # [F, D] sin-cos table of the frame index, added to TempSelfAttn's input
    group: ContextGroup | None = None  # context parallel: frames split over its ranks, positions for TempSelfAttn


# -- block -------------------------------------------------------------------------------------------------------------

class GenTronBlock(AdaLNBlock):
    """DiT's adaLN-Zero block (``norm1 attn norm2 mlp adaLN_modulation``) with ``cross_attn`` (cross-attention
    conditioning) and, in T2V models, ``temp_norm`` + ``temp_attn`` (TempSelfAttn) between attention and MLP."""

    def __init__(self, cfg: GenTronConfig, temporal: bool) -> None:
        super().__init__(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, gated=True)
        d = cfg.hidden_size
        self.cross_attn = CrossAttention(d, cfg.num_heads) if cfg.cross_attention else None
        self.temp_norm = layer_norm(d, affine=True) if temporal else None
        self.temp_attn = Attention(d, cfg.num_heads, qkv_bias=True) if temporal else None

    def _cross(self, x: torch.Tensor, text: Text, frames: Frames | None) -> torch.Tensor:
        """Cross-attention to the clip's text; a clip's frames share it, so they attend as one query sequence."""
        if frames is None:
            return self.cross_attn(x, text.tokens, text.mask, kv=text.kv)  # [B, N, D]
        h = rearrange(x, "(b f) n d -> b (f n) d", b=frames.batch)  # [B, (F N), D]
        h = self.cross_attn(h, text.tokens, text.mask, kv=text.kv)  # [B, (F N), D]
        return rearrange(h, "b (f n) d -> (b f) n d", n=x.shape[1])  # [(B F), N, D]

    def _between(self, x: torch.Tensor, text: Text | None, frames: Frames | None) -> torch.Tensor:
        if self.cross_attn is not None and text is not None:
            x = x + self._cross(x, text, frames)  # [(B F), N, D]; PixArt: no norm, no gate
        if self.temp_attn is not None and frames is not None:
            h = rearrange(x, "(b f) n d -> b f n d", b=frames.batch)  # [B, F, N, D]
            if frames.group is not None:  # this rank's frames -> every frame of its N / n positions
                h = frames.group.all_to_all(h, scatter_dim=2, gather_dim=1)  # [B, F, N / n, D]
            h = self.temp_norm(rearrange(h, "b f n d -> (b n) f d"))  # [(B N), F, D]
            if frames.pos is not None:
                h = h + frames.pos.to(h.dtype)  # [(B N), F, D]: each frame's absolute index
            h = rearrange(self.temp_attn(h, mask=frames.mask, theta=frames.theta), "(b n) f d -> b f n d",
                          b=frames.batch)  # [B, F, N, D]
            if frames.group is not None:
                h = frames.group.all_to_all(h, scatter_dim=1, gather_dim=2)  # [B, F / n, N, D]
            x = x + rearrange(h, "b f n d -> (b f) n d")  # [(B F), N, D]
        return x

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: Text | None = None,  # type: ignore[override]
                frames: Frames | None = None) -> torch.Tensor:
        return super().forward(x, c, between=lambda h: self._between(h, text, frames))


# -- model -------------------------------------------------------------------------------------------------------------

class GenTron(PatchTransformer):
    """Text-to-image GenTron: ``forward(x, t, context, context_mask, pooled)`` -> [B, out_channels, H, W]."""

    config_class = GenTronConfig
    #: linear layers by role, for LoRA targets (``finetune.lora.targets``)
    lora_groups = {"attention": [r"blocks\.\d+\.attn\.(qkv|proj)"], "mlp": [r"blocks\.\d+\.mlp\.fc[12]"],
                   "adaln": [r"blocks\.\d+\.adaLN_modulation\.1"],
                   "cross-attention": [r"blocks\.\d+\.cross_attn\.(q|kv|proj)"],
                   "temporal": [r"blocks\.\d+\.temp_attn\.(qkv|proj)"]}
    #: step-cache options calibrated on the demos (euler-ancestral 25 steps, held-out prompts): under the ancestral
    #: sampler's fresh noise the core's thresholds (first-block 0.2, teacache 0.4) skip nothing in T2V (first-block)
    #: or T2I (teacache); these skip about half the full evaluations in both without a drop in all-correct
    step_cache_defaults = {"first-block": {"threshold": 0.3}, "teacache": {"threshold": 0.8}}

    def __init__(self, config: GenTronConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg, d = self.config, self.config.hidden_size
        video = cfg.num_frames > 0
        self.context_dim = cfg.context_dim
        self.add_embedders()
        self.pooled_embedder = Mlp(cfg.context_dim, d, act_layer=nn.SiLU, out_features=d)
        self.y_proj = Mlp(cfg.context_dim, d, out_features=d) if cfg.cross_attention else None
        self.y_proj_2 = Mlp(cfg.context_dim_2, d, out_features=d) if cfg.cross_attention and cfg.context_dim_2 else None
        self.null_context = self.null_context_2 = None  # PixArt's learned null caption: randn / sqrt(dim)
        if cfg.learned_null:
            self.null_context = nn.Parameter(torch.randn(cfg.text_length, cfg.context_dim) / cfg.context_dim ** 0.5)
            if cfg.context_dim_2:
                self.null_context_2 = nn.Parameter(torch.randn(cfg.text_length, cfg.context_dim_2)
                                                   / cfg.context_dim_2 ** 0.5)
        tables = video and ("sincos" in cfg.temporal_pos or cfg.frame_embed == "tokens")
        self.register_buffer("frame_pos", sincos_1d_torch(d, cfg.num_frames) if tables else None,
                             persistent=False)  # [1, F, D]; not in checkpoints
        self.frame_embedder = Linear(d, d) if video and cfg.frame_embed == "tokens" else None
        self.blocks = BlockStack([GenTronBlock(cfg, temporal=video) for _ in range(cfg.depth)],
                                 recompute_every=int(cfg.grad_checkpointing))
        self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels)
        self.init_dit_weights()
        for linear in (self.pooled_embedder, self.y_proj, self.y_proj_2):  # N(0, 0.02) text MLPs (PixArt's)
            if linear is not None:
                nn.init.normal_(linear.fc1.weight, std=0.02)
                nn.init.normal_(linear.fc2.weight, std=0.02)
        zeroed = [self.frame_embedder] + [sub.proj for block in self.blocks
                                          for sub in (block.cross_attn, block.temp_attn) if sub is not None]
        for linear in filter(None, zeroed):  # zero: the output stays 0 and a T2V model starts as its T2I model
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def example_conditions(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Text inputs of the configured shapes (for ``dtx flops`` and the conformance checks)."""
        cfg, n = self.config, self.config.text_length
        out = {"context": torch.zeros(batch, n, cfg.context_dim, device=device),
               "context_mask": torch.ones(batch, n, dtype=torch.bool, device=device),
               "pooled": torch.zeros(batch, cfg.context_dim, device=device)}
        if cfg.context_dim_2:
            out["context_2"] = torch.zeros(batch, n, cfg.context_dim_2, device=device)
            out["context_mask_2"] = torch.ones(batch, n, dtype=torch.bool, device=device)
        return out

    def prepare_conditions(self, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                           pooled: torch.Tensor | None = None, text_null: torch.Tensor | None = None,
                           context_2: torch.Tensor | None = None, context_mask_2: torch.Tensor | None = None,
                           motion_free: torch.Tensor | None = None) -> dict[str, Any]:
        """``forward``'s keywords for this batch plus ``text_cache``, the text work done once (see ``TextCache``);
        samplers call it once per run instead of redoing the work every step."""
        return text_inputs.prepare(self, {"context": context, "context_mask": context_mask, "pooled": pooled,
                                          "text_null": text_null, "context_2": context_2,
                                          "context_mask_2": context_mask_2, "motion_free": motion_free})

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                text_null: torch.Tensor | None = None, context_2: torch.Tensor | None = None,
                context_mask_2: torch.Tensor | None = None, motion_free: torch.Tensor | None = None,
                text_cache: TextCache | None = None) -> torch.Tensor:
        """x: [B, C, H, W] (T2V: [B, F, C, H, W]); t: [B] timesteps; context [B, L, context_dim] with
        context_mask [B, L] (True = token); pooled [B, context_dim]; text_null [B] (learned null caption);
        context_2/context_mask_2 (second encoder); motion_free [B] (T2V); text_cache: this batch's text work done
        beforehand (``prepare_conditions``), used instead of redoing it."""
        self.check_input(x)
        video, b = self.channel_dim == 2, x.shape[0]
        if motion_free is not None and not video:
            raise ShapeError("motion_free is a text-to-video input; this GenTron is text-to-image (num_frames 0)")
        if text_cache is not None:
            text_cond, texts = text_cache.cond, text_inputs.cached_text(self, b, text_cache)
        else:  # [B, D], projected captions
            text_cond, texts = text_inputs.encode_text(self, b, context, context_mask, pooled, text_null, context_2,
                                                       context_mask_2)
        c = self.t_embedder(per_sample_timesteps(t, b, x.device, "GenTron")) + text_cond  # [B, D]
        h, grid = self.embed_patches(x)  # [(B F), N, D]
        layout = None
        if video:
            frames, group = x.shape[1], self.context_group
            local = frames // group.size if group is not None else frames  # this rank's frames
            c = repeat(c, "b d -> (b f) d", f=local)  # [(B F), D]
            table = None if self.frame_pos is None else frame_positions(self.frame_pos, frames)[0]  # [F, D]
            layout = frame_layout(self.config, b, frames, h.shape[1], motion_free, x.device, table, group)
            if self.frame_embedder is not None:
                own = table if group is None else group.shard(table, dim=0)  # [F, D] of this rank's frames
                h = h + repeat(self.frame_embedder(own), "f d -> (b f) 1 d", b=b).to(h.dtype)  # [(B F), N, D]
        stride = 2 if texts[1] is not None else 1

        def block_args(i: int) -> tuple[Any, ...]:
            text = texts[i % stride]
            return c, None if text is None else text.at(i // stride), layout  # this block's caption or K/V [B, L, 2D]

        h = self.blocks.run(h, block_args)  # [(B F), N, D]
        return self.output(self.final_layer(h, c), b, grid)  # [B, (F,) out, H, W]


class GenTronT2V(GenTron):
    """Text-to-video GenTron: TempSelfAttn in every block, ``forward(..., motion_free)`` on [B, F, C, H, W]."""

    channel_dim = 2


def frame_layout(cfg: GenTronConfig, b: int, f: int, tokens: int, motion_free: torch.Tensor | None,
                 device: torch.device, pos: torch.Tensor | None = None, group: ContextGroup | None = None) -> Frames:
    """Rotary angles and the sin-cos table over the F frames (as ``temporal_pos`` asks; ``pos``: the table when the
    caller holds it) and, for motion-free samples, TempSelfAttn's identity mask over the ``tokens`` positions of a
    frame (context parallel: this rank's share of them)."""
    tokens = tokens if group is None else tokens // group.size
    theta = rope_angles(cfg.hidden_size // cfg.num_heads, f, device) if "rope" in cfg.temporal_pos else None
    if "sincos" not in cfg.temporal_pos:
        pos = None
    elif pos is None:
        pos = sincos_1d_torch(cfg.hidden_size, f)[0].to(device)  # [F, D]
    mask = None
    if motion_free is not None:
        free = torch.as_tensor(motion_free, device=device).bool().reshape(-1)
        if free.shape != (b,):
            raise ShapeError(f"motion_free must be [{b}] booleans, got {list(free.shape)}")
        # built whenever motion_free is given (no branch on its values: one compiled graph for every batch)
        eye = torch.eye(f, dtype=torch.bool, device=device)  # [F, F]
        per_clip = eye | ~free.view(b, 1, 1)  # [B, F, F]: identity where motion-free, all True elsewhere
        mask = repeat(per_clip, "b i j -> (b n) 1 i j", n=tokens)  # [(B N), 1, F, F]
    return Frames(batch=b, frames=f, theta=theta, mask=mask, pos=pos, group=group)


def build_gentron(config: GenTronConfig | None = None, **overrides: Any) -> GenTron:
    """``GenTronT2V`` when ``num_frames > 0``, else the text-to-image ``GenTron``."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else GenTronConfig(**overrides)
    return (GenTronT2V if cfg.num_frames > 0 else GenTron)(cfg)
