"""Seeded Gaussian noise shared by every sampler.

A generator may be one ``torch.Generator`` for the whole batch or a sequence of them, one per sample (as diffusers'
pipelines take them): then sample ``i``'s noise comes from generator ``i`` alone, so a sample is the same whatever
batch it is drawn in, which lets an evaluation set be split over workers and any sample be regenerated alone.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def randn(shape: Sequence[int], generator: Generators = None, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn on the generator's device (so seeds mean the same on every device),
    then moved to ``device``; with one generator per sample, row ``i`` of the batch comes from generator ``i``."""
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} samples; pass one per sample")
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.stack(rows).to(device)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (see ``randn``)."""
    if generator is None:
        return torch.randn_like(x)
    return randn(x.shape, generator, x.device, x.dtype)


def per_sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with that sample's seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
