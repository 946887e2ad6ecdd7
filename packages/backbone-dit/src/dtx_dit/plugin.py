"""dtx plugin entry point of dtx-backbone-dit: the DiT models and presets, the official checkpoint format, the
diffusers DiT folder format (read and export) and the recipes shipped in ``dtx_dit/recipes``. ``dtx flops`` (core)
counts DiTs with the closed form registered with each model (``flops=dit_counter``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dtx.config import register_recipe_folder
from dtx.hookspecs import hookimpl

DTX_HOOK_API = "1.1"  # the dtx hook API this plugin is written for (dtx.hookspecs)

RECIPES = Path(__file__).parent / "recipes"


def _factory(preset: dict[str, Any]) -> Callable[..., Any]:
    from .model import DiT, DiTConfig

    def build(**overrides: Any) -> DiT:
        return DiT(DiTConfig(**{**preset, **overrides}))

    build.config_class = DiTConfig  # type: ignore[attr-defined]  # lets core reject unknown options by name
    return build


@hookimpl
def dtx_register_models(register: Callable[..., Any]) -> None:
    from .flops import dit_counter
    from .model import DIT_PRESETS, SIT_PRESETS, DiTConfig

    register("DiT", _factory({}), family="dit", config=DiTConfig, flops=dit_counter,
             description="DiT with every option settable (defaults: XL/2, 32x32 latents)")
    for name, preset in DIT_PRESETS.items():
        register(name, _factory(preset), family="dit", config=DiTConfig, flops=dit_counter,
                 description=f"depth {preset['depth']}, width {preset['hidden_size']}, {preset['num_heads']} heads, "
                             f"patch {preset['patch_size']}")
    for name, preset in SIT_PRESETS.items():
        register(name, _factory(preset), family="dit", config=DiTConfig, flops=dit_counter,
                 description=f"SiT: {name.replace('SiT-', 'DiT-')}'s network fed flow time (data at t = 1)")


@hookimpl
def dtx_register_checkpoint_formats(register: Callable[..., Any]) -> None:
    from . import checkpoint

    register(checkpoint.FORMAT, checkpoint.detect, load=checkpoint.load,
             description="facebookresearch/DiT .pt: released state dicts and train.py checkpoints (EMA weights)")
    register(checkpoint.SIT_FORMAT, checkpoint.detect_sit, load=checkpoint.load_sit,
             description="willisma/SiT .pt: DiT's key names, read as a DiT fed flow time with SiT's objective "
                         "(train.py checkpoints are recognised by their args; released files need --format sit)")
    from . import diffusers_format

    register(diffusers_format.FORMAT, diffusers_format.detect, load=diffusers_format.load,
             export=diffusers_format.export,
             description="diffusers DiTTransformer2DModel folders and DiTPipeline folders (read and "
                         "`dtx convert --to diffusers`)")


@hookimpl
def dtx_register_recipes(register: Callable[..., Any]) -> None:
    register_recipe_folder(register, RECIPES)
