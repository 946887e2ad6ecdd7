"""Training objectives behind one interface, so the loop and the sampler never ask which formulation they run.

``GaussianObjective``: discrete DDPM/IDDPM diffusion (uniform t over the training schedule; hybrid loss when the
model learns sigma). ``KarrasObjective``: EDM preconditioning with sigma drawn log-normally or cosine-interpolated
and a loss weighting from the ``loss`` registry. Both give ``loss(...) -> [N]`` and ``sample(...) -> x0``, with
samplers from the ``sampler`` registry; class labels travel as ``y`` and the unconditional term uses
``model.null_class``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from .. import plugins
from ..errors import ConfigError
from .config import ObjectiveConfig

Cond = dict[str, torch.Tensor]


class Objective(Protocol):
    kind: str

    def loss(self, model: nn.Module, x: torch.Tensor, cond: Cond,
             generator: torch.Generator | None = None) -> torch.Tensor: ...

    def sample(self, model: nn.Module, noise_shape: Sequence[int], conds: Sequence[Cond], scales: Sequence[float],
               sampler: str, steps: int, generator: torch.Generator | None,
               guide_channels: int | None = None, progress: bool = False) -> torch.Tensor: ...


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal drawn from a CPU generator (so seeds mean the same on every device), then moved."""
    return torch.randn(tuple(shape), generator=generator).to(device)


def sampler_entry(name: str, kind: str) -> Callable[..., Any]:
    """A registered sampler of the given kind; one of the other kind gets an error naming the right choices."""
    entry = plugins.get("sampler", name)
    if entry.meta.get("kind") != kind:
        fits = [n for n, e in plugins.host().table("sampler").items() if e.meta.get("kind") == kind]
        raise ConfigError(f"sampler {entry.name!r} is a {entry.meta.get('kind')} sampler; this run uses the {kind} "
                          f"objective, whose samplers are: {', '.join(sorted(fits))}")
    return entry.obj


def class_conds(model: nn.Module, labels: torch.Tensor | None, cfg_scale: float) -> tuple[list[Cond], list[float]]:
    """Conditioning dicts and guidance scales for class labels: ``[uncond, cond]`` with ``[s]`` when guiding."""
    if labels is None:
        return [{}], []
    if cfg_scale == 1.0:
        return [{"y": labels}], []
    null = getattr(model, "null_class", None)
    if null is None:
        raise ConfigError("classifier-free guidance needs a model trained with class dropout (it has no null class);"
                          " use --cfg 1")
    return [{"y": torch.full_like(labels, int(null))}, {"y": labels}], [float(cfg_scale)]


def _guided(model: Callable[..., torch.Tensor], conds: Sequence[Cond], scales: Sequence[float],
            channels: int | None) -> Callable[..., torch.Tensor]:
    from ..diffusion.guidance import guided

    return guided(model, list(conds), list(scales), channels=channels)


class GaussianObjective:
    """DDPM/IDDPM training through ``create_diffusion``; sampling respaces the schedule to the requested steps."""

    kind = "gaussian"

    def __init__(self, cfg: ObjectiveConfig, learn_sigma: bool) -> None:
        from ..diffusion.respace import create_diffusion

        self.cfg = cfg
        self.learn_sigma = learn_sigma
        self._create = create_diffusion
        self.diffusion = self._respaced("")
        self._cache: dict[int, Any] = {}

    def _respaced(self, respacing: str) -> Any:
        c = self.cfg
        return self._create(timestep_respacing=respacing, noise_schedule=c.noise_schedule,
                            learn_sigma=self.learn_sigma, predict_xstart=c.predict_xstart, predict_v=c.predict_v,
                            diffusion_steps=c.diffusion_steps, channel_dim=1)

    def loss(self, model: nn.Module, x: torch.Tensor, cond: Cond,
             generator: torch.Generator | None = None) -> torch.Tensor:
        n = x.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator).to(x.device)
        noise = _randn(x.shape, generator, x.device).to(x.dtype)
        return self.diffusion.training_losses(model, x, t, model_kwargs=cond, noise=noise)["loss"]

    def sample(self, model: nn.Module, noise_shape: Sequence[int], conds: Sequence[Cond], scales: Sequence[float],
               sampler: str, steps: int, generator: torch.Generator | None,
               guide_channels: int | None = None, progress: bool = False) -> torch.Tensor:
        fn = sampler_entry(sampler, self.kind)
        if steps not in self._cache:
            self._cache[steps] = self._respaced(str(steps))
        device = next(model.parameters()).device
        noise = _randn(noise_shape, generator, device)
        net = _guided(model, conds, scales, guide_channels or getattr(model, "in_channels", None))
        return fn(self._cache[steps], net, noise, model_kwargs={}, clip_denoised=False, progress=progress,
                  generator=generator)


