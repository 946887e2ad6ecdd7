"""``first-block``: first-block cache (as ParaAttention's FBCache and diffusers' ``FirstBlockCache``). Run the first
block; when its residual changed by less than ``threshold`` (relative mean absolute difference) since the last step
computed in full, add the remaining blocks' residual of that step instead of running them. ``threshold`` 0 computes
every step.
"""

from __future__ import annotations

import torch

from .step_cache import ArgsOf, Block, CacheStats, relative_change, threshold_option


class FirstBlockCache:
    """Reuse the remaining blocks' residual while the first block's residual stays within ``threshold``."""

    def __init__(self, stats: CacheStats, threshold: float = 0.2) -> None:
        self.stats, self.threshold = stats, threshold_option("first-block", threshold)
        self.first: torch.Tensor | None = None
        self.rest: torch.Tensor | None = None

    def run(self, n: int, block: Block, h: torch.Tensor, args_of: ArgsOf) -> torch.Tensor:
        h1 = block(0, h, *args_of(0))
        first = h1 - h
        fits = self.first is not None and self.first.shape == first.shape
        if fits and self.rest is not None and relative_change(first, self.first) < self.threshold:
            self.stats.skipped += 1
            return h1 + self.rest
        out = h1
        for i in range(1, n):
            out = block(i, out, *args_of(i))
        self.first, self.rest = first, out - h1
        self.stats.full += 1
        return out
