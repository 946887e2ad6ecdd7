"""Starting a model from another model's weights (``model.init_from`` in a recipe): Latte from a DiT, a GenTron-T2V
from its T2I run, a fine-tune with a new class count. Reads any source without building the source's architecture,
then lets the target family map the keys (its registered ``init_from`` adapter), else copies equal names and shapes,
and reports what was loaded, skipped and left newly initialised."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CheckpointError
from .models import DTX_CONFIG, DTX_WEIGHTS, LoadOptions, model_entry, model_spec, read_safe, select_state

Adapter = Callable[[nn.Module, dict[str, torch.Tensor]], "InitReport"]


@dataclass
class InitReport:
    """Keys copied into the model, source keys not used (with why) and model keys left at their fresh values."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)

    def summary(self, limit: int = 12) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")

        lines = [f"init from {self.source}: {len(self.loaded)} tensors loaded, {len(self.skipped)} skipped, "
                 f"{len(self.new)} newly initialised"]
        if self.skipped:
            lines.append("  skipped: " + few([f"{k} ({why})" for k, why in self.skipped.items()]))
        if self.new:
            lines.append("  new: " + few(self.new))
        return "\n".join(lines)


def read_state_dict(source: str | os.PathLike, options: LoadOptions = LoadOptions()) -> dict[str, torch.Tensor]:
    """Tensors of a dtx folder, a training run (EMA or raw), or a file (a plain state dict, or a training checkpoint
    wrapping ``ema``/``model``), without knowing the architecture that wrote them."""
    from .checkpoint import is_run_folder, load_training_state

    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"model.init_from: not found: {path}")
    if path.is_dir() and (path / DTX_WEIGHTS).is_file() and (path / DTX_CONFIG).is_file():
        return dict(read_safe(path / DTX_WEIGHTS))
    if is_run_folder(path):
        _, state = load_training_state(path)
        return dict(state["ema" if options.weights == "ema" and "ema" in state else "model"])
    if path.is_dir():
        raise CheckpointError(f"model.init_from: {path} is neither a dtx model folder nor a training run")
    state, _ = select_state(read_safe(path, trust=options.trust), _is_tensor_dict,
                            ("ema", "model_ema", "model"), options.weights == "ema")
    if state is None:
        raise CheckpointError(f"model.init_from: {path} holds no state dict of tensors")
    return state


def _is_tensor_dict(state: dict[str, Any]) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def copy_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> InitReport:
    """Copy every source tensor whose name and shape the model shares; report the rest."""
    own = model.state_dict()
    report = InitReport(source=source)
    with torch.no_grad():
        for key, value in state.items():
            if key not in own:
                report.skipped[key] = "not in this model"
            elif tuple(value.shape) != tuple(own[key].shape):
                report.skipped[key] = f"shape {tuple(value.shape)} vs {tuple(own[key].shape)}"
            else:
                own[key].copy_(value.to(own[key].dtype))
                report.loaded.append(key)
    report.new = [k for k in own if k not in set(report.loaded)]
    return report


def init_weights(model: nn.Module, source: str | os.PathLike, options: LoadOptions = LoadOptions()) -> InitReport:
    """Initialise ``model`` in place from ``source`` through its family's ``init_from`` adapter (registered with the
    model) or by equal names and shapes."""
    state = read_state_dict(source, options)
    spec = model_spec(model)
    adapter: Adapter | None = model_entry(spec["name"]).meta.get("init_from") if spec else None
    report = adapter(model, state) if adapter is not None else copy_matching(model, state)
    report.source = str(source)
    if not report.loaded:
        raise CheckpointError(f"model.init_from: no tensor of {source} fits this model")
    return report
