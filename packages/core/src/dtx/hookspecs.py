"""The dtx hook API: what a plugin may contribute.

Every hook is a registration callback in the style of simonw/llm: the host passes a ``register`` function and the
plugin calls it once per thing it contributes, so a hook implementation may ignore arguments added in later
versions. Bump ``HOOK_API_VERSION``'s minor number when hooks are added (and record the new hook in ``HOOK_ADDED``)
and its major number when a hook changes incompatibly.

Versioning: a plugin module declares the hook API it was written for in one attribute, ``DTX_HOOK_API = "1.1"``
(``PLUGIN_API_ATTRIBUTE``; none declared means "1.0"). ``dtx.plugins`` does not load a plugin of another major
version; it loads, with a warning, one written for a newer minor version or one implementing a hook that its declared
version lacks (``HOOK_ADDED``). ``dtx plugins`` reports both with the plugin's name and a fix.

A name registered twice in one kind (by two plugins, or twice by one) is not an override: the first registration
in plugin load order is kept, the clash is reported by ``dtx plugins``, and the bare name must then be picked as
``plugin:name``.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

HOOK_API_VERSION = "1.2"  # 1.1: added dtx_register_objectives; 1.2: dtx_register_caches; no hook changed

#: the plugin module attribute that states the hook API a plugin was written for, e.g. ``DTX_HOOK_API = "1.1"``
PLUGIN_API_ATTRIBUTE = "DTX_HOOK_API"

#: the hook API version (major, minor) that introduced each hook; hooks not listed are in 1.0
HOOK_ADDED: dict[str, tuple[int, int]] = {"dtx_register_objectives": (1, 1), "dtx_register_caches": (1, 2)}


def parse_api_version(value: object) -> tuple[int, int]:
    """``"1.1"`` -> (1, 1); a ValueError naming the expected form for anything else (a float 1.1 included, which
    cannot say 1.10)."""
    parts = value.split(".") if isinstance(value, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{PLUGIN_API_ATTRIBUTE} must be a string 'MAJOR.MINOR' such as {HOOK_API_VERSION!r}, "
                         f"got {value!r}")
    return int(parts[0]), int(parts[1])

hookspec = pluggy.HookspecMarker("dtx")
hookimpl = pluggy.HookimplMarker("dtx")


@hookspec
def dtx_register_models(register: Callable[..., Any]) -> None:
    """Register model architectures and named presets.

    ``register(name, factory, *, family, description="", config=None, flops=None)``: ``factory(**overrides)``
    returns an ``nn.Module``; presets such as ``DiT-XL/2`` are registered as their own names. The optional
    ``flops=counter`` gives the model's cost in closed form: ``counter(model)`` returns a ``dtx.costs.Cost``.
    """


@hookspec
def dtx_register_conditioners(register: Callable[..., Any]) -> None:
    """Register conditioners and text encoders.

    ``register(name, factory, *, description="", default_for=("y",), sample_flags={"--flag": "help"},
    sample_scales={"--motion-cfg": "help"})``: ``factory(**options)`` returns a ``dtx.conditioning.Conditioner``.
    ``default_for`` names the batch keys (data fields) this conditioner is used for when a recipe names none;
    ``sample_flags`` are the ``dtx sample`` flags it reads, each with its help text; ``sample_scales`` are
    ``dtx sample`` options taking a guidance scale for this conditioner alone (a nested term before ``--cfg``'s).
    """


@hookspec
def dtx_register_schedules(register: Callable[..., Any]) -> None:
    """Register noise schedules (beta or sigma schedules): ``register(name, fn, *, description="")``."""


@hookspec
def dtx_register_samplers(register: Callable[..., Any]) -> None:
    """Register samplers: ``register(name, fn, *, kind="gaussian"|"karras"|"flow", description="")``."""


@hookspec
def dtx_register_caches(register: Callable[..., Any]) -> None:
    """Register sampling step caches (``sample.cache``, ``--cache``): ``register(name, factory, *, description="")``
    where ``factory(stats, **options)`` returns an object with ``run(n, block, h, args_of)`` (a cache over a model's
    block stacks) or with ``attach(model)`` and ``detach()`` (a cache of single layers, as ``pab``); see
    ``dtx.layers.step_cache``. A model family may declare calibrated options per cache name in
    ``step_cache_defaults``."""


@hookspec
def dtx_register_losses(register: Callable[..., Any]) -> None:
    """Register loss weightings (min-snr, ...): ``register(name, factory, *, description="")``."""


@hookspec
def dtx_register_objectives(register: Callable[..., Any]) -> None:
    """Register training objectives (what a training step computes: gaussian diffusion, Karras/EDM, ...).

    ``register(name, factory, *, description="")``: ``factory(cfg, model, info)`` -- ``cfg`` the recipe's
    ``dtx.training.config.ObjectiveConfig``, ``model`` the denoiser, ``info`` the dataset's ``dtx.data.DataInfo``
    -- returns a ``dtx.training.objectives.Objective``. Recipes select one with ``objective.kind``.
    """


@hookspec
def dtx_register_datasets(register: Callable[..., Any]) -> None:
    """Register datasets: ``register(name, factory, *, description="")``; ``factory(**cfg)`` returns a Dataset."""


@hookspec
def dtx_register_runners(register: Callable[..., Any]) -> None:
    """Register training runners: ``register(name, run_fn, *, description="", configure_parser=None, sample=None)``.

    ``run_fn(cfg, args)`` trains; ``configure_parser(parser)`` adds the runner's ``dtx train`` flags; ``sample(job,
    workers, address, gpus_per_worker)``, when given, samples a ``dtx.training.sample_set.SampleSetJob``'s missing
    chunks on ``workers`` processes (``dtx sample --num-samples N --workers W``) and returns each one's counts."""


@hookspec
def dtx_register_recipes(register: Callable[..., Any]) -> None:
    """Register training recipes (presets for ``dtx train``): ``register(name, path_or_dict, *, description="")``."""


@hookspec
def dtx_register_checkpoint_formats(register: Callable[..., Any]) -> None:
    """Register checkpoint readers for ``dtx.load_model``.

    ``register(name, detect, load, *, export=None, description="")``: ``detect(path, obj)`` says whether the reader
    understands a file (``obj`` is the safely loaded content, or None for directories); ``load(path, obj, name,
    options, **overrides)`` returns ``(model, info_dict)``. Optional ``export(model, facts, out)`` writes ``model``
    in the format's layout for ``dtx convert --to diffusers`` and returns the notes to print, or None when the model
    is not its family's (``facts``: the run's sampling facts).
    """


@hookspec
def dtx_register_commands(register: Callable[..., Any]) -> None:
    """Register CLI subcommands: ``register(name, configure_parser, run, *, help="")``.

    ``configure_parser(parser)`` adds arguments to an ``argparse`` subparser; ``run(args)`` returns an exit code.
    """
