"""The one sampling path: periodic grids and ``dtx sample`` both call ``generate`` and ``write_samples``.

``generate`` builds the condition sets of a request through the run's conditioning stage (classes, prompts,
flags; nested guidance with any number of terms), samples in batches with a registered sampler, decodes latents
per frame with the VAE when there is one, and returns pixels in [-1, 1] with the raw condition fields.
``write_samples`` writes them: a PNG grid and an ADM ``.npz`` for images; for videos the ``.npz`` (NFHWC), a
frame-grid PNG and a GIF and an MP4 per sample; prompts are written beside them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..conditioning import ConditioningStage, Fields, SampleRequest
from ..data.info import DataInfo
from ..diffusion.noise import per_sample_generators
from ..errors import ConfigError
from ..interface import interface_of
from ..layers.linear import fused_activations
from ..layers.step_cache import CacheStats, step_cache
from .config import SampleConfig, TrainConfig, config_from_dict
from .objectives import Objective, build_objective


@dataclass
class Samples:
    """Generated samples in pixel space ([-1, 1]; latents when no VAE decoded them) and their raw conditions."""

    x: torch.Tensor
    fields: Fields
    per_subject: int
    channel_dim: int
    cache: dict[str, float] | None = None  # the step cache's counts of full and skipped block evaluations


@dataclass
class SamplingSetup:
    """Everything needed to sample a trained model: model, objective, conditioning stage, data facts, config."""

    model: nn.Module
    objective: Objective
    stage: ConditioningStage
    info: DataInfo
    cfg: TrainConfig
    source: str
    step: int | None = None


def request_of(sample: SampleConfig) -> SampleRequest:
    """The request a run's ``sample`` section makes (its classes, prompts and negative prompt)."""
    return SampleRequest(classes=list(sample.classes), prompts=list(sample.prompts),
                         negative_prompt=sample.negative_prompt)


@torch.no_grad()
def generate(setup: SamplingSetup, request: SampleRequest, sample: SampleConfig, *, seed: int = 0,
             per_subject: int | None = None, batch_size: int = 256, vae: Any = None,
             progress: bool = False, seeds: Sequence[int] | None = None) -> Samples:
    """``per_subject`` (default ``sample.n_per_class``) samples of each subject of ``request`` (all classes/prompts;
    or ``per_subject`` in all) with the sampler, steps, guidance and options of ``sample`` (see ``resolve_sample``):
    its ``guidance`` terms, else its ``guidance_scales`` terms then classic CFG at ``sample.cfg``. The noise comes
    from one generator seeded ``seed``, or with ``seeds`` (one per sample) from each sample's own generator."""
    model, stage = setup.model, setup.stage
    raw, n = stage.request_fields(request, sample.n_per_class if per_subject is None else per_subject)
    plan = stage.guidance_steps(sample.cfg, sample.guidance, sample.guidance_scales)
    device = next(model.parameters()).device
    if seeds is not None and len(seeds) != n:
        raise ConfigError(f"{len(seeds)} seeds for {n} samples; give one seed per sample")
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    factory = cache_factory(sample.cache)
    stats = CacheStats()
    bar = samples_bar(progress and n > batch_size, n, setup.info.frames is not None)
    try:
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            conds, scales = stage.condition_sets(request, raw, plan, device, start, start + m)
            generator = gen if seeds is None else per_sample_generators(seeds[start:start + m])
            with step_cache(model, factory, sample.cache_options, name=sample.cache) as batch_stats, \
                    fused_activations():  # a fresh cache per batch; fc1 + GELU as one product
                x = setup.objective.sample(model, (m, *setup.info.sample_shape), conds, scales, sample.sampler,
                                           sample.steps, generator, guide_channels=sample.guide_channels,
                                           progress=progress and bar is None, options=sample.sampler_options,
                                           spacing=sample.timestep_spacing)
            stats.full, stats.skipped = stats.full + batch_stats.full, stats.skipped + batch_stats.skipped
            stats.unit = batch_stats.unit
            if vae is not None:
                from ..data.vae import decode

                x = decode(vae, x)
            out.append(x.float().cpu())
            if bar is not None:
                bar.update(m)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return Samples(torch.cat(out), raw, sample.n_per_class if per_subject is None else per_subject,
                   interface_of(model).channel_dim, stats.as_dict() if factory is not None else None)


def samples_bar(enabled: bool, total: int, video: bool) -> Any:
    """A progress bar counted in samples, so that its rate reads as images (clips) per second; None when off."""
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, unit="clip" if video else "image", file=sys.stderr, desc="sample")


