"""``teacache`` (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"):
accumulate the relative change of the blocks' input tokens and conditioning since the last full step; while the sum
stays below ``threshold``, skip every block and add the last full step's residual. (TeaCache rescales the change
with a polynomial fitted per model; here it is used as measured, and a family may calibrate the threshold.)
``threshold`` 0 computes every step.
"""

from __future__ import annotations

import torch

from .step_cache import ArgsOf, Block, CacheStats, relative_change, threshold_option


class TeaCache:
    """Skip every block while the accumulated relative change of their inputs stays below ``threshold``."""

    def __init__(self, stats: CacheStats, threshold: float = 0.4) -> None:
        self.stats, self.threshold = stats, threshold_option("teacache", threshold)
        self.previous: list[torch.Tensor] | None = None
        self.residual: torch.Tensor | None = None
        self.accumulated = 0.0

    def run(self, n: int, block: Block, h: torch.Tensor, args_of: ArgsOf) -> torch.Tensor:
        inputs = [h] + [a for a in args_of(0) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        fits = self.previous is not None and [t.shape for t in self.previous] == [t.shape for t in inputs]
        if fits and self.residual is not None:
            self.accumulated += sum(relative_change(a, b) for a, b in zip(inputs, self.previous))  # type: ignore[arg-type]
        self.previous = [t.detach() for t in inputs]
        if fits and self.residual is not None and self.accumulated < self.threshold:
            self.stats.skipped += 1
            return h + self.residual
        out = h
        for i in range(n):
            out = block(i, out, *args_of(i))
        self.residual, self.accumulated = out - h, 0.0
        self.stats.full += 1
        return out
