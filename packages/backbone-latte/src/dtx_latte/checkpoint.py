"""Official Latte checkpoints (format ``latte-official``) and initialising a Latte from a DiT (``init_from_dit``).

Vchitect/Latte's ``train.py`` saves ``{"model", "ema"}`` and the released files of FaceForensics, SkyTimelapse,
Taichi-HD and UCF101 hold ``{"ema"}``; both are read here (EMA weights by default), as are plain state dicts and
``module.``/``_orig_mod.`` prefixes. The architecture is read from tensor shapes. A file is recognised by its
``temp_embed`` next to DiT-style keys; DiT's own format refuses such files, so the two never compete.

What tensor shapes cannot tell: Variant 2 has Variant 1's keys (pass ``variant=2``), the appended-image count of
joint training (pass ``use_image_num=``; the weights are the same), and the heads of widths other than the paper's
sizes and 64/72-wide heads (pass ``num_heads=``). Models with RoPE have no ``temp_embed``; save them as dtx folders.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtx.errors import CheckpointError
from dtx.init_weights import InitReport
from dtx.models import LoadOptions, checkpoint_spec, create_model, load_state_dict_strict
from dtx.models import select_state as dtx_select_state

from .blocks import AxisBlock
from .model import LATTE_PRESETS, LatteConfig

FORMAT = "latte-official"
_SIGNATURE = ("temp_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight")
#: Latte's top-level modules (``text_embedding_projection``: the CLIP-text model, recognised to refuse it clearly)
_TOP_LEVEL = {"pos_embed", "temp_embed", "x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer",
              "temporal_upsample", "text_embedding_projection"}
#: (depth, hidden_size) -> num_heads of the paper's sizes; heads cannot be read from tensor shapes
_KNOWN_HEADS = {(p["depth"], p["hidden_size"]): p["num_heads"] for p in LATTE_PRESETS.values()}


def _is_latte_state(state: dict[str, Any]) -> bool:
    return (all(k in state for k in _SIGNATURE) and any(isinstance(k, str) and k.startswith("blocks.") for k in state)
            and all(isinstance(k, str) and k.split(".", 1)[0] in _TOP_LEVEL for k in state))


def select_state(obj: Any, use_ema: bool = True) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The Latte state dict inside a loaded checkpoint object and where it came from ("ema", "model", "state_dict")."""
    return dtx_select_state(obj, _is_latte_state, ("ema", "model"), use_ema)


