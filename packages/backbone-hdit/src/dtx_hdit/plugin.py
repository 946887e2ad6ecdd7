"""dtx plugin entry point of dtx-backbone-hdit: the HDiT models and presets (each with its analytic FLOP counter,
``flops=hdit_counter``, read by the core's ``dtx flops``), the k-diffusion checkpoint format and the recipes shipped in
``dtx_hdit/recipes`` (``hdit-digits``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dtx.config import register_recipe_folder
from dtx.hookspecs import hookimpl

DTX_HOOK_API = "1.1"  # the dtx hook API this plugin is written for (dtx.hookspecs)

RECIPES = Path(__file__).parent / "recipes"


def _factory(preset: dict[str, Any]) -> Callable[..., Any]:
    from .model import HDiT, HDiTConfig

    def build(**overrides: Any) -> HDiT:
        return HDiT(HDiTConfig(**{**preset, **overrides}))

    build.config_class = HDiTConfig  # type: ignore[attr-defined]  # lets core reject unknown options by name
    return build


def _describe(preset: dict[str, Any]) -> str:
    from .model import HDiTConfig, attention_label

    cfg = HDiTConfig(**preset)
    attns = " + ".join(attention_label(level.self_attn) for level in cfg.levels())
    size = "x".join(str(s) for s in cfg.input_hw)
    classes = f"{cfg.num_classes} classes" if cfg.num_classes else "unconditional"
    return (f"{size} px, patch {cfg.patch_hw[0]}, depths {list(cfg.depths)}, widths {list(cfg.widths)} ({attns}), "
            f"mapping {cfg.mapping_width}x{cfg.mapping_depth}, {classes}")


@hookimpl
def dtx_register_models(register: Callable[..., Any]) -> None:
    from .flops import hdit_counter
    from .model import HDIT_PRESETS, HDiTConfig

    register("HDiT", _factory({}), family="hdit", config=HDiTConfig, flops=hdit_counter,
             description="HDiT with every option settable (defaults: the ImageNet-256 architecture)")
    for name, preset in HDIT_PRESETS.items():
        register(name, _factory(preset), family="hdit", config=HDiTConfig, flops=hdit_counter,
                 description=_describe(preset))


@hookimpl
def dtx_register_checkpoint_formats(register: Callable[..., Any]) -> None:
    from . import checkpoint

    register(checkpoint.FORMAT, checkpoint.detect, load=checkpoint.load,
             description="k-diffusion image_transformer_v2: train.py checkpoints (EMA weights), inference "
                         ".safetensors with their config, bare state dicts")


@hookimpl
def dtx_register_recipes(register: Callable[..., Any]) -> None:
    register_recipe_folder(register, RECIPES)
