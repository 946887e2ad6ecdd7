"""LoRA adapters (Hu et al. 2021) through ``peft``: which linear layers get one, adding them, their tensors, folding
them into the base weights, and their scale.

A model declares named groups of its linear layers, ``lora_groups`` (group -> regular expressions matched against
whole module names, e.g. ``{"attention": [r"blocks\\.\\d+\\.attn\\.(qkv|proj)"]}``); a target is a group name or a
module-name glob (``blocks.*.mlp.fc1``). peft wraps each chosen ``nn.Linear`` (dtx's oneDNN ``Linear`` included) so
that W x becomes W x + (alpha / rank)·B A x with B zero-initialised: at step 0 the adapted model is the base model.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .interface import unwrap

ADAPTER_NAME = "default"


@dataclass
class LoraSpec:
    """Rank, alpha (the update is scaled by alpha / rank), dropout on the adapter's input, and the targets."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])

    def validate(self, prefix: str = "finetune.lora.") -> "LoraSpec":
        from .config import check

        check(self.rank >= 1, f"{prefix}rank", f"must be >= 1, got {self.rank}")
        check(self.alpha > 0, f"{prefix}alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, f"{prefix}dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.targets) > 0, f"{prefix}targets", "needs at least one group or module pattern")
        return self


def lora_groups(model: nn.Module) -> dict[str, list[str]]:
    """The groups of linear layers ``model`` declares (``lora_groups``), {} when it declares none."""
    groups = getattr(unwrap(model), "lora_groups", None) or {}
    return {str(k): [str(p) for p in v] for k, v in dict(groups).items()}


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in unwrap(model).named_modules() if isinstance(m, nn.Linear) and name]


def target_modules(model: nn.Module, targets: Sequence[str], key: str = "finetune.lora.targets") -> list[str]:
    """Full names of the linear layers the targets select (each must select at least one)."""
    groups, linears = lora_groups(model), _linear_names(model)
    chosen: list[str] = []
    for target in targets:
        if target in groups:
            hits = [n for n in linears if any(re.fullmatch(p, n) for p in groups[target])]
        else:
            hits = [n for n in linears if fnmatch.fnmatchcase(n, target)]
        if not hits:
            declared = ", ".join(sorted(groups)) or "none"
            raise ConfigError(f"bad value for config key {key!r}: {target!r} selects no linear layer of "
                              f"{type(unwrap(model)).__name__} (its groups: {declared}; or a module-name glob such "
                              f"as {linears[0] if linears else 'blocks.*.attn.qkv'!r})")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def add_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Wrap the targeted linear layers of ``model`` (in place) with LoRA adapters; only the adapters stay trainable.
    Returns the wrapped module names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_modules(model, spec.targets)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names)
    inject_adapter_in_model(config, unwrap(model), adapter_name=ADAPTER_NAME)
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA-wrapped layer; a model can hold none before peft is imported (peft imports
    transformers: seconds that runs without adapters do not pay)."""
    if "peft.tuners.lora" not in sys.modules:
        return []
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter tensor (``...lora_A.default.weight``)."""
    return ".lora_A." in key or ".lora_B." in key or ".lora_embedding_" in key


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` under its own state-dict names."""
    return {k: v for k, v in unwrap(model).state_dict().items() if is_adapter_key(k)}


def set_adapter_scale(model: nn.Module, scale: float) -> None:
    """Multiply every adapter's update by ``scale`` (1 = as trained; 0 = the base model)."""
    for _, layer in lora_layers(model):
        layer.set_scale(ADAPTER_NAME, scale)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight (W + scale·B A) and put the plain linear layer back; in place."""
    root = unwrap(model)
    for name, layer in lora_layers(root):
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer.get_base_layer())
    return model


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's saved names (``<module>.lora_A.weight``, no adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unwrap(model)).items()}


#: PEFT's files: what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def adapter_hyper(model: nn.Module) -> dict[str, float]:
    """Rank, alpha and dropout of ``model``'s adapter (the first adapted layer's; one spec per run)."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA adapter to write (--adapter-only needs a LoRA run)")
    layer = layers[0][1]
    return {"r": int(layer.r[ADAPTER_NAME]), "lora_alpha": float(layer.lora_alpha[ADAPTER_NAME]),
            "lora_dropout": float(getattr(layer.lora_dropout[ADAPTER_NAME], "p", 0.0))}


def write_adapter(out: str | os.PathLike, state: dict[str, torch.Tensor], targets: Sequence[str],
                  hyper: dict[str, float], base: str | None) -> Path:
    """A PEFT adapter folder: ``adapter_model.safetensors`` (``state`` under ``base_model.model.``) and
    ``adapter_config.json`` (LoRA on ``targets`` with ``hyper``'s rank, alpha and dropout)."""
    from safetensors.torch import save_file

    from .io import atomic_write, atomic_write_text

    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "inference_mode": True,
              **hyper, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in state.items()}
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def save_adapter(model: nn.Module, out: str | os.PathLike, base: str | None = None) -> Path:
    """Write ``model``'s adapter in PEFT's format under dtx's module names: ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_A.weight``) and ``adapter_config.json``; ``base`` is recorded as the base
    model's path."""
    hyper = adapter_hyper(model)
    return write_adapter(out, peft_state(model), [n for n, _ in lora_layers(model)], hyper, base)


def load_adapter(model: nn.Module, folder: str | os.PathLike, scale: float = 1.0) -> list[str]:
    """Add the adapter PEFT saved in ``folder`` to ``model`` (in place) at ``scale``; returns the adapted modules."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a PEFT adapter folder: {name} is missing")
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not a LoRA adapter config ({exc})") from None
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    root = unwrap(model)
    modules = {n for n, _ in root.named_modules()}
    targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) else []
    absent = [t for t in targets if t not in modules]
    if absent:
        raise CheckpointError(f"{folder}: the adapter targets modules this model lacks: {', '.join(absent[:4])}")
    inject_adapter_in_model(config, root, adapter_name=ADAPTER_NAME)
    result = set_peft_model_state_dict(root, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in getattr(result, "missing_keys", []) if is_adapter_key(k)]
    if missing:
        raise CheckpointError(f"{folder}: adapter tensors missing for {', '.join(missing[:4])}")
    set_adapter_scale(model, scale)
    return [n for n, _ in lora_layers(model)]


def apply_adapter(model: nn.Module, folder: str | os.PathLike | None, scale: float | None) -> None:
    """What ``dtx sample --adapter/--adapter-scale`` do: add the saved adapter in ``folder`` at ``scale`` (default
    1), or, with no folder, rescale the model's own adapter (a LoRA run); nothing when neither is given."""
    if folder:
        if has_lora(model):
            raise ConfigError("--adapter: SOURCE already has a LoRA adapter (a LoRA run); sample its base instead")
        load_adapter(model, folder, 1.0 if scale is None else scale)
        model.to(next(model.parameters()).device)
    elif scale is not None:
        if not has_lora(model):
            raise ConfigError("--adapter-scale needs --adapter or a LoRA run as SOURCE")
        set_adapter_scale(model, scale)
