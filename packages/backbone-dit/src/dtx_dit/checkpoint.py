"""Official DiT checkpoints: format detection, architecture inference from tensor shapes, and strict loading.

Understands the released plain state dicts (``DiT-XL-2-256x256.pt``) and train.py checkpoints
``{"model", "ema", "opt", "args"}`` (EMA weights by default), also with ``module.``/``_orig_mod.`` prefixes.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dtx.errors import CheckpointError
from dtx.models import (DTX_CONFIG, DTX_WEIGHTS, LoadOptions, checkpoint_spec, create_model, load_state_dict_strict,
                        read_safe)
from dtx.models import select_state as dtx_select_state

from .model import DIT_PRESETS, SIT_PRESETS, DiTConfig

FORMAT = "dit-official"
SIT_FORMAT = "sit"
_SIGNATURE = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight")
#: DiT's top-level modules; other families reuse DiT's key names (Latte adds ``temp_embed``), so anything else
#: at the top level means the file is not a DiT
_TOP_LEVEL = {"pos_embed", "x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer"}
#: (depth, hidden_size) -> num_heads of the paper's sizes; heads cannot be read from tensor shapes
_KNOWN_HEADS = {(p["depth"], p["hidden_size"]): p["num_heads"] for p in DIT_PRESETS.values()}


def _is_dit_state(state: dict[str, Any]) -> bool:
    return all(k in state for k in _SIGNATURE) and all(k.split(".", 1)[0] in _TOP_LEVEL for k in state)


def select_state(obj: Any, use_ema: bool = True) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The DiT state dict inside a loaded checkpoint object and where it came from ("ema", "model", "state_dict")."""
    return dtx_select_state(obj, _is_dit_state, ("ema", "model"), use_ema)


def detect(path: Path, obj: Any) -> bool:
    """Whether ``obj`` (a safely loaded file) holds DiT weights with the official key names (and is not a SiT
    train.py checkpoint, whose args name its interpolant path)."""
    return select_state(obj)[0] is not None and "path_type" not in _args_dict(obj)


def detect_sit(path: Path, obj: Any) -> bool:
    """A SiT train.py checkpoint: DiT's weights with SiT's args. Released SiT files are plain DiT state dicts that
    no reader can tell from DiT's; ``format="sit"`` (``--format sit``) reads them."""
    return select_state(obj)[0] is not None and "path_type" in _args_dict(obj)


def _args_dict(obj: Any) -> dict[str, Any]:
    args = obj.get("args") if isinstance(obj, dict) else None
    if args is None:
        return {}
    return dict(args) if isinstance(args, dict) else dict(vars(args))


