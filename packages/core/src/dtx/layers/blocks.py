"""A model's stack of transformer blocks and activation recomputation, the one place either is written.

Recomputation (often called activation or gradient checkpointing; unrelated to run checkpoints) drops a block's
activations in the forward pass and recomputes them in the backward pass: less memory for about one more forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError


def recomputed(fn: Callable[..., torch.Tensor], *args: Any, enabled: bool = True) -> torch.Tensor:
    """``fn(*args)``, its activations recomputed in the backward pass when ``enabled`` and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def recompute_policy(value: Any, option: str = "recompute") -> int:
    """A recomputation policy as ``every``: 0 none, 1 every block, k every k-th block (blocks 0, k, 2k, ...).
    Accepts 0/1/k, booleans, "none", "all"/"every" or "every-k"; else a ConfigError naming ``option``."""
    if isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower()
    named = {"none": 0, "off": 0, "false": 0, "all": 1, "every": 1, "on": 1, "true": 1}
    if text in named:
        return named[text]
    digits = text[len("every-"):] if text.startswith("every-") else text
    if digits.isdigit():
        return int(digits)
    raise ConfigError(f"{option}={value!r} is not a recomputation policy: none, all, every-K or K (a block count)")


class BlockStack(nn.ModuleList):
    """The transformer blocks of a model, run in order, every ``recompute_every``-th one recomputed in the backward
    (0: none). State-dict keys are a ModuleList's (``blocks.0.attn...``), so checkpoints are unchanged."""

    def __init__(self, blocks: Iterable[nn.Module], recompute_every: int = 0) -> None:
        super().__init__(blocks)
        self.recompute_every = 0
        self.set_recompute(recompute_every)
        self._step_cache: Any = None  # a sampling run's step cache (``dtx.layers.step_cache``), or None

    def set_step_cache(self, cache: Any) -> None:
        """Let ``cache`` (``run(n, block, h, args_of)``) decide which blocks ``run`` computes; None: all of them."""
        self._step_cache = cache

    def set_recompute(self, every: int) -> None:
        """Recompute blocks 0, k, 2k, ... for ``every`` = k (1: all, 0: none)."""
        if every < 0:
            raise ConfigError(f"recompute every {every} blocks: must be >= 0 (0 none, 1 every block)")
        self.recompute_every = int(every)

    def call(self, i: int, h: torch.Tensor, *args: Any) -> torch.Tensor:
        """Block ``i`` on ``h`` and its own arguments (for loops that run blocks one at a time)."""
        if self._step_cache is not None:
            raise ConfigError("sample.cache: this model runs its blocks one at a time (BlockStack.call); a step cache "
                              "needs them run through BlockStack.run")
        return self._block(i, h, *args)

    def _block(self, i: int, h: torch.Tensor, *args: Any) -> torch.Tensor:
        every = self.recompute_every
        return recomputed(self[i], h, *args, enabled=every > 0 and i % every == 0)

    def run(self, h: torch.Tensor, args_of: Callable[[int], tuple[Any, ...]]) -> torch.Tensor:
        """Every block in order, block ``i`` on the previous output and ``args_of(i)``; a step cache, when one is
        set, may skip blocks."""
        if self._step_cache is not None:
            return self._step_cache.run(len(self), self._block, h, args_of)
        for i in range(len(self)):
            h = self._block(i, h, *args_of(i))
        return h

    def forward(self, h: torch.Tensor, *args: Any) -> torch.Tensor:  # type: ignore[override]
        """Every block in order, each on the previous output and the same ``args``."""
        return self.run(h, lambda i: args)


def set_recompute(model: nn.Module, every: int) -> None:
    """Turn on recomputation through the model's declared switch: its ``set_recompute(every)`` method, else every
    ``BlockStack`` it holds, else (``every`` 1 only) a diffusers model's ``enable_gradient_checkpointing``."""
    if every < 0:
        raise ConfigError(f"recompute every {every} blocks: must be >= 0 (0 none, 1 every block)")
    switch = getattr(model, "set_recompute", None)
    if callable(switch):
        switch(every)
        return
    stacks = [m for m in model.modules() if isinstance(m, BlockStack)]
    for stack in stacks:
        stack.set_recompute(every)
    if stacks or every == 0:
        return
    if every == 1 and callable(getattr(model, "enable_gradient_checkpointing", None)):
        model.enable_gradient_checkpointing()
        return
    raise ConfigError(f"recompute: {type(model).__name__} declares no way to recompute activations (a set_recompute"
                      f"(every) method or its blocks in a dtx.layers.BlockStack); set recompute to none")
