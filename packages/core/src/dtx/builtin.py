"""The core's own contributions, registered like any plugin (entry point ``core``)."""

from __future__ import annotations

from typing import Any, Callable

from .hookspecs import hookimpl


@hookimpl
def dtx_register_commands(register: Callable[..., Any]) -> None:
    from . import cli

    register("plugins", cli.configure_plugins, cli.run_plugins, help="list installed plugins and what they register")
    register("models", cli.configure_models, cli.run_models, help="list registered model architectures and presets")
