"""Fixed sin-cos position tables (MAE/DiT convention), 1D and 2D, for any grid shape, and the one rule by which a
model with a stored table adds positions to a grid or clip of another size."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import ConfigError


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim] table: all sines then all cosines, omega_k = 10000^(-k/(dim/2)), computed in float64."""
    if dim % 2:
        raise ConfigError(f"sin-cos embedding dimension must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(positions).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None) -> np.ndarray:
    """[grid_h * grid_w, dim] table for a row-major token grid, in DiT's order.

    Dims [0, dim/2) encode the column index and [dim/2, dim) the row index (DiT's ``emb_h`` really holds w).
    """
    if dim % 4:
        raise ConfigError(f"2D sin-cos embedding dimension must be divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def sincos_2d_torch(dim: int, grid_h: int, grid_w: int | None = None) -> torch.Tensor:
    """``sincos_2d`` as a float32 tensor of shape [1, T, dim]."""
    return torch.from_numpy(sincos_2d(dim, grid_h, grid_w)).float().unsqueeze(0)


def sincos_1d_torch(dim: int, length: int) -> torch.Tensor:
    """1D table over positions 0..length-1 as a float32 tensor of shape [1, length, dim] (Latte temporal table)."""
    return torch.from_numpy(sincos_1d(dim, np.arange(length, dtype=np.float32))).float().unsqueeze(0)


_table_2d = functools.lru_cache(maxsize=32)(sincos_2d_torch)
_table_1d = functools.lru_cache(maxsize=32)(sincos_1d_torch)


def grid_positions(stored: torch.Tensor, stored_grid: tuple[int, int], grid_h: int, grid_w: int) -> torch.Tensor:
    """[1, grid_h * grid_w, D] positions of a token grid: the model's ``stored`` table at its own ``stored_grid``,
    the same sin-cos construction (cached) at any other, always in the stored table's dtype and on its device, so
    the result's dtype never depends on the grid."""
    if (grid_h, grid_w) == tuple(stored_grid):
        return stored
    return _table_2d(stored.shape[-1], grid_h, grid_w).to(device=stored.device, dtype=stored.dtype)


def frame_positions(stored: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, frames, D] sin-cos positions of a clip's frames: ``stored`` when it has that length, else the table built
    for ``frames`` (cached), in the stored table's dtype and on its device."""
    if stored.shape[-2] == frames:
        return stored
    return _table_1d(stored.shape[-1], frames).to(device=stored.device, dtype=stored.dtype)
