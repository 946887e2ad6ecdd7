"""k-diffusion ``image_transformer_v2`` checkpoints: format detection, the architecture from the stored JSON config
or from the tensor shapes, and strict loading into ``HDiT``.

Understands train.py checkpoints ``{"config", "model", "model_ema", "opt", ...}`` (EMA weights by default;
``LoadOptions(weights="raw")`` takes ``model``), convert_for_inference.py's ``.safetensors`` (the config sits in
the file's metadata) and bare state dicts, also with ``module.``/``_orig_mod.``/``inner_model.`` prefixes. A bare
state dict holds no attention types or kernel sizes: k-diffusion's defaults (neighborhood attention, kernel 7, on
every level but the last, global on the last) are assumed unless ``self_attns=...`` is passed, and an input size
of 16x16 innermost tokens (as in every published HDiT) unless ``input_size=...`` is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtx.errors import CheckpointError, ConfigError
from dtx.models import LoadOptions, create_model, load_state_dict_strict, model_entry
from dtx.models import select_state as dtx_select_state

from .model import (HDIT_PRESETS, GlobalAttentionSpec, HDiTConfig, NeighborhoodAttentionSpec, NoAttentionSpec,
                    attention_to_dict, parse_attention)

log = logging.getLogger(__name__)

FORMAT = "k-diffusion-hdit"
FAMILY = "hdit"
_SIGNATURE = ("patch_in.proj.weight", "time_emb.weight", "time_in_proj.weight", "aug_emb.weight",
              "mapping.in_norm.scale", "mid_level.0.ff.up_proj.weight", "out_norm.scale", "patch_out.proj.weight")
_TOP_LEVEL = {"patch_in", "time_emb", "time_in_proj", "aug_emb", "aug_in_proj", "class_emb", "mapping_cond_in_proj",
              "mapping", "down_levels", "up_levels", "mid_level", "merges", "splits", "out_norm", "patch_out"}
#: options that do not change the state dict; a preset keeps its own values of every other option
_NON_ARCH = ("input_size", "dropout", "mapping_dropout", "grad_checkpointing")
#: innermost token grid assumed for a bare state dict (16x16 in every configuration of the paper)
INNER_TOKENS = 16


def _is_hdit_state(state: Mapping[str, Any]) -> bool:
    return (all(k in state for k in _SIGNATURE)
            and all(isinstance(k, str) and k.split(".", 1)[0] in _TOP_LEVEL for k in state))


def select_state(obj: Any, use_ema: bool = True) -> tuple[dict[str, torch.Tensor] | None, str, dict | None]:
    """(state dict, where it came from: "model_ema" / "model" / "state_dict", the k-diffusion config or None)."""
    state, where = dtx_select_state(obj, _is_hdit_state, ("model_ema", "model"), use_ema)
    config = obj.get("config") if where not in ("", "state_dict") and isinstance(obj.get("config"), Mapping) else None
    return state, where, config


def detect(path: Path, obj: Any) -> bool:
    """Whether ``obj`` (a safely loaded file) holds k-diffusion image_transformer_v2 weights."""
    return select_state(obj)[0] is not None


def _safetensors_config(path: Path) -> dict | None:
    """The JSON config convert_for_inference.py stores in a ``.safetensors`` file's metadata, if any."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("config")
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the metadata 'config' is not valid JSON ({exc})") from None


# -- architecture from k-diffusion's JSON config ------------------------------------------------------------------

