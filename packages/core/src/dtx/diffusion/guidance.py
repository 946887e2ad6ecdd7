"""Classifier-free guidance over any number of nested condition sets, evaluated in one batched forward.

Outputs are ordered from least to most conditioned and combined as e₀ + Σᵢ sᵢ·(eᵢ − eᵢ₋₁). One step is classic CFG
u + s·(c − u) (s = 1: no guidance); GenTron's motion-free guidance is two steps, conds [(∅, ∅), (∅, c_M), (c_T, c_M)]
with scales [λ_M, λ_T]. The weights sum to one, so ε-, x₀-/D- and velocity-predictions can all be guided.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import ConfigError, ShapeError


def combine_guidance(outputs: Sequence[torch.Tensor], scales: Sequence[float], channels: int | None = None,
                     channel_dim: int = 1) -> torch.Tensor:
    """e₀ + Σᵢ sᵢ·(eᵢ − eᵢ₋₁); with ``channels=k`` only the first k channels are guided and the rest are taken from
    the most-conditioned output (DiT's legacy 3-channel CFG)."""
    if len(outputs) != len(scales) + 1:
        raise ConfigError(f"guidance needs len(scales) == len(outputs) - 1, got {len(scales)} scales for "
                          f"{len(outputs)} outputs")
    if any(o.shape != outputs[0].shape for o in outputs):
        raise ShapeError(f"guidance outputs differ in shape: {[tuple(o.shape) for o in outputs]}")
    total = outputs[0].shape[channel_dim]
    k = total if channels is None else channels
    if not 0 < k <= total:
        raise ConfigError(f"guided channels must be in 1..{total}, got {channels}")
    heads = [o.narrow(channel_dim, 0, k) for o in outputs]
    guided = heads[0]
    for i, scale in enumerate(scales, start=1):
        guided = guided + scale * (heads[i] - heads[i - 1])
    if k == total:
        return guided
    return torch.cat([guided, outputs[-1].narrow(channel_dim, k, total - k)], dim=channel_dim)


def _repeat(v: torch.Tensor, n: int, batch: int, name: str) -> torch.Tensor:
    if v.shape[0] != batch:
        raise ShapeError(f"{name} must be batch-first with {batch} rows, got shape {tuple(v.shape)}")
    return torch.cat([v] * n)


def _check_conds(conds: Sequence[Mapping[str, Any]]) -> None:
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ConfigError(f"guidance condition sets must share their keys, got {[sorted(c) for c in conds]}")
    for key in keys:
        values = [c[key] for c in conds]
        if any(v is None for v in values) and not all(v is None for v in values):
            raise ConfigError(f"guidance condition {key!r} is None in some condition sets but not in all")
        tensors = [isinstance(v, torch.Tensor) for v in values]
        if any(tensors) and not all(tensors):
            raise ConfigError(f"guidance condition {key!r} must be a tensor in every condition set or in none")
        if not any(tensors) and any(v != values[0] for v in values):
            raise ConfigError(f"guidance condition {key!r} is not a tensor, so it must be equal in all condition "
                              f"sets to batch them, got {values}")


def _batched(conds: Sequence[Mapping[str, Any]], batch: int) -> dict[str, Any]:
    """The condition sets' kwargs for one forward over all of them: tensors concatenated in ``conds`` order."""
    kwargs = {}
    for key, value in conds[0].items():
        if isinstance(value, torch.Tensor) and len(conds) > 1:
            kwargs[key] = torch.cat([_repeat(c[key], 1, batch, f"condition {key!r}") for c in conds])
        else:
            kwargs[key] = value
    return kwargs


def guided(model: Callable[..., torch.Tensor], conds: Sequence[Mapping[str, Any]], scales: Sequence[float],
           channels: int | None = None, channel_dim: int = 1,
           prepare: Callable[..., dict[str, Any]] | None = None) -> Callable[..., torch.Tensor]:
    """``fn(x, t_or_sigma, **shared)`` running ``model`` once on all condition sets stacked along the batch.

    x, a batched t/σ and tensor ``shared`` kwargs are repeated per condition set; each tensor condition is
    concatenated in ``conds`` order; non-tensor conditions and shared values are passed through unchanged.
    The concatenation happens on the first call (and again only if x's batch size changes), and ``prepare``
    (a backbone's ``prepare_conditions``) then maps the batched conditions once to the kwargs the model is called
    with, so step-invariant condition work is not repeated per step.
    """
    conds = [dict(c) for c in conds]
    if not conds:
        raise ConfigError("guidance needs at least one condition set")
    if len(scales) != len(conds) - 1:
        raise ConfigError(f"guidance needs one scale per added condition set: {len(conds)} condition sets need "
                          f"{len(conds) - 1} scales, got {len(scales)}")
    _check_conds(conds)
    scales = [float(s) for s in scales]
    n = len(conds)
    cache: dict[int, dict[str, Any]] = {}

    def batched(batch: int) -> dict[str, Any]:
        if batch not in cache:
            cache.clear()
            kwargs = _batched(conds, batch)
            cache[batch] = dict(prepare(**kwargs)) if prepare is not None else kwargs
        return cache[batch]

    def fn(x: torch.Tensor, t: torch.Tensor | float, **shared: Any) -> torch.Tensor:
        batch = x.shape[0]
        kwargs = dict(batched(batch))
        overlap = set(shared) & (set(conds[0]) | set(kwargs))
        if overlap:
            raise ConfigError(f"keyword arguments {sorted(overlap)} are given both per condition set and shared")
        if n == 1:
            return model(x, t, **kwargs, **shared)
        for key, value in shared.items():
            is_batched = isinstance(value, torch.Tensor) and value.ndim > 0
            kwargs[key] = _repeat(value, n, batch, f"shared argument {key!r}") if is_batched else value
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            t = _repeat(t, n, batch, "t/sigma")
        out = model(torch.cat([x] * n), t, **kwargs)
        if out.shape[0] != n * batch:
            raise ShapeError(f"guided model returned {out.shape[0]} rows for a batch of {n} x {batch}")
        return combine_guidance(out.split(batch), scales, channels=channels, channel_dim=channel_dim)

    return fn
