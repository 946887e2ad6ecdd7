"""DiT <-> diffusers ``DiTTransformer2DModel``: folders (and DiT pipeline folders) load into dtx's DiT, and dtx DiTs
export to folders diffusers' ``from_pretrained`` and ``DiTPipeline`` read.

The key map is diffusers' ``scripts/convert_dit_to_diffusers.py``: DiT's one timestep and label
embedder is copied into every block's ``norm1.emb``, ``qkv`` is split into ``to_q``/``to_k``/``to_v``, and the
position table (a non-persistent buffer in diffusers) is rebuilt with DiT's own construction on load.

Numerics: dtx keeps the official DiT's. Loading a diffusers folder therefore gives the official DiT's
outputs, not diffusers': diffusers' timestep features divide the frequency exponent by 127 where DiT divides by 128,
and its MLP-branch norm uses ``norm_eps`` (1e-5 unless the config says otherwise) where DiT uses 1e-6. Exports set
``norm_eps`` to 1e-6, so the timestep features are the only difference left; both differences are stated in the
exported README and in ``dtx convert``'s output, and measured by the tests.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtx import diffusers_interop as dfi
from dtx.errors import CheckpointError, ConfigError
from dtx.layers import sincos_2d_torch
from dtx.models import LoadOptions, create_model, load_state_dict_strict

from .model import DIT_PRESETS, DiT

FORMAT = "diffusers-dit"
CLASS = "DiTTransformer2DModel"
PIPELINE = "DiTPipeline"
_EMB = "norm1.emb."

T_EMBEDDING_NOTE = (
    "diffusers' DiT timestep embedding (CombinedTimestepLabelEmbeddings: Timesteps(256, flip_sin_to_cos=True, "
    "downscale_freq_shift=1)) divides the frequency exponent by 127 where the official DiT and dtx divide by 128, "
    "so diffusers' forward pass differs from dtx's at every timestep but 0")
GUIDANCE_NOTE = (
    "DiTPipeline guides all 4 latent channels; the official DiT guides 3 (dtx: --guide-channels 3), so FIDs "
    "reported with DiT's sample.py (which guides the first 3 of the 4 latent channels and passes the 4th through "
    "from the conditional half) are not reproduced by DiTPipeline at the same scale")
EPS_NOTE = ("diffusers applies norm_eps (default 1e-5) to the MLP-branch LayerNorm (norm3); DiT uses 1e-6, which "
            "this folder's config sets")

# -- key map ----------------------------------------------------------------------------------------------------------

_BLOCK_MAP = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_TOP_MAP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_EMBEDDERS = {
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
    "y_embedder.embedding_table": "class_embedder.embedding_table",
}


def to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """dtx/official DiT state dict -> DiTTransformer2DModel's (``pos_embed`` dropped: diffusers rebuilds it)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if key == "pos_embed":
            continue
        if module in _TOP_MAP:
            out[f"{_TOP_MAP[module]}.{leaf}"] = value
        elif module in _EMBEDDERS:
            for i in range(depth):
                out[f"transformer_blocks.{i}.{_EMB}{_EMBEDDERS[module]}.{leaf}"] = value.clone()
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", module):
            i, sub = m.groups()
            if sub == "attn.qkv":
                for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    out[f"transformer_blocks.{i}.attn1.{name}.{leaf}"] = part.clone()
            elif sub in _BLOCK_MAP:
                out[f"transformer_blocks.{i}.{_BLOCK_MAP[sub]}.{leaf}"] = value
            else:
                raise ConfigError(f"DiT key {key} has no place in {CLASS}")
        else:
            raise ConfigError(f"DiT key {key} has no place in {CLASS}")
    return out


