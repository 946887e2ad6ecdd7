"""Discrete Gaussian diffusion (DDPM/IDDPM) with the ADM numerics that DiT and Latte train and sample with.

Schedule tables are float64 numpy arrays; per-timestep values are gathered and cast to the working dtype (the input's
float dtype, at least float32 as in ADM) and broadcast over tensors of any rank. ``channel_dim`` names the axis that
holds channels, so video latents laid out [B, F, C, H, W] use ``channel_dim=2``. Respacing lives in ``respace.py``,
diffusers-backed samplers in ``diffusers_bridge.py``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError, ShapeError
from .noise import randn_like
from .sampler_api import SamplerOption, takes

Model = Callable[..., Tensor]

MEAN_TYPES = ("epsilon", "x0", "v")
VAR_TYPES = ("learned_range", "learned", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


# --- beta schedules -------------------------------------------------------------------------------------------------

def linear_beta_schedule(num_steps: int) -> np.ndarray:
    """ADM linear betas from 1e-4 to 0.02, scaled by 1000/T so that any T spans the same noise range."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def cosine_beta_schedule(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM cosine schedule (diffusers' ``squaredcos_cap_v2``).

    beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta) with abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2.
    """
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}
#: most diffusion steps a schedule may have (DDPM and DiT train with 1000): a larger count is a crafted value whose
#: tables would take minutes and gigabytes to build
MAX_DIFFUSION_STEPS = 100_000
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}


def get_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Float64 betas of the named schedule (``linear``, ``cosine`` or its alias ``squaredcos_cap_v2``)."""
    key = _SCHEDULE_ALIASES.get(name, name)
    if key not in SCHEDULES:
        allowed = ", ".join([*SCHEDULES, *_SCHEDULE_ALIASES])
        raise ConfigError(f"unknown noise schedule {name!r}; allowed: {allowed}")
    if not 1 <= int(num_steps) <= MAX_DIFFUSION_STEPS:
        raise ConfigError(f"number of diffusion steps must be in [1, {MAX_DIFFUSION_STEPS}], got {num_steps}")
    return SCHEDULES[key](int(num_steps))


# --- densities --------------------------------------------------------------------------------------------------------

