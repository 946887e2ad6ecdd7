"""The core's own contributions, registered like any plugin (entry point ``core``)."""

from __future__ import annotations

from typing import Any, Callable

from .hookspecs import hookimpl


@hookimpl
def dtx_register_commands(register: Callable[..., Any]) -> None:
    from . import cli

    register("plugins", cli.configure_plugins, run=cli.run_plugins, help="list installed plugins and what they register")
    register("models", cli.configure_models, run=cli.run_models, help="list registered model architectures and presets")
    from .training import commands as training

    register("train", training.configure_train, run=training.run_train,
             help="train a model from a recipe name or YAML config (resumes when --out holds a checkpoint)")
    register("sample", training.configure_sample, run=training.run_sample,
             help="sample a trained run or checkpoint into a PNG grid and an .npz archive")
    from .data import extract
    from .evaluation import report

    register("extract-latents", extract.configure_parser, run=extract.run,
             help="encode an image folder with a local diffusers AutoencoderKL into latent shards")
    register("eval", report.configure_parser, run=report.run,
             help="score a samples .npz (or a run folder's newest): digits accuracy, Frechet distance, FID")


@hookimpl
def dtx_register_schedules(register: Callable[..., Any]) -> None:
    from .diffusion import gaussian, karras

    for name, fn in gaussian.SCHEDULES.items():
        register(name, fn, kind="beta", description="discrete beta schedule")
    for name, fn in karras.SCHEDULES.items():
        register(name, fn, kind="sigma", description="continuous sigma schedule")


@hookimpl
def dtx_register_samplers(register: Callable[..., Any]) -> None:
    from .diffusion import gaussian, karras

    for name, fn in gaussian.SAMPLERS.items():
        register(name, fn, kind="gaussian", description="discrete-time sampler over a respaced schedule")
    for name, fn in karras.SAMPLERS.items():
        register(name, fn, kind="karras", description="sigma-space sampler (k-diffusion convention)")


@hookimpl
def dtx_register_losses(register: Callable[..., Any]) -> None:
    from .diffusion import karras

    for name, fn in karras.WEIGHTINGS.items():
        register(name, fn, kind="sigma-weighting", description="EDM loss weighting w(sigma)")


@hookimpl
def dtx_register_datasets(register: Callable[..., Any]) -> None:
    from .data.digits import DigitsDataset
    from .data.images import ImageFolderDataset
    from .data.latents import LatentFolderDataset

    register("digits", DigitsDataset, description="scikit-learn's bundled 8x8 digits, upsampled to 8/16/32 (no download)")
    register("image-folder", ImageFolderDataset, description="class-subfolder images, ADM centre crop and flip")
    register("latent-folder", LatentFolderDataset, description="VAE latent shards written by `dtx extract-latents`")


@hookimpl
def dtx_register_runners(register: Callable[..., Any]) -> None:
    from .training.commands import run_local

    register("local", run_local, description="one process, no Ray (debugging; CUDA when available)")