def from_diffusers(state: dict[str, torch.Tensor], depth: int, source: Path) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel state dict -> DiT's official names; every block's embedders must equal block 0's
    (DiT has one timestep/label embedder; diffusers' converter copies it into each block)."""
    out: dict[str, torch.Tensor] = {}
    inverse_top = {v: k for k, v in _TOP_MAP.items()}
    inverse_block = {v: k for k, v in _BLOCK_MAP.items()}
    inverse_emb = {v: k for k, v in _EMBEDDERS.items()}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in inverse_top:
            out[f"{inverse_top[module]}.{leaf}"] = value
            continue
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
        if m is None:
            raise CheckpointError(f"{source}: unexpected key {key} for a {CLASS}")
        i, sub = m.groups()
        if sub.startswith(_EMB):
            name = inverse_emb.get(sub[len(_EMB):])
            if name is None:
                raise CheckpointError(f"{source}: unexpected key {key} for a {CLASS}")
            first = state.get(f"transformer_blocks.0.{sub}.{leaf}")
            if first is None or first.shape != value.shape or not torch.equal(first, value):
                raise CheckpointError(f"{source}: {key} differs from block 0's; DiT has one timestep and label "
                                      f"embedder, and diffusers' converter copies it into every block, so a "
                                      f"folder with different ones per block has no DiT equivalent")
            out[f"{name}.{leaf}"] = value
        elif sub in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
            qkv.setdefault((i, leaf), {})[sub[-1]] = value
        elif sub in inverse_block:
            out[f"blocks.{i}.{inverse_block[sub]}.{leaf}"] = value
        else:
            raise CheckpointError(f"{source}: unexpected key {key} for a {CLASS}")
    for (i, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            lacking = sorted({"q", "k", "v"} - set(parts))[0]
            raise CheckpointError(f"{source}: transformer_blocks.{i}.attn1 lacks to_{lacking}.{leaf}")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# -- reading ----------------------------------------------------------------------------------------------------------

def _require(source: dfi.DiffusersSource, key: str, allowed: tuple[Any, ...]) -> None:
    value = source.config.get(key, allowed[0])
    if value not in allowed:
        raise CheckpointError(f"{source.model_dir / dfi.CONFIG}: {key} {value!r} has no DiT equivalent "
                              f"(DiT: {allowed[0]!r})")


def dit_options(source: dfi.DiffusersSource) -> tuple[str, dict[str, Any]]:
    """(architecture, options) of the DiT a DiTTransformer2DModel config describes (a paper preset when it is one)."""
    _require(source, "norm_type", ("ada_norm_zero",))
    _require(source, "activation_fn", ("gelu-approximate",))
    _require(source, "attention_bias", (True,))
    _require(source, "norm_elementwise_affine", (False,))
    heads = dfi.config_int(source, "num_attention_heads", 16)
    d = heads * dfi.config_int(source, "attention_head_dim", 72)
    c = dfi.config_int(source, "in_channels", 4)
    out = dfi.config_int(source, "out_channels", c)
    if out not in (c, 2 * c):
        raise CheckpointError(f"{source.model_dir / dfi.CONFIG}: out_channels {out} is neither in_channels {c} nor "
                              f"twice it (eps and learned variance)")
    arch = {"depth": dfi.config_int(source, "num_layers", 28), "hidden_size": d, "num_heads": heads,
            "patch_size": dfi.config_int(source, "patch_size", 2)}
    options = {"input_size": dfi.config_int(source, "sample_size", 32), "in_channels": c,
               "learn_sigma": out == 2 * c, "num_classes": dfi.config_int(source, "num_embeds_ada_norm", 1000),
               "class_dropout_prob": 0.1}
    name = next((n for n, preset in DIT_PRESETS.items() if preset == arch), None)
    return (name, options) if name else ("DiT", {**arch, **options})


def detect(path: Path, obj: Any) -> bool:
    """A DiTTransformer2DModel folder, or a pipeline folder around one (``obj`` is None for folders)."""
    return obj is None and dfi.find_model(path, {CLASS}) is not None


def load(path: Path, obj: Any, name: str | None = None, options: LoadOptions = LoadOptions(),
         **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the DiT the folder's config describes, load its weights strictly, and (for a pipeline) record its VAE
    and scheduler for ``dtx sample``. The model keeps the official DiT's numerics (see the module docstring)."""
    source = dfi.find_model(path, {CLASS})
    if source is None:
        raise CheckpointError(f"{path}: not a {CLASS} folder")
    arch, spec = dit_options(source)
    if name is not None:
        arch = name
    spec.update(overrides)
    model = create_model(arch, **spec)
    depth = model.config.depth
    state = from_diffusers(dfi.read_weights(source.model_dir), depth, source.model_dir)
    state["pos_embed"] = model.pos_embed.detach().clone()  # diffusers does not store it; DiT's own construction
    load_state_dict_strict(model, state, str(source.model_dir))
    c, (h, w) = model.in_channels, model.config.input_hw
    info = dfi.latent_facts(source, c, (h, w), num_classes=model.num_classes, fields=("y",))
    config = dfi.sampling_config(source, info, sample={"sampler": "ddim", "steps": 50, "cfg": 4.0,
                                                                 **dfi.scheduler_sampling(source)})
    notes = [T_EMBEDDING_NOTE.replace("so diffusers'", "dtx keeps 128, so diffusers'")]
    eps = dfi.json_number(source.config.get("norm_eps", 1e-5), "norm_eps", source.model_dir / dfi.CONFIG, float)
    if eps != 1e-6:
        notes.append(f"this folder's norm_eps {eps} is not used: dtx keeps DiT's 1e-6 in every LayerNorm")
    return model, {"source": str(path), "config": config, "notes": notes,
                   "pipeline": str(source.pipeline_dir) if source.pipeline_dir else None}


# -- export -----------------------------------------------------------------------------------------------------------

def diffusers_config(model: DiT) -> dict[str, Any]:
    """The DiTTransformer2DModel config holding ``model``; a ConfigError saying why for DiTs it cannot hold."""
    cfg = model.config
    reasons = []
    if cfg.block != "adaln-zero":
        reasons.append(f"block {cfg.block!r} (diffusers' DiT has adaLN-Zero blocks only)")
    if cfg.num_classes < 1 or cfg.class_dropout_prob <= 0:
        reasons.append("no class table with a null row (diffusers' DiT always embeds num_embeds_ada_norm classes "
                       "plus the null class)")
    if cfg.mlp_ratio != 4.0:
        reasons.append(f"mlp_ratio {cfg.mlp_ratio} (diffusers' feed-forward is 4x wide)")
    h, w = cfg.input_hw
    if h != w:
        reasons.append(f"non-square latents {h}x{w} (diffusers' DiT has one sample_size)")
    table = sincos_2d_torch(cfg.hidden_size, *model.grid_size)
    if not torch.allclose(model.pos_embed.detach().cpu(), table, atol=1e-6):
        reasons.append("a pos_embed other than DiT's sin-cos table (diffusers rebuilds the table, it stores none)")
    if reasons:
        raise ConfigError(f"{CLASS} cannot hold this DiT: {'; '.join(reasons)}")
    return {"num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
            "in_channels": cfg.in_channels, "out_channels": model.out_channels, "num_layers": cfg.depth,
            "sample_size": h, "patch_size": cfg.patch_size, "num_embeds_ada_norm": cfg.num_classes,
            "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
            "norm_elementwise_affine": False, "norm_eps": 1e-6, "dropout": 0.0, "upcast_attention": False,
            "norm_num_groups": 32}


def _readme(title: str, notes: list[str]) -> str:
    lines = [f"# {title}", "", "Exported by `dtx convert --to diffusers` from a dtx DiT (official DiT key layout and "
             "numerics). The `_dtx` entry of the transformer's `config.json` keeps the run's data facts and sampling "
             "settings, so `dtx sample` and `dtx convert` read the folder as the run was (diffusers ignores config "
             "keys that start with `_`).", "", "## Numerical differences", ""]
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


def export(model: nn.Module, facts: dict[str, Any], out: Path) -> list[str] | None:
    """Write ``model`` (a dtx DiT) as a diffusers folder at ``out``: the transformer folder, or a DiTPipeline folder
    (transformer/, vae/, scheduler/) when ``facts`` (the run's data_info and objective) name a VAE. None when
    ``model`` is not a DiT; returns the notes to print."""
    if not isinstance(model, DiT):
        return None
    config = diffusers_config(model)
    objective = dict(facts.get("objective") or {})
    example = (f"`dtx train dit-digits objective.kind=gaussian sample.sampler=ddim --out runs/dit-digits-ddpm`, then "
               f"`dtx convert runs/dit-digits-ddpm --to diffusers {out}` (the dit-digits recipe's DDPM variant, "
               f"README: Performance)")
    notes = [T_EMBEDDING_NOTE, GUIDANCE_NOTE, EPS_NOTE]
    if model.num_classes != 1000:
        notes.append(f"DiTPipeline's guidance labels the unconditional half with class 1000 (hard-coded); this "
                     f"model's null class is {model.null_class}, so use DiTPipeline with guidance_scale=1, or guide "
                     f"in dtx")
    state = to_diffusers(model.state_dict(), model.config.depth)
    info = dict(facts.get("data_info") or {})
    vae = info.get("vae")
    if not vae:
        if objective.get("kind") == "karras":  # same refusal as for the pipeline: the folder alone would mislead
            dfi.scheduler_config(objective, example=example)
        dfi.write_model(out, CLASS, config, state, _readme(f"{CLASS} exported from dtx", notes), facts=facts)
        return notes
    scheduler = dfi.scheduler_config(objective, example=example)
    vae_dir = Path(str(vae))
    if (vae_dir / "vae" / dfi.CONFIG).is_file():
        vae_dir = vae_dir / "vae"
    if not (vae_dir / dfi.CONFIG).is_file():
        raise ConfigError(f"the run's VAE folder {vae} has no {dfi.CONFIG}; cannot write a {PIPELINE} folder")
    dfi.write_model(out / dfi.TRANSFORMER, CLASS, config, state, facts=facts)
    dfi.copy_component(vae_dir, out / "vae")
    dfi.write_pipeline(out, PIPELINE, {"transformer": ("diffusers", CLASS), "vae": dfi.component_class(vae_dir)},
                       scheduler=scheduler, readme=_readme(f"{PIPELINE} exported from dtx", notes))
    return notes

