"""How a run's ranks divide the work: data parallelism over samples, and context parallelism over each sample's
tokens (``parallel.context`` = N consecutive ranks share every sample of their micro-batch).

The N ranks of a context group read the same micro-batch and draw the same noise (the data order and step seeds
follow the data rank), each model splits its tokens across the group (``dtx.layers.context_parallel``), and every
rank computes the same loss. Gradients are averaged over all ranks as before (DDP, or FSDP2 sharding parameters
over all ranks: the ranks of a group compute with the same parameters), which gives the data-parallel gradient of
the data ranks' batches. Checkpoints do not depend on N: a run resumes with another N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..layers.context_parallel import ContextGroup, set_context_parallel
from .context import RunContext


@dataclass(frozen=True)
class ParallelPlan:
    """This rank's place in the run: its data-parallel rank and world (which samples), and the context group that
    splits each of its samples' tokens (None when each rank has samples of its own)."""

    data_rank: int
    data_world: int
    context: ContextGroup | None = None

    def apply(self, model: nn.Module) -> None:
        """Let ``model`` split its tokens across this rank's context group (nothing without one)."""
        if self.context is not None:
            set_context_parallel(model, self.context)


def plan_parallel(context_size: int, ctx: RunContext) -> ParallelPlan:
    """The plan for ``parallel.context`` = ``context_size`` on ``ctx``'s ranks: groups of consecutive ranks (every
    rank creates every group, as process groups require)."""
    n, world = context_size, ctx.world_size
    if n == 1:
        return ParallelPlan(ctx.rank, world)
    if world % n:
        raise ConfigError(f"bad value for config key 'parallel.context': {n} ranks per sample must divide the "
                          f"{world} workers (--workers a multiple of {n})")
    groups = [dist.new_group(list(range(start, start + n))) for start in range(0, world, n)]
    return ParallelPlan(ctx.rank // n, world // n, ContextGroup(groups[ctx.rank // n]))