def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the batch (first) one."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float,
              logvar2: Tensor | float) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats; scalars broadcast."""
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor)), None)
    if ref is None:
        raise ShapeError("normal_kl needs at least one tensor argument")
    logvar1 = torch.as_tensor(logvar1, dtype=ref.dtype, device=ref.device)
    logvar2 = torch.as_tensor(logvar2, dtype=ref.dtype, device=ref.device)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF that ADM uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability of data in [-1, 1] quantised to 256 bins of width 2/255 under N(means, exp(log_scales)^2).

    The outermost bins extend to -inf / +inf (edges at +-0.999); probabilities are floored at 1e-12.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ShapeError(f"x, means and log_scales must share one shape, got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(log_scales.shape)}")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# --- the process ------------------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """DDPM/IDDPM forward process, model parameterisations, training losses and samplers over ``len(betas)`` steps.

    ``timestep_map[i]`` is the original-schedule timestep of step ``i`` (identity unless respaced); the model is always
    called with mapped timesteps. Model output: C channels, or 2C (``[mean-param, var]``) for learned variances.
    """

    def __init__(self, betas: np.ndarray | list[float], model_mean_type: str = "epsilon",
                 model_var_type: str = "learned_range", loss_type: str = "mse",
                 timestep_map: np.ndarray | list[int] | None = None, channel_dim: int = 1) -> None:
        for value, allowed, what in ((model_mean_type, MEAN_TYPES, "model_mean_type"),
                                     (model_var_type, VAR_TYPES, "model_var_type"),
                                     (loss_type, LOSS_TYPES, "loss_type")):
            if value not in allowed:
                raise ConfigError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int) or channel_dim < 1:
            raise ConfigError(f"channel_dim must be an int >= 1 (dim 0 is the batch), got {channel_dim!r}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas <= 1)):
            raise ConfigError("betas must be a non-empty 1-D sequence with every value in (0, 1]")
        num_steps = betas.shape[0]
        timestep_map = np.arange(num_steps) if timestep_map is None else np.asarray(timestep_map)
        if timestep_map.shape != (num_steps,) or not np.issubdtype(timestep_map.dtype, np.integer):
            raise ConfigError(f"timestep_map must hold {num_steps} integer timesteps, one per beta")

        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.channel_dim = channel_dim
        self.num_timesteps = num_steps
        self.timestep_map = timestep_map.astype(np.int64)
        self.betas = betas
        self.log_betas = np.log(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log takes the t = 1 value there (a 1-step chain falls back to beta).
        first = self.posterior_variance[1] if num_steps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.fixed_large_variance = np.append(first, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._tensors: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    # -- table lookup and model call --

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        if key not in self._tensors:
            self._tensors[key] = torch.from_numpy(getattr(self, name)).to(dtype).to(device)
        return self._tensors[key]

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` in ``like``'s float dtype (float32 at least), shaped [B, 1, ..., 1] to broadcast."""
        dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float32
        return self._table(name, t.device, dtype)[t].view(-1, *([1] * (like.ndim - 1)))

    def _check_t(self, t: Tensor, x: Tensor) -> None:
        if not isinstance(t, Tensor) or t.shape != (x.shape[0],) or t.is_floating_point():
            raise ShapeError(f"t must be an integer tensor of shape ({x.shape[0]},) (one step per sample), "
                             f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if x.ndim <= self.channel_dim:
            raise ShapeError(f"x has {x.ndim} dims but channel_dim is {self.channel_dim}")

    def original_timesteps(self, t: Tensor) -> Tensor:
        """Map step indices of this (possibly respaced) chain to timesteps of the original schedule."""
        return self._table("timestep_map", t.device, torch.long)[t]

    def call_model(self, model: Model, x: Tensor, t: Tensor, model_kwargs: Mapping[str, Any] | None = None) -> Tensor:
        """``model(x, original_t, **model_kwargs)``."""
        return model(x, self.original_timesteps(t), **(model_kwargs or {}))

    def split_model_output(self, output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split a model output into (mean parameter, variance values or None), checking its shape against ``x``."""
        learned = self.model_var_type in ("learned", "learned_range")
        channels = x.shape[self.channel_dim]
        expected = list(x.shape)
        expected[self.channel_dim] = channels * (2 if learned else 1)
        if list(output.shape) != expected:
            raise ShapeError(f"model output has shape {tuple(output.shape)}, expected {tuple(expected)} "
                             f"({'2C' if learned else 'C'} channels along dim {self.channel_dim} for "
                             f"model_var_type={self.model_var_type!r})")
        if not learned:
            return output, None
        mean_param, var_values = output.split(channels, dim=self.channel_dim)
        return mean_param, var_values

    # -- forward process and parameterisations --

    def _signal_noise(self, t: Tensor, like: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """sqrt(abar_t) a + sqrt(1 - abar_t) b."""
        return (self._extract("sqrt_alphas_cumprod", t, like) * a
                + self._extract("sqrt_one_minus_alphas_cumprod", t, like) * b)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given noise."""
        self._check_t(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        if noise.shape != x0.shape:
            raise ShapeError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        return self._signal_noise(t, x0, x0, noise)

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x0.shape != xt.shape:
            raise ShapeError(f"x0 shape {tuple(x0.shape)} differs from xt shape {tuple(xt.shape)}")
        mean = self._extract("posterior_mean_coef1", t, xt) * x0 + self._extract("posterior_mean_coef2", t, xt) * xt
        variance = self._extract("posterior_variance", t, xt).expand_as(xt)
        log_variance = self._extract("posterior_log_variance_clipped", t, xt).expand_as(xt)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt
                - self._extract("sqrt_recipm1_alphas_cumprod", t, xt) * eps)

    def predict_eps_from_xstart(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return ((self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt - x0)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, xt))

    def predict_xstart_from_v(self, xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return self._signal_noise(t, xt, xt, -v)

    def v_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the v-prediction regression target."""
        return self._signal_noise(t, x0, noise, -x0)

    # -- reverse process --

    def mean_variance_from_output(self, output: Tensor, x: Tensor, t: Tensor,
                                  clip_denoised: bool = False) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a raw model output: ``mean``, ``variance``, ``log_variance``, ``pred_xstart``."""
        mean_param, var_values = self.split_model_output(output, x)
        if self.model_var_type == "learned":
            log_variance = var_values
            variance = torch.exp(log_variance)
        elif self.model_var_type == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            names = {"fixed_small": ("posterior_variance", "posterior_log_variance_clipped"),
                     "fixed_large": ("fixed_large_variance", "fixed_large_log_variance")}[self.model_var_type]
            variance, log_variance = (self._extract(name, t, x).expand_as(x) for name in names)

        if self.model_mean_type == "x0":
            pred_xstart = mean_param
        elif self.model_mean_type == "epsilon":
            pred_xstart = self.predict_xstart_from_eps(x, t, mean_param)
        else:
            pred_xstart = self.predict_xstart_from_v(x, t, mean_param)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: Model, x: Tensor, t: Tensor, model_kwargs: Mapping[str, Any] | None = None,
                        clip_denoised: bool = False) -> dict[str, Tensor]:
        """Run the model at (x, t) and return the reverse-step Gaussian (see ``mean_variance_from_output``)."""
        self._check_t(t, x)
        return self.mean_variance_from_output(self.call_model(model, x, t, model_kwargs), x, t, clip_denoised)

    # -- training --

    def _vb_terms_bpd(self, output: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-sample VB term in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL where t == 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        out = self.mean_variance_from_output(output, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model: Model, x0: Tensor, t: Tensor, model_kwargs: Mapping[str, Any] | None = None,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses at steps ``t``: ``loss`` plus ``mse`` (MSE losses) and ``vb`` (learned variance or KL).

        With a learned variance the VB term sees the mean parameter detached, so it trains only the variance.
        """
        self._check_t(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        output = self.call_model(model, xt, t, model_kwargs)
        terms: dict[str, Tensor] = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            terms["vb"] = self._vb_terms_bpd(output, x0, xt, t)
            terms["loss"] = terms["vb"] * self.num_timesteps if self.loss_type == "rescaled_kl" else terms["vb"]
            return terms

        mean_param, var_values = self.split_model_output(output, xt)
        if var_values is not None:
            frozen = torch.cat([mean_param.detach(), var_values], dim=self.channel_dim)
            vb = self._vb_terms_bpd(frozen, x0, xt, t)
            # Scale VB as if it were summed over the 1000 original steps, matching the MSE term's weight.
            terms["vb"] = vb * (self.num_timesteps / 1000.0) if self.loss_type == "rescaled_mse" else vb
        if self.model_mean_type == "epsilon":
            target = noise
        elif self.model_mean_type == "x0":
            target = x0
        else:
            target = self.v_target(x0, t, noise)
        terms["mse"] = mean_flat((target - mean_param) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # -- sampling --

    def p_sample(self, model: Model, x: Tensor, t: Tensor, model_kwargs: Mapping[str, Any] | None = None, *,
                 clip_denoised: bool = False, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One ancestral step x_t -> x_{t-1} (no noise added where t == 0): ``sample`` and ``pred_xstart``."""
        out = self.p_mean_variance(model, x, t, model_kwargs, clip_denoised)
        noise = randn_like(x, generator)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model: Model, x: Tensor, t: Tensor, model_kwargs: Mapping[str, Any] | None = None, *,
                    clip_denoised: bool = False, generator: torch.Generator | None = None,
                    eta: float = 0.0) -> dict[str, Tensor]:
        """One DDIM step x_t -> x_{t-1}; ``eta`` = 0 is deterministic, 1 matches the DDPM posterior variance."""
        out = self.p_mean_variance(model, x, t, model_kwargs, clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        if eta != 0:
            nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
            sample = sample + nonzero * sigma * randn_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step: Callable[..., dict[str, Tensor]], noise: Tensor, progress: bool) -> Tensor:
        x = noise
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x = step(x, t)["sample"]
        return x

    def p_sample_loop(self, model: Model, noise: Tensor, model_kwargs: Mapping[str, Any] | None = None, *,
                      clip_denoised: bool = False, progress: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        """Ancestral sampling from x_T = ``noise`` through every step of this chain."""
        return self._loop(lambda x, t: self.p_sample(model, x, t, model_kwargs, clip_denoised=clip_denoised,
                                                     generator=generator), noise, progress)

    def ddim_sample_loop(self, model: Model, noise: Tensor, model_kwargs: Mapping[str, Any] | None = None, *,
                         clip_denoised: bool = False, progress: bool = False,
                         generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        """DDIM sampling from x_T = ``noise`` through every step of this chain (respace it for fewer steps)."""
        if eta < 0:
            raise ConfigError(f"DDIM eta must be >= 0, got {eta}")
        return self._loop(lambda x, t: self.ddim_sample(model, x, t, model_kwargs, clip_denoised=clip_denoised,
                                                        generator=generator, eta=eta), noise, progress)


# --- samplers with the uniform registry signature ---------------------------------------------------------------------

#: DDIM's eta scales the posterior noise: 0 is deterministic, 1 is DDPM's variance; above 1 the variance exceeds
#: 1 - abar_prev on large respaced steps and the mean's square root turns NaN
DDIM_ETA = SamplerOption("eta", float, 0.0, 1.0)


@takes()
def ddpm_sampler(diffusion: GaussianDiffusion, model: Model, noise: Tensor,
                 model_kwargs: Mapping[str, Any] | None = None, *, clip_denoised: bool = False,
                 progress: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Ancestral DDPM sampling (DiT's ``p_sample_loop``)."""
    return diffusion.p_sample_loop(model, noise, model_kwargs, clip_denoised=clip_denoised, progress=progress,
                                   generator=generator)


@takes(DDIM_ETA)
def ddim_sampler(diffusion: GaussianDiffusion, model: Model, noise: Tensor,
                 model_kwargs: Mapping[str, Any] | None = None, *, clip_denoised: bool = False,
                 progress: bool = False, generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
    """DDIM sampling (ADM's ``ddim_sample_loop``); option ``eta``."""
    return diffusion.ddim_sample_loop(model, noise, model_kwargs, clip_denoised=clip_denoised, progress=progress,
                                      generator=generator, eta=eta)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_sampler,
    "ddim": ddim_sampler,
}
