"""Continuous sigma-space diffusion (EDM / k-diffusion, as trained by HDiT): preconditioning, loss weightings,
σ sampling for training, σ schedules for sampling, and the samplers (defined in ``samplers.py``, re-exported here).

Data are noised as x̃ = x₀ + σ·n. The network F sees c_in·x̃ and the raw σ (it applies c_noise = ln σ / 4 itself);
the denoiser is D(x̃; σ) = c_skip·x̃ + c_out·F(c_in·x̃, σ).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, ShapeError
from .samplers import (
    SAMPLERS, get_ancestral_step, gaussian_noise_sampler, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde,
    sample_euler, sample_euler_ancestral, sample_heun, to_d,
)

Weighting = Callable[[torch.Tensor], torch.Tensor]
Shape = int | Sequence[int]

__all__ = [
    "SAMPLERS", "SCHEDULES", "WEIGHTINGS", "Denoiser", "get_ancestral_step", "get_sigmas_exponential",
    "get_sigmas_karras", "get_sigmas_polyexponential", "gaussian_noise_sampler", "make_weighting",
    "rand_cosine_interpolated", "rand_log_normal", "rand_log_uniform", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde", "sample_euler", "sample_euler_ancestral", "sample_heun", "stratified_uniform", "to_d",
    "weighting_karras", "weighting_min_snr", "weighting_snr", "weighting_soft_min_snr",
]


# --- loss weightings: w(σ) multiplies the F-space MSE; w_F = c_out² · w_D converts a D-space weighting ---------

def weighting_karras(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM: w_F = 1 (the D-space weight 1/c_out² equalises the F-target's variance)."""
    return torch.ones_like(sigma)


