"""Context parallelism: each sample's tokens split across the N ranks of a context group, for sequences too long
for one device's activation memory.

- Images (Ulysses; Jacobs et al. 2023, DeepSpeed-Ulysses): the token sequence is split in N; attention turns the
  sequence split into a head split with one all-to-all on q, k and v, attends over the whole sequence with H/N heads,
  and turns back with one all-to-all on its output. Everything else in a block is token-wise and runs locally.
- Videos (dynamic sequence parallelism; Zhao et al. 2024, VideoSys): the residual stream is split by frames, so
  spatial attention is local; temporal attention switches to a split by spatial position with one all-to-all and
  back with another.

Gradients: every rank of a group computes the same loss on the gathered output, and ``gather``'s backward hands
each rank N times its own slice of the gradient, so averaging gradients over all ranks (as data-parallel training
does) gives exactly the single-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import ShapeError


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any, size: int) -> torch.Tensor:
    """Chunk ``x`` in ``size`` along ``scatter_dim``, send chunk j to rank j, concatenate what arrives along
    ``gather_dim`` (in rank order)."""
    chunks = [c.contiguous() for c in x.chunk(size, dim=scatter_dim)]
    out = [torch.empty_like(chunks[0]) for _ in range(size)]
    dist.all_to_all(out, chunks, group=group)
    return torch.cat(out, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any, size: int) -> torch.Tensor:
        ctx.dims, ctx.group, ctx.size = (scatter_dim, gather_dim), group, size
        return _all_to_all(x, scatter_dim, gather_dim, group, size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group, ctx.size), None, None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, size: int, rank: int) -> torch.Tensor:
        ctx.dim, ctx.size, ctx.rank = dim, size, rank
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return ctx.size * grad.chunk(ctx.size, dim=ctx.dim)[ctx.rank], None, None, None, None


class ContextGroup:
    """The ranks sharing each sample's tokens: a process group (None: the default one), its size, this rank's index
    in it. Every operation is differentiable."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def check_split(self, length: int, what: str) -> None:
        """``length`` (of ``what``) divides evenly over the group, else a ShapeError naming both."""
        if length % self.size:
            raise ShapeError(f"context parallelism over {self.size} ranks needs {what} divisible by {self.size}, "
                             f"got {length}")

    def shard(self, x: torch.Tensor, dim: int, what: str = "the token count") -> torch.Tensor:
        """This rank's contiguous 1/N of ``x`` along ``dim``."""
        self.check_split(x.shape[dim], what)
        return x.chunk(self.size, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's shard concatenated along ``dim`` (rank order); backward: N x this rank's gradient slice."""
        return _Gather.apply(x, dim, self.group, self.size, self.rank)

    def all_to_all(self, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        """Split ``x`` along ``scatter_dim`` over the ranks and join what they send along ``gather_dim``: a sequence
        split [.., L/N, ..] with heads H becomes a head split [.., H/N, ..] over the whole sequence, or back."""
        self.check_split(x.shape[scatter_dim], f"dimension {scatter_dim} of a {list(x.shape)} tensor")
        return _AllToAll.apply(x, scatter_dim, gather_dim, self.group, self.size)


class StandInGroup(ContextGroup):
    """Rank 0 of a group of ``size`` ranks, played in one process without communicating: every operation returns a
    tensor of the shape rank 0 would hold (its own shard standing in for the others'). For measuring one rank's
    memory and time on one machine (``dtx bench --context-parallel``); the values are not those of a real run."""

    def __init__(self, size: int) -> None:
        self.group, self.size, self.rank = None, int(size), 0

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([x] * self.size, dim=dim)

    def all_to_all(self, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        self.check_split(x.shape[scatter_dim], f"dimension {scatter_dim} of a {list(x.shape)} tensor")
        return torch.cat([x.chunk(self.size, dim=scatter_dim)[0]] * self.size, dim=gather_dim)


def set_context_parallel(model: Any, group: ContextGroup | None) -> None:
    """Split ``model``'s tokens across ``group`` through its declared ``set_context_parallel`` (None: undo); a model
    without one is refused with a ConfigError naming it."""
    from ..errors import ConfigError

    switch = getattr(model, "set_context_parallel", None)
    if not callable(switch):
        raise ConfigError(f"parallel.context: {type(model).__name__} cannot split its tokens across ranks (it declares "
                          f"no set_context_parallel); set parallel.context to 1")
    switch(group)