def precision_context(precision: str, device: torch.device) -> Any:
    """The autocast of a sampling precision (``fp32``: none; ``bf16``, ``fp16``)."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cache_factory(name: str | None) -> Any:
    """The registered step cache ``name`` (None: no cache); an unknown name is an error naming ``sample.cache``."""
    if name is None:
        return None
    from .objectives import lookup

    return lookup("sample.cache", "cache", name).obj


def _prompts(fields: Fields) -> list[str] | None:
    text = fields.get("text")
    return [str(t) for t in text] if isinstance(text, list) else None


def write_samples(samples: Samples, out: str | Path, fps: float = 8.0, scale: int | None = None) -> dict[str, Any]:
    """Write samples beside ``out`` (a ``.png`` path): grid/frame grid PNG, ``.npz``, per-sample GIF/MP4 for videos
    in ``<stem>/``, ``<stem>.prompts.txt`` for text; returns the written paths. The files land together or not at
    all (a full disk leaves neither a grid without its archive nor the reverse; older files stay untouched)."""
    from ..io import atomic_group

    x = samples.x
    if x.shape[samples.channel_dim] not in (1, 3):
        raise ConfigError(f"samples have {x.shape[samples.channel_dim]} channels; latent samples need a VAE to "
                          f"decode them (--vae PATH)")
    with atomic_group():
        return _write_sample_files(samples, Path(out), fps, scale)


def _write_sample_files(samples: Samples, out: Path, fps: float, scale: int | None) -> dict[str, Any]:
    from .. import writers

    x, fields = samples.x, samples.fields
    labels = fields["y"].cpu() if isinstance(fields.get("y"), torch.Tensor) else None
    prompts = _prompts(fields)
    extra = {"prompts": np.array(prompts)} if prompts else None
    written: dict[str, Any] = {"n": int(x.shape[0])}
    written["npz"] = str(writers.save_npz(x, out.with_suffix(".npz"), labels=labels,
                                          channel_dim=samples.channel_dim, extra=extra))
    if samples.channel_dim == 2:
        written["grid"] = str(writers.save_frame_grid(x, out, scale=scale))
        written["videos"] = [str(p) for p in writers.save_videos(x, out.parent / out.stem, fps=fps)]
    else:
        per_row = samples.per_subject if samples.per_subject < x.shape[0] else math.ceil(math.sqrt(x.shape[0]))
        written["grid"] = str(writers.save_grid(x, out, nrow=per_row, scale=scale))
    if prompts:
        from ..io import atomic_write_text

        path = out.with_name(out.stem + ".prompts.txt")
        written["prompts"] = str(atomic_write_text(path, "".join(p.replace("\n", " ") + "\n" for p in prompts)))
    return written


# -- rebuilding a trained model for sampling --------------------------------------------------------------------------

def setup_from_state(model: nn.Module, state: dict[str, Any], source: str) -> SamplingSetup:
    """Objective, stage and data facts of a training checkpoint's ``state`` around its rebuilt ``model``."""
    cfg = config_from_dict(state["config"])
    info = DataInfo.from_dict(state["data_info"])
    return SamplingSetup(model, build_objective(cfg.objective, model, info),
                         ConditioningStage.build(cfg.conditioning, model, info), info, cfg, source,
                         int(state.get("step", 0)))


def setup_from_model(model: nn.Module, stored: dict[str, Any], source: str) -> SamplingSetup:
    """A model without a training run (a dtx folder or a foreign checkpoint): data facts from what was stored
    with it or from the model's declared input shape; objective and conditioning from the stored config or the
    defaults (DDPM linear, the default conditioner of each field)."""
    cfg = config_from_dict({k: v for k, v in stored.items() if k in ("objective", "conditioning", "sample")})
    if "data_info" in stored:
        info = DataInfo.from_dict(stored["data_info"])
    else:
        iface = interface_of(model)
        if iface.input_shape is None:
            raise ConfigError(f"{source}: the model does not declare its input shape and no data_info was stored "
                              f"with it")
        shape = iface.input_shape
        frames = shape[0] if len(shape) == 4 else None
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        info = DataInfo(channels=shape[-3], height=shape[-2], width=shape[-1], frames=frames,
                        num_classes=num_classes, fields=("y",) if num_classes else ())
    return SamplingSetup(model, build_objective(cfg.objective, model, info),
                         ConditioningStage.build(cfg.conditioning, model, info), info, cfg, source)


def load_for_sampling(source: str | Path, *, weights: str = "ema", trust: bool = False,
                      device: torch.device | str = "cpu", format: str | None = None) -> SamplingSetup:
    """A training run, a checkpoint folder, a dtx model folder or any registered checkpoint format (``format``:
    that one, without detection), ready to sample."""
    from ..models import LoadOptions, load_model_with_info

    options = LoadOptions(weights=weights, trust=trust, format=format)  # type: ignore[arg-type]
    model, loaded = load_model_with_info(source, None, options)
    model.to(device)
    if "state" in loaded:
        setup = setup_from_state(model, loaded["state"], loaded["checkpoint"])
    else:
        setup = setup_from_model(model, dict(loaded.get("config") or {}), str(source))
    return dataclasses.replace(setup, stage=setup.stage.to(device))
