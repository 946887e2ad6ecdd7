"""The patch-transformer skeleton every DiT-style family is written over: the config fields and checks they share,
and a base model owning what they all do alike -- patch tokens of images or clips with sin-cos positions, the
timestep and label embeddings, DiT's initialisation, the output layout, classifier-free guidance in DiT's batch
layout and the text-input checks. A family adds its options, its blocks and its ``forward``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from ..config import check
from ..diffusion.guidance import combine_guidance
from ..errors import ShapeError
from .adaln import dit_base_init
from .context_parallel import ContextGroup
from .embeddings import LabelEmbedder, TimestepEmbedder
from .patch import PatchEmbed, PatchGridConfig, TubeletEmbed, unpatchify
from .position import grid_positions, sincos_2d_torch
from .transformer import Attention


@dataclass
class TransformerConfig(PatchGridConfig):
    """Options every patch transformer has; the defaults are the XL/2 shape on 32x32x4 latents. ``validate`` runs
    the shared checks, refuses a ``Literal``-typed option outside its values, then the family's ``validate_options``
    (each a ConfigError naming the key)."""

    input_size: Any = 32  # latent side, or [height, width]
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learn_sigma: bool = True  # outputs [eps, variance interpolation v]: 2 x in_channels
    grad_checkpointing: bool = False  # recompute every block's activations in the backward pass

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> Any:
        self.validate_transformer()
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if typing.get_origin(hints.get(f.name)) is typing.Literal:
                values, value = typing.get_args(hints[f.name]), getattr(self, f.name)
                check(value in values, f.name, f"{value!r} is not one of {', '.join(map(str, values))}")
        self.validate_options()
        return self

    def validate_options(self) -> None:
        """The family's own checks."""

    def check_min(self, low: int, *names: str) -> None:
        """Each option in ``names`` is at least ``low``."""
        for name in names:
            check(getattr(self, name) >= low, name, f"must be >= {low}, got {getattr(self, name)}")

    def check_head_split(self, parts: int, why: str) -> None:
        """The head size divides into ``parts`` (rotary embeddings rotate pairs, axial ones split per axis)."""
        check(self.head_dim % parts == 0, "num_heads",
              f"{why}, so the head size must be divisible by {parts}, got {self.head_dim}")


#: DiT's model sizes (Table 1 of the DiT paper), shared by the families that reuse them: depth, width, heads
DIT_SIZES: dict[str, tuple[int, int, int]] = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                              "XL": (28, 1152, 16)}


def size_presets(family: str, patches: tuple[int, ...] = (2, 4, 8)) -> dict[str, dict[str, Any]]:
    """Presets ``{family}-{size}/{patch}`` of DiT's sizes times the patch sizes, e.g. ``DiT-XL/2``."""
    return {f"{family}-{size}/{patch}": {"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": patch}
            for size, (depth, width, heads) in DIT_SIZES.items() for patch in patches}


