"""Sigma-space ODE/SDE samplers with k-diffusion's calling convention (re-exported by ``dtx.diffusion.karras``).

``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None, **opts)``: ``x`` is already
noise·σ_max, ``sigmas`` is a decreasing 1-D schedule (usually ending in 0) and ``model(x, σ·1_N, **extra_args)``
returns the denoised D(x; σ). The update rules are k-diffusion's (``k_diffusion/sampling.py``).

Stochastic samplers draw their noise as independent standard Gaussians from ``generator`` (k-diffusion's SDE solvers
default to a Brownian-tree noise sampler instead, which needs torchsde). Independent per-step draws are a valid
noise sampler for these solvers because each step only needs the increment over (σ_i, σ_{i+1}], and increments over
disjoint intervals are independent; samples therefore have the same law, but one seed does not reproduce
k-diffusion's samples, and they change with the step count. A custom ``noise_sampler(σ, σ_next)`` may be passed.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import trange

from ..errors import ConfigError, ShapeError
from .noise import randn_like
from .sampler_api import SamplerOption, takes

Model = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], Any]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The options users may set (``sample.sampler_options`` / ``--sampler-option``), with the ranges in which every step
# stays finite: noise scales and eta of at most 100 (k-diffusion's use 0..1), churn and the churn window >= 0.
ETA = SamplerOption("eta", float, 0.0, 100.0)
S_NOISE = SamplerOption("s_noise", float, 0.0, 100.0)
CHURN = (SamplerOption("s_churn", float, low=0.0), SamplerOption("s_tmin", float, low=0.0),
         SamplerOption("s_tmax", float, 0.0, math.inf), S_NOISE)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dσ = (x − D(x; σ)) / σ."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                       eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_down, σ_up) of an ancestral step: deterministic step to σ_down, then fresh noise of std σ_up.

    σ_up = min(σ_to, η·σ_to·√(σ_from² − σ_to²)/σ_from) and σ_down² + σ_up² = σ_to².
    """
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def gaussian_noise_sampler(x: torch.Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Noise sampler returning independent N(0, I) draws shaped like ``x`` (σ arguments are ignored)."""
    def sample(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return randn_like(x, generator)

    return sample


def _prepare(x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas on x's device, at least float32 and at least x's precision; plus the all-ones batch vector."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1:
        raise ShapeError(f"sigmas must be a 1-D schedule, got shape {tuple(sigmas.shape)}")
    dtype = torch.promote_types(torch.promote_types(sigmas.dtype, x.dtype), torch.float32)
    sigmas = sigmas.to(device=x.device, dtype=dtype)
    return sigmas, sigmas.new_ones([x.shape[0]])


def _churn(x: torch.Tensor, sigma: torch.Tensor, n_steps: int, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM stochastic churn: raise σ to σ̂ = σ(1 + γ) by adding noise of std √(σ̂² − σ²) (γ = 0 outside [tmin, tmax])."""
    gamma = min(s_churn / n_steps, math.sqrt(2.0) - 1.0) if s_tmin <= float(sigma) <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1.0)
    if gamma > 0:
        eps = randn_like(x, generator) * s_noise
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _churned_slope(model: Model, x: torch.Tensor, sigmas: torch.Tensor, i: int, s_in: torch.Tensor, extra_args: dict,
                   callback: Callback | None, churn: tuple[float, float, float, float],
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared first stage of Euler and Heun: churn, denoise at σ̂, report; returns (x̂, σ̂, dx/dσ at x̂)."""
    x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, *churn, generator)
    denoised = model(x, sigma_hat * s_in, **extra_args)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
    return x, sigma_hat, to_d(x, sigma_hat, denoised)


@takes(*CHURN)
@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, disable: bool | None = None,
                 generator: torch.Generator | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (EDM Algorithm 2 with churn, first order)."""
    extra_args = extra_args or {}
    sigmas, s_in = _prepare(x, sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat, d = _churned_slope(model, x, sigmas, i, s_in, extra_args, callback,
                                         (s_churn, s_tmin, s_tmax, s_noise), generator)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@takes(ETA, S_NOISE)
@torch.no_grad()
def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callback | None = None, disable: bool | None = None,
                           generator: torch.Generator | None = None, eta: float = 1.0, s_noise: float = 1.0,
                           noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral Euler: Euler step to σ_down, then add noise of std σ_up (``eta`` scales the stochasticity)."""
    extra_args = extra_args or {}
    sigmas, s_in = _prepare(x, sigmas)
    noise_sampler = noise_sampler or gaussian_noise_sampler(x, generator)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@takes(*CHURN)
@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None,
                generator: torch.Generator | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (EDM Algorithm 2); the final step to σ = 0 is a plain Euler step."""
    extra_args = extra_args or {}
    sigmas, s_in = _prepare(x, sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat, d = _churned_slope(model, x, sigmas, i, s_in, extra_args, callback,
                                         (s_churn, s_tmin, s_tmax, s_noise), generator)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@takes()
@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, disable: bool | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep in λ = −ln σ; first and last (σ → 0) steps are first order."""
    extra_args = extra_args or {}
    sigmas, s_in = _prepare(x, sigmas)
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


@takes(ETA, S_NOISE, SamplerOption("solver_type", str, choices=("heun", "midpoint")))
@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None,
                        generator: torch.Generator | None = None, eta: float = 1.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None, solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE; ``eta = 0`` makes it deterministic, ``solver_type`` picks the second-order correction."""
    if solver_type not in ("heun", "midpoint"):
        raise ConfigError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    extra_args = extra_args or {}
    sigmas, s_in = _prepare(x, sigmas)
    noise_sampler = noise_sampler or gaussian_noise_sampler(x, generator)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                phi_1 = -torch.expm1(-h - eta_h)
                if solver_type == "heun":
                    x = x + (phi_1 / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi_1 * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] \
                    * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@takes(ETA, S_NOISE)
@torch.no_grad()
def sample_dpmpp_3m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None,
                        generator: torch.Generator | None = None, eta: float = 1.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (HDiT paper's sampler); warms up with first- and second-order steps."""
    extra_args = extra_args or {}
    sigmas, s_in = _prepare(x, sigmas)
    noise_sampler = noise_sampler or gaussian_noise_sampler(x, generator)
    denoised_1, denoised_2 = None, None
    h_1, h_2 = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
            phi_2 = torch.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] \
                    * (-torch.expm1(-2 * h * eta)).sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler-ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp-2m": sample_dpmpp_2m,
    "dpmpp-2m-sde": sample_dpmpp_2m_sde,
    "dpmpp-3m-sde": sample_dpmpp_3m_sde,
}