class KarrasObjective:
    """EDM (Karras et al.) preconditioned denoiser; sampling walks a Karras sigma schedule with a sigma-space solver."""

    kind = "karras"

    def __init__(self, cfg: ObjectiveConfig, image_size: int) -> None:
        from ..diffusion import karras

        self.cfg = cfg
        self.k = karras
        self.image_size = image_size
        weighting = plugins.get("loss", cfg.weighting)
        if weighting.meta.get("kind") != "sigma-weighting":
            raise ConfigError(f"loss {weighting.name!r} is not a sigma weighting; the karras objective needs one of: "
                              + ", ".join(n for n, e in plugins.host().table("loss").items()
                                          if e.meta.get("kind") == "sigma-weighting"))
        self.weighting = functools.partial(weighting.obj, sigma_data=cfg.sigma_data, **cfg.weighting_options)

    def denoiser(self, model: nn.Module) -> nn.Module:
        return self.k.Denoiser(model, sigma_data=self.cfg.sigma_data, weighting=self.weighting)

    def sample_sigmas(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        c = self.cfg
        if c.sigma_sample == "log-normal":
            sigma = self.k.rand_log_normal((n,), loc=c.p_mean, scale=c.p_std, generator=generator)
        else:
            sigma = self.k.rand_cosine_interpolated((n,), image_d=self.image_size, noise_d_low=32,
                                                    noise_d_high=self.image_size, sigma_data=c.sigma_data,
                                                    min_value=min(c.sigma_min, 1e-3), max_value=max(c.sigma_max, 1e3),
                                                    generator=generator)
        return sigma.to(device)

    def loss(self, model: nn.Module, x: torch.Tensor, cond: Cond,
             generator: torch.Generator | None = None) -> torch.Tensor:
        sigma = self.sample_sigmas(x.shape[0], generator, x.device)
        noise = _randn(x.shape, generator, x.device).to(x.dtype)
        loss = self.denoiser(model).loss(x, noise, sigma, **cond)
        return loss.reshape(x.shape[0], -1).mean(1)

    def sample(self, model: nn.Module, noise_shape: Sequence[int], conds: Sequence[Cond], scales: Sequence[float],
               sampler: str, steps: int, generator: torch.Generator | None,
               guide_channels: int | None = None, progress: bool = False) -> torch.Tensor:
        fn = sampler_entry(sampler, self.kind)
        device = next(model.parameters()).device
        c = self.cfg
        sigmas = self.k.get_sigmas_karras(steps, c.sigma_min, c.sigma_max, rho=c.rho, device=device)
        x = _randn(noise_shape, generator, device) * sigmas[0]
        net = _guided(self.denoiser(model), conds, scales, guide_channels)
        return fn(net, x, sigmas, extra_args={}, disable=not progress, generator=generator)


def build_objective(cfg: ObjectiveConfig, model: nn.Module, image_size: int) -> Objective:
    """The objective a config asks for; a Gaussian one learns sigma exactly when the model does."""
    if cfg.kind == "karras":
        return KarrasObjective(cfg, image_size)
    return GaussianObjective(cfg, learn_sigma=bool(getattr(model, "learn_sigma", False)))
