"""One calling convention for every registered sampler, discrete or sigma-space:

``sampler(model, x, schedule, *, generator=None, progress=False, **options) -> x0``

``schedule`` is what the objective walks: a (respaced) ``GaussianDiffusion`` for DDPM samplers, the sigma sequence
(ending in 0) for k-diffusion samplers; ``x`` is x_T (``noise``, or ``noise * sigmas[0]``). The adapters below give
the core's samplers that signature without changing their own, which follow DiT and k-diffusion.

Each sampler declares the options a user may set (``@takes(SamplerOption(...), ...)`` beside its definition): their
type and range or choices. ``check_options`` refuses an unknown name or a bad value (``eta=.inf`` would sample NaN,
``eta=abc`` would fail deep inside the loop) before anything runs or is written.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..errors import ConfigError

Sampler = Callable[..., torch.Tensor]

#: arguments the adapters themselves pass; everything else a sampler takes is a user option (eta, solver_type, ...)
_CALL_ARGS = {"diffusion", "model", "noise", "model_kwargs", "clip_denoised", "progress", "generator", "x", "sigmas",
              "extra_args", "callback", "disable", "noise_sampler"}


@dataclass(frozen=True)
class SamplerOption:
    """One option of a sampler: ``type`` float, int or str, and the closed range [``low``, ``high``] (None: unbounded
    on that side; ``high=math.inf`` admits inf itself, e.g. ``s_tmax``) or the allowed ``choices``."""

    name: str
    type: type = float
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        """What the option takes, for error messages: "a number in [0, 1]", "one of 'heun', 'midpoint'"."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is not None and self.high is not None:
            return f"{'an integer' if self.type is int else 'a number'} in [{self.low:g}, {self.high:g}]"
        what = "an integer" if self.type is int else "a finite number"
        if self.low is not None:
            return f"{what} >= {self.low:g}"
        return what if self.high is None else f"{what} <= {self.high:g}"

    def check(self, value: Any) -> Any:
        """``value`` as this option's type (an int is a float too), or ``ValueError`` when it is not allowed."""
        ok = not isinstance(value, bool)
        if self.type is float:
            ok = ok and (isinstance(value, float) or (isinstance(value, int) and abs(value) <= sys.float_info.max))
            value = float(value) if ok else value
        elif self.type is int:
            ok = ok and isinstance(value, int)
        else:
            ok = ok and isinstance(value, self.type)
        if ok and self.choices:
            ok = value in self.choices
        elif ok and self.type in (int, float):
            finite = math.isfinite(value) or (value == math.inf and self.high == math.inf)
            ok = finite and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        if not ok:
            raise ValueError(self.describe())
        return value


def takes(*options: SamplerOption) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the options a sampler function takes (none: ``@takes()``); the adapters below keep the declaration."""
    def declare(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.sampler_options = {o.name: o for o in options}  # type: ignore[attr-defined]
        return fn

    return declare


def declared_options(sampler: Sampler) -> dict[str, SamplerOption] | None:
    """The options a registered sampler declares with ``takes`` (None: it declares none, e.g. a plugin's)."""
    return getattr(sampler, "sampler_options", None)


def option_names(sampler: Sampler) -> set[str] | None:
    """The options a registered sampler accepts (None: it takes any keyword)."""
    from ..options import factory_options

    declared = declared_options(sampler)
    if declared is not None:
        return set(declared)
    names = factory_options(getattr(sampler, "__wrapped__", sampler))
    return None if names is None else names - _CALL_ARGS


def check_options(name: str, sampler: Sampler, options: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``options`` of sampler ``name`` checked by name and, where it declares them, by type and range; errors name
    ``key``: a config key (``sample.sampler_options``) or a command-line flag (``--sampler-option``)."""
    from ..options import check_names

    check_names(f"{key}: sampler {name!r}", option_names(sampler), options)
    declared = declared_options(sampler) or {}
    checked = dict(options)
    for option, value in options.items():
        if option in declared:
            try:
                checked[option] = declared[option].check(value)
            except ValueError as exc:
                where = f"{key} {option}" if key.startswith("-") else f"config key '{key}.{option}'"
                raise ConfigError(f"bad value for {where}: sampler {name!r} takes {option} as {exc}, "
                                  f"got {value!r}") from None
    return checked


def discrete(fn: Callable[..., torch.Tensor]) -> Sampler:
    """A DDPM/DDIM-style ``fn(diffusion, model, noise, model_kwargs, ...)`` in the common signature."""
    @functools.wraps(fn)
    def sample(model: Callable[..., torch.Tensor], x: torch.Tensor, schedule: Any, *,
               generator: torch.Generator | None = None, progress: bool = False, **options: Any) -> torch.Tensor:
        return fn(schedule, model, x, None, clip_denoised=False, progress=progress, generator=generator, **options)

    return sample


def sigma_space(fn: Callable[..., torch.Tensor]) -> Sampler:
    """A k-diffusion ``fn(model, x, sigmas, extra_args, callback, disable, ...)`` in the common signature."""
    @functools.wraps(fn)
    def sample(model: Callable[..., torch.Tensor], x: torch.Tensor, schedule: torch.Tensor, *,
               generator: torch.Generator | None = None, progress: bool = False, **options: Any) -> torch.Tensor:
        return fn(model, x, schedule, disable=not progress, generator=generator, **options)

    return sample
