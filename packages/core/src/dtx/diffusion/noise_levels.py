"""The noise-level contract: what a backbone receives besides ``x``, whatever objective trains it.

A model declares ``noise_input`` (see ``dtx.interface``):

- ``"c_noise"``: EDM's and k-diffusion's ``c_noise = ln(sigma) / 4`` (Karras et al. 2022, Table 1);
- ``"sigma"``: raw sigma (the model maps it itself);
- ``"timestep"``: a DDPM timestep index in ``[0, num_timesteps)``, as DiT's sinusoidal embedding expects.

Gaussian (DDPM) objectives step through timesteps t; a continuous model gets the sigma of that step,
``sigma_t = sqrt((1 - abar_t) / abar_t)``. Sigma-space (EDM) objectives draw sigma; a timestep model gets the
(fractional) timestep whose sigma equals it on a reference DDPM schedule -- DiT's linear betas 1e-4..0.02 over
``num_timesteps`` steps -- by linear interpolation in log sigma (k-diffusion's ``DiscreteSchedule.sigma_to_t``),
clamped to ``[0, num_timesteps - 1]`` (sigma 0.0100..157.4 for the 1000-step schedule). This keeps the embedding
in the range it was designed (or pretrained) for, so an official DiT fine-tunes under EDM without surprise.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .gaussian import linear_beta_schedule

Model = Callable[..., torch.Tensor]


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """EDM's noise conditioning ``ln(sigma) / 4``."""
    return sigma.log() / 4


class DiscreteSigmas:
    """The sigmas ``sqrt((1 - abar_t) / abar_t)`` of a discrete schedule and the maps t <-> sigma between them."""

    def __init__(self, alphas_cumprod: np.ndarray) -> None:
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        self.log_sigmas = torch.from_numpy(0.5 * np.log((1 - abar) / abar))

    @classmethod
    def reference(cls, num_timesteps: int = 1000) -> "DiscreteSigmas":
        """DiT's (and ADM's) linear schedule over ``num_timesteps`` steps."""
        return cls(np.cumprod(1.0 - linear_beta_schedule(num_timesteps)))

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose sigma is ``sigma`` (log-sigma interpolation, clamped to the schedule)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().log().clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo = hi - 1
        w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + w).to(sigma.dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (possibly fractional) timestep ``t``, interpolated in log sigma."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.double().clamp(0, len(log_sigmas) - 1)
        lo = t.floor().long().clamp(max=len(log_sigmas) - 2)
        w = t - lo
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp().float()


class NoiseLevelAdapter:
    """Calls ``model(x, convert(level), **kwargs)``: hands a backbone the noise level it declared."""

    def __init__(self, model: Model, convert: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.model, self.convert = model, convert

    def __call__(self, x: torch.Tensor, level: Any, **kwargs: Any) -> torch.Tensor:
        if self.convert is not None:
            level = self.convert(torch.as_tensor(level, device=x.device))
        return self.model(x, level, **kwargs)


def from_sigma(model: Model, noise_input: str, num_timesteps: int = 1000) -> Model:
    """``model`` behind a sigma-space objective: it is called with sigma converted to what it declared."""
    if noise_input == "sigma":
        return model
    if noise_input == "c_noise":
        return NoiseLevelAdapter(model, c_noise)
    reference = DiscreteSigmas.reference(num_timesteps)
    return NoiseLevelAdapter(model, reference.sigma_to_t)


def from_timestep(model: Model, noise_input: str, alphas_cumprod: np.ndarray) -> Model:
    """``model`` behind a DDPM objective (called with original-schedule timesteps) converted to what it declared."""
    if noise_input == "timestep":
        return model
    sigmas = DiscreteSigmas(alphas_cumprod)
    if noise_input == "sigma":
        return NoiseLevelAdapter(model, sigmas.t_to_sigma)
    return NoiseLevelAdapter(model, lambda t: c_noise(sigmas.t_to_sigma(t)))
