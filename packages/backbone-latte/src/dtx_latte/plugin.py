"""dtx plugin entry point of dtx-backbone-latte.

Models: ``Latte`` (every option settable; defaults Latte-XL/2, 16 frames of 32x32 latents, unconditional) and the
twelve presets ``Latte-{S,B,L,XL}/{2,4,8}``, all of family "latte", each registered with its closed-form cost
(``flops=latte_counter``) and the DiT initialisation adapter (``init_from=init_from_dit``: ``model.init_from`` of a
recipe). Checkpoint formats: ``latte-official`` (Vchitect/Latte ``.pt`` files). Datasets: ``moving-digits`` (embedded,
no download). Conditioners: ``image-labels`` (labels of the stills appended for image-video joint training). Recipes:
``dtx_latte/recipes/*.yaml`` (``latte-moving-digits``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dtx.config import register_recipe_folder
from dtx.hookspecs import hookimpl

DTX_HOOK_API = "1.1"  # the dtx hook API this plugin is written for (dtx.hookspecs)

RECIPES = Path(__file__).parent / "recipes"


def _factory(preset: dict[str, Any]) -> Callable[..., Any]:
    from .model import Latte, LatteConfig

    def build(**overrides: Any) -> Latte:
        return Latte(LatteConfig(**{**preset, **overrides}))

    build.config_class = LatteConfig  # type: ignore[attr-defined]  # lets core reject unknown options by name
    return build


@hookimpl
def dtx_register_models(register: Callable[..., Any]) -> None:
    from .checkpoint import init_from_dit
    from .flops import latte_counter
    from .model import LATTE_PRESETS, LatteConfig

    meta = dict(family="latte", config=LatteConfig, flops=latte_counter, init_from=init_from_dit)
    register("Latte", _factory({}), **meta,
             description="Latte video DiT with every option settable (defaults: XL/2, 16 frames of 32x32 latents)")
    for name, preset in LATTE_PRESETS.items():
        register(name, _factory(preset), **meta,
                 description=f"depth {preset['depth']}, width {preset['hidden_size']}, {preset['num_heads']} heads, "
                             f"patch {preset['patch_size']}; variant, patch_embed, injection, temporal_pos options")


@hookimpl
def dtx_register_checkpoint_formats(register: Callable[..., Any]) -> None:
    from . import checkpoint

    register(checkpoint.FORMAT, checkpoint.detect, load=checkpoint.load,
             description="Vchitect/Latte .pt: released checkpoints and train.py {model, ema} files (EMA weights)")
    from . import diffusers_format

    register(diffusers_format.FORMAT, diffusers_format.detect, load=diffusers_format.load,
             export=diffusers_format.export,
             description="`dtx convert --to diffusers` of these Latte models: refused with the reason (diffusers' "
                         "Latte is Latte-1's layout, dtx-ext-gentron's PixArt with num_frames)")


@hookimpl
def dtx_register_datasets(register: Callable[..., Any]) -> None:
    from .data import MovingDigits

    register("moving-digits", MovingDigits, description="scikit-learn digits bouncing in a 32x32 canvas, "
                                                        "8 frames by default (no download)")


@hookimpl
def dtx_register_conditioners(register: Callable[..., Any]) -> None:
    from .conditioning import ImageLabelConditioner

    register("image-labels", ImageLabelConditioner, default_for=("y_image",),
             description="class labels of the stills appended for image-video joint training (y_image)")


@hookimpl
def dtx_register_recipes(register: Callable[..., Any]) -> None:
    register_recipe_folder(register, RECIPES)
