"""Step caches: during sampling, skip the work of a model's transformer blocks when it would barely change, reusing
what was computed at an earlier step. A cache sees the whole batched forward of one sampling step (every guidance
term at once), so all terms of a step use the same fresh or cached features.

- ``first-block`` (first-block cache, as ParaAttention's FBCache and diffusers' ``FirstBlockCache``): run the first
  block; when its residual changed by less than ``threshold`` (relative mean absolute difference) since the last
  step computed in full, add the remaining blocks' residual of that step instead of running them.
- ``teacache`` (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"):
  accumulate the relative change of the blocks' input tokens and conditioning since the last full step; while the
  sum stays below ``threshold``, skip every block and add the last full step's residual. (TeaCache rescales the
  change with a polynomial fitted per model; here it is used as measured.)

A model opts in by running its blocks through ``dtx.layers.BlockStack.run``; ``threshold`` 0 computes every step.
``pab`` (pyramid attention broadcast, ``dtx.layers.attention_broadcast``) reuses single attention layers' outputs
instead, placed by the sampling progress that objectives report through ``with_progress``.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import ConfigError

ArgsOf = Callable[[int], tuple[Any, ...]]
Block = Callable[..., torch.Tensor]


def _threshold(cache: str, value: Any) -> float:
    """A cache's threshold: a finite number >= 0 (a ConfigError naming the option otherwise)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
    if not ok:
        raise ConfigError(f"sample.cache_options: cache {cache!r} takes threshold as a number >= 0, got {value!r}")
    return float(value)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean |new - old| / mean |old|: how much a tensor moved between two steps."""
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


_PROGRESS: ContextVar[float | None] = ContextVar("dtx_sampling_progress", default=None)


def sampling_progress() -> float | None:
    """How far the running sampler has come, 0 at its start noise and 1 at the data (None outside sampling)."""
    return _PROGRESS.get()


def with_progress(net: Callable[..., torch.Tensor], progress_of: Callable[[float], float]) -> Callable[..., torch.Tensor]:
    """``net(x, level, ...)`` that makes ``progress_of(level)`` (the noise level's place in the sampler's schedule,
    0 to 1) the ``sampling_progress`` while it runs; caches that act by schedule position read it."""
    def fn(x: torch.Tensor, level: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        value = level.reshape(-1)[0] if isinstance(level, torch.Tensor) else level
        token = _PROGRESS.set(min(1.0, max(0.0, float(progress_of(float(value))))))
        try:
            return net(x, level, *args, **kwargs)
        finally:
            _PROGRESS.reset(token)

    return fn


@dataclass
class CacheStats:
    """What a cache computed in full and skipped: block-stack forwards (one per stack and step), or for a cache of
    single layers its layer evaluations (``unit``)."""

    full: int = 0
    skipped: int = 0
    unit: str = "block-stack evaluations"

    def as_dict(self) -> dict[str, Any]:
        total = self.full + self.skipped
        return {"full": self.full, "skipped": self.skipped, "unit": self.unit,
                "fewer_full_evaluations": round(total / self.full, 3) if self.full else 0.0}


class FirstBlockCache:
    """Reuse the remaining blocks' residual while the first block's residual stays within ``threshold``."""

    def __init__(self, stats: CacheStats, threshold: float = 0.2) -> None:
        self.stats, self.threshold = stats, _threshold("first-block", threshold)
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


class TeaCache:
    """Skip every block while the accumulated relative change of their inputs stays below ``threshold``."""

    def __init__(self, stats: CacheStats, threshold: float = 0.4) -> None:
        self.stats, self.threshold = stats, _threshold("teacache", threshold)
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


def _pab(stats: CacheStats, **options: Any) -> Any:
    """Pyramid attention broadcast: reuse attention outputs over steps (spatial 2, temporal 4, cross 6)."""
    from .attention_broadcast import PyramidAttentionBroadcast

    return PyramidAttentionBroadcast(stats, **options)


CACHES: dict[str, Callable[..., Any]] = {"first-block": FirstBlockCache, "teacache": TeaCache, "pab": _pab}


def family_defaults(model: nn.Module, name: str | None) -> dict[str, Any]:
    """The options a model's family calibrated for the cache ``name`` on its own demo (its ``step_cache_defaults``,
    ``{cache name: {option: value}}``), else none: the cache's own defaults apply."""
    from ..interface import unwrap

    declared = getattr(unwrap(model), "step_cache_defaults", None) or {}
    return dict(declared.get(name, {})) if name else {}


def _stacks(model: nn.Module) -> list[Any]:
    from .blocks import BlockStack

    return [m for m in model.modules() if isinstance(m, BlockStack)]


@contextlib.contextmanager
def step_cache(model: nn.Module, factory: Callable[..., Any] | None, options: dict[str, Any] | None = None,
               key: str = "sample.cache", name: str | None = None) -> Iterator[CacheStats]:
    """Install a fresh cache (``factory(stats, **options)``) on each block stack of ``model`` for one sampling run;
    the stacks are restored afterwards. ``factory`` None yields empty stats and changes nothing. With the cache's
    registered ``name``, options the model's family calibrated for it (``step_cache_defaults``) fill in what
    ``options`` leave out."""
    stats = CacheStats()
    if factory is None:
        yield stats
        return
    options = {**family_defaults(model, name), **(options or {})}
    try:
        probe = factory(stats, **(options or {}))
    except TypeError as exc:
        raise ConfigError(f"{key}_options: {exc}") from None
    if callable(getattr(probe, "attach", None)):  # a cache of single layers (pab): it finds them itself
        stats.unit = getattr(probe, "unit", stats.unit)
        probe.attach(model)
        try:
            yield stats
        finally:
            probe.detach()
        return
    stacks = _stacks(model)
    if not stacks:
        raise ConfigError(f"{key}: {type(model).__name__} has no dtx.layers.BlockStack, so no step cache can skip "
                          f"its blocks")
    caches = [probe] + [factory(stats, **(options or {})) for _ in stacks[1:]]
    for stack, cache in zip(stacks, caches):
        stack.set_step_cache(cache)
    try:
        yield stats
    finally:
        for stack in stacks:
            stack.set_step_cache(None)