def _kd_attention(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An attention entry of a k-diffusion config read as its make_model reads it: the fields of its type (d_head
    64 and kernel_size 7 when absent), anything else ignored."""
    kind = entry.get("type")
    fields = {"global": ("d_head",), "neighborhood": ("d_head", "kernel_size"),
              "shifted-window": ("d_head", "window_size"), "none": ()}.get(kind)
    if fields is None:
        raise CheckpointError(f"k-diffusion config: unsupported self attention type {kind!r}")
    return attention_to_dict(parse_attention({"type": kind, **{k: entry[k] for k in fields if k in entry}}))


def options_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """HDiT options of a k-diffusion JSON config (its ``model`` section, and ``dataset.num_classes``)."""
    model = config.get("model")
    if not isinstance(model, Mapping):
        raise CheckpointError("the k-diffusion config has no 'model' section")
    if model.get("type") != "image_transformer_v2":
        raise CheckpointError(f"k-diffusion model type {model.get('type')!r} is not image_transformer_v2 (HDiT)")
    try:
        opts: dict[str, Any] = {
            "in_channels": int(model["input_channels"]),
            "input_size": [int(s) for s in model["input_size"]],
            "patch_size": (int(model["patch_size"]) if isinstance(model["patch_size"], int)
                           else [int(s) for s in model["patch_size"]]),
            "depths": [int(d) for d in model["depths"]],
            "widths": [int(w) for w in model["widths"]],
        }
    except KeyError as exc:
        raise CheckpointError(f"the k-diffusion config's model section lacks {exc.args[0]!r}") from None
    if model.get("d_ffs"):
        opts["d_ffs"] = [int(f) for f in model["d_ffs"]]
    if model.get("self_attns"):
        opts["self_attns"] = [_kd_attention(a) for a in model["self_attns"]]
    dropout = model.get("dropout_rate")
    if dropout is not None:
        opts["dropout"] = [float(p) for p in dropout] if isinstance(dropout, list) else float(dropout)
    for ours, theirs in (("mapping_width", "mapping_width"), ("mapping_depth", "mapping_depth"),
                         ("mapping_d_ff", "mapping_d_ff"), ("mapping_cond_dim", "mapping_cond_dim")):
        if model.get(theirs) is not None:
            opts[ours] = int(model[theirs])
    if model.get("mapping_dropout_rate") is not None:
        opts["mapping_dropout"] = float(model["mapping_dropout_rate"])
    dataset = config.get("dataset") if isinstance(config.get("dataset"), Mapping) else {}
    opts["num_classes"] = int(dataset.get("num_classes", 0) or 0)
    return opts


def sampling_sections(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """dtx ``objective`` and ``sample`` sections equivalent to a k-diffusion config: EDM preconditioning with its
    sigma_data (0.5 for a bare state dict, as every HDiT config), its sigma range, weighting and sigma density, and
    DPM++(2M) SDE with Karras sigmas over 50 steps (k-diffusion's train.py demo sampler)."""
    model = dict(config.get("model", {})) if config else {}
    objective: dict[str, Any] = {"kind": "karras", "sigma_data": float(model.get("sigma_data", 0.5))}
    for key in ("sigma_min", "sigma_max"):
        if model.get(key) is not None:
            objective[key] = float(model[key])
    if model.get("loss_weighting") in ("karras", "soft-min-snr", "snr"):
        objective["weighting"] = model["loss_weighting"]
    density = model.get("sigma_sample_density") or {}
    if density.get("type") == "cosine-interpolated":
        objective["sigma_sample"] = "cosine-interpolated"
    elif density.get("type") == "lognormal":
        objective["sigma_sample"] = "log-normal"
        objective["p_mean"] = float(density.get("mean", density.get("loc", -1.2)))
        objective["p_std"] = float(density.get("std", density.get("scale", 1.2)))
    return {"objective": objective, "sample": {"sampler": "dpmpp-2m-sde", "steps": 50}}


# -- architecture from the tensor shapes ---------------------------------------------------------------------------

def _depth(state: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)


def _patch_and_channels(k_in: int, k_out: int, given: Mapping[str, Any]) -> tuple[Any, int, int | None, bool]:
    """(patch_size, in_channels, out_channels or None, guessed) from patch_in/patch_out fan-in and fan-out."""
    if "patch_size" in given:
        ph, pw = (given["patch_size"],) * 2 if isinstance(given["patch_size"], int) else given["patch_size"]
        patch: Any = given["patch_size"]
        area = int(ph) * int(pw)
        if k_in % area or k_out % area:
            raise CheckpointError(f"patch_size {given['patch_size']} does not fit patch_in ({k_in} inputs) and "
                                  f"patch_out ({k_out} outputs)")
        channels, guessed = k_in // area, False
    elif "in_channels" in given:
        channels = int(given["in_channels"])
        side = math.isqrt(k_in // channels) if k_in % channels == 0 else 0
        if side * side * channels != k_in:
            raise CheckpointError(f"in_channels {channels} does not fit patch_in's {k_in} inputs with a square "
                                  f"patch; pass patch_size=[ph, pw]")
        patch, guessed = side, False
    else:
        fits = [(c, math.isqrt(k_in // c)) for c in (3, 1, 4)
                if k_in % c == 0 and math.isqrt(k_in // c) ** 2 * c == k_in]
        if len(fits) != 1:
            options = (", ".join(f"{c} channels with patch {p}" for c, p in fits)
                       or "no square patch of 1, 3 or 4 channels")
            raise CheckpointError(f"cannot tell the channels and patch size from patch_in's {k_in} inputs ({options}); "
                                  f"pass in_channels=... or patch_size=...")
        channels, patch = fits[0]
        guessed = True
    area = (patch * patch) if isinstance(patch, int) else int(patch[0]) * int(patch[1])
    out = k_out // area
    return patch, channels, (out if out != channels else None), guessed


def _level_attention(given: Any, keys_attn: Any, i: int) -> dict[str, Any]:
    """The attention of level i: ``given`` (an override or the config's) checked against what the keys hold
    (None: no attention keys; else the d_head they imply); a string override takes the keys' d_head."""
    spec = parse_attention(given)
    if isinstance(spec, NoAttentionSpec) != (keys_attn is None):
        has = "no attention weights" if keys_attn is None else f"attention weights (d_head {keys_attn})"
        raise CheckpointError(f"level {i}: self_attns says {attention_to_dict(spec)['type']!r} but the checkpoint "
                              f"has {has}")
    if keys_attn is not None:
        if isinstance(given, str) or (isinstance(given, Mapping) and "d_head" not in given):
            spec = dataclasses.replace(spec, d_head=keys_attn)
        elif spec.d_head != keys_attn:
            raise CheckpointError(f"level {i}: self_attns says d_head {spec.d_head} but the checkpoint's heads give "
                                  f"d_head {keys_attn}")
    return attention_to_dict(spec)


def infer_options(state: Mapping[str, torch.Tensor], given: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, Any], list[str]]:
    """(HDiT options rebuilding the architecture of ``state``, the options that had to be assumed).

    ``given`` (the stored config's options, then the caller's overrides) settles what the keys cannot tell:
    attention types and kernel sizes, the input size, the patch/channel split; what it does not settle is
    assumed (k-diffusion's defaults) and listed.
    """
    given = dict(given or {})
    assumed: list[str] = []
    n_down = _depth(state, "down_levels")
    if _depth(state, "up_levels") != n_down or _depth(state, "merges") != n_down or _depth(state, "splits") != n_down:
        raise CheckpointError(f"the checkpoint has {n_down} down levels but {_depth(state, 'up_levels')} up levels, "
                              f"{_depth(state, 'merges')} merges and {_depth(state, 'splits')} splits")
    prefixes = [f"down_levels.{i}" for i in range(n_down)] + ["mid_level"]
    depths, widths, d_ffs, key_attn = [], [], [], []
    for i, prefix in enumerate(prefixes):
        depth = _depth(state, prefix)
        if i < n_down and _depth(state, f"up_levels.{i}") != depth:
            raise CheckpointError(f"level {i} has {depth} down layers but {_depth(state, f'up_levels.{i}')} up layers")
        up = state.get(f"{prefix}.0.ff.up_proj.weight")
        if depth < 1 or up is None:
            raise CheckpointError(f"level {i} ({prefix}) has no layers")
        depths.append(depth)
        widths.append(int(up.shape[1]))
        d_ffs.append(int(up.shape[0]) // 2)
        scale = state.get(f"{prefix}.0.self_attn.scale")
        key_attn.append(None if scale is None else int(up.shape[1]) // int(scale.shape[0]))

    w0, k_in = state["patch_in.proj.weight"].shape
    k_out = state["patch_out.proj.weight"].shape[0]
    patch, channels, out_channels, guessed = _patch_and_channels(int(k_in), int(k_out), given)
    if guessed:
        assumed.append(f"in_channels={channels} and patch_size={patch}")

    if given.get("self_attns") is not None:
        if len(given["self_attns"]) != len(widths):
            raise CheckpointError(f"self_attns lists {len(given['self_attns'])} levels; the checkpoint has "
                                  f"{len(widths)}")
        attns = [_level_attention(a, k, i) for i, (a, k) in enumerate(zip(given["self_attns"], key_attn))]
    else:
        attns = []
        for i, d_head in enumerate(key_attn):
            if d_head is None:
                attns.append({"type": "none"})
            elif i < len(key_attn) - 1:
                attns.append(attention_to_dict(NeighborhoodAttentionSpec(d_head=d_head)))
            else:
                attns.append(attention_to_dict(GlobalAttentionSpec(d_head=d_head)))
        if any(d is not None for d in key_attn):
            assumed.append("self_attns (k-diffusion's defaults: neighborhood attention with kernel 7 below the "
                           "last level, global on the last)")

    mapping_width = int(state["time_in_proj.weight"].shape[0])
    mapping_depth = _depth(state, "mapping.blocks")
    options: dict[str, Any] = {
        "patch_size": patch, "in_channels": channels, "depths": depths, "widths": widths, "d_ffs": d_ffs,
        "self_attns": attns, "mapping_width": mapping_width, "mapping_depth": mapping_depth,
        "num_classes": int(state["class_emb.weight"].shape[0]) - 1 if "class_emb.weight" in state else 0,
        "mapping_cond_dim": (int(state["mapping_cond_in_proj.weight"].shape[1])
                             if "mapping_cond_in_proj.weight" in state else 0),
    }
    if mapping_depth:
        options["mapping_d_ff"] = int(state["mapping.blocks.0.up_proj.weight"].shape[0]) // 2
    if out_channels is not None:
        options["out_channels"] = out_channels
    if "input_size" in given:
        options["input_size"] = given["input_size"]
    else:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        scale = INNER_TOKENS * 2 ** (len(widths) - 1)
        options["input_size"] = [int(ph) * scale, int(pw) * scale]
        assumed.append(f"input_size={options['input_size']} ({INNER_TOKENS}x{INNER_TOKENS} innermost tokens)")
    for key in ("dropout", "mapping_dropout", "grad_checkpointing"):
        if key in given:
            options[key] = given[key]
    if int(w0) != widths[0]:
        raise CheckpointError(f"patch_in gives width {int(w0)} but level 0 has width {widths[0]}")
    return options, assumed


def _architecture(cfg: HDiTConfig) -> tuple:
    """What the state dict depends on: equal tuples mean the same tensors."""
    levels = [(level.depth, level.width, level.d_ff, level.self_attn) for level in cfg.levels()]
    mapping = cfg.mapping()
    return (cfg.patch_hw, cfg.in_channels, cfg.out_channels or cfg.in_channels, levels,
            (mapping.depth, mapping.width, mapping.d_ff), cfg.num_classes, cfg.mapping_cond_dim)


def match_preset(options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(preset name, the options it needs on top) when ``options`` build a preset's architecture, else
    ("HDiT", options)."""
    try:
        arch = _architecture(HDiTConfig(**options))
    except (ConfigError, TypeError):
        return "HDiT", dict(options)
    for name, preset in HDIT_PRESETS.items():
        if _architecture(HDiTConfig(**preset)) == arch:
            defaults = HDiTConfig(**preset)
            extra = {k: options[k] for k in _NON_ARCH if k in options and options[k] != getattr(defaults, k)}
            return name, extra
    return "HDiT", dict(options)


# -- loading -------------------------------------------------------------------------------------------------------

def load(path: Path, obj: Any, name: str | None = None, options: LoadOptions = LoadOptions(),
         **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the HDiT a k-diffusion checkpoint needs (or ``name``, with model ``overrides``) and load it strictly.

    The architecture comes from the stored config when there is one (train.py checkpoints, inference
    ``.safetensors``), else from the tensor shapes plus k-diffusion's defaults; ``overrides`` win over both.
    The returned info holds the weights used, what was assumed, the k-diffusion config and the dtx ``objective``
    and ``sample`` sections (``config``) that ``dtx sample`` reads.
    """
    state, where, kd_config = select_state(obj, use_ema=options.weights == "ema")
    if state is None:
        raise CheckpointError(f"{path}: no k-diffusion image_transformer_v2 weights found")
    kd_config = kd_config or _safetensors_config(path)
    given = {**(options_from_config(kd_config) if kd_config else {}), **overrides}
    inferred, assumed = infer_options(state, given)
    if assumed:
        log.warning("%s: assumed %s; pass model options to override", path, "; ".join(assumed))
    # the inferred options already hold the overrides, self_attns resolved against the keys (d_head filled in)
    options_ = {**inferred, **{k: v for k, v in overrides.items() if k != "self_attns"}}
    entry = model_entry(name) if name else None
    if entry is not None and entry.meta.get("family") != FAMILY:
        arch, spec = entry.name, dict(overrides)
    elif entry is not None and entry.name in HDIT_PRESETS:
        fixed = set(HDIT_PRESETS[entry.name]) - set(_NON_ARCH) - set(overrides)
        arch, spec = entry.name, {k: v for k, v in options_.items() if k not in fixed}
    elif entry is not None:
        arch, spec = entry.name, options_
    else:
        arch, spec = match_preset(options_)
    model = create_model(arch, **spec)
    load_state_dict_strict(model, state, f"{path} ({where})")
    info = {"weights": where, "source": str(path), "assumed": assumed, "kdiffusion_config": kd_config,
            "config": sampling_sections(kd_config)}
    return model, info
