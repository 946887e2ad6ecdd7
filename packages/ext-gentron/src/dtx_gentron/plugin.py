"""dtx plugin entry point of dtx-ext-gentron.

Models: ``GenTron`` (every option settable; defaults GenTron-XL/2) and the presets ``GenTron-{S,B,XL,G}/2``, family
"gentron"; ``num_frames > 0`` builds the text-to-video model. Building a model never loads a text encoder: encoders
are conditioners. ``PixArt`` (PixArt-alpha's adaLN-single text DiT; ``num_frames > 0``: Latte-1's text-to-video
model) with presets ``PixArt-XL/2`` and ``Latte-1``, family "pixart", loads from and exports to diffusers'
``PixArtTransformer2DModel`` / ``LatteTransformer3DModel`` folders (checkpoint format ``diffusers-pixart``).
Conditioners: ``text`` (a ``transformers`` text encoder; default for the data field ``text``),
``text-embeddings`` (pre-extracted encodings), ``motion`` (the motion-free mask; ``--motion-free``,
``--motion-cfg``). Datasets: ``captioned-digits``, ``captioned-moving-digits``, ``text-embeddings`` (shards). Command: ``compbench-digits``.
Recipes: ``dtx_gentron/recipes/*.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dtx.config import register_recipe_folder
from dtx.hookspecs import hookimpl

DTX_HOOK_API = "1.1"  # the dtx hook API this plugin is written for (dtx.hookspecs)

RECIPES = Path(__file__).parent / "recipes"


def _factory(preset: dict[str, Any]) -> Callable[..., Any]:
    from .model import GenTronConfig, build_gentron

    def build(**overrides: Any) -> Any:
        return build_gentron(GenTronConfig(**{**preset, **overrides}))

    build.config_class = GenTronConfig  # type: ignore[attr-defined]  # lets core reject unknown options by name
    return build


@hookimpl
def dtx_register_models(register: Callable[..., Any]) -> None:
    from .model import GENTRON_PRESETS, GenTronConfig

    register("GenTron", _factory({}), family="gentron", config=GenTronConfig,
             description="GenTron text-to-image/video DiT with every option settable (defaults: XL/2)")
    for name, preset in GENTRON_PRESETS.items():
        register(name, _factory(preset), family="gentron", config=GenTronConfig,
                 description=f"depth {preset['depth']}, width {preset['hidden_size']}, {preset['num_heads']} heads; "
                             f"conditioning cross-attention|adaln, num_frames > 0 for text-to-video")
    from .pixart import PIXART_PRESETS, PixArtConfig, build_pixart

    def pixart(preset: dict[str, Any]) -> Callable[..., Any]:
        def build(**overrides: Any) -> Any:
            return build_pixart(PixArtConfig(**{**preset, **overrides}))

        build.config_class = PixArtConfig  # type: ignore[attr-defined]
        return build

    register("PixArt", pixart({}), family="pixart", config=PixArtConfig,
             description="PixArt-alpha adaLN-single text DiT (diffusers' PixArt/Latte layout); num_frames > 0: "
                         "Latte-1 text-to-video")
    for name, preset in PIXART_PRESETS.items():
        register(name, pixart(preset), family="pixart", config=PixArtConfig,
                 description=f"depth {preset['depth']}, width {preset['hidden_size']}, {preset['num_heads']} heads"
                             + (f", {preset['num_frames']} frames, temporal blocks" if "num_frames" in preset else ""))


@hookimpl
def dtx_register_checkpoint_formats(register: Callable[..., Any]) -> None:
    from . import diffusers_format

    register(diffusers_format.FORMAT, diffusers_format.detect, load=diffusers_format.load,
             export=diffusers_format.export, export_adapter=diffusers_format.export_adapter,
             description="diffusers PixArtTransformer2DModel and LatteTransformer3DModel folders (read and "
                         "`dtx convert --to diffusers`; GenTron refused with the reason)")


@hookimpl
def dtx_register_conditioners(register: Callable[..., Any]) -> None:
    from .conditioning import MotionConditioner
    from .text import TextConditioner
    from .text_cache import PrecomputedTextConditioner

    register("text", TextConditioner, default_for=("text",),
             description="a frozen transformers text encoder (default: the offline all-MiniLM-L6-v2)")
    register("text-embeddings", PrecomputedTextConditioner, default_for=("text_context",),
             description="text encodings pre-extracted to safetensors shards (prompts still use the encoder)")
    register("motion", MotionConditioner, default_for=("motion_free",),
             sample_flags={"--motion-free": "sample with the motion-free mask (frames do not attend to each other)"},
             sample_scales={"--motion-cfg": "motion-free guidance scale (GenTron: 1.0-1.3), a term before --cfg"},
             description="GenTron-T2V's motion-free mask (dropout = p_motion_free)")


@hookimpl
def dtx_register_datasets(register: Callable[..., Any]) -> None:
    from .data import CaptionedDigits, CaptionedMovingDigits
    from .text_cache import TextEmbeddingShards

    register("captioned-digits", CaptionedDigits,
             description="two coloured digits (or one) on 32x32 RGB with captions; held-out combinations in test")
    register("captioned-moving-digits", CaptionedMovingDigits,
             description="a coloured digit moving left/right/up/down, captioned (no download)")
    register("text-embeddings", TextEmbeddingShards,
             description="a dataset with its captions encoded (dtx_gentron.text_cache.extract_text_embeddings)")


@hookimpl
def dtx_register_commands(register: Callable[..., Any]) -> None:
    from . import compbench

    register("compbench-digits", compbench.configure_parser, run=compbench.run,
             help="score text-to-image/video samples of the captioned digits: digit, colour, position, motion")
    from . import text_cache

    register("extract-text", text_cache.configure_parser, run=text_cache.run,
             help="encode a captioned dataset's text once into safetensors shards (train without the encoder)")


@hookimpl
def dtx_register_recipes(register: Callable[..., Any]) -> None:
    register_recipe_folder(register, RECIPES)
