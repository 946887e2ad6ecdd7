"""Fully sharded data parallel (PyTorch FSDP2) for the training loop: shard a model block by block, shard its EMA copy
the same way, and move full state dicts between sharded modules and checkpoints.

A sharded run's checkpoint holds the same full tensors as any other run's (gathered to rank 0 on CPU, written in the
one checkpoint format): it resumes with any strategy or number of workers and samples in one process. On restore
every rank reads the full state and keeps its own shard. Unsharded modules take the plain ``state_dict`` paths, so
single-process and DDP runs are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..models import check_state_dict_fits, load_state_dict_strict


def _dtensor() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a sharded ``DTensor`` (the module went through ``fully_shard``)."""
    dtensor = _dtensor()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def shard_units(model: nn.Module) -> list[str]:
    """Names of the submodules sharded as units of their own: every element of an ``nn.ModuleList`` (the transformer
    blocks), outermost lists only; the root is sharded last and takes the remaining parameters."""
    names: list[str] = []
    for name, sub in model.named_modules():
        if isinstance(sub, nn.ModuleList) and not any(name.startswith(n + ".") for n in names):
            names.extend(f"{name}.{i}" for i in range(len(sub)))
    return names


def _shard(module: nn.Module, units: list[str], mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for name in units:
        fully_shard(module.get_submodule(name), mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def shard_model(model: nn.Module, mesh: Any = None) -> nn.Module:
    """``fully_shard`` each transformer block of ``model`` and then the model itself, in place (FSDP2: parameters
    become ``DTensor`` shards over ``mesh``, default: all ranks of the process group); returns ``model``."""
    return _shard(model, shard_units(model), mesh)


def shard_like(module: nn.Module, reference: nn.Module) -> None:
    """Shard ``module`` (a copy of ``reference``'s architecture, e.g. the EMA model) with the same units and mesh, so
    its shards line up with ``reference``'s parameter by parameter."""
    from torch.distributed.fsdp import FSDPModule

    units = [n for n, sub in reference.named_modules() if n and isinstance(sub, FSDPModule)]
    _shard(module, units, next(p for p in reference.parameters()).device_mesh)


def _options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of ``module``; for a sharded one a collective call (every rank) that gathers the full
    tensors to rank 0 on CPU and returns ``{}`` on the other ranks."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_model_state(module: nn.Module, state: dict[str, torch.Tensor], where: str,
                     keys: set[str] | None = None) -> None:
    """Load a full state dict (every key, matching shapes, or ``CheckpointError`` naming ``where``), or exactly the
    ``keys`` a partial one holds (a LoRA run's adapters); a sharded module keeps this rank's shard of each tensor."""
    if keys is not None:
        own = module.state_dict()
        check_state_dict_fits(module, {**{k: v for k, v in own.items() if k not in keys}, **state}, where)
        missing = sorted(keys - set(state))
        if missing:
            raise CheckpointError(f"{where} lacks {len(missing)} trained tensors ({', '.join(missing[:4])} ...)")
    if not is_sharded(module):
        if keys is None:
            load_state_dict_strict(module, state, where)
        else:
            module.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if keys is None:
        check_state_dict_fits(module, state, where)
    set_model_state_dict(module, state, options=_options(strict=keys is None))


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict: plain (parameters numbered) for an unsharded model; for a sharded one the full
    state keyed by parameter name, gathered to rank 0 (collective; ``{}`` on the other ranks)."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))


def _numbering(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Parameter name of each number in ``optimizer.state_dict()`` (numbers follow the optimizer's groups)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return dict(enumerate(names[id(p)] for group in optimizer.param_groups for p in group["params"]))


def _by_name(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A numbered optimizer state dict (torch's own layout) re-keyed by parameter name."""
    name = _numbering(module, optimizer)
    return {"state": {name[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in state["param_groups"]]}


def _by_number(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_by_name`, for an unsharded model."""
    number = {n: i for i, n in _numbering(module, optimizer).items()}
    return {"state": {number[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore an optimizer state saved by :func:`optimizer_state` in either layout, into a sharded model or not
    (``KeyError`` when the names or numbers do not fit the model)."""
    named = any(isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", []))
    if not is_sharded(module):
        optimizer.load_state_dict(_by_number(module, optimizer, state) if named else state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state if named else _by_name(module, optimizer, state),
                             options=_options())
