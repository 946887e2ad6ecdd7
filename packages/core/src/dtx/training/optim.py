"""AdamW parameter groups: no weight decay on biases, norms, gains, embedding tables and position tables, and
per-group learning-rate multipliers that a model asks for (HDiT trains its mapping network at lr / 3).

A model opts in with a method ``param_group_fn(name, param) -> dict | None`` returning ``{"weight_decay": bool}``
and/or ``{"lr_scale": float}`` for the parameters it wants treated differently; the default rules cover the rest.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import OptimConfig

ParamGroupFn = Callable[[str, nn.Parameter], Optional[dict[str, Any]]]

_NO_DECAY_MODULES = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
                     nn.RMSNorm)
_NO_DECAY_LEAVES = ("pos_embed", "pos_emb", "position", "gain", "scale")


def default_decays(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Weight decay only for matrices/kernels that are not norms, embedding tables, position tables or gains."""
    if param.ndim < 2 or isinstance(module, _NO_DECAY_MODULES):
        return False
    leaf = name.rsplit(".", 1)[-1].lower()
    return not any(key in leaf for key in _NO_DECAY_LEAVES)


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 param_group_fn: ParamGroupFn | None = None) -> list[dict[str, Any]]:
    """Split the trainable parameters into groups keyed by (decays, lr_scale); each group records its ``lr_scale``."""
    fn = param_group_fn or getattr(model, "param_group_fn", None)
    owners = {f"{mname}.{pname}" if mname else pname: module
              for mname, module in model.named_modules() for pname, _ in module.named_parameters(recurse=False)}
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = default_decays(owners[name], name, p)
        scale = 1.0
        extra = fn(name, p) if fn is not None else None
        if extra:
            decays = bool(extra.get("weight_decay", decays))
            scale = float(extra.get("lr_scale", scale))
        key = (decays, scale)
        if key not in groups:
            label = ("decay" if decays else "no_decay") + ("" if scale == 1.0 else f"_x{scale:g}")
            groups[key] = {"params": [], "param_names": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": weight_decay if decays else 0.0, "group": label}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def _fusable(model: nn.Module) -> bool:
    """Plain CPU or CUDA floating parameters (not sharded DTensors): PyTorch's fused AdamW handles them in one pass."""
    return all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
               for p in model.parameters() if p.requires_grad)


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``fused=None`` takes PyTorch's fused kernel where :func:`_fusable` (several
    times faster than the per-tensor loop PyTorch defaults to on CPU: docs/perf/optimizer.md)."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay)
    fused = _fusable(model) if fused is None else fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_at(step: int, cfg: OptimConfig, max_steps: int | None = None) -> float:
    """Base learning rate at optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``, constant, then
    (with ``decay_steps`` and ``max_steps``) linear from lr down to ``decay_to`` x lr, reached at the last step.

    The decay is the "D" of warmup-stable-decay: annealing only the end of a fixed-length run gets most of what a
    schedule over the whole run gives while the stable phase can be resumed or extended."""
    scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.decay_steps > 0 and max_steps is not None:
        span = min(cfg.decay_steps, max_steps)  # a run shorter than the decay (a smoke test) decays throughout
        into = step - (max_steps - span)  # 0 at the first decayed step, span - 1 at the last
        if into >= 0:
            frac = min(1.0, (into + 1) / span)
            scale = min(scale, 1.0 - frac * (1.0 - cfg.decay_to))
    return cfg.lr * scale


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_scale", 1.0)
