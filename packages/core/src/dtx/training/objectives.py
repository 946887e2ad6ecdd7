"""Training objectives behind one interface, registered in the ``objective`` registry so plugins can add their own.

An objective gives ``loss(model, x, cond) -> [N]`` and ``sample(...) -> x0`` and reads the model's declared
``channel_dim`` and ``noise_input`` (``dtx.interface``), so neither the loop nor the sampler asks which formulation,
layout or noise embedding they run. Core provides ``gaussian`` (DDPM/IDDPM, uniform t, hybrid loss when the model
learns sigma), ``karras`` (EDM preconditioning, sigma log-normal or cosine-interpolated, registered weightings) and
``flow`` (flow matching on SiT's paths, uniform, logit-normal or shifted time).
Samplers of both kinds are called through one signature: ``sampler(model, x, schedule, generator=, progress=)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from .. import plugins
from ..data.info import DataInfo
from ..diffusion import noise_levels
from ..diffusion.guidance import guided
from ..diffusion.noise import Generators, randn
from ..errors import ConfigError, UnknownNameError
from ..interface import ModelInterface, interface_of, unwrap
from ..layers.step_cache import with_progress
from ..diffusion.sampler_api import check_options
from ..options import factory_options
from .config import ObjectiveConfig

Cond = dict[str, torch.Tensor]


class Objective(Protocol):
    kind: str  # the sampler kind it drives: "gaussian", "karras" or "flow"

    def loss(self, model: nn.Module, x: torch.Tensor, cond: Cond,
             generator: torch.Generator | None = None) -> torch.Tensor: ...

    def sample(self, model: nn.Module, noise_shape: Sequence[int], conds: Sequence[Cond], scales: Sequence[float],
               sampler: str, steps: int, generator: Generators,
               guide_channels: int | None = None, progress: bool = False,
               options: Mapping[str, Any] | None = None, spacing: str = "sections") -> torch.Tensor: ...


def _randn(shape: Sequence[int], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal drawn from CPU generators (so seeds mean the same on every device), then moved."""
    return randn(shape, generator).to(device)


