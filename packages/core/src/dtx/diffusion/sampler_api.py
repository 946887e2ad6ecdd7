"""One calling convention for every registered sampler, discrete or sigma-space:

``sampler(model, x, schedule, *, generator=None, progress=False, **options) -> x0``

``schedule`` is what the objective walks: a (respaced) ``GaussianDiffusion`` for DDPM samplers, the sigma sequence
(ending in 0) for k-diffusion samplers; ``x`` is x_T (``noise``, or ``noise * sigmas[0]``). The adapters below give
the core's samplers that signature without changing their own, which follow DiT and k-diffusion.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

Sampler = Callable[..., torch.Tensor]

#: arguments the adapters themselves pass; everything else a sampler takes is a user option (eta, solver_type, ...)
_CALL_ARGS = {"diffusion", "model", "noise", "model_kwargs", "clip_denoised", "progress", "generator", "x", "sigmas",
              "extra_args", "callback", "disable", "noise_sampler"}


def option_names(sampler: Sampler) -> set[str] | None:
    """The options a registered sampler accepts (None: it takes any keyword)."""
    from ..options import factory_options

    names = factory_options(getattr(sampler, "__wrapped__", sampler))
    return None if names is None else names - _CALL_ARGS


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
