"""Latte (Ma et al., 2024): a latent video diffusion transformer with the official state-dict layout of
Vchitect/Latte ``models/latte.py`` / ``latte_img.py`` (Variant 1), plus the paper's other design choices.

The paper's design space, each selected by one ``LatteConfig`` option:

- ``variant`` 1..4: how spatial and temporal attention are combined. The four variants are block-spec lists built in
  one place (``block_layout``), and each spec builds its own module (k-diffusion image_transformer_v2 style):

  1. interleaved (official): ``blocks.{i}`` even i spatial, odd i temporal; DiT's names
     ``norm1 attn norm2 mlp adaLN_modulation``.
  2. late fusion: ``blocks.{i}`` for i < depth/2 spatial, then i >= depth/2 temporal; DiT's names as variant 1
     (the same keys: only the order differs, so pass ``variant=2`` when loading).
  3. factorised MHA: every block runs spatial MHA, temporal MHA, MLP; ``norm1 attn_s norm_t attn_t norm2 mlp
     adaLN_modulation adaLN_modulation_t``.
  4. split-head MHA: every block runs half the heads spatially and half temporally in parallel and sums the two
     outputs; ``norm1 split_attn norm2 mlp adaLN_modulation``.

  ``depth`` counts blocks (each with one MLP) in every variant, so Latte-XL/2 is 28 blocks: 14 spatial + 14
  temporal in variants 1 and 2, 28 factorised or split-head blocks in variants 3 and 4.
- ``patch_embed``: "uniform" (a 2D ``PatchEmbed`` per frame, the official one) or "tubelet" (``Conv3d`` with
  kernel = stride = (s, p, p): ``num_frames / s`` token frames, decoded by the final linear layer, unpatchify and a
  ``ConvTranspose3d`` with kernel = stride = (s, 1, 1), ``temporal_upsample``, restoring the frame count).
- ``injection``: "adaln" (S-AdaLN = DiT's adaLN-Zero, the official one) or "tokens" (t and y as extra key/value
  tokens of every attention sequence; plain pre-norm blocks with affine norms and a non-modulated final layer).
- ``temporal_pos``: "absolute" (frozen 1D sin-cos ``temp_embed`` [1, frames, D], added once before the first
  temporal attention, the official one) or "rope" (rotary angles over the frame index inside temporal attention).
- ``spatial_pos``: "absolute" (frozen 2D sin-cos ``pos_embed`` added to the patch tokens, the official one) or
  "rope" (axial rotary angles over the patch grid inside spatial attention, HDiT's; attention then depends on
  relative positions only, so a digit looks the same to it wherever it is, and other resolutions need no table).
- ``use_image_num``: image-video joint training (``latte_img.py``): images appended after the clip's frames go through
  the spatial path only, never through temporal attention nor ``temp_embed``; each image has its own label.

Tensors are [B, F, C, H, W] in and out (``channel_dim = 2``). Token layouts, with einops axis names: ``(b f) t d``
for spatial attention (t = tokens per frame) and ``(b t) f d`` for temporal attention; the residual stream lives in
the spatial layout between blocks.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from dtx.attention import attention
from dtx.config import check
from dtx.diffusion.guidance import combine_guidance
from dtx.errors import ShapeError
from dtx.layers import (Attention, AxialRoPE, BlockStack, FinalLayer, LabelEmbedder, Linear, Mlp, PatchEmbed,
                        PatchGridConfig, TimestepEmbedder, apply_rotary, check_label_range, dit_base_init,
                        grid_positions, layer_norm, make_axial_pos, modulate, per_sample_timesteps, rope_angles,
                        sincos_1d_torch, sincos_2d_torch, unpatchify)

Injection = Literal["adaln", "tokens"]
PatchEmbedding = Literal["uniform", "tubelet"]
TemporalPos = Literal["absolute", "rope"]
SpatialPos = Literal["absolute", "rope"]
INJECTIONS: tuple[str, ...] = get_args(Injection)
PATCH_EMBEDDINGS: tuple[str, ...] = get_args(PatchEmbedding)
TEMPORAL_POS: tuple[str, ...] = get_args(TemporalPos)
VARIANTS = (1, 2, 3, 4)


@dataclass
class LatteConfig(PatchGridConfig):
    """Architecture of one Latte; the defaults are the official Latte-XL/2 (16 frames of 32x32x4 latents,
    unconditional, Variant 1, uniform patches, S-AdaLN, absolute temporal table)."""

    input_size: Any = 32  # latent side, or [height, width]
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28  # blocks; variants 1/2: half spatial, half temporal
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_frames: int = 16  # frames of a clip (without appended images)
    num_classes: int = 0  # 0 = unconditional (official extras=1); UCF101: 101 (extras=2)
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row (null = num_classes) for guidance
    learn_sigma: bool = True
    variant: int = 1  # 1 interleaved (official), 2 late fusion, 3 factorised MHA, 4 split-head MHA
    patch_embed: PatchEmbedding = "uniform"
    temporal_stride: int = 2  # s of "tubelet": num_frames / s token frames; unused by "uniform"
    injection: Injection = "adaln"
    temporal_pos: TemporalPos = "absolute"
    spatial_pos: SpatialPos = "absolute"
    use_image_num: int = 0  # images appended to each clip (joint training); 0 = videos only
    grad_checkpointing: bool = False

    @property
    def stride(self) -> int:
        """Frames per token frame: s for tubelets, 1 for uniform patches."""
        return self.temporal_stride if self.patch_embed == "tubelet" else 1

    @property
    def token_frames(self) -> int:
        """Token frames of a clip of ``num_frames`` frames (the length of ``temp_embed``)."""
        return self.num_frames // self.stride

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def validate(self) -> "LatteConfig":
        self.validate_transformer()
        check(self.variant in VARIANTS, "variant", f"must be 1, 2, 3 or 4, got {self.variant!r}")
        check(self.variant not in (1, 2) or self.depth % 2 == 0, "depth",
              f"variant {self.variant} pairs spatial and temporal blocks, so depth must be even, got {self.depth}")
        check(self.variant != 4 or self.num_heads % 2 == 0, "num_heads",
              f"variant 4 splits the heads in half (spatial, temporal), so num_heads must be even, "
              f"got {self.num_heads}")
        check(self.num_frames >= 1, "num_frames", f"must be >= 1, got {self.num_frames}")
        check(self.num_classes >= 0, "num_classes", f"must be >= 0, got {self.num_classes}")
        check(0.0 <= self.class_dropout_prob < 1.0, "class_dropout_prob",
              f"must be in [0, 1), got {self.class_dropout_prob}")
        check(self.patch_embed in PATCH_EMBEDDINGS, "patch_embed",
              f"{self.patch_embed!r} is not one of {', '.join(PATCH_EMBEDDINGS)}")
        check(self.temporal_stride >= 1, "temporal_stride", f"must be >= 1, got {self.temporal_stride}")
        check(self.patch_embed != "tubelet" or self.num_frames % self.temporal_stride == 0, "num_frames",
              f"{self.num_frames} frames are not divisible by the tubelet temporal_stride {self.temporal_stride}")
        check(self.injection in INJECTIONS, "injection", f"{self.injection!r} is not one of {', '.join(INJECTIONS)}")
        check(self.temporal_pos in TEMPORAL_POS, "temporal_pos",
              f"{self.temporal_pos!r} is not one of {', '.join(TEMPORAL_POS)}")
        check(self.temporal_pos != "rope" or (self.hidden_size // self.num_heads) % 2 == 0, "num_heads",
              f"rope rotates pairs of head dimensions, so the head size must be even, got "
              f"{self.hidden_size // self.num_heads}")
        check(self.spatial_pos in TEMPORAL_POS, "spatial_pos",
              f"{self.spatial_pos!r} is not one of {', '.join(TEMPORAL_POS)}")
        check(self.spatial_pos != "rope" or (self.hidden_size // self.num_heads) % 8 == 0, "num_heads",
              f"axial rope gives a quarter of each head to each axis, so the head size must be divisible by 8, got "
              f"{self.hidden_size // self.num_heads}")
        check(self.use_image_num >= 0, "use_image_num", f"must be >= 0, got {self.use_image_num}")
        check(self.use_image_num == 0 or self.patch_embed == "uniform", "use_image_num",
              "joint image-video training needs patch_embed 'uniform' (a tubelet spans several frames, an image one)")
        return self


#: The official sizes (same as DiT): S/B/L/XL widths and depths times patch sizes 2/4/8.
LATTE_PRESETS: dict[str, dict[str, int]] = {
    f"Latte-{size}/{patch}": {"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": patch}
    for size, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                        "XL": (28, 1152, 16)}.items()
    for patch in (2, 4, 8)
}


# -- one forward pass's token layout -------------------------------------------------------------------------------

@dataclass
class AxisInputs:
    """What attention along one axis takes: the condition, as adaLN input ``c`` [N, D] (injection "adaln") or as
    tokens ``ctx`` [N, n, D] joining the keys and values (injection "tokens"), and the rotary angles, if any."""

    c: torch.Tensor | None = None
    ctx: torch.Tensor | None = None
    rope: torch.Tensor | None = None


@dataclass
class Layout:
    """What the blocks of one forward pass share: sizes, each axis' inputs, the absolute temporal table."""

    batch: int
    frames: int  # token frames of the clip: the temporal attention's sequence length
    images: int  # appended image frames (spatial path only)
    tokens: int  # tokens per frame (grid_h * grid_w)
    spatial: AxisInputs  # N = (b F) sequences of t tokens, F = frames + images; rope [heads, t, head_dim / 4]
    temporal: AxisInputs  # N = (b t) sequences of f frames; rope [frames, head_dim / 2]
    temp_embed: torch.Tensor | None  # absolute temporal table [1, frames, D]


