"""Patch embedding and its inverse for image latents of any size divisible by the patch, and the patch-grid part of
every patchifying model's config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn

from ..errors import ShapeError


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch, flattened row-major to [N, T, D] (timm's PatchEmbed keys: ``proj``).

    Unlike timm it accepts any H, W divisible by the patch, and says so clearly when they are not.
    """

    def __init__(self, patch_size: int | tuple[int, int], in_channels: int, embed_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = _pair(patch_size)
        self.in_channels = in_channels
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ShapeError(f"input size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        return h // ph, w // pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"patch embed expects [N, {self.in_channels}, H, W], got {list(x.shape)}")
        weight = self.proj.weight
        if x.device != weight.device:
            raise ShapeError(f"input is on {x.device} but the model is on {weight.device}")
        if not x.is_floating_point() or (x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type)):
            raise ShapeError(f"input dtype {x.dtype} does not match the model's {weight.dtype} (cast it, or use autocast)")
        self.grid(x.shape[2], x.shape[3])
        return self.proj(x).flatten(2).transpose(1, 2)


class TubeletEmbed(nn.Module):
    """Compression patch embedding of clips: ``Conv3d`` with kernel = stride = (s, p, p), [B, F, C, H, W] ->
    [(B F/s), (H/p W/p), D] (``proj``, as ``PatchEmbed``)."""

    def __init__(self, stride: int, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.stride, self.patch_size, self.in_channels = stride, patch_size, in_channels
        kernel = (stride, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=True)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        if h % self.patch_size or w % self.patch_size:
            raise ShapeError(f"input size {h}x{w} is not divisible by the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] % self.stride:
            raise ShapeError(f"a tubelet embedding needs [B, F, C, H, W] clips with F divisible by temporal_stride "
                             f"{self.stride}, got {list(x.shape)}")
        x = self.proj(rearrange(x, "b f c h w -> b c f h w"))  # [B, D, F/s, H/p, W/p]
        return rearrange(x, "b d f h w -> (b f) (h w) d")  # [(B F/s), t, D]


def unpatchify(x: torch.Tensor, patch_size: int | tuple[int, int], channels: int, grid_h: int,
               grid_w: int) -> torch.Tensor:
    """[N, h*w, ph*pw*C] tokens (each laid out p_row, p_col, c) -> [N, C, h*ph, w*pw] images; h != w allowed."""
    ph, pw = _pair(patch_size)
    n, t, d = x.shape
    if t != grid_h * grid_w or d != ph * pw * channels:
        raise ShapeError(f"cannot unpatchify {list(x.shape)} into a {grid_h}x{grid_w} grid of {ph}x{pw}x{channels}")
    x = x.reshape(n, grid_h, grid_w, ph, pw, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, grid_h * ph, grid_w * pw)


class PatchGridConfig:
    """Mixin of a model config dataclass with ``input_size`` (side or [height, width]) and ``patch_size``: the input
    size as (H, W), the token grid, and the checks every patchifying model runs on them (``validate_grid``) and
    every patch transformer with ``in_channels``, ``depth``, ``hidden_size``, ``num_heads`` (and ``mlp_ratio``)
    runs on those (``validate_transformer``)."""

    input_size: Any
    patch_size: int

    @property
    def input_hw(self) -> tuple[int, int]:
        size = self.input_size
        if isinstance(size, int):
            return size, size
        h, w = size
        return int(h), int(w)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.input_hw
        return h // self.patch_size, w // self.patch_size

    def validate_grid(self) -> None:
        """``input_size`` an int or [H, W], ``patch_size`` >= 1 dividing it (ConfigError naming the key)."""
        from ..config import check

        size = self.input_size
        check(isinstance(size, int) or (isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2
                                       and all(isinstance(s, int) for s in size)),
              "input_size", f"must be an int or [height, width], got {size!r}")
        h, w = self.input_hw
        check(self.patch_size >= 1, "patch_size", f"must be >= 1, got {self.patch_size}")
        check(h >= self.patch_size and w >= self.patch_size and h % self.patch_size == 0 and w % self.patch_size == 0,
              "input_size", f"{h}x{w} is not divisible by patch_size {self.patch_size}")

    def validate_transformer(self) -> None:
        """``validate_grid`` plus: at least one input channel and one block, heads dividing the width, a width the
        2D sin-cos table can split in four, a positive MLP ratio (ConfigError naming the key)."""
        from ..config import check

        self.validate_grid()
        cfg: Any = self
        check(cfg.in_channels >= 1, "in_channels", f"must be >= 1, got {cfg.in_channels}")
        check(cfg.depth >= 1, "depth", f"must be >= 1, got {cfg.depth}")
        check(cfg.num_heads >= 1 and cfg.hidden_size % cfg.num_heads == 0, "num_heads",
              f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        check(cfg.hidden_size % 4 == 0, "hidden_size",
              f"must be divisible by 4 for the 2D sin-cos position table, got {cfg.hidden_size}")
        mlp_ratio = getattr(cfg, "mlp_ratio", 1.0)
        check(mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {mlp_ratio}")


def per_sample_timesteps(t: torch.Tensor | float, n: int, device: torch.device, model: str = "model") -> torch.Tensor:
    """``t`` as one timestep per sample [n]: a scalar is broadcast, anything but [n] is a ShapeError."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ShapeError(f"{model} expects t of shape [{n}] (one timestep per sample), got {list(t.shape)}")
    return t