def detect(path: Path, obj: Any) -> bool:
    """Whether ``obj`` (a safely loaded file) holds Latte weights with the official key names."""
    return select_state(obj)[0] is not None


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> tuple[str, dict[str, Any]]:
    """(model name, options) rebuilding the architecture that produced ``state``, read from tensor shapes
    (``num_heads`` when given: heads are not in the shapes).

    A paper size is returned as its preset name (e.g. "Latte-XL/2") with the other options; anything else as "Latte"
    with every architectural option. ``input_size`` is left out when the position table is not square.
    """
    if any(k.startswith("text_embedding_projection.") for k in state):
        raise CheckpointError("this is a CLIP-text Latte (extras=78, text_embedding_projection); only unconditional "
                              "and class-conditional Latte checkpoints are supported")
    w = state["x_embedder.proj.weight"]
    if w.ndim == 5:  # Conv3d tubelet embedding [D, C, s, p, p]
        d, c, stride, p, _ = w.shape
        embed: dict[str, Any] = {"patch_embed": "tubelet", "temporal_stride": stride}
    elif w.ndim == 4:  # per-frame Conv2d [D, C, p, p]
        d, c, p, _ = w.shape
        stride, embed = 1, {}
    else:
        raise CheckpointError(f"x_embedder.proj.weight has shape {tuple(w.shape)}; expected a 2D or 3D patch conv")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise CheckpointError("checkpoint has Latte embeddings but no blocks.{i} weights")
    variant = 3 if "blocks.0.attn_s.qkv.weight" in state else 4 if "blocks.0.split_attn.qkv.weight" in state else 1
    injection = "adaln" if "blocks.0.adaLN_modulation.1.weight" in state else "tokens"
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / d
    out = state["final_layer.linear.weight"].shape[0] // (p * p)
    if out not in (c, 2 * c):
        raise CheckpointError(f"final_layer.linear gives {out} channels per pixel; a Latte over {c} channels gives "
                              f"{c} or {2 * c}")
    heads = num_heads or _KNOWN_HEADS.get((depth, d)) or next((d // hd for hd in (64, 72) if d % hd == 0), None)
    if heads is None:
        raise CheckpointError(f"cannot infer num_heads for hidden size {d}; pass num_heads=...")
    tokens = state["pos_embed"].shape[1] if "pos_embed" in state else 0
    side = math.isqrt(tokens)
    input_size: Any = side * p if tokens and side * side == tokens else None
    num_frames = state["temp_embed"].shape[1] * stride

    table = state.get("y_embedder.embedding_table.weight")
    if table is None:  # unconditional (extras=1)
        num_classes, dropout = 0, LatteConfig.class_dropout_prob
    elif table.shape[0] == 1:
        num_classes, dropout = 1, 0.0
    else:  # the classes plus the null row (UCF101: 102 rows)
        num_classes, dropout = table.shape[0] - 1, 0.1

    arch = {"depth": depth, "hidden_size": d, "num_heads": heads, "patch_size": p}
    options = {"input_size": input_size, "num_frames": num_frames, "num_classes": num_classes, "in_channels": c,
               "mlp_ratio": mlp_ratio, "class_dropout_prob": dropout, "learn_sigma": out == 2 * c,
               "variant": variant, "injection": injection, **embed}
    defaults = LatteConfig()
    keep = {"input_size", "num_frames", "num_classes"}
    spec = {k: v for k, v in options.items() if k in keep or v != getattr(defaults, k)}
    if input_size is None:
        del spec["input_size"]
    name = next((n for n, preset in LATTE_PRESETS.items() if preset == arch), None)
    if name is None:
        return "Latte", {**arch, **spec}
    return name, spec


def load(path: Path, obj: Any, name: str | None = None, options: LoadOptions = LoadOptions(),
         **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model the checkpoint needs (or ``name``, with model ``overrides``) and load its weights strictly.

    ``options.weights == "raw"`` picks a training checkpoint's ``model`` weights instead of ``ema``.
    """
    state, where = select_state(obj, use_ema=options.weights == "ema")
    if state is None:
        raise CheckpointError(f"{path}: no Latte weights found")
    inferred_name, inferred = infer_config(state, overrides.get("num_heads"))
    arch, spec = checkpoint_spec(name, "latte", "Latte", inferred_name, inferred, LATTE_PRESETS, overrides, path)
    model = create_model(arch, **spec)
    load_state_dict_strict(model, state, str(path))
    return model, {"weights": where, "source": str(path)}


# -- initialising from a DiT ----------------------------------------------------------------------------------------

def _block_sources(model: nn.Module, i: int, block: nn.Module) -> dict[str, tuple[str, slice | None]]:
    """Model key of block i -> (DiT key, row slice or None) it starts from."""
    src = f"blocks.{i}."
    out: dict[str, tuple[str, slice | None]] = {}
    for key in block.state_dict():
        module = key.split(".", 1)[0]
        if isinstance(block, AxisBlock) or module in ("mlp", "norm1", "norm2", "adaLN_modulation"):
            out[src + key] = (src + key, None)  # DiT's own name
        elif module in ("attn_s", "attn_t", "split_attn"):  # a DiT attention, copied to each of them
            out[src + key] = (src + "attn." + key.split(".", 1)[1], None)
        elif module == "norm_t":
            out[src + key] = (src + "norm1." + key.split(".", 1)[1], None)
        elif module == "adaLN_modulation_t":  # the temporal MHA's (shift, scale, gate) = DiT's attention rows
            d = model.config.hidden_size
            out[src + key] = (src + "adaLN_modulation." + key.split(".", 1)[1], slice(0, 3 * d))
    return out


def init_from_dit(model: nn.Module, state: dict[str, torch.Tensor]) -> InitReport:
    """``init_from`` adapter of every Latte: start from a DiT (or Latte) state dict, as the paper does.

    - Shared layers are loaded by name and shape: ``x_embedder``, ``t_embedder``, ``pos_embed`` (when the grid
      matches), ``final_layer`` and the blocks.
    - Variants 1 and 2 have DiT's block names, so DiT block i fills Latte block i whatever its axis, as the official
      ``train.py`` does: a DiT-XL/2 (28 blocks) fills the 14 spatial and 14 temporal blocks of Latte-XL/2 (variant 1:
      even = spatial, odd = temporal; variant 2: blocks 0..13 spatial, 14..27 temporal). A shallower DiT leaves the
      last blocks new; extra DiT blocks are skipped.
    - Variant 3: DiT block i's ``attn`` fills both ``attn_s`` and ``attn_t``; ``mlp`` and ``adaLN_modulation``
      (same shapes) are copied, and ``adaLN_modulation_t`` takes the attention rows (shift, scale, gate) of DiT's.
      Variant 4: ``attn`` fills ``split_attn`` (its first half of the heads then attends spatially, the second half
      temporally); ``mlp`` and ``adaLN_modulation`` are copied.
    - ``temp_embed`` keeps its sin-cos init (new; a Latte source's is copied when its shape agrees); the label table
      is dropped when the class count differs (the paper removes it; the official code would fail on the shape) or
      copied when equal.
    """
    own = model.state_dict()
    sources: dict[str, tuple[str, slice | None]] = {k: (k, None) for k in own if not k.startswith("blocks.")}
    for i, block in enumerate(model.blocks):
        sources.update(_block_sources(model, i, block))
    report = InitReport()
    used: set[str] = set()
    mismatched: dict[str, str] = {}
    with torch.no_grad():
        for key, (src, rows) in sources.items():
            if src not in state:
                continue
            value = state[src] if rows is None else state[src][rows]
            if tuple(value.shape) != tuple(own[key].shape):
                mismatched[src] = f"shape {tuple(value.shape)} vs {tuple(own[key].shape)}"
                continue
            own[key].copy_(value.to(own[key].dtype))
            report.loaded.append(key)
            used.add(src)
    table = "y_embedder.embedding_table.weight"
    for key in state:
        if key in used:
            continue
        if key == table and table in mismatched:
            report.skipped[key] = (f"label table of {state[key].shape[0]} rows vs {own[table].shape[0]}: class count "
                                   f"differs, dropped as in the paper")
        elif key in mismatched:
            report.skipped[key] = mismatched[key]
        else:
            report.skipped[key] = "not in this model"
    loaded = set(report.loaded)
    report.new = [k for k in own if k not in loaded]
    return report