def to_temporal(x: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stream -> (clip tokens in the temporal layout, the appended images' tokens, left as they are)."""
    x = rearrange(x, "(b f) t d -> b f t d", b=lay.batch)  # [B, F, t, D]
    video, images = x[:, :lay.frames], x[:, lay.frames:]  # [B, f, t, D], [B, n_img, t, D]
    return rearrange(video, "b f t d -> (b t) f d"), images  # [(B t), f, D]


def from_temporal(video: torch.Tensor, images: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Inverse of ``to_temporal``: the clip's frames followed by the images, in the spatial layout."""
    video = rearrange(video, "(b t) f d -> b f t d", b=lay.batch)  # [B, f, t, D]
    return rearrange(torch.cat([video, images], dim=1), "b f t d -> (b f) t d")  # [(B F), t, D]


def _modulation(linear: nn.Module | None, c: torch.Tensor | None, chunks: int) -> tuple[torch.Tensor, ...] | None:
    return None if linear is None else linear(c).chunk(chunks, dim=1)


def _sublayer(x: torch.Tensor, norm: nn.Module, fn: Any, mod: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """Pre-norm residual ``x + gate * fn(modulate(norm(x)))`` (adaLN-Zero, ``mod`` = shift, scale, gate) or
    ``x + fn(norm(x))`` (affine norm, no modulation)."""
    if mod is None:
        return x + fn(norm(x))
    shift, scale, gate = mod
    return x + gate.unsqueeze(1) * fn(modulate(norm(x), shift, scale))


# -- blocks ----------------------------------------------------------------------------------------------------------

class AxisBlock(nn.Module):
    """DiT block attending along one axis (variants 1 and 2), with DiT's module names: spatial blocks see each frame's
    t tokens, temporal blocks each position's clip frames (the appended images skip them)."""

    def __init__(self, cfg: LatteConfig, axis: Literal["spatial", "temporal"]) -> None:
        super().__init__()
        d, adaln = cfg.hidden_size, cfg.injection == "adaln"
        self.axis = axis
        self.norm1 = layer_norm(d, affine=not adaln)
        self.attn = Attention(d, cfg.num_heads, qkv_bias=True)
        self.norm2 = layer_norm(d, affine=not adaln)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(d, 6 * d)) if adaln else None

    def _block(self, x: torch.Tensor, axis: AxisInputs) -> torch.Tensor:
        mod = _modulation(self.adaLN_modulation, axis.c, 6)  # shift, scale, gate (msa), shift, scale, gate (mlp)
        context = None if axis.ctx is None else self.norm1(axis.ctx)
        x = _sublayer(x, self.norm1, lambda h: self.attn(h, theta=axis.rope, context=context), mod and mod[:3])
        return _sublayer(x, self.norm2, self.mlp, mod and mod[3:])

    def forward(self, x: torch.Tensor, lay: Layout, add_temp: bool = False) -> torch.Tensor:
        if self.axis == "spatial":
            return self._block(x, lay.spatial)  # [(B F), t, D]
        video, images = to_temporal(x, lay)  # [(B t), f, D], [B, n_img, t, D]
        if add_temp and lay.temp_embed is not None:
            video = video + lay.temp_embed  # [(B t), f, D]; once, before the first temporal attention
        video = self._block(video, lay.temporal)  # [(B t), f, D]
        return from_temporal(video, images, lay)  # [(B F), t, D]


class FactorisedBlock(nn.Module):
    """Variant 3: spatial MHA, then temporal MHA, then the MLP, in one block.

    ``adaLN_modulation`` (6D, DiT's chunk order) modulates the spatial MHA and the MLP per frame, and
    ``adaLN_modulation_t`` (3D: shift, scale, gate) the temporal MHA per position.
    """

    def __init__(self, cfg: LatteConfig) -> None:
        super().__init__()
        d, h, adaln = cfg.hidden_size, cfg.num_heads, cfg.injection == "adaln"
        self.norm1 = layer_norm(d, affine=not adaln)
        self.attn_s = Attention(d, h, qkv_bias=True)
        self.norm_t = layer_norm(d, affine=not adaln)
        self.attn_t = Attention(d, h, qkv_bias=True)
        self.norm2 = layer_norm(d, affine=not adaln)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(d, 6 * d)) if adaln else None
        self.adaLN_modulation_t = nn.Sequential(nn.SiLU(), Linear(d, 3 * d)) if adaln else None

    def forward(self, x: torch.Tensor, lay: Layout, add_temp: bool = False) -> torch.Tensor:
        sp, tm = lay.spatial, lay.temporal
        mod = _modulation(self.adaLN_modulation, sp.c, 6)
        mod_t = _modulation(self.adaLN_modulation_t, tm.c, 3)
        ctx_s = None if sp.ctx is None else self.norm1(sp.ctx)
        x = _sublayer(x, self.norm1, lambda h: self.attn_s(h, theta=sp.rope, context=ctx_s),
                      mod and mod[:3])  # [(B F), t, D]
        video, images = to_temporal(x, lay)  # [(B t), f, D], [B, n_img, t, D]
        if add_temp and lay.temp_embed is not None:
            video = video + lay.temp_embed  # [(B t), f, D]
        ctx_t = None if tm.ctx is None else self.norm_t(tm.ctx)
        video = _sublayer(video, self.norm_t, lambda h: self.attn_t(h, theta=tm.rope, context=ctx_t), mod_t)
        x = from_temporal(video, images, lay)  # [(B F), t, D]
        return _sublayer(x, self.norm2, self.mlp, mod and mod[3:])  # [(B F), t, D]


class SplitHeadBlock(nn.Module):
    """Variant 4: one MHA whose first half of the heads attends spatially and second half temporally, in parallel.

    ``split_attn`` has DiT's attention shapes (``qkv`` [3D, D], ``proj`` [D, D]); projecting the concatenated heads
    equals summing the spatial and the temporal outputs, each projected by its half of ``proj``'s columns (the paper's
    sum). The appended images have no temporal half (zeros there). With an absolute temporal table, ``temp_embed`` is
    added to the residual stream at the start of the first block (its temporal heads run in parallel with the
    spatial ones).
    """

    def __init__(self, cfg: LatteConfig) -> None:
        super().__init__()
        d, adaln = cfg.hidden_size, cfg.injection == "adaln"
        self.norm1 = layer_norm(d, affine=not adaln)
        self.split_attn = Attention(d, cfg.num_heads, qkv_bias=True)
        self.norm2 = layer_norm(d, affine=not adaln)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(d, 6 * d)) if adaln else None

    def _attend(self, h: torch.Tensor, lay: Layout) -> torch.Tensor:
        attn, heads = self.split_attn, self.split_attn.num_heads
        half = heads // 2
        q, k, v = attn.heads(h)  # [(B F), H, t, hd] each
        qs, ks, vs = q[:, :half], k[:, :half], v[:, :half]  # spatial heads [(B F), H/2, t, hd]
        sp, tm = lay.spatial, lay.temporal
        if sp.rope is not None:
            qs, ks = apply_rotary(qs, sp.rope[:half]), apply_rotary(ks, sp.rope[:half])  # [(B F), H/2, t, hd]
        if sp.ctx is not None:
            _, kc, vc = attn.heads(self.norm1(sp.ctx))  # [(B F), H, n, hd]
            ks, vs = torch.cat([ks, kc[:, :half]], 2), torch.cat([vs, vc[:, :half]], 2)  # [(B F), H/2, t + n, hd]
        out_s = attention(qs, ks, vs)  # [(B F), H/2, t, hd]

        def temporal(z: torch.Tensor) -> torch.Tensor:  # [(B F), H/2, t, hd] -> clip frames [(B t), H/2, f, hd]
            z = rearrange(z, "(b f) h t e -> b f h t e", b=lay.batch)[:, :lay.frames]  # [B, f, H/2, t, hd]
            return rearrange(z, "b f h t e -> (b t) h f e")  # [(B t), H/2, f, hd]

        qt, kt, vt = temporal(q[:, half:]), temporal(k[:, half:]), temporal(v[:, half:])  # [(B t), H/2, f, hd]
        if tm.rope is not None:
            qt, kt = apply_rotary(qt, tm.rope), apply_rotary(kt, tm.rope)  # [(B t), H/2, f, hd]
        if tm.ctx is not None:
            _, kc, vc = attn.heads(self.norm1(tm.ctx))  # [(B t), H, n, hd]
            kt, vt = torch.cat([kt, kc[:, half:]], 2), torch.cat([vt, vc[:, half:]], 2)  # [(B t), H/2, f + n, hd]
        out_t = rearrange(attention(qt, kt, vt), "(b t) h f e -> b f h t e", b=lay.batch)  # [B, f, H/2, t, hd]
        if lay.images:
            out_t = F.pad(out_t, (0, 0, 0, 0, 0, 0, 0, lay.images))  # [B, F, H/2, t, hd]: images get no temporal half
        out_t = rearrange(out_t, "b f h t e -> (b f) h t e")  # [(B F), H/2, t, hd]
        out = rearrange(torch.cat([out_s, out_t], dim=1), "n h t e -> n t (h e)")  # [(B F), t, D]
        return attn.proj(out)  # [(B F), t, D] = proj_s(out_s) + proj_t(out_t)

    def forward(self, x: torch.Tensor, lay: Layout, add_temp: bool = False) -> torch.Tensor:
        if add_temp and lay.temp_embed is not None:
            video, images = to_temporal(x, lay)  # [(B t), f, D], [B, n_img, t, D]
            x = from_temporal(video + lay.temp_embed, images, lay)  # [(B F), t, D]
        mod = _modulation(self.adaLN_modulation, lay.spatial.c, 6)
        x = _sublayer(x, self.norm1, lambda h: self._attend(h, lay), mod and mod[:3])  # [(B F), t, D]
        return _sublayer(x, self.norm2, self.mlp, mod and mod[3:])  # [(B F), t, D]


# -- variants: block specs turned into layers in one place ----------------------------------------------------------

@dataclass(frozen=True)
class AxisBlockSpec:
    """A DiT block along one axis (variants 1, 2)."""

    axis: Literal["spatial", "temporal"]

    @property
    def temporal(self) -> bool:
        return self.axis == "temporal"

    def build(self, cfg: LatteConfig) -> nn.Module:
        return AxisBlock(cfg, self.axis)


@dataclass(frozen=True)
class FactorisedBlockSpec:
    """Spatial MHA, temporal MHA, MLP (variant 3)."""

    temporal = True

    def build(self, cfg: LatteConfig) -> nn.Module:
        return FactorisedBlock(cfg)


@dataclass(frozen=True)
class SplitHeadBlockSpec:
    """Half the heads spatial, half temporal, summed (variant 4)."""

    temporal = True

    def build(self, cfg: LatteConfig) -> nn.Module:
        return SplitHeadBlock(cfg)


BlockSpec = Union[AxisBlockSpec, FactorisedBlockSpec, SplitHeadBlockSpec]


def block_layout(variant: int, depth: int) -> list[BlockSpec]:
    """The spec of each ``blocks.{i}`` of a variant: the one place where a variant number means anything."""
    half = depth // 2
    layouts = {
        1: lambda: [AxisBlockSpec("spatial" if i % 2 == 0 else "temporal") for i in range(depth)],  # official
        2: lambda: [AxisBlockSpec("spatial")] * half + [AxisBlockSpec("temporal")] * half,
        3: lambda: [FactorisedBlockSpec()] * depth,
        4: lambda: [SplitHeadBlockSpec()] * depth,
    }
    return layouts[variant]()


# -- patch embeddings ------------------------------------------------------------------------------------------------

class TubeletEmbed(nn.Module):
    """Compression patch embedding: ``Conv3d`` with kernel = stride = (s, p, p) over [B, C, F, H, W]."""

    def __init__(self, stride: int, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.stride, self.patch_size, self.in_channels = stride, patch_size, in_channels
        kernel = (stride, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, C, H, W] -> [(B F/s), t, D]."""
        b = x.shape[0]
        x = self.proj(rearrange(x, "b f c h w -> b c f h w"))  # [B, D, F/s, H/p, W/p]
        return rearrange(x, "b d f h w -> (b f) (h w) d", b=b)  # [(B F/s), t, D]




def interpolate_temp_embed(table: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, n, D] temporal table resampled to [1, frames, D] linearly over frame positions (ends aligned)."""
    out = F.interpolate(table.transpose(1, 2), size=frames, mode="linear", align_corners=True)  # [1, D, frames]
    return out.transpose(1, 2)  # [1, frames, D]


# -- model -----------------------------------------------------------------------------------------------------------

class Latte(nn.Module):
    """Latte over clips of latents: ``forward(x, t, y, y_image)`` -> [B, F, out_channels, H, W].

    With ``learn_sigma`` each frame's output is [eps (in_channels), variance interpolation v (in_channels)]. The model
    takes DDPM timesteps in [0, 1000) (``noise_input``). Labels are used as given: condition dropout for guidance is
    the conditioning stage's job (``class_dropout_prob`` > 0 still adds the null-class row).
    """

    channel_dim = 2  # [B, F, C, H, W]
    noise_input = "timestep"
    num_timesteps = 1000

    def __init__(self, config: LatteConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config, **overrides) if config is not None else LatteConfig(**overrides)
        self.config = cfg.validate()
        d, p = cfg.hidden_size, cfg.patch_size
        self.in_channels = cfg.in_channels
        self.learn_sigma = cfg.learn_sigma
        self.out_channels = cfg.out_channels
        self.patch_size = p
        self.num_classes = cfg.num_classes
        self.num_frames = cfg.num_frames
        self.use_image_num = cfg.use_image_num
        self.grid_size = cfg.grid
        self._warned_frames: set[int] = set()

        if cfg.patch_embed == "tubelet":
            self.x_embedder: nn.Module = TubeletEmbed(cfg.temporal_stride, p, cfg.in_channels, d)
        else:
            self.x_embedder = PatchEmbed(p, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob) if cfg.num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], d), requires_grad=False)
        self.spatial_rope = AxialRoPE(d // cfg.num_heads, cfg.num_heads) if cfg.spatial_pos == "rope" else None
        if cfg.temporal_pos == "absolute":
            self.temp_embed = nn.Parameter(torch.zeros(1, cfg.token_frames, d), requires_grad=False)
        else:
            self.temp_embed = None
        self.block_specs = block_layout(cfg.variant, cfg.depth)
        self.blocks = BlockStack([spec.build(cfg) for spec in self.block_specs],
                                 recompute_every=int(cfg.grad_checkpointing))
        self.first_temporal = next(i for i, spec in enumerate(self.block_specs) if spec.temporal)
        self.final_layer = FinalLayer(d, p, self.out_channels, modulated=cfg.injection == "adaln")
        if cfg.patch_embed == "tubelet":
            s = cfg.temporal_stride
            self.temporal_upsample = nn.ConvTranspose3d(self.out_channels, self.out_channels, kernel_size=(s, 1, 1),
                                                        stride=(s, 1, 1))
        else:
            self.temporal_upsample = None
        self.initialize_weights()

    #: step-cache options calibrated on latte-moving-digits (euler-ancestral 25 steps, 200 clips): first-block at
    #: the core's 0.2 skips a quarter of the steps; 0.3 halves the full evaluations within 2 points of frame consistency
    step_cache_defaults = {"first-block": {"threshold": 0.3}}

    @property
    def lora_groups(self) -> dict[str, list[str]]:
        """Linear layers by role, for LoRA targets (``finetune.lora.targets``); ``temporal``: the temporal blocks'
        attention (variants 1, 2) or every block's temporal attention (variants 3, 4)."""
        temporal = "|".join(str(i) for i, s in enumerate(self.block_specs) if getattr(s, "axis", None) == "temporal")
        return {"attention": [r"blocks\.\d+\.attn(_s|_t)?\.(qkv|proj)"], "mlp": [r"blocks\.\d+\.mlp\.fc[12]"],
                "adaln": [r"blocks\.\d+\.adaLN_modulation(_t)?\.1"],
                "temporal": [rf"blocks\.({temporal})\.attn\.(qkv|proj)", r"blocks\.\d+\.attn_t\.(qkv|proj)"]}

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Per-sample input shape the model was built for: (num_frames, in_channels, H, W), a clip without images."""
        return (self.num_frames, self.in_channels, *self.config.input_hw)

    @property
    def null_class(self) -> int | None:
        """Label of the unconditional (dropped) class used for guidance, or None when the model has none."""
        return self.y_embedder.null_class if self.y_embedder is not None else None

    def initialize_weights(self) -> None:
        """The official init: xavier linears with zero biases, the patch conv xavier on its (D, -1) view, N(0, 0.02)
        label table and t-MLP weights, sin-cos tables, and zero on every adaLN linear, the final adaLN and the final
        linear, so the output is exactly 0 at init.

        ``temporal_upsample`` (tubelet) starts as nearest-neighbour upsampling (weight 1 from each channel to itself
        at every one of the s taps, zero bias): each token frame's decoded output is copied to its s frames. The output
        is still exactly 0 at init, and gradients reach the final linear (a zero upsampler would block them).
        """
        cfg = self.config
        dit_base_init(self, self.x_embedder.proj)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_torch(cfg.hidden_size, *self.grid_size))
            if self.temp_embed is not None:
                self.temp_embed.copy_(sincos_1d_torch(cfg.hidden_size, cfg.token_frames))
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for name, module in self.named_modules():
            if name.rsplit(".", 1)[-1].startswith("adaLN_modulation"):  # every block's and the final layer's
                nn.init.zeros_(module[-1].weight)
                nn.init.zeros_(module[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.temporal_upsample is not None:
            with torch.no_grad():
                self.temporal_upsample.weight.zero_()
                idx = torch.arange(self.out_channels)
                self.temporal_upsample.weight[idx, idx] = 1.0  # [C_in, C_out, s, 1, 1]: identity at every tap
                self.temporal_upsample.bias.zero_()

    # -- inputs ----------------------------------------------------------------------------------------------------

    def _spatial_angles(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor | None:
        """Axial rotary angles [heads, grid_h * grid_w, head_dim / 4] of the patch grid (None: absolute table)."""
        if self.spatial_rope is None:
            return None
        pos = make_axial_pos(grid_h, grid_w, device=device).view(-1, 2)  # [t, 2] (y, x) in [-1, 1]
        return self.spatial_rope.theta(pos).transpose(0, 1)  # [H, t, hd / 4]: hd / 8 angles for y, hd / 8 for x

    def temporal_table(self, frames: int) -> torch.Tensor | None:
        """``temp_embed`` for a clip of ``frames`` token frames: the stored table, or (another length) the table
        interpolated linearly over frame positions, with a warning once per length. None with rope."""
        if self.temp_embed is None:
            return None
        if frames == self.temp_embed.shape[1]:
            return self.temp_embed
        if frames not in self._warned_frames:
            self._warned_frames.add(frames)
            warnings.warn(f"Latte was built for {self.temp_embed.shape[1]} token frames and got {frames}: using its "
                          f"temporal position table linearly interpolated to {frames} frames", stacklevel=3)
        return interpolate_temp_embed(self.temp_embed, frames)

    def _image_count(self, x: torch.Tensor, y_image: torch.Tensor | None) -> int:
        """Appended images: ``use_image_num`` when x has ``num_frames + use_image_num`` frames, else none."""
        n = self.use_image_num
        images = n if n and x.shape[1] == self.num_frames + n else 0
        if y_image is not None and (not images or tuple(y_image.shape) != (x.shape[0], images)):
            raise ShapeError(f"y_image must be [B, use_image_num] = [{x.shape[0]}, {n}] labels of the images appended "
                             f"to a {self.num_frames}-frame clip; got {list(y_image.shape)} for x {list(x.shape)}")
        return images

    def _labels(self, y: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        """Label embeddings [*shape, D] (None for unconditional models)."""
        if self.y_embedder is None:  # unconditional model: labels, if any, are ignored
            return None
        if y is None:
            if self.num_classes != 1:
                raise ShapeError(f"this Latte has num_classes={self.num_classes} and needs class labels y "
                                 f"(use y={self.null_class} for unconditional outputs)")
            y = torch.zeros(shape, dtype=torch.long, device=device)
        if tuple(y.shape) != shape or y.dtype.is_floating_point:
            raise ShapeError(f"Latte expects integer class labels of shape {list(shape)}, got {y.dtype} "
                             f"{list(y.shape)}")
        check_label_range(y, self.y_embedder.embedding_table.num_embeddings)
        return self.y_embedder(y, train=False)  # labels arrive already dropped (dtx.conditioning)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal_upsample is not None:
            s = self.config.temporal_stride
            if x.shape[1] % s:
                raise ShapeError(f"a tubelet Latte needs a frame count divisible by temporal_stride {s}, got "
                                 f"{x.shape[1]}")
            return self.x_embedder(x)  # [(B f), t, D], f = F / s
        return self.x_embedder(rearrange(x, "b f c h w -> (b f) c h w"))  # [(B F), t, D]

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None,
                y_image: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, F(+use_image_num), C, H, W]; t: [B] timesteps; y: [B] labels of the clips; y_image: [B, use_image_num]
        labels of the appended images (default: the clip's label).

        x carries ``use_image_num`` appended images exactly when it has ``num_frames + use_image_num`` frames; any
        other frame count is a clip alone (sampling), run with the temporal table interpolated to its length.
        """
        if x.ndim != 5 or x.shape[2] != self.in_channels:
            raise ShapeError(f"Latte expects [B, frames, {self.in_channels}, H, W], got {list(x.shape)}")
        b = x.shape[0]
        images = self._image_count(x, y_image)
        p = self.patch_size
        grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
        h = self._embed(x)  # [(B F), t, D]
        if self.spatial_rope is None:
            h = h + grid_positions(self.pos_embed, self.grid_size, grid_h, grid_w)  # [(B F), t, D]
        frames = h.shape[0] // b - images  # token frames of the clip
        tokens = h.shape[1]

        t_emb = self.t_embedder(per_sample_timesteps(t, b, x.device, "Latte"))  # [B, D]
        y_emb = self._labels(y, (b,), x.device)  # [B, D] or None
        cond = t_emb if y_emb is None else t_emb + y_emb  # [B, D]: the clip's condition
        frame_t = repeat(t_emb, "b d -> b f d", f=frames + images)  # [B, F, D]
        frame_y = None  # [B, F, D]: the clip's label on its frames, each image's own label on the images
        if y_emb is not None:
            frame_y = repeat(y_emb, "b d -> b f d", f=frames)  # [B, f, D]
            if images:
                labels = y_image if y_image is not None or y is None else repeat(y, "b -> b n", n=images)
                frame_y = torch.cat([frame_y, self._labels(labels, (b, images), x.device)], dim=1)  # [B, F, D]
        head_dim = self.config.hidden_size // self.config.num_heads
        spatial = AxisInputs(rope=self._spatial_angles(grid_h, grid_w, x.device))
        temporal = AxisInputs(rope=rope_angles(head_dim, frames, x.device) if self.config.temporal_pos == "rope"
                              else None)
        if self.config.injection == "adaln":
            spatial.c = rearrange(frame_t if frame_y is None else frame_t + frame_y, "b f d -> (b f) d")  # [(B F), D]
            temporal.c = repeat(cond, "b d -> (b t) d", t=tokens)  # [(B t), D]
        else:  # condition tokens t (and y) as extra keys/values of every attention
            spatial.ctx = rearrange(torch.stack([frame_t] if frame_y is None else [frame_t, frame_y], dim=2),
                                    "b f n d -> (b f) n d")  # [(B F), n, D]
            clip_tokens = torch.stack([t_emb] if y_emb is None else [t_emb, y_emb], dim=1)  # [B, n, D]
            temporal.ctx = repeat(clip_tokens, "b n d -> (b t) n d", t=tokens)  # [(B t), n, D]
        lay = Layout(batch=b, frames=frames, images=images, tokens=tokens, spatial=spatial, temporal=temporal,
                     temp_embed=self.temporal_table(frames))

        h = self.blocks.run(h, lambda i: (lay, i == self.first_temporal))  # [(B F), t, D]
        h = self.final_layer(h, spatial.c)  # [(B F), t, p * p * out]
        out = unpatchify(h, p, self.out_channels, grid_h, grid_w)  # [(B F), out, H, W]
        if self.temporal_upsample is None:
            return rearrange(out, "(b f) c h w -> b f c h w", b=b)  # [B, F, out, H, W]
        out = self.temporal_upsample(rearrange(out, "(b f) c h w -> b c f h w", b=b))  # [B, out, F, H, W]
        return rearrange(out, "b c f h w -> b f c h w")  # [B, F, out, H, W]

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float = 7.0) -> torch.Tensor:
        """The official classifier-free guidance batch layout: y = [labels; null labels], only x's first half is
        used; the ``in_channels`` eps channels are guided along dim 2, the learned-variance channels pass through."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)  # [B, F, out, H, W]
        cond, uncond = out.chunk(2)
        k = self.in_channels
        guided = combine_guidance([uncond[:, :, :k], cond[:, :, :k]], [cfg_scale], channel_dim=2)
        return torch.cat([torch.cat([guided, guided]), out[:, :, k:]], dim=2)