def kept_timesteps(num_timesteps: int, steps: int, spacing: str) -> list[int]:
    """The training timesteps a ``steps``-step Gaussian sampler visits: ``sections`` (DiT and ADM: evenly over
    [0, T-1], both ends kept) or ``leading`` (diffusers' DDIM/DDPM default: 0, T//N, 2T//N, ...)."""
    from ..diffusion.respace import space_timesteps

    if spacing == "leading":
        return [i * (num_timesteps // steps) for i in range(steps)]
    return space_timesteps(num_timesteps, str(steps))


def lookup(key: str, registry: str, name: str) -> plugins.Entry:
    """A registry entry named by config key ``key``; an unknown name is an error that names the key."""
    try:
        return plugins.get(registry, name)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{key}: {exc}") from None


def _entry(key: str, registry: str, name: str, kind: str, what: str) -> Callable[..., Any]:
    """A registered sampler or schedule of the given kind; one of another kind gets an error naming the fits."""
    entry = lookup(key, registry, name)
    if entry.meta.get("kind") != kind:
        fits = [n for n, e in plugins.host().table(registry).items() if e.meta.get("kind") == kind]
        raise ConfigError(f"{key}: {registry} {entry.name!r} is a {entry.meta.get('kind')} {registry}; {what} "
                          f"{', '.join(sorted(fits))}")
    return entry.obj


def sampler_entry(name: str, kind: str) -> Callable[..., Any]:
    return _entry("sample.sampler", "sampler", name, kind, f"this run uses the {kind} objective, whose samplers are:")


def schedule_entry(key: str, name: str, kind: str) -> Callable[..., Any]:
    return _entry(key, "schedule", name, kind, f"this objective needs a {kind} schedule:")


def call_sampler(fn: Callable[..., torch.Tensor], name: str, net: Callable[..., torch.Tensor], x: torch.Tensor,
                 schedule: Any, generator: Generators, progress: bool,
                 options: Mapping[str, Any] | None) -> torch.Tensor:
    """Run a registered sampler with the recipe's/CLI's sampler options (eta, solver_type, ...), checked by name,
    type and range (``dtx sample`` and ``dtx train`` check them earlier, naming their key)."""
    options = check_options(name, fn, dict(options or {}), "sampler_options")
    return fn(net, x, schedule, generator=generator, progress=progress, **options)


def prepare_hook(model: nn.Module) -> Callable[..., dict[str, Any]] | None:
    """The backbone's optional ``prepare_conditions``: step-invariant condition work, done once per sampling run."""
    return getattr(unwrap(model), "prepare_conditions", None)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class GaussianObjective:
    """DDPM/IDDPM training through ``create_diffusion``; sampling respaces the schedule to the requested steps."""

    kind = "gaussian"

    def __init__(self, cfg: ObjectiveConfig, model: nn.Module, info: DataInfo | None = None) -> None:
        from ..diffusion.respace import create_diffusion

        self.cfg = cfg
        self.iface: ModelInterface = interface_of(model)
        self.betas = schedule_entry("objective.noise_schedule", cfg.noise_schedule, "beta")(cfg.diffusion_steps)
        self._create = functools.partial(create_diffusion, betas=self.betas, learn_sigma=self.iface.learn_sigma,
                                         predict_xstart=cfg.predict_xstart, predict_v=cfg.predict_v,
                                         diffusion_steps=cfg.diffusion_steps, channel_dim=self.iface.channel_dim)
        self.diffusion = self._create(timestep_respacing="")
        self._cache: dict[tuple[int, str], Any] = {}

    def net(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The model as the diffusion calls it: original-schedule timesteps mapped to its declared noise input."""
        return noise_levels.from_timestep(model, self.iface.noise_input, self.diffusion.alphas_cumprod)

    def loss(self, model: nn.Module, x: torch.Tensor, cond: Cond,
             generator: torch.Generator | None = None) -> torch.Tensor:
        n = x.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator).to(x.device)
        noise = _randn(x.shape, generator, x.device).to(x.dtype)
        return self.diffusion.training_losses(self.net(model), x, t, model_kwargs=cond, noise=noise)["loss"]

    def sample(self, model: nn.Module, noise_shape: Sequence[int], conds: Sequence[Cond], scales: Sequence[float],
               sampler: str, steps: int, generator: Generators,
               guide_channels: int | None = None, progress: bool = False,
               options: Mapping[str, Any] | None = None, spacing: str = "sections") -> torch.Tensor:
        fn = sampler_entry(sampler, self.kind)
        if (steps, spacing) not in self._cache:
            self._cache[steps, spacing] = self._create(use_timesteps=kept_timesteps(
                self.cfg.diffusion_steps, steps, spacing))
        noise = _randn(noise_shape, generator, _device(model))
        channels = guide_channels or self.iface.in_channels or noise_shape[self.iface.channel_dim]
        net = guided(self.net(model), list(conds), list(scales), channels=channels, channel_dim=self.iface.channel_dim,
                     prepare=prepare_hook(model))
        last = max(self.cfg.diffusion_steps - 1, 1)
        net = with_progress(net, lambda t: 1.0 - t / last)  # the sampler calls it with training timesteps
        return call_sampler(fn, sampler, net, noise, self._cache[steps, spacing], generator, progress, options)


class KarrasObjective:
    """EDM (Karras et al.) preconditioned denoiser; sampling walks a registered sigma schedule with a sigma-space
    solver. The backbone receives c_noise = ln(sigma)/4, raw sigma or a timestep, as it declares."""

    kind = "karras"

    def __init__(self, cfg: ObjectiveConfig, model: nn.Module, info: DataInfo) -> None:
        from ..diffusion import karras

        self.cfg, self.k = cfg, karras
        self.iface = interface_of(model)
        if self.iface.learn_sigma:
            raise ConfigError("the karras objective predicts the denoised sample and has no learned variance; "
                              "set the model's learn_sigma to false or use objective.kind=gaussian")
        self.image_d = cfg.image_d or max(info.height, info.width) * info.vae_downsample  # pixels, as the reference
        self.schedule = schedule_entry("objective.sigma_schedule", cfg.sigma_schedule, "sigma")
        weighting = lookup("objective.weighting", "loss", cfg.weighting)
        if weighting.meta.get("kind") != "sigma-weighting":
            raise ConfigError(f"loss {weighting.name!r} is not a sigma weighting; the karras objective needs one of: "
                              + ", ".join(n for n, e in plugins.host().table("loss").items()
                                          if e.meta.get("kind") == "sigma-weighting"))
        self.weighting = functools.partial(weighting.obj, sigma_data=cfg.sigma_data, **cfg.weighting_options)

    def denoiser(self, model: Callable[..., torch.Tensor]) -> nn.Module:
        inner = noise_levels.from_sigma(model, self.iface.noise_input, self.iface.num_timesteps)
        return self.k.Denoiser(inner, sigma_data=self.cfg.sigma_data, weighting=self.weighting)

    def sample_sigmas(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        c = self.cfg
        if c.sigma_sample == "log-normal":
            sigma = self.k.rand_log_normal((n,), loc=c.p_mean, scale=c.p_std, generator=generator)
        else:
            sigma = self.k.rand_cosine_interpolated((n,), image_d=self.image_d, noise_d_low=c.noise_d_low,
                                                    noise_d_high=c.noise_d_high or self.image_d,
                                                    sigma_data=c.sigma_data,
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
               sampler: str, steps: int, generator: Generators,
               guide_channels: int | None = None, progress: bool = False,
               options: Mapping[str, Any] | None = None, spacing: str = "sections") -> torch.Tensor:
        fn = sampler_entry(sampler, self.kind)
        device = _device(model)
        c = self.cfg
        shape_options = {"rho": c.rho} if "rho" in (factory_options(self.schedule) or ()) else {}
        sigmas = self.schedule(steps, c.sigma_min, c.sigma_max, device=device, **shape_options)
        x = _randn(noise_shape, generator, device) * sigmas[0]
        net = guided(self.denoiser(model), list(conds), list(scales), channels=guide_channels,
                     channel_dim=self.iface.channel_dim, prepare=prepare_hook(model))
        top, bottom = math.log(float(sigmas[0])), math.log(float(sigmas[sigmas > 0].min()))
        net = with_progress(net, lambda sigma: (top - math.log(max(sigma, 1e-12))) / max(top - bottom, 1e-12))
        return call_sampler(fn, sampler, net, x, sigmas, generator, progress, options)


class FlowObjective:
    """Flow matching: the model regresses the velocity (or the noise, or the score) of x_t = alpha(t)·x0 +
    sigma(t)·eps on a path of ``dtx.diffusion.flow``; samplers integrate the flow ODE or SiT's SDE over a (shifted)
    time grid, with guidance only inside ``guidance_interval``. The backbone receives flow time, sigma or a
    timestep, as it declares; the extra channels of a learned-variance model are ignored (as SiT does)."""

    kind = "flow"

    def __init__(self, cfg: ObjectiveConfig, model: nn.Module, info: DataInfo) -> None:
        from ..diffusion import flow

        self.cfg, self.flow = cfg, flow
        self.iface = interface_of(model)
        self.path = flow.FlowPath(cfg.path)
        self.sign = noise_levels.velocity_sign(self.iface.noise_input) if cfg.prediction == "velocity" else 1.0
        self.shift = cfg.t_shift
        if cfg.t_shift_tokens:
            patch = getattr(unwrap(model), "patch_size", 2)
            patch = patch if isinstance(patch, int) else 2  # e.g. HDiT's (h, w) pair: counted as 2
            self.shift = flow.shift_for_tokens((info.frames or 1) * (info.height // patch) * (info.width // patch))

    def _interval(self, training: bool, sde: bool = False) -> tuple[float, float]:
        eps = self.cfg.train_eps if training else self.cfg.sample_eps
        if eps is None:
            eps = self.flow.default_eps(self.path, self.cfg.prediction, training)
        return self.flow.time_interval(self.path, self.cfg.prediction, eps, sde)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """The model's prediction in flow time's direction, without learned-variance channels."""
        if self.iface.learn_sigma:
            cd = self.iface.channel_dim
            out = out.narrow(cd, 0, out.shape[cd] // 2)
        return out * self.sign if self.sign != 1.0 else out

    def _inner(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The model called with flow time converted to the noise input it declared."""
        return noise_levels.from_flow_time(model, self.iface.noise_input, self.path, self.iface.num_timesteps)

    def net(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``v(x, t, **cond)``: the velocity dx/dt the model's prediction implies, t a flow-time vector."""
        inner = self._inner(model)

        def velocity(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
            out = self._output(inner(x, t, **cond))
            t_b = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
            return self.path.velocity(out, x, t_b, self.cfg.prediction)  # type: ignore[arg-type]

        return velocity

    def loss(self, model: nn.Module, x: torch.Tensor, cond: Cond,
             generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.cfg
        t = self.flow.sample_times(x.shape[0], c.t_sample, generator, c.t_mean, c.t_std, self.shift,
                                   self._interval(training=True)).to(x.device)
        noise = _randn(x.shape, generator, x.device).to(x.dtype)
        x_t, _ = self.path.sample(x, noise, t.reshape(-1, *([1] * (x.ndim - 1))))
        out = self._output(self._inner(model)(x_t.to(x.dtype), t, **cond))
        return self.flow.flow_loss(self.path, out, x, noise, t, c.prediction, c.loss_weight)  # type: ignore[arg-type]

    def _guided(self, model: nn.Module, conds: Sequence[Cond], scales: Sequence[float],
                channels: int | None) -> Callable[..., torch.Tensor]:
        """Guided velocity; outside ``guidance_interval`` only the most-conditioned term (guidance scale 1)."""
        velocity, cd, prepare = self.net(model), self.iface.channel_dim, prepare_hook(model)
        full = guided(velocity, list(conds), list(scales), channels=channels, channel_dim=cd, prepare=prepare)
        lo, hi = self.cfg.guidance_interval
        if len(conds) == 1 or (lo, hi) == (0.0, 1.0):
            return full
        plain = guided(velocity, list(conds)[-1:], [], channel_dim=cd, prepare=prepare)

        def fn(x: torch.Tensor, t: torch.Tensor, **shared: Any) -> torch.Tensor:
            now = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            return full(x, t, **shared) if lo <= now <= hi else plain(x, t, **shared)

        return fn

    def sample(self, model: nn.Module, noise_shape: Sequence[int], conds: Sequence[Cond], scales: Sequence[float],
               sampler: str, steps: int, generator: Generators,
               guide_channels: int | None = None, progress: bool = False,
               options: Mapping[str, Any] | None = None, spacing: str = "sections") -> torch.Tensor:
        fn = sampler_entry(sampler, self.kind)
        device = _device(model)
        sde = bool(lookup("sample.sampler", "sampler", sampler).meta.get("sde"))
        times = self.flow.time_grid(steps, self.shift, self._interval(training=False, sde=sde), device)
        x = _randn(noise_shape, generator, device)
        net = self._guided(model, conds, scales, guide_channels)
        start, end = float(times[0]), float(times[-1])
        net = with_progress(net, lambda t: (start - t) / ((start - end) or 1.0))
        return call_sampler(fn, sampler, net, x, self.flow.FlowSchedule(times, self.path), generator, progress,
                            options)


def build_objective(cfg: ObjectiveConfig, model: nn.Module, info: DataInfo) -> Objective:
    """The registered objective ``cfg.kind`` for ``model`` on data described by ``info``."""
    return lookup("objective.kind", "objective", cfg.kind).obj(cfg, model, info)
