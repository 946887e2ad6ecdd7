"""Latte's blocks: one spec dataclass per kind, each building its module (k-diffusion image_transformer_v2 style),
and the token layout they share within one forward pass.

Token layouts, with einops axis names: ``(b f) t d`` for spatial attention (t = tokens per frame) and ``(b t) f d``
for temporal attention; the residual stream lives in the spatial layout between blocks. Images appended to a clip
(joint image-video training) follow its frames and take the spatial path only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dtx.attention import attention
from dtx.layers import AdaLNBlock, Attention, Linear, Mlp, TransformerConfig, apply_rotary, layer_norm, residual
from dtx.layers.context_parallel import ContextGroup


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
    spatial: AxisInputs  # N = (b F) sequences of t tokens, F = frames + images; rope [heads, t, head_dim / 4]
    temporal: AxisInputs  # N = (b t) sequences of f frames; rope [frames, head_dim / 2]
    temp_embed: torch.Tensor | None  # absolute temporal table [1, frames, D], added before the first temporal attention
    group: ContextGroup | None = None  # context parallel: frames (images too) split over its ranks, switched to
    # positions for temporal attention (then t above is this rank's t / N positions and f all frames)


def to_temporal(x: torch.Tensor, lay: Layout, add_temp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stream -> (clip tokens in the temporal layout, with the temporal table when ``add_temp``; the
    appended images' tokens, left as they are)."""
    x = rearrange(x, "(b f) t d -> b f t d", b=lay.batch)  # [B, F, t, D]
    if lay.group is not None:
        x = lay.group.all_to_all(x, scatter_dim=2, gather_dim=1)  # [B, F, t / N, D]: every frame of t / N positions
    video, images = x[:, :lay.frames], x[:, lay.frames:]  # [B, f, t, D], [B, n_img, t, D]
    video = rearrange(video, "b f t d -> (b t) f d")  # [(B t), f, D]
    return (video + lay.temp_embed if add_temp and lay.temp_embed is not None else video), images


