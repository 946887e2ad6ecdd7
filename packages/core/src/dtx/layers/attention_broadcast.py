"""``pab``: pyramid attention broadcast (Zhao et al. 2024, "Real-Time Video Generation with Pyramid Attention
Broadcast"). In the middle of sampling, attention outputs change little from one step to the next, and the less the
further an attention reaches: cross-attention least, then temporal, then spatial. So each attention layer computes
its output at one forward and reuses it for the next ``range - 1`` forwards, with ranges forming a pyramid (spatial
2, temporal 4, cross 6 by default, the paper's choice for video models), but only inside a window of the sampling
progress (0 at the start noise, 1 at the data; 0.2 to 0.9 by default): early steps lay out the sample and the last
ones add its details, so both are computed in full.

The layers are those with a ``set_broadcast`` switch (``dtx.layers.Attention`` and ``CrossAttention``, HDiT's
attention blocks, whose branch is broadcast and the residual added). Roles come from the model: ``CrossAttention``
layers are cross-attention; those the model's ``lora_groups`` list under ``temporal`` are temporal; the rest spatial. A range of 1 (or 0)
computes that role every time, so ``pab`` with every range at most 1 gives exactly the uncached samples. One
decision per layer and forward covers the whole batched forward, so every guidance term sees the same outputs.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from .step_cache import CacheStats, sampling_progress

ROLES = ("spatial", "temporal", "cross")


def attention_roles(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Every attention layer of ``model`` by name: (role, module)."""
    from .transformer import CrossAttention

    groups = getattr(model, "lora_groups", None) or {}
    temporal = [re.compile(p) for p in groups.get("temporal", [])]
    roles: dict[str, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if not callable(getattr(module, "set_broadcast", None)):
            continue
        if isinstance(module, CrossAttention):
            roles[name] = ("cross", module)
        else:
            is_temporal = any(p.fullmatch(f"{name}.{leaf}") for p in temporal for leaf in ("qkv", "proj"))
            roles[name] = ("temporal" if is_temporal else "spatial", module)
    return roles


def _range(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"sample.cache_options: cache 'pab' takes {name} as an integer >= 0, got {value!r}")
    return value


class PyramidAttentionBroadcast:
    """Pyramid attention broadcast: reuse attention outputs over steps (spatial 2, temporal 4, cross-attention 6).

    Counts are attention evaluations computed and reused."""

    unit = "attention evaluations"

    def __init__(self, stats: CacheStats, spatial: int = 2, temporal: int = 4, cross: int = 6,
                 window: tuple[float, float] | list[float] = (0.2, 0.9)) -> None:
        self.stats = stats
        self.ranges = {"spatial": _range("spatial", spatial), "temporal": _range("temporal", temporal),
                       "cross": _range("cross", cross)}
        ok = (isinstance(window, (list, tuple)) and len(window) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
              and 0 <= window[0] <= window[1] <= 1)
        if not ok:
            raise ConfigError(f"sample.cache_options: cache 'pab' takes window as [start, end] with 0 <= start <= "
                              f"end <= 1 (sampling progress), got {window!r}")
        self.window = (float(window[0]), float(window[1]))
        self.saved: dict[str, tuple[torch.Tensor, int, torch.Size]] = {}  # output, reuses, input shape
        self.layers: list[nn.Module] = []

    def attach(self, model: nn.Module) -> None:
        """Install the broadcast on every attention layer of ``model``."""
        roles = attention_roles(model)
        if not roles:
            raise ConfigError(f"sample.cache: {type(model).__name__} has no attention layer with a set_broadcast "
                              f"switch for 'pab' to broadcast")
        for name, (role, module) in roles.items():
            module.set_broadcast(self._broadcast(name, self.ranges[role]))
            self.layers.append(module)

    def detach(self) -> None:
        for module in self.layers:
            module.set_broadcast(None)
        self.layers, self.saved = [], {}

    def _broadcast(self, name: str, reach: int) -> Callable[[Callable[[], torch.Tensor], torch.Tensor],
                                                            torch.Tensor]:
        def broadcast(compute: Callable[[], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            progress = sampling_progress()
            inside = progress is not None and self.window[0] <= progress <= self.window[1]
            saved = self.saved.get(name)
            if inside and saved is not None and saved[1] + 1 < reach and saved[2] == x.shape:
                self.saved[name] = (saved[0], saved[1] + 1, saved[2])
                self.stats.skipped += 1
                return saved[0]
            out = compute()
            self.saved[name] = (out, 0, x.shape)
            self.stats.full += 1
            return out

        return broadcast
