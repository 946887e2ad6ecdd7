"""Model registry API: build registered architectures and presets, save and load them in any registered format."""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import plugins
from .errors import CheckpointError, ConfigError, DtxError

DTX_WEIGHTS = "model.safetensors"
DTX_CONFIG = "config.yaml"


def list_models(family: str | None = None) -> list[str]:
    """Names of every registered architecture and preset (optionally of one family)."""
    table = plugins.host().table("model")
    return sorted(n for n, e in table.items() if family is None or e.meta.get("family") == family)


def model_entry(name: str) -> plugins.Entry:
    return plugins.get("model", name)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered architecture or preset, e.g. ``create_model("DiT-XL/2", input_size=32)``.

    The model remembers how it was built in ``model.dtx_spec`` so that it can be saved and rebuilt.
    """
    entry = model_entry(name)
    factory = entry.obj
    _check_overrides(entry.name, factory, overrides)
    try:
        model = factory(**overrides)
    except DtxError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build model {entry.name!r} with {overrides}: {exc}") from exc
    model.dtx_spec = {"name": entry.name, **overrides}
    return model


def _check_overrides(name: str, factory: Any, overrides: dict[str, Any]) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = _config_fields(factory)
        if accepted is None:
            return
    else:
        accepted = set(params)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"model {name!r} has no option {', '.join(hints)}; options: {', '.join(sorted(accepted))}")


def _config_fields(factory: Any) -> set[str] | None:
    cfg_cls = getattr(factory, "config_class", None)
    if cfg_cls is None:
        return None
    import dataclasses

    return {f.name for f in dataclasses.fields(cfg_cls)}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -- dtx checkpoint format: a folder with model.safetensors + config.yaml (no pickle) ---------------------------

def save_model(model: nn.Module, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a dtx checkpoint folder: ``model.safetensors`` + ``config.yaml``."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    spec = getattr(model, "dtx_spec", None)
    if not spec:
        raise ConfigError("model was not built with dtx.create_model, so its architecture cannot be recorded")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (DTX_WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "dtx", "name": str(spec["name"])})
    os.replace(tmp, out / DTX_WEIGHTS)
    cfg = {"model": dict(spec), **(extra or {})}
    tmp = out / (DTX_CONFIG + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    os.replace(tmp, out / DTX_CONFIG)
    return out


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; on any mismatch raise one error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", shaped)):
            if keys:
                more = f" ... (+{len(keys) - 6})" if len(keys) > 6 else ""
                parts.append(f"{label}: {', '.join(keys[:6])}{more}")
        raise CheckpointError(f"{source} does not fit {getattr(model, 'dtx_spec', {}).get('name', type(model).__name__)}"
                              f": {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def read_safe(path: Path, trust: bool = False) -> Any:
    """Read a checkpoint file without executing code: safetensors, or torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        # train scripts (DiT's train.py) store their argparse.Namespace under "args"; it holds plain values only
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:
        if not trust and "weights_only" in str(exc):
            raise CheckpointError(f"{path} contains pickled objects that are not plain tensors; refusing to unpickle it "
                                  f"(pass --trust-checkpoint / trust=True only for files you trust)") from exc
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc


def _load_dtx_folder(path: Path, name: str | None, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    from omegaconf import OmegaConf

    from .config import read_yaml

    cfg = OmegaConf.to_container(read_yaml(path / DTX_CONFIG), resolve=True)
    spec = cfg.get("model")
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(f"{path / DTX_CONFIG} has no model.name")
    spec = dict(spec)
    arch = name or spec.pop("name")
    spec.pop("name", None)
    spec.update(overrides)
    model = create_model(arch, **spec)
    load_state_dict_strict(model, read_safe(path / DTX_WEIGHTS), str(path))
    return model, {"format": "dtx", "config": cfg}


def load_model(source: str | os.PathLike, name: str | None = None, *, trust: bool = False,
               **overrides: Any) -> nn.Module:
    """Load a model from a dtx checkpoint folder, a training run (its newest valid checkpoint, EMA weights), or any
    file a plugin understands (e.g. an official DiT ``.pt``).

    ``name`` forces the architecture; otherwise it is read from the checkpoint or inferred from tensor shapes.
    Files are read without unpickling arbitrary objects unless ``trust=True``. The model is returned in eval mode
    (label dropout off); call ``.train()`` to fine-tune.
    """
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / DTX_CONFIG).exists() and (path / DTX_WEIGHTS).exists():
        model, info = _load_dtx_folder(path, name, **overrides)
        model.dtx_load_info = info
        return model.eval()
    if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "manifest.json").is_file()):
        from .training.sample import load_run  # a training run folder or one of its checkpoints: EMA weights

        model = load_run(path).model
        model.dtx_load_info = {"format": "dtx-run"}
        return model.eval()
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder without {DTX_WEIGHTS} + {DTX_CONFIG} (nor a training run)")
    obj = read_safe(path, trust=trust)
    formats = plugins.host().table("checkpoint_format")
    for entry in formats.values():
        detect = entry.obj
        if detect(path, obj):
            load = entry.meta.get("load") or entry.meta.get("args", (None,))[0]
            model, info = load(path, obj, name, **overrides)
            model.dtx_load_info = {"format": entry.name, **info}
            return model.eval()
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: no installed plugin recognises this checkpoint (top-level keys: {keys}); "
                          f"formats known: {', '.join(sorted(formats)) or 'none'}")
