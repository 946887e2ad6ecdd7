"""The dtx entry point of dtx-backbone-template (``[project.entry-points.dtx] template = "dtx_template.plugin"``).

Only hook implementations live here, and they import the model when called: ``dtx plugins`` and every ``dtx``
command import this module, so it must stay cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import dtx
from dtx.config import register_recipe_folder

DTX_HOOK_API = "1.1"  # the dtx hook API this plugin is written for; dtx refuses another major version

RECIPES = Path(__file__).parent / "recipes"


def _factory(preset: dict[str, Any]) -> Callable[..., Any]:
    """A factory of keyword options over ``preset``; ``config_class`` lets dtx name unknown options."""
    from .model import TemplateConfig, TemplateViT

    def build(**options: Any) -> TemplateViT:
        return TemplateViT(TemplateConfig(**{**preset, **options}))

    build.config_class = TemplateConfig  # type: ignore[attr-defined]
    return build


@dtx.hookimpl
def dtx_register_models(register: Callable[..., Any]) -> None:
    from .model import PRESETS

    register("TemplateViT", _factory({}), family="template",
             description="in-context ViT denoiser (every option settable)")
    for name, preset in PRESETS.items():
        register(name, _factory(preset), family="template",
                 description=f"depth {preset['depth']}, width {preset['hidden_size']}, patch {preset['patch_size']}")


@dtx.hookimpl
def dtx_register_recipes(register: Callable[..., Any]) -> None:
    register_recipe_folder(register, RECIPES)
