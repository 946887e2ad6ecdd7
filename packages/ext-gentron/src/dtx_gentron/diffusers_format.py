"""PixArt-alpha and Latte-1 <-> diffusers: ``PixArtTransformer2DModel`` and ``LatteTransformer3DModel`` folders load
into dtx's ``PixArt`` (text-to-image) and ``PixArt`` with ``num_frames`` (Latte-1 text-to-video), and those export
back; GenTron models are refused with the reason.

The key map is diffusers' ``scripts/convert_pixart_alpha_to_diffusers.py``, which Latte's
``LatteTransformer3DModel`` (diffusers' ``latte_transformer_3d.py``) shares for its spatial blocks; its temporal blocks
(``temporal_transformer_blocks.{i}``) map to dtx's ``temporal_blocks.{i}`` with the same sub-module names. The
position tables are not stored by diffusers and are rebuilt on load. Timestep features agree (both divide by 128).

A ``PixArtAlphaPipeline`` or ``LattePipeline`` folder is read as a whole: its ``text_encoder/`` (T5) and
``tokenizer/`` configure the ``text`` conditioner (captions padded to the model's ``text_length``, 120, with the
padding mask passed as ``context_mask``; the empty caption is the guidance null, as diffusers' default negative
prompt), its ``vae/`` decodes and its ``scheduler/`` gives the objective's betas and the sampler, so
``dtx sample PIPELINE --prompt ...`` needs nothing else and no network.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtx import diffusers_interop as dfi
from dtx.errors import CheckpointError, ConfigError
from dtx.interface import unwrap
from dtx.models import LoadOptions, create_model, load_state_dict_strict

from .model import GenTron
from .pixart import PixArt

FORMAT = "diffusers-pixart"
PIXART, LATTE = "PixArtTransformer2DModel", "LatteTransformer3DModel"

_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_SPLITS = {"attn.qkv": ("attn1", ("to_q", "to_k", "to_v")), "cross_attn.kv_linear": ("attn2", ("to_k", "to_v"))}
_SPLIT_PARTS = {f"{attn}.{name}": (joined, name) for joined, (attn, names) in _SPLITS.items() for name in names}
_LISTS = {"blocks": "transformer_blocks", "temporal_blocks": "temporal_transformer_blocks"}


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dtx PixArt state dict (PixArt's original names) -> diffusers' names (``pos_embed`` dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        if key == "final_layer.scale_shift_table":
            out["scale_shift_table"] = value
            continue
        module, _, leaf = key.rpartition(".")
        if module in _TOP:
            out[f"{_TOP[module]}.{leaf}"] = value
            continue
        m = re.fullmatch(r"(blocks|temporal_blocks)\.(\d+)\.(.+)", key)
        if m is None:
            raise ConfigError(f"PixArt key {key} has no place in diffusers' layout")
        lst, i, rest = m.groups()
        prefix = f"{_LISTS[lst]}.{i}."
        sub, _, leaf = rest.rpartition(".")
        if rest == "scale_shift_table":
            out[prefix + rest] = value
        elif sub in _SPLITS:
            attn, names = _SPLITS[sub]
            for name, part in zip(names, value.chunk(len(names), dim=0)):
                out[f"{prefix}{attn}.{name}.{leaf}"] = part.clone()
        elif sub in _BLOCK:
            out[f"{prefix}{_BLOCK[sub]}.{leaf}"] = value
        else:
            raise ConfigError(f"PixArt key {key} has no place in diffusers' layout")
    return out


def from_diffusers(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """diffusers PixArt/Latte state dict -> PixArt's original names (q/k/v and k/v joined)."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    lists = {v: k for k, v in _LISTS.items()}
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "scale_shift_table":
            out["final_layer.scale_shift_table"] = value
            continue
        module, _, leaf = key.rpartition(".")
        if module in top:
            out[f"{top[module]}.{leaf}"] = value
            continue
        m = re.fullmatch(r"(transformer_blocks|temporal_transformer_blocks)\.(\d+)\.(.+)", key)
        if m is None:
            raise CheckpointError(f"{source}: unexpected key {key}")
        lst, i, rest = m.groups()
        prefix = f"{lists[lst]}.{i}."
        sub, _, leaf = rest.rpartition(".")
        if rest == "scale_shift_table":
            out[prefix + rest] = value
        elif sub in block:
            out[f"{prefix}{block[sub]}.{leaf}"] = value
        elif sub in _SPLIT_PARTS:
            joined, name = _SPLIT_PARTS[sub]
            parts.setdefault(f"{prefix}{joined}.{leaf}", {})[name] = value
        else:
            raise CheckpointError(f"{source}: unexpected key {key}")
    for key, got in parts.items():
        joined = key.split(".", 2)[2].rsplit(".", 1)[0]
        names = _SPLITS[joined][1]
        missing = [n for n in names if n not in got]
        if missing:
            raise CheckpointError(f"{source}: {key} cannot be joined, {missing[0]} is missing")
        out[key] = torch.cat([got[n] for n in names], dim=0)
    return out