def infer_config(state: dict[str, torch.Tensor], args: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(model name, overrides) rebuilding the architecture that produced ``state``, read from tensor shapes.

    A paper configuration is returned as its preset name (e.g. "DiT-XL/2") with the non-default options; anything
    else as "DiT" with every architectural option. ``args`` (train.py's) settles the class count when present.
    ``input_size`` is left out when the position table is not square.
    """
    args = args or {}
    d, c, p, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise CheckpointError("checkpoint has DiT embeddings but no blocks.{i} weights")
    if "blocks.0.adaLN_modulation.1.weight" in state:
        rows = state["blocks.0.adaLN_modulation.1.weight"].shape[0]
        block = {6 * d: "adaln-zero", 4 * d: "adaln"}.get(rows)
        if block is None:
            raise CheckpointError(f"blocks.0.adaLN_modulation.1.weight has {rows} rows; DiT blocks have {6 * d} or {4 * d}")
    else:
        block = "cross-attention" if "blocks.0.cross_attn.q.weight" in state else "in-context"
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / d
    out = state["final_layer.linear.weight"].shape[0] // (p * p)
    if out not in (c, 2 * c):
        raise CheckpointError(f"final_layer.linear gives {out} channels per pixel; a DiT over {c} channels gives "
                              f"{c} or {2 * c}")
    heads = _KNOWN_HEADS.get((depth, d)) or next((d // hd for hd in (64, 72) if d % hd == 0), None)
    if heads is None:
        raise CheckpointError(f"cannot infer num_heads for hidden size {d}; pass num_heads=...")

    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1]
        side = math.isqrt(tokens)
        input_size: Any = side * p if side * side == tokens else None
    else:
        input_size = args["image_size"] // 8 if "image_size" in args else None

    table = state.get("y_embedder.embedding_table.weight")
    if table is None:  # unconditional; the dropout option then has no effect
        num_classes, dropout = 0, DiTConfig.class_dropout_prob
    elif "num_classes" in args:
        num_classes = int(args["num_classes"])
        dropout = 0.1 if table.shape[0] == num_classes + 1 else 0.0
    elif table.shape[0] == 1:
        num_classes, dropout = 1, 0.0
    else:  # the usual layout: the classes plus the null row for guidance
        num_classes, dropout = table.shape[0] - 1, 0.1

    arch = {"depth": depth, "hidden_size": d, "num_heads": heads, "patch_size": p}
    options = {"input_size": input_size, "num_classes": num_classes, "in_channels": c, "mlp_ratio": mlp_ratio,
               "class_dropout_prob": dropout, "learn_sigma": out == 2 * c, "block": block}
    defaults = DiTConfig()
    name = next((n for n, preset in DIT_PRESETS.items() if preset == arch), None)
    keep = {"input_size", "num_classes"}
    spec = {k: v for k, v in options.items() if k in keep or v != getattr(defaults, k)}
    if input_size is None:  # non-square pos_embed (or none): the caller must say
        del spec["input_size"]
    if name is None:
        return "DiT", {**arch, **spec}
    return name, spec


def load(path: Path, obj: Any, name: str | None = None, options: LoadOptions = LoadOptions(),
         **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model the checkpoint needs (or ``name``, with model ``overrides``) and load its weights strictly.

    Loader options: ``options.weights == "raw"`` picks a training checkpoint's ``model`` weights instead of ``ema``.
    """
    state, where = select_state(obj, use_ema=options.weights == "ema")
    if state is None:
        raise CheckpointError(f"{path}: no DiT weights found")
    args = _args_dict(obj)
    inferred_name, inferred = infer_config(state, args)
    arch, spec = checkpoint_spec(name, "dit", "DiT", inferred_name, inferred, DIT_PRESETS, overrides, path)
    model = create_model(arch, **spec)
    load_state_dict_strict(model, state, str(path))
    return model, {"weights": where, "source": str(path), "args": args}


def sit_settings(args: dict[str, Any]) -> dict[str, Any]:
    """The objective and sampling settings SiT's sample.py would use for a checkpoint with train.py ``args``:
    its path, prediction, loss weight and epsilons (defaults: linear, velocity), the adaptive dopri5 ODE solver,
    guidance 4 on the first three channels (SiT's ``forward_with_cfg``)."""
    objective = {"kind": "flow", "path": str(args.get("path_type") or "Linear").lower(),
                 "prediction": str(args.get("prediction") or "velocity"),
                 "loss_weight": str(args.get("loss_weight") or "none")}
    for key in ("train_eps", "sample_eps"):
        if args.get(key) is not None:
            objective[key] = float(args[key])
    return {"objective": objective,
            "sample": {"sampler": "flow-dopri5", "steps": 50, "cfg": float(args.get("cfg_scale") or 4.0),
                       "guide_channels": 3}}


def load_sit(path: Path, obj: Any, name: str | None = None, options: LoadOptions = LoadOptions(),
             **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A SiT checkpoint as a DiT fed SiT's time (``SiT-XL/2`` ... or ``DiT`` with ``noise_input="sit_time"``), with
    SiT's objective and sampling settings recorded so that ``dtx sample`` samples it as SiT's sample.py does."""
    state, where = select_state(obj, use_ema=options.weights == "ema")
    if state is None:
        raise CheckpointError(f"{path}: no SiT (DiT-layout) weights found")
    args = _args_dict(obj)
    inferred_name, inferred = infer_config(state, args)
    inferred["noise_input"] = "sit_time"
    if inferred_name != "DiT":
        inferred_name = inferred_name.replace("DiT-", "SiT-")
    arch, spec = checkpoint_spec(name, "dit", "DiT", inferred_name, inferred, SIT_PRESETS, overrides, path)
    model = create_model(arch, **spec)
    load_state_dict_strict(model, state, str(path))
    return model, {"weights": where, "source": str(path), "args": args, "config": sit_settings(args)}


def load_weights(model: nn.Module, source: str | os.PathLike, skip: Sequence[str] = (), *, use_ema: bool = True,
                 trust: bool = False) -> list[str]:
    """Copy a checkpoint's weights into an existing ``model``, keeping the model's own values for keys under ``skip``.

    For fine-tuning released weights with a changed part, e.g. ``skip=["y_embedder"]`` for a new class count or
    ``skip=["final_layer.linear"]`` for learn_sigma off. Any other mismatch raises a CheckpointError listing keys.
    Returns the skipped keys.
    """
    path = Path(source)
    if path.is_dir():
        path = path / DTX_WEIGHTS
        if not (path.parent / DTX_CONFIG).exists():
            raise CheckpointError(f"{source} is a folder without {DTX_WEIGHTS} + {DTX_CONFIG}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    state, _ = select_state(read_safe(path, trust=trust), use_ema=use_ema)
    if state is None:
        raise CheckpointError(f"{path}: no DiT weights found")
    prefixes = [s.rstrip(".") for s in skip]

    def skipped_key(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in prefixes)

    own = model.state_dict()
    skipped = [k for k in own if skipped_key(k)]
    merged = {k: v for k, v in state.items() if not skipped_key(k)}
    merged.update({k: own[k] for k in skipped})
    load_state_dict_strict(model, merged, str(path))
    return skipped
