"""GenTron (Chen et al., CVPR 2024): text-to-image and text-to-video diffusion transformers built from DiT's blocks.

GenTron has no official code, so every choice the paper leaves open is made here and documented in the README:

- **Blocks** are the core's DiT block (``dtx.layers.AdaLNBlock``: adaLN-Zero self-attention and MLP, DiT's state-dict
  names) with sub-layers between the attention and the MLP:
  - ``cross_attn``: PixArt-alpha's form (no norm, no gate, zero-initialised output projection) over the projected
    text tokens, with the padding mask (conditioning "cross-attention", the paper's winner);
  - T2V only, ``temp_norm`` + ``temp_attn`` = TempSelfAttn after the cross-attention: pre-LN self-attention over
    the frames of each token position, ``(b f) n d -> (b n) f d``, with temporal positions (the paper is silent on
    them; attention without them could not tell forward from backward motion): RoPE over the frame index
    (``temporal_pos: rope``, default), a sin-cos table of the frame index added to its normalised input (``sincos``,
    as AnimateDiff's motion module), or both; its output projection is zero-initialised, so a T2V model built from
    a T2I model starts as the per-frame T2I model with any of them. ``frame_embed: tokens`` also adds a learned
    linear map of the frame's sin-cos table to every token of the frame before the blocks (Latte adds its fixed table
    to the residual stream the same way); zero-initialised, so that start is kept.
- **Condition** c = t_emb + pooled_embedder(pooled text) drives adaLN (both designs); conditioning "adaln" has no
  cross-attention (the paper's adaLN-Zero-with-text baseline).
- **Text** ``context`` [B, L, context_dim] is projected once by ``y_proj`` (PixArt's caption MLP) to the model width;
  with two encoders (CLIP + T5, ``context_dim_2``) even blocks attend to ``context`` and odd blocks to
  ``context_2``. ``learned_null`` adds a learned null caption (``null_context``, PixArt's ``randn / sqrt(dim)`` init)
  substituted where ``text_null`` is True; otherwise the null caption is the encoder's output for "".
- **Motion-free mask** (``motion_free`` [B] bool): TempSelfAttn attends each frame to itself only, so its output is
  the per-token map proj(W_v LN(x)) -- the layer is not skipped (softmax over a single key is 1).
- **Prepared conditions**: ``prepare_conditions`` adds a ``TextCache`` to the text keywords (the text part of c and
  every block's cross-attention K/V), which samplers compute once per run instead of once per step; ``forward``
  always takes the text keywords and uses the cache, when given, instead of redoing that work. A clip's frames share
  its text, so in T2V they attend to it as one query sequence ``(b f) n d -> b (f n) d``: the K/V are never repeated
  per frame.

Shapes: T2I ``x`` [B, C, H, W] (``GenTron``, ``channel_dim`` 1); T2V ``x`` [B, F, C, H, W] (``GenTronT2V``,
``channel_dim`` 2), built when ``num_frames > 0``. Timesteps are DDPM indices in [0, 1000), as DiT's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from einops import rearrange, repeat
from torch import nn

from dtx.config import check
from dtx.errors import ShapeError
from dtx.layers import (AdaLNBlock, Attention, BlockStack, CrossAttention, FinalLayer, Linear, Mlp, PatchEmbed,
                        PatchGridConfig, TimestepEmbedder, dit_base_init, frame_positions, grid_positions, layer_norm,
                        per_sample_timesteps, rope_angles, sincos_1d_torch, sincos_2d_torch, unpatchify)

Conditioning = Literal["cross-attention", "adaln"]
TemporalPos = Literal["rope", "sincos", "rope+sincos", "none"]
FrameEmbed = Literal["none", "tokens"]
CONDITIONINGS: tuple[str, ...] = get_args(Conditioning)
TEMPORAL_POS: tuple[str, ...] = get_args(TemporalPos)
FRAME_EMBEDS: tuple[str, ...] = get_args(FrameEmbed)


@dataclass
class GenTronConfig(PatchGridConfig):
    """Architecture of one GenTron; the defaults are GenTron-XL/2 on 32x32x4 latents with the offline MiniLM text
    encoder's width (384)."""

    input_size: Any = 32  # latent side, or [height, width]
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0  # GenTron-XL/2: 4608 = 4 x 1152; G/2: 6656 = 4 x 1664
    context_dim: int = 384  # width of the text tokens (MiniLM 384, CLIP-L 768, T5-XXL 4096)
    context_dim_2: int = 0  # > 0: a second text sequence (CLIP + T5); odd blocks attend to it
    text_length: int = 32  # tokens per caption (the encoder's max_length): the learned null's length
    conditioning: Conditioning = "cross-attention"
    learned_null: bool = False  # a learned null caption, substituted where ``text_null`` is True
    num_frames: int = 0  # 0: text-to-image; > 0: text-to-video clips of this many frames (TempSelfAttn)
    temporal_pos: TemporalPos = "rope"  # RoPE over frames in TempSelfAttn; "sincos": absolute frame table on its input
    frame_embed: FrameEmbed = "none"  # "tokens": a learned map of the frame's sin-cos table added to its tokens
    learn_sigma: bool = True
    grad_checkpointing: bool = False

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def cross_attention(self) -> bool:
        return self.conditioning == "cross-attention"

    def validate(self) -> "GenTronConfig":
        self.validate_transformer()
        for name in ("context_dim", "text_length"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.context_dim_2 >= 0, "context_dim_2", f"must be >= 0, got {self.context_dim_2}")
        check(self.conditioning in CONDITIONINGS, "conditioning",
              f"{self.conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
        check(self.num_frames >= 0, "num_frames", f"must be >= 0 (0 = text-to-image), got {self.num_frames}")
        check(self.temporal_pos in TEMPORAL_POS, "temporal_pos",
              f"{self.temporal_pos!r} is not one of {', '.join(TEMPORAL_POS)}")
        check(self.frame_embed in FRAME_EMBEDS, "frame_embed",
              f"{self.frame_embed!r} is not one of {', '.join(FRAME_EMBEDS)}")
        check("rope" not in self.temporal_pos or (self.hidden_size // self.num_heads) % 2 == 0, "num_heads",
              f"rope rotates pairs of head dimensions, so the head size must be even, got "
              f"{self.hidden_size // self.num_heads}")
        return self


#: The paper's two sizes (G/2: depth, width and MLP scaled together) and two small ones for CPU.
GENTRON_PRESETS: dict[str, dict[str, int]] = {
    "GenTron-S/2": {"depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 2},
    "GenTron-B/2": {"depth": 12, "hidden_size": 768, "num_heads": 12, "patch_size": 2},
    "GenTron-XL/2": {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2},
    "GenTron-G/2": {"depth": 48, "hidden_size": 1664, "num_heads": 16, "patch_size": 2},
}


# -- what one forward pass shares -------------------------------------------------------------------------------------

@dataclass
class Text:
    """Text of one forward pass, per clip: projected tokens [B, L, D] (raw inputs) or the cross-attention K/V of the
    blocks attending to it [B, blocks, L, 2D] (prepared inputs; one block's [B, L, 2D] after ``at``), key mask
    [B, L]."""

    tokens: torch.Tensor | None
    mask: torch.Tensor | None
    kv: torch.Tensor | None = None

    def at(self, j: int) -> Text:
        """This text as the j-th block attending to it sees it."""
        return self if self.kv is None else Text(self.tokens, self.mask, self.kv[:, j])  # kv [B, L, 2D]


@dataclass
class TextCache:
    """The step-invariant text work of one batch (``prepare_conditions``): the text part of c ``cond`` [B, D] and
    the cross-attention K/V of the blocks attending to each text ``kv`` [B, blocks, L, 2D] with its key mask
    ``mask`` [B, L] (``_2``: the second encoder's, odd blocks). A memo of the batch's text keywords, never a
    replacement for them."""

    cond: torch.Tensor
    kv: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    kv_2: torch.Tensor | None = None
    mask_2: torch.Tensor | None = None


@dataclass
class Frames:
    """T2V layout: clips, frames, the rotary angles and absolute table over frames, the motion-free mask."""

    batch: int
    frames: int
    theta: torch.Tensor | None  # [F, head_dim / 2]
    mask: torch.Tensor | None  # [(B n), 1, F, F] bool: identity for motion-free samples, all True otherwise
    pos: torch.Tensor | None = None  # [F, D] sin-cos table of the frame index, added to TempSelfAttn's input


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
        return rearrange(h, "b (f n) d -> (b f) n d", f=frames.frames)  # [(B F), N, D]

    def _between(self, x: torch.Tensor, text: Text | None, frames: Frames | None) -> torch.Tensor:
        if self.cross_attn is not None and text is not None:
            x = x + self._cross(x, text, frames)  # [(B F), N, D]; PixArt: no norm, no gate
        if self.temp_attn is not None and frames is not None:
            h = self.temp_norm(rearrange(x, "(b f) n d -> (b n) f d", b=frames.batch))  # [(B N), F, D]
            if frames.pos is not None:
                h = h + frames.pos.to(h.dtype)  # [(B N), F, D]: each frame's absolute index
            h = self.temp_attn(h, mask=frames.mask, theta=frames.theta)  # [(B N), F, D]
            x = x + rearrange(h, "(b n) f d -> (b f) n d", b=frames.batch)  # [(B F), N, D]
        return x

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: Text | None = None,  # type: ignore[override]
                frames: Frames | None = None) -> torch.Tensor:
        return super().forward(x, c, between=lambda h: self._between(h, text, frames))




# -- model -------------------------------------------------------------------------------------------------------------

class GenTron(nn.Module):
    """Text-to-image GenTron: ``forward(x, t, context, context_mask, pooled)`` -> [B, out_channels, H, W]."""

    channel_dim = 1
    noise_input = "timestep"
    num_timesteps = 1000
    num_classes = 0
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
        super().__init__()
        cfg = dataclasses.replace(config, **overrides) if config is not None else GenTronConfig(**overrides)
        self.config = cfg.validate()
        d, p = cfg.hidden_size, cfg.patch_size
        self.in_channels, self.out_channels, self.learn_sigma = cfg.in_channels, cfg.out_channels, cfg.learn_sigma
        self.patch_size, self.grid_size = p, cfg.grid
        self.context_dim = cfg.context_dim
        self.x_embedder = PatchEmbed(p, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.pooled_embedder = Mlp(cfg.context_dim, d, act_layer=nn.SiLU, out_features=d)
        self.y_proj = Mlp(cfg.context_dim, d, out_features=d) if cfg.cross_attention else None
        self.y_proj_2 = (Mlp(cfg.context_dim_2, d, out_features=d)
                         if cfg.cross_attention and cfg.context_dim_2 else None)
        if cfg.learned_null:
            self.null_context = nn.Parameter(torch.randn(cfg.text_length, cfg.context_dim) / cfg.context_dim ** 0.5)
            self.null_context_2 = (nn.Parameter(torch.randn(cfg.text_length, cfg.context_dim_2)
                                                / cfg.context_dim_2 ** 0.5) if cfg.context_dim_2 else None)
        else:
            self.null_context = self.null_context_2 = None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], d), requires_grad=False)
        frame_pos = sincos_1d_torch(d, cfg.num_frames) if cfg.num_frames > 0 and "sincos" in cfg.temporal_pos else None
        self.register_buffer("frame_pos", frame_pos, persistent=False)  # [1, F, D]; not in checkpoints
        self.frame_embedder = Linear(d, d) if cfg.num_frames > 0 and cfg.frame_embed == "tokens" else None
        self.blocks = BlockStack([GenTronBlock(cfg, temporal=cfg.num_frames > 0) for _ in range(cfg.depth)],
                                 recompute_every=int(cfg.grad_checkpointing))
        self.final_layer = FinalLayer(d, p, self.out_channels)
        self.initialize_weights()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.config.input_hw)

    def initialize_weights(self) -> None:
        """DiT's init (xavier linears, zero biases, N(0, 0.02) t-MLP, zero adaLN and final linear) plus PixArt's
        N(0, 0.02) caption MLP and zero cross-attention projection, and a zero TempSelfAttn projection: the output
        is exactly 0 at init, and a T2V model equals its T2I model frame by frame."""
        dit_base_init(self, self.x_embedder.proj)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_torch(self.config.hidden_size, *self.grid_size))
        for mlp in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.pooled_embedder.fc1,
                    self.pooled_embedder.fc2):
            nn.init.normal_(mlp.weight, std=0.02)
        for proj in (self.y_proj, self.y_proj_2):
            if proj is not None:
                nn.init.normal_(proj.fc1.weight, std=0.02)
                nn.init.normal_(proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            for sub in (block.cross_attn, block.temp_attn):
                if sub is not None:
                    nn.init.zeros_(sub.proj.weight)
                    nn.init.zeros_(sub.proj.bias)
        if self.frame_embedder is not None:  # zero: a T2V model still starts as its T2I model frame by frame
            nn.init.zeros_(self.frame_embedder.weight)
            nn.init.zeros_(self.frame_embedder.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- inputs ------------------------------------------------------------------------------------------------------

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

    def _text(self, context: torch.Tensor | None, mask: torch.Tensor | None, null_param: torch.Tensor | None,
              text_null: torch.Tensor | None, width: int, b: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked text tokens [B, L, width] and mask [B, L] (all True when none), the learned null substituted."""
        if context is None:
            raise ShapeError(f"GenTron needs text: {name} [B, L, {width}] (run a text conditioner)")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != width:
            raise ShapeError(f"{name} must be [{b}, L, {width}], got {list(context.shape)}")
        if mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        if mask.shape != context.shape[:2]:
            raise ShapeError(f"{name} mask must be {list(context.shape[:2])}, got {list(mask.shape)}")
        mask = mask.bool()
        if text_null is not None and null_param is not None:
            if null_param.shape[0] != context.shape[1]:
                raise ShapeError(f"{name} has {context.shape[1]} tokens but the learned null caption has "
                                 f"{null_param.shape[0]} (text_length)")
            drop = text_null.bool().view(b, 1, 1)
            context = torch.where(drop, null_param.to(context.dtype)[None], context)
            mask = mask | drop.view(b, 1)
        return context, mask

    def _text_condition(self, context: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None,
                        text_null: torch.Tensor | None, b: int) -> torch.Tensor:
        """pooled_embedder(pooled text) [B, D], the text part of c; without ``pooled``, the tokens' masked mean."""
        if pooled is None or (text_null is not None and self.null_context is not None):
            weights = mask.to(context.dtype).unsqueeze(-1)  # [B, L, 1]
            mean = (context * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [B, C_txt]
            pooled = mean if pooled is None else torch.where(text_null.bool()[:, None], mean, pooled)
        if pooled.shape != (b, self.config.context_dim):
            raise ShapeError(f"pooled must be [{b}, {self.config.context_dim}], got {list(pooled.shape)}")
        return self.pooled_embedder(pooled)  # [B, D]

    def _encode_text(self, b: int, context: torch.Tensor | None, context_mask: torch.Tensor | None,
                     pooled: torch.Tensor | None, text_null: torch.Tensor | None, context_2: torch.Tensor | None,
                     context_mask_2: torch.Tensor | None) -> tuple[torch.Tensor, list[Text | None]]:
        """The text part of c [B, D] and the projected captions (None without cross-attention) from raw inputs."""
        cfg = self.config
        if context is None and pooled is not None and not cfg.cross_attention:
            return self.pooled_embedder(pooled), [None, None]  # [B, D]: adaLN-only needs the pooled text alone
        ctx, mask = self._text(context, context_mask, self.null_context, text_null, cfg.context_dim, b, "context")
        text_cond = self._text_condition(ctx, mask, pooled, text_null, b)  # [B, D]
        texts: list[Text | None] = [None, None]
        if cfg.cross_attention:
            texts[0] = Text(self.y_proj(ctx), mask)  # [B, L, D]
            if cfg.context_dim_2:
                ctx2, mask2 = self._text(context_2, context_mask_2, self.null_context_2, text_null,
                                         cfg.context_dim_2, b, "context_2")
                texts[1] = Text(self.y_proj_2(ctx2), mask2)  # [B, L2, D]
        return text_cond, texts

    def _text_blocks(self) -> list[range]:
        """Indices of the blocks attending to each text: all, or even/odd ones with two encoders."""
        depth = self.config.depth
        return [range(0, depth, 2), range(1, depth, 2)] if self.config.context_dim_2 else [range(depth)]

    # -- prepared conditions -------------------------------------------------------------------------------------

    def prepare_conditions(self, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                           pooled: torch.Tensor | None = None, text_null: torch.Tensor | None = None,
                           context_2: torch.Tensor | None = None, context_mask_2: torch.Tensor | None = None,
                           motion_free: torch.Tensor | None = None) -> dict[str, Any]:
        """``forward``'s keywords for this batch plus ``text_cache``, the text work done once (see ``TextCache``);
        samplers call it once per run instead of redoing the work every step."""
        rows = context if context is not None else pooled
        if rows is None:
            raise ShapeError(f"GenTron needs text: context [B, L, {self.config.context_dim}] (run a text conditioner)")
        raw = {"context": context, "context_mask": context_mask, "pooled": pooled, "text_null": text_null,
               "context_2": context_2, "context_mask_2": context_mask_2, "motion_free": motion_free}
        text_cond, texts = self._encode_text(rows.shape[0], context, context_mask, pooled, text_null, context_2,
                                             context_mask_2)
        parts: dict[str, torch.Tensor | None] = {}
        for suffix, text, blocks in zip(("", "_2"), texts, self._text_blocks()):
            if text is not None:
                kvs = [self.blocks[i].cross_attn.project_context(text.tokens) for i in blocks]  # each [B, L, 2D]
                parts["kv" + suffix] = torch.stack(kvs, dim=1)  # [B, blocks, L, 2D]
                parts["mask" + suffix] = text.mask  # [B, L]
        cache = TextCache(text_cond, **parts)  # type: ignore[arg-type]
        return {**{k: v for k, v in raw.items() if v is not None}, "text_cache": cache}

    def _cached_text(self, b: int, cache: TextCache) -> list[Text | None]:
        """The blocks' texts from a checked ``TextCache`` (per-block K/V)."""
        d = self.config.hidden_size
        if cache.cond.shape != (b, d):
            raise ShapeError(f"text_cache.cond must be [{b}, {d}] (prepare_conditions of this batch), got "
                             f"{list(cache.cond.shape)}")
        texts: list[Text | None] = [None, None]
        if not self.config.cross_attention:
            return texts
        for j, blocks in enumerate(self._text_blocks()):
            name = "text_cache.kv" + ("_2" if j else "")
            kv, mask = (cache.kv_2, cache.mask_2) if j else (cache.kv, cache.mask)
            if kv is None or kv.ndim != 4 or kv.shape[:2] != (b, len(blocks)) or kv.shape[3] != 2 * d:
                got = None if kv is None else list(kv.shape)
                raise ShapeError(f"{name} must be [{b}, {len(blocks)}, L, {2 * d}] (prepare_conditions), got {got}")
            if mask is not None and mask.shape != kv.shape[:1] + kv.shape[2:3]:
                raise ShapeError(f"{name} mask must be {[b, kv.shape[2]]}, got {list(mask.shape)}")
            texts[j] = Text(None, mask, kv)  # kv [B, blocks, L, 2D], mask [B, L]
        return texts

    # -- forward -----------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                text_null: torch.Tensor | None = None, context_2: torch.Tensor | None = None,
                context_mask_2: torch.Tensor | None = None, motion_free: torch.Tensor | None = None,
                text_cache: TextCache | None = None) -> torch.Tensor:
        """x: [B, C, H, W] (T2V: [B, F, C, H, W]); t: [B] timesteps; context [B, L, context_dim] with
        context_mask [B, L] (True = token); pooled [B, context_dim]; text_null [B] (learned null caption);
        context_2/context_mask_2 (second encoder); motion_free [B] (T2V); text_cache: this batch's text work done
        beforehand (``prepare_conditions``), used instead of redoing it."""
        video = self.channel_dim == 2
        if x.ndim != 3 + self.channel_dim or x.shape[self.channel_dim] != self.in_channels:
            shape = f"[B, F, {self.in_channels}, H, W] clips" if video else f"[B, {self.in_channels}, H, W] images"
            raise ShapeError(f"{type(self).__name__} expects {shape}, got {list(x.shape)}")
        if motion_free is not None and not video:
            raise ShapeError("motion_free is a text-to-video input; this GenTron is text-to-image (num_frames 0)")
        b = x.shape[0]
        if text_cache is not None:
            text_cond, texts = text_cache.cond, self._cached_text(b, text_cache)
        else:
            text_cond, texts = self._encode_text(b, context, context_mask, pooled, text_null, context_2,
                                                 context_mask_2)  # [B, D], projected captions
        t = per_sample_timesteps(t, b, x.device, "GenTron")
        c = self.t_embedder(t) + text_cond  # [B, D]
        return self._run_blocks(x, c, texts, motion_free)

    def _run_blocks(self, x: torch.Tensor, c: torch.Tensor, texts: list[Text | None],
                    motion_free: torch.Tensor | None) -> torch.Tensor:
        """Patchify, the blocks (each with its text) and the final layer: x [B, (F,) C, H, W] -> the output."""
        video, b, p = self.channel_dim == 2, x.shape[0], self.patch_size
        clips = rearrange(x, "b f c h w -> (b f) c h w") if video else x  # [(B F), C, H, W]
        grid_h, grid_w = clips.shape[-2] // p, clips.shape[-1] // p
        h = self.x_embedder(clips)  # [(B F), N, D]
        h = h + grid_positions(self.pos_embed, self.grid_size, grid_h, grid_w)  # [(B F), N, D]
        layout = None
        if video:
            c = repeat(c, "b d -> (b f) d", f=x.shape[1])  # [(B F), D]
            pos = None if self.frame_pos is None else frame_positions(self.frame_pos, x.shape[1])[0]  # [F, D]
            layout = frame_layout(self.config, b, x.shape[1], grid_h * grid_w, motion_free, x.device, pos)
            if self.frame_embedder is not None:
                w = self.frame_embedder.weight
                table = sincos_1d_torch(self.config.hidden_size, x.shape[1])[0].to(w.device, w.dtype)  # [F, D]
                h = h + repeat(self.frame_embedder(table), "f d -> (b f) 1 d", b=b).to(h.dtype)  # [(B F), N, D]
        stride = 2 if texts[1] is not None else 1

        def block_args(i: int) -> tuple[Any, ...]:
            text = texts[i % stride]
            return c, None if text is None else text.at(i // stride), layout  # this block's caption or K/V [B, L, 2D]

        h = self.blocks.run(h, block_args)  # [(B F), N, D]
        h = self.final_layer(h, c)  # [(B F), N, p * p * out]
        out = unpatchify(h, p, self.out_channels, grid_h, grid_w)  # [(B F), out, H, W]
        return rearrange(out, "(b f) c h w -> b f c h w", b=b) if video else out  # [B, (F,) out, H, W]


class GenTronT2V(GenTron):
    """Text-to-video GenTron: TempSelfAttn in every block, ``forward(..., motion_free)`` on [B, F, C, H, W]."""

    channel_dim = 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.config.num_frames, self.in_channels, *self.config.input_hw)


def frame_layout(cfg: GenTronConfig, b: int, f: int, tokens: int, motion_free: torch.Tensor | None,
                 device: torch.device, pos: torch.Tensor | None = None) -> Frames:
    """Rotary angles and the sin-cos table over the F frames (as ``temporal_pos`` asks; ``pos``: the table when the
    caller holds it) and, for motion-free samples, TempSelfAttn's identity mask."""
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
    return Frames(batch=b, frames=f, theta=theta, mask=mask, pos=pos)


def build_gentron(config: GenTronConfig | None = None, **overrides: Any) -> GenTron:
    """``GenTronT2V`` when ``num_frames > 0``, else the text-to-image ``GenTron``."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else GenTronConfig(**overrides)
    return (GenTronT2V if cfg.num_frames > 0 else GenTron)(cfg)
