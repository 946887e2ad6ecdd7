"""Step caches: during sampling, skip work of a model that would barely change, reusing what was computed at an
earlier step. This module holds what every cache shares: the counts (``CacheStats``), the sampling progress that
objectives report (``with_progress``, ``sampling_progress``), the family-calibrated options and ``step_cache``, which
installs a cache for one sampling run. The caches, one module each (registered in ``dtx.layers.caches``):
``first_block_cache`` (``first-block``), ``teacache`` (``teacache``), ``attention_broadcast`` (``pab``).

A cache over block stacks (``run(n, block, h, args_of)``) sees the whole batched forward of one sampling step
(every guidance term at once), so all terms of a step use the same fresh or cached features; models opt in by
running their blocks through ``dtx.layers.BlockStack.run``. A cache of single layers has ``attach(model)`` and
``detach()`` instead.
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


def threshold_option(cache: str, value: Any) -> float:
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
