"""Patch embedding and its inverse for image latents of any size divisible by the patch."""

from __future__ import annotations

import torch
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