def _require(source: dfi.DiffusersSource, key: str, allowed: Any, default: Any, why: str) -> None:
    value = source.config.get(key, default)
    if value != allowed:
        raise CheckpointError(f"{source.model_dir / dfi.CONFIG}: {key} {value!r} {why}")


def pixart_options(source: dfi.DiffusersSource) -> tuple[str, dict[str, Any]]:
    """(architecture, options) of the dtx PixArt a PixArt/Latte config describes."""
    cfg, latte = source.config, source.class_name == LATTE
    _require(source, "norm_type", "ada_norm_single", None, "is not PixArt's adaLN-single")
    _require(source, "activation_fn", "gelu-approximate", "geglu", "is not PixArt's GELU(tanh) MLP")
    _require(source, "attention_bias", True, False, "(PixArt's attention has biases)")
    _require(source, "norm_elementwise_affine", False, True, "(PixArt's norms have no affine parameters)")
    _require(source, "norm_eps", 1e-6, 1e-5, "(PixArt's norms use eps 1e-6, which dtx keeps)")
    heads = dfi.config_int(source, "num_attention_heads")
    d = heads * dfi.config_int(source, "attention_head_dim")
    _require(source, "cross_attention_dim", d, None, f"differs from the width {d} (captions are projected to it)")
    size = dfi.config_int(source, "sample_size")
    if not latte:
        extra = cfg.get("use_additional_conditions")
        if extra or (extra is None and size == 128):
            raise CheckpointError(f"{source.model_dir / dfi.CONFIG}: use_additional_conditions (PixArt-MS resolution "
                                  f"and aspect-ratio embedders) is not implemented in dtx")
    scale = cfg.get("interpolation_scale") if not latte else None
    scale = scale if scale is not None else max(size // 64, 1)
    if scale != 1:
        raise CheckpointError(f"{source.model_dir / dfi.CONFIG}: interpolation_scale {scale} (position table "
                              f"over a {scale}x coarser grid) is not implemented in dtx; only 1")
    c = dfi.config_int(source, "in_channels")
    out = dfi.config_int(source, "out_channels", c)
    if out not in (c, 2 * c):
        raise CheckpointError(f"{source.model_dir / dfi.CONFIG}: out_channels {out} is neither {c} nor {2 * c}")
    options = {"depth": dfi.config_int(source, "num_layers"), "hidden_size": d, "num_heads": heads,
               "patch_size": dfi.config_int(source, "patch_size"), "input_size": size, "in_channels": c,
               "learn_sigma": out == 2 * c, "context_dim": dfi.config_int(source, "caption_channels"),
               "num_frames": dfi.config_int(source, "video_length", 16) if latte else 0}
    return "PixArt", options


#: ``guidance_scale`` and ``num_inference_steps`` defaults of diffusers' PixArtAlphaPipeline and LattePipeline
_PIPELINE_DEFAULTS = {PIXART: (4.5, 20), LATTE: (7.5, 50)}


def text_conditioning(source: dfi.DiffusersSource, text_length: int) -> dict[str, Any] | None:
    """The ``conditioning`` section that encodes prompts with a pipeline's ``text_encoder/`` and ``tokenizer/``
    through the ``text`` conditioner (``max_length`` = the model's ``text_length``, null = the empty caption);
    None for a folder without a text encoder (the default conditioner then applies)."""
    encoder = source.component("text_encoder")
    if encoder is None:
        return None
    tokenizer = source.component("tokenizer")
    options: dict[str, Any] = {"encoder": str(encoder), "max_length": int(text_length), "null": "empty"}
    if tokenizer is not None:
        options["tokenizer"] = str(tokenizer)
    return {"conditioners": {"text": {"name": "text", "options": options}}}


def detect(path: Path, obj: Any) -> bool:
    """A PixArtTransformer2DModel or LatteTransformer3DModel folder, or a pipeline folder around one."""
    return obj is None and dfi.find_model(path, {PIXART, LATTE}) is not None


def load(path: Path, obj: Any, name: str | None = None, options: LoadOptions = LoadOptions(),
         **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the PixArt (or Latte-1 text-to-video) model the folder's config describes and load it strictly."""
    source = dfi.find_model(path, {PIXART, LATTE})
    if source is None:
        raise CheckpointError(f"{path}: not a {PIXART} or {LATTE} folder")
    arch, spec = pixart_options(source)
    model = create_model(name or arch, **{**spec, **overrides})
    state = from_diffusers(dfi.read_weights(source.model_dir), source.model_dir)
    state["pos_embed"] = model.pos_embed.detach().clone()  # not stored by diffusers; the sin-cos table
    load_state_dict_strict(model, state, str(source.model_dir))
    frames = model.config.num_frames or None
    info = dfi.latent_facts(source, model.in_channels, model.config.input_hw, frames=frames, fields=("text",))
    cfg, pipeline_steps = _PIPELINE_DEFAULTS[source.class_name]
    scheduled = dfi.scheduler_sampling(source)  # the pipeline's own scheduler: its sampler and step count
    sample = {"sampler": "ddim", "steps": pipeline_steps if scheduled else 50, "cfg": cfg, **scheduled}
    config = dfi.sampling_config(source, info, sample=sample,
                                 conditioning=text_conditioning(source, model.config.text_length))
    return model, {"source": str(path), "config": config,
                   "pipeline": str(source.pipeline_dir) if source.pipeline_dir else None}


def diffusers_config(model: PixArt) -> tuple[str, dict[str, Any]]:
    """(class, config) of the diffusers model holding ``model``."""
    cfg = model.config
    h, w = cfg.input_hw
    if h != w:
        raise ConfigError(f"diffusers' PixArt and Latte cannot hold non-square latents {h}x{w} (one sample_size)")
    if h // 64 > 1:
        raise ConfigError(f"diffusers would interpolate the position table of a {h}x{h} latent grid "
                          f"(interpolation_scale {h // 64}), which this model was not trained with")
    common = {"num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
              "in_channels": cfg.in_channels, "out_channels": model.out_channels, "num_layers": cfg.depth,
              "dropout": 0.0, "cross_attention_dim": cfg.hidden_size, "attention_bias": True, "sample_size": h,
              "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
              "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
              "caption_channels": cfg.context_dim}
    if cfg.num_frames:
        return LATTE, {**common, "video_length": cfg.num_frames}
    return PIXART, {**common, "interpolation_scale": 1, "use_additional_conditions": False, "upcast_attention": False,
                    "norm_num_groups": 32}


def export(model: nn.Module, facts: dict[str, Any], out: Path) -> list[str] | None:
    """Write a dtx PixArt as a PixArtTransformer2DModel / LatteTransformer3DModel folder; refuse GenTron with the
    reason; None for other families."""
    if isinstance(model, GenTron):
        raise ConfigError("diffusers' PixArtTransformer2DModel cannot hold a GenTron: GenTron's blocks are DiT's "
                          "adaLN-Zero (a modulation MLP per block, conditioned on t plus the pooled text), while "
                          "PixArt's layout has adaLN-single (one shared t_block plus a learned table per block) and no "
                          "pooled-text path; train dtx-ext-gentron's 'PixArt' architecture (cross-attention T2I, "
                          "or num_frames > 0 for Latte-1 T2V) for a model diffusers can load")
    if not isinstance(model, PixArt):
        return None
    cls, config = diffusers_config(model)
    objective = dict(facts.get("objective") or {})
    if objective.get("kind") == "karras":
        dfi.scheduler_config(objective)
    notes = ["no timestep-embedding difference: diffusers' PixArt and Latte divide by 128 as dtx does",
             "no pipeline folder: PixArtAlphaPipeline and LattePipeline need a T5 text encoder and tokenizer, which "
             "dtx runs do not carry; put this folder under transformer/ of a pipeline with the encoder the model "
             "was trained with"]
    readme = "\n".join([f"# {cls} exported from dtx", "", "Exported by `dtx convert --to diffusers` from a dtx "
                        "PixArt model (PixArt-alpha's key layout and numerics).", "", "## Notes", ""]
                       + [f"- {n}" for n in notes]) + "\n"
    dfi.write_model(out, cls, config, to_diffusers(model.state_dict()), readme)
    return notes



def adapter_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors of a dtx PixArt (``<module>.lora_A.weight`` under PixArt's names) under diffusers'
    module names. A fused projection's adapter splits exactly: q, k and v share its A, each takes its rows of B
    (W_q + B_q A is the q rows of W_qkv + B A)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", key)
        if m is None:
            raise ConfigError(f"adapter key {key} is not a LoRA A or B weight")
        module, part = m.groups()
        if module in _TOP:
            out[f"{_TOP[module]}.{part}.weight"] = value
            continue
        b = re.fullmatch(r"(blocks|temporal_blocks)\.(\d+)\.(.+)", module)
        sub = b.group(3) if b else None
        if b is None or (sub not in _SPLITS and sub not in _BLOCK):
            raise ConfigError(f"adapted module {module} has no place in diffusers' layout")
        prefix = f"{_LISTS[b.group(1)]}.{b.group(2)}."
        if sub in _BLOCK:
            out[f"{prefix}{_BLOCK[sub]}.{part}.weight"] = value
            continue
        attn, names = _SPLITS[sub]
        pieces = value.chunk(len(names), dim=0) if part == "lora_B" else [value] * len(names)
        for name, piece in zip(names, pieces):
            out[f"{prefix}{attn}.{name}.{part}.weight"] = piece.clone()
    return out


def export_adapter(model: nn.Module, out: Path, base: str | None) -> list[str] | None:
    """A dtx PixArt's LoRA adapter as a PEFT folder keyed by diffusers' module names, for a
    ``PixArtTransformer2DModel`` / ``LatteTransformer3DModel``; None for other families."""
    from dtx import adapters

    if not isinstance(unwrap(model), PixArt):
        return None
    state = adapter_to_diffusers(adapters.peft_state(model))
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    adapters.write_adapter(out, state, targets, adapters.adapter_hyper(model), base)
    return ["keys follow diffusers' PixArtTransformer2DModel / LatteTransformer3DModel module names (fused q/k/v "
            "adapters split exactly); diffusers 0.42 gives these models no LoRA loader (no load_lora_weights), so "
            "load it with PEFT: PeftModel.from_pretrained(transformer, OUT) or peft.inject_adapter_in_model + "
            "set_peft_model_state_dict"]
