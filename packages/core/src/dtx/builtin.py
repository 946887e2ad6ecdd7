"""The core's own contributions, registered like any plugin (entry point ``core``): commands, schedules, samplers,
loss weightings, objectives, conditioners, datasets and the local runner."""

from __future__ import annotations

from typing import Any, Callable

from .hookspecs import hookimpl

DTX_HOOK_API = "1.2"  # the hook API these registrations are written for (dtx.hookspecs)


@hookimpl
def dtx_register_commands(register: Callable[..., Any]) -> None:
    from .commands import bench, convert, extract_latents, flops, models, plugins, recipes, sample, train
    from .commands import eval as eval_command

    register("plugins", plugins.configure, run=plugins.run,
             help="list installed plugins, their hook API, what they register, and what is wrong with them")
    register("models", models.configure, run=models.run, help="list registered model architectures and presets")
    register("recipes", recipes.configure, run=recipes.run,
             help="list registered training recipes: model family, data, max_steps and time cap (max_minutes)")
    register("train", train.configure, run=train.run,
             help="train a model from a recipe name or YAML config (resumes when --out holds a checkpoint)")
    register("sample", sample.configure, run=sample.run,
             help="sample a run, model folder or checkpoint: PNG grid + .npz (videos: frame grid, GIF, MP4)")
    register("convert", convert.configure, run=convert.run,
             help="write a run or any loadable checkpoint as a dtx folder (model.safetensors + config.yaml)")
    register("flops", flops.configure, run=flops.run,
             help="parameters and forward FLOPs of any registered model (analytic where its family counts them)")
    register("bench", bench.configure, run=bench.run,
             help="forward and training-step time, samples/s, memory, FLOPs, TFLOP/s and MFU of a model or recipe; "
                  "--compare A B times two configurations interleaved")
    register("extract-latents", extract_latents.configure, run=extract_latents.run,
             help="encode an image or video folder with a local diffusers AutoencoderKL into latent shards")
    register("eval", eval_command.configure, run=eval_command.run,
             help="score a samples .npz (or a run folder's newest): digits accuracy, Frechet distance, FID; for "
                  "videos frame consistency and motion")


@hookimpl
def dtx_register_schedules(register: Callable[..., Any]) -> None:
    from .diffusion import gaussian, karras

    for name, fn in gaussian.SCHEDULES.items():
        register(name, fn, kind="beta", description="discrete beta schedule (objective.noise_schedule)")
    for name, fn in karras.SCHEDULES.items():
        register(name, fn, kind="sigma", description="continuous sigma schedule (objective.sigma_schedule)")


@hookimpl
def dtx_register_samplers(register: Callable[..., Any]) -> None:
    from .diffusion import diffusers_bridge, flow_samplers, gaussian, karras, sampler_api

    for name, fn in {**gaussian.SAMPLERS, **diffusers_bridge.SAMPLERS}.items():
        register(name, sampler_api.discrete(fn), kind="gaussian",
                 description="discrete-time sampler over a respaced schedule")
    for name, fn in karras.SAMPLERS.items():
        register(name, sampler_api.sigma_space(fn), kind="karras",
                 description="sigma-space sampler (k-diffusion convention)")
    for name, fn in flow_samplers.SAMPLERS.items():
        register(name, fn, kind="flow", sde=name == "flow-sde",
                 description="flow-matching sampler over a flow-time grid (objective.t_shift)")


@hookimpl
def dtx_register_caches(register: Callable[..., Any]) -> None:
    from .layers.caches import CACHES

    for name, factory in CACHES.items():
        register(name, factory, description=(factory.__doc__ or "").splitlines()[0])


@hookimpl
def dtx_register_losses(register: Callable[..., Any]) -> None:
    from .diffusion import karras

    for name, fn in karras.WEIGHTINGS.items():
        register(name, fn, kind="sigma-weighting", description="EDM loss weighting w(sigma)")


@hookimpl
def dtx_register_objectives(register: Callable[..., Any]) -> None:
    from .training.objectives import FlowObjective, GaussianObjective, KarrasObjective

    register("gaussian", GaussianObjective, description="DDPM/IDDPM: uniform t, eps/x0/v, hybrid loss with "
                                                        "learned variance")
    register("karras", KarrasObjective, description="EDM: preconditioned denoiser, log-normal or "
                                                    "cosine-interpolated sigma, registered weightings")
    register("flow", FlowObjective, description="flow matching: linear (rectified flow), gvp or vp path; velocity, "
                                                "noise or score; uniform, logit-normal or shifted time")


@hookimpl
def dtx_register_conditioners(register: Callable[..., Any]) -> None:
    from .conditioning import ClassLabelConditioner, FlagConditioner

    register("class-label", ClassLabelConditioner, default_for=("y",),
             description="integer class labels y; null = the model's null class (10% dropout by default)")
    register("flag", FlagConditioner, description="a per-sample boolean field passed to the model by name")


@hookimpl
def dtx_register_datasets(register: Callable[..., Any]) -> None:
    from .data.digits import DigitsDataset
    from .data.images import ImageFolderDataset
    from .data.latents import LatentFolderDataset
    from .data.videos import VideoFolderDataset

    register("digits", DigitsDataset, description="scikit-learn's bundled 8x8 digits, upsampled to 8/16/32 (no download)")
    register("image-folder", ImageFolderDataset, description="class-subfolder images, ADM centre crop and flip")
    register("latent-folder", LatentFolderDataset, description="VAE latent shards written by `dtx extract-latents`")
    register("video-folder", VideoFolderDataset, description="video files or frame folders as [F, C, H, W] clips")


@hookimpl
def dtx_register_runners(register: Callable[..., Any]) -> None:
    from .training.local import run_local

    register("local", run_local, description="one process, no Ray (debugging; CUDA when available)")
