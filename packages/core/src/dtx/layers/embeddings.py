"""Conditioning embeddings shared by the backbones: sinusoidal timestep features, the timestep MLP, class labels."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError, ShapeError
from .linear import Linear


def check_label_range(y: torch.Tensor, rows: int, note: str = "") -> None:
    """Refuse class labels outside ``[0, rows)`` where that costs nothing: CPU tensors in eager mode (on GPU the
    check would synchronise, and under torch.compile ``int(y.min())`` would break the graph)."""
    if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling() and \
            (int(y.min()) < 0 or int(y.max()) >= rows):
        raise ShapeError(f"class labels must lie in [0, {rows - 1}]{note}, got {int(y.min())}..{int(y.max())}")


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT/ADM sinusoidal features of (possibly fractional) timesteps: ``[cos(t f), sin(t f)]``, cos half first.

    f_k = exp(-ln(max_period) k / half), k < half = dim // 2 (the divisor is ``half``, not ``half - 1``).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features followed by ``Linear -> SiLU -> Linear`` (state-dict keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label table with an extra null row (index ``num_classes``) when label dropout is on, for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.dropout_prob > 0 else None

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class with probability ``dropout_prob`` (or where ``force_drop_ids == 1``)."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        if self.null_class is None and bool(drop.any()):
            raise ConfigError("cannot drop labels: this LabelEmbedder has dropout_prob=0, so it has no null class")
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)

    def embed(self, y: torch.Tensor | None, shape: tuple[int, ...], model: str = "model") -> torch.Tensor:
        """Embeddings [*shape, D] of labels that arrive already dropped (``dtx.conditioning``): integer labels of
        ``shape`` inside the table (compile-safe check); ``y`` may be None only for a one-class model (label 0)."""
        if y is None:
            if self.num_classes != 1:
                raise ShapeError(f"this {model} has num_classes={self.num_classes} and needs class labels y "
                                 f"(use y={self.null_class} for unconditional outputs)")
            y = torch.zeros(shape, dtype=torch.long, device=self.embedding_table.weight.device)
        if tuple(y.shape) != tuple(shape) or y.dtype.is_floating_point:
            raise ShapeError(f"{model} expects integer class labels y of shape {list(shape)}, got {y.dtype} "
                             f"{list(y.shape)}")
        check_label_range(y, self.embedding_table.num_embeddings)
        return self(y, train=False)


class FourierFeatures(nn.Module):
    """Random Fourier features ``[cos(2 pi x W^T), sin(2 pi x W^T)]`` with a fixed N(0, std^2) buffer (k-diffusion)."""

    def __init__(self, in_features: int, out_features: int, std: float = 1.0) -> None:
        super().__init__()
        if out_features % 2:
            raise ConfigError(f"FourierFeatures needs an even out_features, got {out_features}")
        self.register_buffer("weight", torch.randn(out_features // 2, in_features) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * x @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)