class PatchTransformer(nn.Module):
    """Base of a DiT-style model built from a ``config_class`` config: images [B, C, H, W] (``channel_dim`` 1) or
    clips [B, F, C, H, W] (``channel_dim`` 2) in and out, DDPM timesteps in [0, 1000)."""

    config_class: ClassVar[type[TransformerConfig]] = TransformerConfig
    channel_dim = 1
    noise_input = "timestep"
    num_timesteps = 1000
    num_classes = 0

    def __init__(self, config: TransformerConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config, **overrides) if config is not None else self.config_class(**overrides)
        self.config: Any = cfg.validate()
        self.in_channels, self.out_channels, self.learn_sigma = cfg.in_channels, cfg.out_channels, cfg.learn_sigma
        self.patch_size, self.grid_size = cfg.patch_size, cfg.grid
        self._context_group: ContextGroup | None = None

    def add_embedders(self, num_classes: int = 0, class_dropout_prob: float = 0.0,
                      patch: nn.Module | None = None) -> None:
        """``x_embedder`` (``patch``, default a per-frame ``PatchEmbed``), ``t_embedder``, the label table
        ``y_embedder`` (None without classes) and the frozen sin-cos table ``pos_embed``, in DiT's order."""
        cfg, d = self.config, self.config.hidden_size
        self.x_embedder = patch if patch is not None else PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(num_classes, d, class_dropout_prob) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], d), requires_grad=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape the model was built for: ([num_frames,] in_channels, H, W)."""
        frames = (self.config.num_frames,) if self.channel_dim == 2 else ()
        return (*frames, self.in_channels, *self.config.input_hw)

    @property
    def null_class(self) -> int | None:
        """Label of the unconditional (dropped) class used for guidance, or None when the model has none."""
        labels = getattr(self, "y_embedder", None)
        return labels.null_class if isinstance(labels, LabelEmbedder) else None

    def init_dit_weights(self, zero_adaln: bool = True) -> None:
        """DiT's initialisation: xavier linears with zero biases, the patch projection xavier on its (D, -1) view,
        sin-cos positions, N(0, 0.02) label table and timestep MLP, zero output linear and (``zero_adaln``: adaLN-Zero)
        every ``adaLN_modulation*`` linear, so the output is exactly 0 at init. Families zero their own extras after."""
        dit_base_init(self, self.x_embedder.proj)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_torch(self.config.hidden_size, *self.grid_size))
        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [self.final_layer.linear]
        if zero_adaln:
            zeroed += [m[-1] for name, m in self.named_modules()
                       if name.rsplit(".", 1)[-1].startswith("adaLN_modulation")]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def check_input(self, x: torch.Tensor) -> None:
        """``x`` is a batch of images or clips with ``in_channels`` channels."""
        if x.ndim != 3 + self.channel_dim or x.shape[self.channel_dim] != self.in_channels:
            shape = "[B, frames, C, H, W] clips" if self.channel_dim == 2 else "[B, C, H, W] images"
            raise ShapeError(f"{type(self).__name__} expects {shape} with C = {self.in_channels}, got "
                             f"{list(x.shape)}")

    @property
    def context_group(self) -> ContextGroup | None:
        """The ranks this model's tokens are split across (``set_context_parallel``), or None."""
        return self._context_group

    def set_context_parallel(self, group: ContextGroup | None) -> None:
        """Split each sample's tokens across the ranks of ``group`` (None: undo): an image's patch tokens, with
        every self-attention turned into Ulysses attention; a clip's frames (families with temporal attention
        switch the split for it). ``embed_patches`` shards and ``output`` gathers."""
        self._context_group = group
        if self.channel_dim == 1:
            for module in self.modules():
                if isinstance(module, Attention):
                    module.set_context_group(group)

    def embed_patches(self, x: torch.Tensor, positions: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens [(B F), T, D] of images or clips (their frames, or tubelets) with the sin-cos positions of their
        grid added (``positions``), and the grid (rows, columns). Context parallel: this rank's share of every
        image's tokens [B, T / N, D] or of every clip's frames [(B F / N), T, D]."""
        batch = x.shape[0]
        if self.channel_dim == 2 and not isinstance(self.x_embedder, TubeletEmbed):
            x = rearrange(x, "b f c h w -> (b f) c h w")  # [(B F), C, H, W]
        grid = self.x_embedder.grid(*x.shape[-2:])
        h = self.x_embedder(x)  # [(B F), T, D]
        h = h + grid_positions(self.pos_embed, self.grid_size, *grid) if positions else h
        group = self._context_group
        if group is not None and self.channel_dim == 1:
            h = group.shard(h, dim=1, what="the patch tokens of an image")  # [B, T / N, D]
        elif group is not None:
            frames = group.shard(rearrange(h, "(b f) t d -> b f t d", b=batch), dim=1, what="the token frames of a clip")
            h = rearrange(frames, "b f t d -> (b f) t d")  # [(B F / N), T, D]
        return h, grid

    def output(self, h: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
        """Final-layer tokens [(B F), T, p * p * out] -> [B, (F,) out, H, W] (context parallel: gathered from
        every rank's share first)."""
        group = self._context_group
        if group is not None and self.channel_dim == 1:
            h = group.gather(h, dim=1)  # [B, T, p * p * out]
        elif group is not None:
            h = rearrange(group.gather(rearrange(h, "(b f) t e -> b f t e", b=batch), dim=1), "b f t e -> (b f) t e")
        out = unpatchify(h, self.patch_size, self.out_channels, *grid)  # [(B F), out, H, W]
        return rearrange(out, "(b f) c h w -> b f c h w", b=batch) if self.channel_dim == 2 else out

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance in DiT's batch layout: y = [labels; null labels], only x's first half is used.

        ``guide_channels=None`` guides every eps channel; 3 is DiT's legacy behaviour (needed to reproduce its FIDs).
        The other channels (learned variance) pass through unguided: both halves hold the guided channels, each
        with its own remainder."""
        cd, half = self.channel_dim, x[: len(x) // 2]
        cond, uncond = self.forward(torch.cat([half, half]), t, y).chunk(2)
        k = self.in_channels if guide_channels is None else guide_channels
        guided = combine_guidance([uncond, cond], [cfg_scale], channels=k, channel_dim=cd)
        rest = uncond.narrow(cd, k, uncond.shape[cd] - k)
        return torch.cat([guided, torch.cat([guided.narrow(cd, 0, k), rest], dim=cd)])


def text_tokens(context: torch.Tensor | None, mask: torch.Tensor | None, batch: int, width: int,
                name: str = "context") -> tuple[torch.Tensor, torch.Tensor]:
    """Checked text tokens [B, L, width] and their key mask [B, L] (bool; all True when none is given)."""
    if context is None:
        raise ShapeError(f"this model needs text: {name} [{batch}, L, {width}] (run a text conditioner)")
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != width:
        raise ShapeError(f"{name} must be [{batch}, L, {width}] text tokens, got {list(context.shape)}")
    if mask is None:
        return context, torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    if tuple(mask.shape) != tuple(context.shape[:2]):
        raise ShapeError(f"{name} mask must be {list(context.shape[:2])}, got {list(mask.shape)}")
    return context, mask.bool()
