"""Exponential moving average of model weights, with DiT's constant decay or k-diffusion's warm-up power schedule.

The warm-up schedule ``decay = min(max_decay, 1 - (1 + step)^-power)`` starts at 0 (a copy) and forgets the early
weights quickly, which is what short runs need; a constant 0.9999 averages over ~10k steps.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .config import EMAConfig
from .sharding import load_model_state, model_state


def constant_decay(step: int, decay: float) -> float:
    """DiT: the first update copies the weights (decay 0), every later one uses ``decay``."""
    return 0.0 if step == 0 else decay


def warmup_decay(step: int, power: float, max_decay: float) -> float:
    """k-diffusion's ``EMAWarmup`` with inv_gamma 1: ``1 - (1 + step)^-power``, capped at ``max_decay``."""
    return min(max_decay, max(0.0, 1.0 - (1.0 + step) ** -power))


class EMA:
    """A frozen copy of the model in eval mode whose float parameters track the trained ones; buffers are copied."""

    def __init__(self, model: nn.Module, cfg: EMAConfig) -> None:
        from ..finetune import saved_keys

        self.cfg = cfg
        #: a LoRA model's EMA tracks (and saves) only what the run trains: its adapters, not the frozen base
        self.keys = saved_keys(model)
        self.tracked = None if self.keys is None else [p.requires_grad for p in model.parameters()]
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def decay(self, step: int | None = None) -> float:
        step = self.updates if step is None else step
        if self.cfg.kind == "warmup":
            return warmup_decay(step, self.cfg.power, self.cfg.max_decay)
        return constant_decay(step, self.cfg.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """``ema = decay * ema + (1 - decay) * param`` over all parameters (frozen ones included, as DiT)."""
        d = self.decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise RuntimeError("EMA and model have different parameter lists")
        tracked = self.tracked or [True] * len(params)
        floats = [(e, p) for e, p, t in zip(ema_params, params, tracked) if t and e.is_floating_point()]
        if floats:
            es, ps = [e for e, _ in floats], [p.to(e.dtype) for e, p in floats]
            torch._foreach_lerp_(es, ps, 1.0 - d)  # one pass; equal to mul_(d).add_(p, 1 - d) up to rounding
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)
        self.updates += 1
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full EMA weights, or a LoRA run's tracked tensors (collective when sharded: see
        :func:`dtx.training.sharding.model_state`)."""
        state = model_state(self.model)
        return state if self.keys is None else {k: v for k, v in state.items() if k in self.keys}

    def load_state_dict(self, state: dict[str, Any], updates: int) -> None:
        load_model_state(self.model, state, "EMA checkpoint", keys=self.keys)
        self.updates = updates
