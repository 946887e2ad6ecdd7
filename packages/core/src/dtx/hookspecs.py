"""The dtx hook API: what a plugin may contribute.

Every hook is a registration callback in the style of simonw/llm: the host passes a ``register`` function and the
plugin calls it once per thing it contributes, so a hook implementation may ignore arguments added in later
versions. Bump ``HOOK_API_VERSION`` when a hook changes incompatibly; add hooks freely.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

HOOK_API_VERSION = "1.0"

hookspec = pluggy.HookspecMarker("dtx")
hookimpl = pluggy.HookimplMarker("dtx")


@hookspec
def dtx_register_models(register: Callable[..., Any]) -> None:
    """Register model architectures and named presets.

    ``register(name, factory, *, family, description="", config=None)``: ``factory(**overrides)`` returns an
    ``nn.Module``; presets such as ``DiT-XL/2`` are registered as their own names.
    """


@hookspec
def dtx_register_conditioners(register: Callable[..., Any]) -> None:
    """Register conditioners and text encoders: ``register(name, factory, *, description="")``."""


@hookspec
def dtx_register_schedules(register: Callable[..., Any]) -> None:
    """Register noise schedules (beta or sigma schedules): ``register(name, fn, *, description="")``."""


@hookspec
def dtx_register_samplers(register: Callable[..., Any]) -> None:
    """Register samplers: ``register(name, fn, *, kind="gaussian"|"karras", description="")``."""


@hookspec
def dtx_register_losses(register: Callable[..., Any]) -> None:
    """Register training objectives / loss weightings: ``register(name, factory, *, description="")``."""


@hookspec
def dtx_register_datasets(register: Callable[..., Any]) -> None:
    """Register datasets: ``register(name, factory, *, description="")``; ``factory(**cfg)`` returns a Dataset."""


@hookspec
def dtx_register_runners(register: Callable[..., Any]) -> None:
    """Register training runners: ``register(name, run_fn, *, description="")``."""


@hookspec
def dtx_register_recipes(register: Callable[..., Any]) -> None:
    """Register training recipes (presets for ``dtx train``): ``register(name, path_or_dict, *, description="")``."""


@hookspec
def dtx_register_checkpoint_formats(register: Callable[..., Any]) -> None:
    """Register checkpoint readers for ``dtx.load_model``.

    ``register(name, detect, load, *, description="")``: ``detect(path, obj)`` says whether the reader understands
    a file (``obj`` is the safely loaded content, or None for directories); ``load(path, obj, name, **overrides)``
    returns ``(model, info_dict)``.
    """


@hookspec
def dtx_register_commands(register: Callable[..., Any]) -> None:
    """Register CLI subcommands: ``register(name, configure_parser, run, *, help="")``.

    ``configure_parser(parser)`` adds arguments to an ``argparse`` subparser; ``run(args)`` returns an exit code.
    """
