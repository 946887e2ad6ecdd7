"""Latte (Ma et al., 2024): a latent video diffusion transformer with the official state-dict layout of
Vchitect/Latte ``models/latte.py`` / ``latte_img.py`` (Variant 1), plus the paper's other design choices, each one
``LatteConfig`` option:

- ``variant``: how spatial and temporal attention combine (``block_layout``; blocks in ``dtx_latte.blocks``).
  1 interleaved (official): ``blocks.{i}`` even i spatial, odd i temporal, DiT's names; 2 late fusion: the first
  half spatial, then temporal (the same keys: pass ``variant=2`` when loading); 3 factorised MHA: every block runs
  spatial MHA, temporal MHA, MLP; 4 split-head MHA: half the heads spatial, half temporal, summed. ``depth`` counts
  blocks (each with one MLP), so Latte-XL/2 is 28 blocks in every variant.
- ``patch_embed``: "uniform" (a 2D patch embedding per frame, official) or "tubelet" (``Conv3d`` with kernel =
  stride = (s, p, p), decoded by a ``ConvTranspose3d`` ``temporal_upsample`` restoring the frame count).
- ``injection``: "adaln" (S-AdaLN = DiT's adaLN-Zero, official) or "tokens" (t and y as extra key/value tokens of
  every attention; plain pre-norm blocks and a non-modulated final layer).
- ``temporal_pos`` / ``spatial_pos``: "absolute" (frozen sin-cos ``temp_embed`` [1, frames, D] added once before
  the first temporal attention / ``pos_embed`` on the patch tokens, official) or "rope" (rotary angles over the
  frame index / axial ones over the patch grid inside attention: relative positions only).
- ``use_image_num``: image-video joint training (``latte_img.py``): images appended after the clip's frames take
  the spatial path only, each with its own label.

Tensors are [B, F, C, H, W] in and out (``channel_dim = 2``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from dtx.config import check
from dtx.errors import ShapeError
from dtx.layers import (AxialRoPE, BlockStack, FinalLayer, PatchTransformer, TransformerConfig, TubeletEmbed,
                        make_axial_pos, per_sample_timesteps, rope_angles, sincos_1d_torch, size_presets)

from .blocks import AxisBlockSpec, AxisInputs, BlockSpec, FactorisedBlockSpec, Layout, SplitHeadBlockSpec


@dataclass
class LatteConfig(TransformerConfig):
    """Architecture of one Latte; the defaults are the official Latte-XL/2 (16 frames of 32x32x4 latents,
    unconditional, Variant 1, uniform patches, S-AdaLN, absolute temporal table)."""

    num_frames: int = 16  # frames of a clip (without appended images)
    num_classes: int = 0  # 0 = unconditional (official extras=1); UCF101: 101 (extras=2)
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row (null = num_classes) for guidance
    variant: int = 1  # 1 interleaved (official), 2 late fusion, 3 factorised MHA, 4 split-head MHA
    patch_embed: Literal["uniform", "tubelet"] = "uniform"
    temporal_stride: int = 2  # s of "tubelet": num_frames / s token frames; unused by "uniform"
    injection: Literal["adaln", "tokens"] = "adaln"
    temporal_pos: Literal["absolute", "rope"] = "absolute"
    spatial_pos: Literal["absolute", "rope"] = "absolute"
    use_image_num: int = 0  # images appended to each clip (joint training); 0 = videos only

    @property
    def stride(self) -> int:
        """Frames per token frame: s for tubelets, 1 for uniform patches."""
        return self.temporal_stride if self.patch_embed == "tubelet" else 1

    @property
    def token_frames(self) -> int:
        """Token frames of a clip of ``num_frames`` frames (the length of ``temp_embed``)."""
        return self.num_frames // self.stride

    def validate_options(self) -> None:
        check(self.variant in (1, 2, 3, 4), "variant", f"must be 1, 2, 3 or 4, got {self.variant!r}")
        check(self.variant not in (1, 2) or self.depth % 2 == 0, "depth",
              f"variant {self.variant} pairs spatial and temporal blocks, so depth must be even, got {self.depth}")
        check(self.variant != 4 or self.num_heads % 2 == 0, "num_heads",
              f"variant 4 splits the heads in half (spatial, temporal), so num_heads must be even, "
              f"got {self.num_heads}")
        self.check_min(1, "num_frames", "temporal_stride")
        self.check_min(0, "num_classes", "use_image_num")
        check(0.0 <= self.class_dropout_prob < 1.0, "class_dropout_prob",
              f"must be in [0, 1), got {self.class_dropout_prob}")
        check(self.patch_embed != "tubelet" or self.num_frames % self.temporal_stride == 0, "num_frames",
              f"{self.num_frames} frames are not divisible by the tubelet temporal_stride {self.temporal_stride}")
        if self.temporal_pos == "rope":
            self.check_head_split(2, "rope rotates pairs of head dimensions")
        if self.spatial_pos == "rope":
            self.check_head_split(8, "axial rope gives a quarter of each head to each axis")
        check(self.use_image_num == 0 or self.patch_embed == "uniform", "use_image_num",
              "joint image-video training needs patch_embed 'uniform' (a tubelet spans several frames, an image one)")


#: The official sizes (same as DiT): S/B/L/XL widths and depths times patch sizes 2/4/8.
LATTE_PRESETS: dict[str, dict[str, Any]] = size_presets("Latte")


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


class Latte(PatchTransformer):
    """Latte over clips of latents: ``forward(x, t, y, y_image)`` -> [B, F, out_channels, H, W].

    With ``learn_sigma`` each frame's output is [eps (in_channels), variance interpolation v (in_channels)]. Labels
    are used as given: condition dropout for guidance is the conditioning stage's job (``class_dropout_prob`` > 0
    still adds the null-class row).
    """

    config_class = LatteConfig
    channel_dim = 2  # [B, F, C, H, W]
    #: step-cache options calibrated on latte-moving-digits (euler-ancestral 25 steps, 200 clips): first-block at
    #: the core's 0.2 skips a quarter of the steps; 0.3 halves the full evaluations within 2 points of frame consistency
    step_cache_defaults = {"first-block": {"threshold": 0.3}}

    def __init__(self, config: LatteConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg, d = self.config, self.config.hidden_size
        self.num_classes, self.num_frames, self.use_image_num = cfg.num_classes, cfg.num_frames, cfg.use_image_num
        self._warned_frames: set[int] = set()
        tubelet = cfg.patch_embed == "tubelet"
        patch = TubeletEmbed(cfg.temporal_stride, cfg.patch_size, cfg.in_channels, d) if tubelet else None
        self.add_embedders(cfg.num_classes, cfg.class_dropout_prob, patch)
        self.spatial_rope = AxialRoPE(cfg.head_dim, cfg.num_heads) if cfg.spatial_pos == "rope" else None
        absolute = cfg.temporal_pos == "absolute"
        self.temp_embed = nn.Parameter(torch.zeros(1, cfg.token_frames, d), requires_grad=False) if absolute else None
        self.block_specs = block_layout(cfg.variant, cfg.depth)
        self.blocks = BlockStack([spec.build(cfg, cfg.injection == "adaln") for spec in self.block_specs],
                                 recompute_every=int(cfg.grad_checkpointing))
        self.first_temporal = next(i for i, spec in enumerate(self.block_specs) if spec.temporal)
        self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels, modulated=cfg.injection == "adaln")
        s, out = cfg.temporal_stride, self.out_channels
        self.temporal_upsample = nn.ConvTranspose3d(out, out, kernel_size=(s, 1, 1), stride=(s, 1, 1)) if tubelet \
            else None
        self.init_dit_weights()
        if self.temp_embed is not None:
            with torch.no_grad():
                self.temp_embed.copy_(sincos_1d_torch(d, cfg.token_frames))
        if self.temporal_upsample is not None:  # nearest-neighbour upsampling: output still 0, gradients flow
            with torch.no_grad():
                self.temporal_upsample.weight.zero_()
                idx = torch.arange(out)
                self.temporal_upsample.weight[idx, idx] = 1.0  # [C_in, C_out, s, 1, 1]: identity at every tap
                self.temporal_upsample.bias.zero_()

    @property
    def lora_groups(self) -> dict[str, list[str]]:
        """Linear layers by role, for LoRA targets (``finetune.lora.targets``); ``temporal``: the temporal blocks'
        attention (variants 1, 2) or every block's temporal attention (variants 3, 4)."""
        temporal = "|".join(str(i) for i, s in enumerate(self.block_specs) if getattr(s, "axis", None) == "temporal")
        return {"attention": [r"blocks\.\d+\.attn(_s|_t)?\.(qkv|proj)"], "mlp": [r"blocks\.\d+\.mlp\.fc[12]"],
                "adaln": [r"blocks\.\d+\.adaLN_modulation(_t)?\.1"],
                "temporal": [rf"blocks\.({temporal})\.attn\.(qkv|proj)", r"blocks\.\d+\.attn_t\.(qkv|proj)"]}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape the model was built for: (num_frames, in_channels, H, W), a clip without images."""
        return (self.num_frames, self.in_channels, *self.config.input_hw)

    def _spatial_angles(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor | None:
        """Axial rotary angles [heads, grid_h * grid_w, head_dim / 4] of the patch grid (None: absolute table)."""
        if self.spatial_rope is None:
            return None
        pos = make_axial_pos(grid_h, grid_w, device=device).view(-1, 2)  # [t, 2] (y, x) in [-1, 1]
        return self.spatial_rope.theta(pos).transpose(0, 1)  # [H, t, hd / 4]: hd / 8 angles for y, hd / 8 for x

    def temporal_table(self, frames: int) -> torch.Tensor | None:
        """``temp_embed`` for a clip of ``frames`` token frames: the stored table, or (another length) the table
        interpolated linearly over frame positions (ends aligned), with a warning once per length. None with rope."""
        if self.temp_embed is None or frames == self.temp_embed.shape[1]:
            return self.temp_embed
        if frames not in self._warned_frames:
            self._warned_frames.add(frames)
            warnings.warn(f"Latte was built for {self.temp_embed.shape[1]} token frames and got {frames}: using its "
                          f"temporal position table linearly interpolated to {frames} frames", stacklevel=3)
        table = F.interpolate(self.temp_embed.transpose(1, 2), size=frames, mode="linear", align_corners=True)
        return table.transpose(1, 2)  # [1, frames, D]

    def _image_count(self, x: torch.Tensor, y_image: torch.Tensor | None) -> int:
        """Appended images: ``use_image_num`` when x has ``num_frames + use_image_num`` frames, else none."""
        n = self.use_image_num
        images = n if n and x.shape[1] == self.num_frames + n else 0
        if y_image is not None and (not images or tuple(y_image.shape) != (x.shape[0], images)):
            raise ShapeError(f"y_image must be [B, use_image_num] = [{x.shape[0]}, {n}] labels of the images appended "
                             f"to a {self.num_frames}-frame clip; got {list(y_image.shape)} for x {list(x.shape)}")
        return images

    def _layout(self, b: int, frames: int, images: int, grid: tuple[int, int], t_emb: torch.Tensor,
                y: torch.Tensor | None, y_image: torch.Tensor | None) -> Layout:
        """Each axis' condition and rotary angles: spatial attention sees each frame's (t, its label), temporal
        attention the clip's (t, y), as adaLN input or as tokens (``injection``)."""
        y_emb = None if self.y_embedder is None else self.y_embedder.embed(y, (b,), "Latte")  # [B, D]
        frame_t = repeat(t_emb, "b d -> b f d", f=frames + images)  # [B, F, D]
        frame_y = None if y_emb is None else repeat(y_emb, "b d -> b f d", f=frames)  # [B, f, D]
        if y_emb is not None and images:
            labels = y_image if y_image is not None or y is None else repeat(y, "b -> b n", n=images)
            frame_y = torch.cat([frame_y, self.y_embedder.embed(labels, (b, images), "Latte")], dim=1)  # [B, F, D]
        group = self.context_group
        tokens = grid[0] * grid[1] // (group.size if group is not None else 1)  # positions per temporal sequence
        rope_t = rope_angles(self.config.head_dim, frames, t_emb.device) if self.config.temporal_pos == "rope" else None
        spatial = AxisInputs(rope=self._spatial_angles(*grid, t_emb.device))
        temporal = AxisInputs(rope=rope_t)
        if group is not None:  # this rank's frames
            frame_t, frame_y = (None if z is None else group.shard(z, dim=1) for z in (frame_t, frame_y))
        if self.config.injection == "adaln":
            spatial.c = rearrange(frame_t if frame_y is None else frame_t + frame_y, "b f d -> (b f) d")  # [(B F), D]
            temporal.c = repeat(t_emb if y_emb is None else t_emb + y_emb, "b d -> (b t) d", t=tokens)  # [(B t), D]
        else:  # condition tokens t (and y) as extra keys/values of every attention
            spatial.ctx = rearrange(torch.stack([frame_t] if frame_y is None else [frame_t, frame_y], dim=2),
                                    "b f n d -> (b f) n d")  # [(B F), n, D]
            clip_tokens = torch.stack([t_emb] if y_emb is None else [t_emb, y_emb], dim=1)  # [B, n, D]
            temporal.ctx = repeat(clip_tokens, "b n d -> (b t) n d", t=tokens)  # [(B t), n, D]
        return Layout(b, frames, images, spatial, temporal, self.temporal_table(frames), group)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None,
                y_image: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, F(+use_image_num), C, H, W]; t: [B] timesteps; y: [B] labels of the clips; y_image: [B, use_image_num]
        labels of the appended images (default: the clip's label).

        x carries ``use_image_num`` appended images exactly when it has ``num_frames + use_image_num`` frames; any
        other frame count is a clip alone (sampling), run with the temporal table interpolated to its length.
        """
        self.check_input(x)
        b, images = x.shape[0], self._image_count(x, y_image)
        h, grid = self.embed_patches(x, positions=self.spatial_rope is None)  # [(B F), t, D]
        t_emb = self.t_embedder(per_sample_timesteps(t, b, x.device, "Latte"))  # [B, D]
        lay = self._layout(b, x.shape[1] // self.config.stride - images, images, grid, t_emb, y, y_image)
        h = self.blocks.run(h, lambda i: (lay, i == self.first_temporal))  # [(B F), t, D]
        out = self.output(self.final_layer(h, lay.spatial.c), b, grid)  # [B, F / s, out, H, W]
        if self.temporal_upsample is None:
            return out
        out = self.temporal_upsample(rearrange(out, "b f c h w -> b c f h w"))  # [B, out, F, H, W]
        return rearrange(out, "b c f h w -> b f c h w")  # [B, F, out, H, W]