def weighting_snr(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """SNR: D-space 1/σ², i.e. F-space σd²/(σ² + σd²)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def weighting_soft_min_snr(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """HDiT's soft-min-SNR: D-space 1/(σ² + σd²) (γ = σd⁻²), i.e. F-space (σ·σd)²/(σ² + σd²)²."""
    return (sigma * sigma_data) ** 2 / (sigma**2 + sigma_data**2) ** 2


def weighting_min_snr(sigma: torch.Tensor, sigma_data: float, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-γ (Hang et al., default γ = 5): D-space min(1/σ², γ), i.e. F-space σd²·min(1, γσ²)/(σ² + σd²)."""
    return sigma_data**2 * torch.clamp(gamma * sigma**2, max=1.0) / (sigma**2 + sigma_data**2)


def make_weighting(weighting: str | Weighting, sigma_data: float, **options: Any) -> Weighting:
    """Resolve a weighting name (with its options, e.g. ``gamma`` for min-snr) or a callable ``w(σ)`` to ``w(σ)``."""
    if callable(weighting):
        if options:
            raise ConfigError(f"weighting options {sorted(options)} only apply to named weightings, not a callable")
        return weighting
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(sorted(WEIGHTINGS))}")
    fn = WEIGHTINGS[weighting]
    try:
        inspect.signature(fn).bind(None, sigma_data, **options)
    except TypeError:
        accepted = [p for p in inspect.signature(fn).parameters if p not in ("sigma", "sigma_data")]
        raise ConfigError(f"loss weighting {weighting!r} accepts options {accepted}, got {sorted(options)}") from None
    return functools.partial(fn, sigma_data=sigma_data, **options)


# --- preconditioning ------------------------------------------------------------------------------------------

def _sigma_vector(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ as a float vector of length N = x.shape[0] (a scalar is shared by the whole batch)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, x.shape[0])):
        raise ShapeError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma.expand(x.shape[0]).contiguous()


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[N] -> [N, 1, ..., 1] with ``ndim`` dims, to broadcast over images, videos or tokens alike."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


class Denoiser(nn.Module):
    """EDM preconditioning around a network F(c_in·x, σ, **cond); D(x; σ) = c_skip·x + c_out·F.

    ``weighting`` names an entry of ``WEIGHTINGS`` (extra keywords such as ``gamma=`` are its options) or is a
    callable ``w(σ)`` on F-space. The inner model receives the raw σ as an [N] vector.
    """

    def __init__(self, inner_model: nn.Module, sigma_data: float = 0.5, weighting: str | Weighting = "karras",
                 **weighting_options: Any) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ConfigError(f"sigma_data must be positive, got {sigma_data}")
        self.inner_model = inner_model
        self.sigma_data = float(sigma_data)
        self.weighting = make_weighting(weighting, self.sigma_data, **weighting_options)

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) = (σd²/(σ²+σd²), σ·σd/√(σ²+σd²), 1/√(σ²+σd²)), shaped like ``sigma``."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
        c_in = 1 / (sigma**2 + sd2) ** 0.5
        return c_skip, c_out, c_in

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = _sigma_vector(sigma, x)
        c_skip, c_out, c_in = (_per_sample(c, x.ndim) for c in self.get_scalings(sigma))
        return self.inner_model(x * c_in, sigma, **cond) * c_out + x * c_skip

    def loss(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        """Per-sample weighted F-space MSE: mean over non-batch dims of (F − (x₀ − c_skip·x̃)/c_out)², times w(σ)."""
        if noise.shape != x0.shape:
            raise ShapeError(f"noise shape {tuple(noise.shape)} differs from data shape {tuple(x0.shape)}")
        sigma = _sigma_vector(sigma, x0)
        c_skip, c_out, c_in = (_per_sample(c, x0.ndim) for c in self.get_scalings(sigma))
        noised = x0 + noise * _per_sample(sigma, x0.ndim)
        output = self.inner_model(noised * c_in, sigma, **cond)
        target = (x0 - c_skip * noised) / c_out
        return (output - target).pow(2).flatten(1).mean(1) * self.weighting(sigma)


# --- σ sampling for training ------------------------------------------------------------------------------------

def _shape(shape: Shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def stratified_uniform(shape: Shape, group: int = 0, groups: int = 1, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """U(0,1) with one draw per stratum along the last dim; ``groups`` strata sets interleave across ranks/steps."""
    if groups < 1 or not 0 <= group < groups:
        raise ConfigError(f"stratified sampling needs 0 <= group < groups, got group={group}, groups={groups}")
    shape = _shape(shape)
    n = shape[-1] * groups
    offsets = torch.arange(group, n, groups, device=device, dtype=dtype)
    return (offsets + torch.rand(shape, generator=generator, device=device, dtype=dtype)) / n


def rand_log_normal(shape: Shape, loc: float = 0.0, scale: float = 1.0, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """σ with ln σ ~ N(loc, scale²) (EDM uses loc −1.2, scale 1.2)."""
    return (torch.randn(_shape(shape), generator=generator, device=device, dtype=dtype) * scale + loc).exp()


def rand_log_uniform(shape: Shape, min_value: float, max_value: float, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """σ with ln σ uniform on [ln min_value, ln max_value]."""
    if not 0 < min_value <= max_value:
        raise ConfigError(f"log-uniform sigma needs 0 < min_value <= max_value, got {min_value}, {max_value}")
    lo, hi = math.log(min_value), math.log(max_value)
    return (torch.rand(_shape(shape), generator=generator, device=device, dtype=dtype) * (hi - lo) + lo).exp()


def _logsnr_cosine_shifted(u: torch.Tensor, shift: float, logsnr_lo: float, logsnr_hi: float) -> torch.Tensor:
    """Cosine logSNR schedule from logsnr_hi (u = 0) to logsnr_lo (u = 1), shifted by ``shift`` (endpoints kept)."""
    t_min = math.atan(math.exp(-0.5 * (logsnr_hi - shift)))
    t_max = math.atan(math.exp(-0.5 * (logsnr_lo - shift)))
    return -2 * torch.log(torch.tan(t_min + u * (t_max - t_min))) + shift


def rand_cosine_interpolated(shape: Shape, image_d: float, noise_d_low: float, noise_d_high: float,
                             sigma_data: float = 1.0, min_value: float = 1e-3, max_value: float = 1e3,
                             generator: torch.Generator | None = None, stratified: bool = False, group: int = 0,
                             groups: int = 1, device: torch.device | str = "cpu",
                             dtype: torch.dtype | None = None) -> torch.Tensor:
    """HDiT's σ sampler: logSNR = lerp(cosine shifted to noise_d_low, cosine shifted to noise_d_high, u).

    Each cosine schedule is shifted by 2·ln(noise_d/image_d) and spans σ ∈ [min_value, max_value];
    σ = σd·exp(−logSNR/2). ``stratified`` draws u per stratum (see ``stratified_uniform``).
    """
    if not 0 < min_value < max_value:
        raise ConfigError(f"cosine-interpolated sigma needs 0 < min_value < max_value, got {min_value}, {max_value}")
    if min(image_d, noise_d_low, noise_d_high, sigma_data) <= 0:
        raise ConfigError("cosine-interpolated sigma needs positive image_d, noise_d_low, noise_d_high and sigma_data")
    if stratified:
        u = stratified_uniform(shape, group, groups, generator=generator, device=device, dtype=dtype)
    else:
        u = torch.rand(_shape(shape), generator=generator, device=device, dtype=dtype)
    logsnr_lo = -2 * math.log(max_value / sigma_data)
    logsnr_hi = -2 * math.log(min_value / sigma_data)
    low = _logsnr_cosine_shifted(u, 2 * math.log(noise_d_low / image_d), logsnr_lo, logsnr_hi)
    high = _logsnr_cosine_shifted(u, 2 * math.log(noise_d_high / image_d), logsnr_lo, logsnr_hi)
    sigma = torch.exp(-torch.lerp(low, high, u) / 2) * sigma_data
    return sigma.clamp(min_value, max_value)


# --- σ schedules for sampling (decreasing, with a final 0) ------------------------------------------------------

def _check_range(n: int, sigma_min: float, sigma_max: float, allow_zero_min: bool = False) -> None:
    if n < 1:
        raise ConfigError(f"a sigma schedule needs n >= 1 steps, got {n}")
    low_ok = sigma_min >= 0 if allow_zero_min else sigma_min > 0
    if not low_ok or not sigma_min <= sigma_max:
        bound = "0 <=" if allow_zero_min else "0 <"
        raise ConfigError(f"a sigma schedule needs {bound} sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """EDM schedule σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i < n, then 0."""
    _check_range(n, sigma_min, sigma_max, allow_zero_min=True)
    ramp = torch.linspace(0, 1, n, device=device, dtype=dtype)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device: torch.device | str = "cpu",
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """n σ evenly spaced in ln σ from σ_max to σ_min, then 0."""
    _check_range(n, sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device, dtype=dtype).exp())


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                               device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """ln σ_i = ln σ_min + (1 − i/(n−1))^ρ·(ln σ_max − ln σ_min), then 0 (ρ = 1 is the exponential schedule)."""
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, device=device, dtype=dtype) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


# --- registrations (``dtx.builtin`` registers these) ------------------------------------------------------------

WEIGHTINGS: dict[str, Callable[..., torch.Tensor]] = {
    "karras": weighting_karras,
    "snr": weighting_snr,
    "soft-min-snr": weighting_soft_min_snr,
    "min-snr": weighting_min_snr,
}

SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "karras": get_sigmas_karras,
    "exponential": get_sigmas_exponential,
    "polyexponential": get_sigmas_polyexponential,
}