def from_temporal(video: torch.Tensor, images: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Inverse of ``to_temporal``: the clip's frames followed by the images, in the spatial layout."""
    video = rearrange(video, "(b t) f d -> b f t d", b=lay.batch)  # [B, f, t, D]
    x = torch.cat([video, images], dim=1) if lay.images else video  # [B, F, t, D]
    if lay.group is not None:
        x = lay.group.all_to_all(x, scatter_dim=1, gather_dim=2)  # [B, F / N, t, D]: this rank's frames again
    return rearrange(x, "b f t d -> (b f) t d")  # [(B F), t, D]


def _adaln(d: int, chunks: int, adaln: bool) -> nn.Module | None:
    return nn.Sequential(nn.SiLU(), Linear(d, chunks * d)) if adaln else None


def _chunks(linear: nn.Module | None, c: torch.Tensor | None, n: int) -> tuple[torch.Tensor, ...] | None:
    return None if linear is None else linear(c).chunk(n, dim=1)


class AxisBlock(AdaLNBlock):
    """DiT's block attending along one axis (variants 1 and 2), with DiT's module names."""

    def __init__(self, cfg: TransformerConfig, adaln: bool, axis: Literal["spatial", "temporal"]) -> None:
        super().__init__(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, modulated=adaln)
        self.axis = axis

    def forward(self, x: torch.Tensor, lay: Layout, add_temp: bool = False) -> torch.Tensor:  # type: ignore[override]
        if self.axis == "spatial":
            sp = lay.spatial
            return super().forward(x, sp.c, theta=sp.rope, context=sp.ctx)  # [(B F), t, D]
        video, images = to_temporal(x, lay, add_temp)  # [(B t), f, D], [B, n_img, t, D]
        tm = lay.temporal
        video = super().forward(video, tm.c, theta=tm.rope, context=tm.ctx)  # [(B t), f, D]
        return from_temporal(video, images, lay)  # [(B F), t, D]


class FactorisedBlock(nn.Module):
    """Variant 3: spatial MHA, then temporal MHA, then the MLP, in one block. ``adaLN_modulation`` (6D, DiT's chunk
    order) modulates the spatial MHA and the MLP per frame, ``adaLN_modulation_t`` (3D) the temporal MHA per
    position."""

    def __init__(self, cfg: TransformerConfig, adaln: bool) -> None:
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_heads
        self.norm1 = layer_norm(d, affine=not adaln)
        self.attn_s = Attention(d, h, qkv_bias=True)
        self.norm_t = layer_norm(d, affine=not adaln)
        self.attn_t = Attention(d, h, qkv_bias=True)
        self.norm2 = layer_norm(d, affine=not adaln)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = _adaln(d, 6, adaln)
        self.adaLN_modulation_t = _adaln(d, 3, adaln)

    def forward(self, x: torch.Tensor, lay: Layout, add_temp: bool = False) -> torch.Tensor:
        sp, tm = lay.spatial, lay.temporal
        mod, mod_t = _chunks(self.adaLN_modulation, sp.c, 6), _chunks(self.adaLN_modulation_t, tm.c, 3)
        ctx_s = None if sp.ctx is None else self.norm1(sp.ctx)
        x = residual(x, self.norm1, lambda h: self.attn_s(h, theta=sp.rope, context=ctx_s), mod and mod[:3])
        video, images = to_temporal(x, lay, add_temp)  # [(B t), f, D], [B, n_img, t, D]
        ctx_t = None if tm.ctx is None else self.norm_t(tm.ctx)
        video = residual(video, self.norm_t, lambda h: self.attn_t(h, theta=tm.rope, context=ctx_t), mod_t)
        x = from_temporal(video, images, lay)  # [(B F), t, D]
        return residual(x, self.norm2, self.mlp, mod and mod[3:])  # [(B F), t, D]


class SplitHeadBlock(nn.Module):
    """Variant 4: one MHA whose first half of the heads attends spatially and second half temporally, in parallel.

    ``split_attn`` has DiT's attention shapes; projecting the concatenated heads equals summing the spatial and the
    temporal outputs, each projected by its half of ``proj``'s columns (the paper's sum). The appended images have
    no temporal half (zeros there). An absolute temporal table is added to the residual stream at the start of the
    first block (its temporal heads run in parallel with the spatial ones).
    """

    def __init__(self, cfg: TransformerConfig, adaln: bool) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = layer_norm(d, affine=not adaln)
        self.split_attn = Attention(d, cfg.num_heads, qkv_bias=True)
        self.norm2 = layer_norm(d, affine=not adaln)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = _adaln(d, 6, adaln)

    def _heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: AxisInputs,
               half: slice) -> torch.Tensor:
        """Attention of one half of the heads along one axis, with its rotary angles and condition tokens."""
        if axis.rope is not None:
            rope = axis.rope[half] if axis.rope.ndim == 3 else axis.rope  # spatial angles are per head
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if axis.ctx is not None:
            _, kc, vc = self.split_attn.heads(self.norm1(axis.ctx))  # [N, H, n, hd]
            k, v = torch.cat([k, kc[:, half]], 2), torch.cat([v, vc[:, half]], 2)  # [N, H/2, L + n, hd]
        return attention(q, k, v)  # [N, H/2, L, hd]

    def _attend(self, h: torch.Tensor, lay: Layout) -> torch.Tensor:
        half = self.split_attn.num_heads // 2
        first, second = slice(None, half), slice(half, None)
        q, k, v = self.split_attn.heads(h)  # [(B F), H, t, hd] each
        out_s = self._heads(q[:, first], k[:, first], v[:, first], lay.spatial, first)  # [(B F), H/2, t, hd]

        def temporal(z: torch.Tensor) -> torch.Tensor:  # [(B F), H/2, t, hd] -> clip frames [(B t), H/2, f, hd]
            z = rearrange(z, "(b f) h t e -> b f h t e", b=lay.batch)  # [B, F, H/2, t, hd]
            if lay.group is not None:  # frames split -> positions split: [B, F, H/2, t / N, hd]
                z = lay.group.all_to_all(z, scatter_dim=3, gather_dim=1)
            return rearrange(z[:, :lay.frames], "b f h t e -> (b t) h f e")  # [(B t), H/2, f, hd]

        out_t = self._heads(temporal(q[:, second]), temporal(k[:, second]), temporal(v[:, second]), lay.temporal,
                            second)  # [(B t), H/2, f, hd]
        out_t = rearrange(out_t, "(b t) h f e -> b f h t e", b=lay.batch)  # [B, f, H/2, t, hd]
        if lay.images:
            out_t = F.pad(out_t, (0, 0, 0, 0, 0, 0, 0, lay.images))  # [B, F, H/2, t, hd]: images get no temporal half
        if lay.group is not None:  # back to this rank's frames: [B, F / N, H/2, t, hd]
            out_t = lay.group.all_to_all(out_t, scatter_dim=1, gather_dim=3)
        out_t = rearrange(out_t, "b f h t e -> (b f) h t e")  # [(B F), H/2, t, hd]
        out = rearrange(torch.cat([out_s, out_t], dim=1), "n h t e -> n t (h e)")  # [(B F), t, D]
        return self.split_attn.proj(out)  # [(B F), t, D] = proj_s(out_s) + proj_t(out_t)

    def forward(self, x: torch.Tensor, lay: Layout, add_temp: bool = False) -> torch.Tensor:
        if add_temp and lay.temp_embed is not None:
            x = from_temporal(*to_temporal(x, lay, add_temp=True), lay)  # [(B F), t, D]
        mod = _chunks(self.adaLN_modulation, lay.spatial.c, 6)
        x = residual(x, self.norm1, lambda h: self._attend(h, lay), mod and mod[:3])  # [(B F), t, D]
        return residual(x, self.norm2, self.mlp, mod and mod[3:])  # [(B F), t, D]


@dataclass(frozen=True)
class AxisBlockSpec:
    """A DiT block along one axis (variants 1, 2)."""

    axis: Literal["spatial", "temporal"]

    @property
    def temporal(self) -> bool:
        return self.axis == "temporal"

    def build(self, cfg: TransformerConfig, adaln: bool) -> nn.Module:
        return AxisBlock(cfg, adaln, self.axis)


@dataclass(frozen=True)
class FactorisedBlockSpec:
    """Spatial MHA, temporal MHA, MLP (variant 3)."""

    temporal = True

    def build(self, cfg: TransformerConfig, adaln: bool) -> nn.Module:
        return FactorisedBlock(cfg, adaln)


@dataclass(frozen=True)
class SplitHeadBlockSpec:
    """Half the heads spatial, half temporal, summed (variant 4)."""

    temporal = True

    def build(self, cfg: TransformerConfig, adaln: bool) -> nn.Module:
        return SplitHeadBlock(cfg, adaln)


BlockSpec = Union[AxisBlockSpec, FactorisedBlockSpec, SplitHeadBlockSpec]
