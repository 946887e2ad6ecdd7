"""The noise-level contract: what a backbone receives besides ``x``, whatever objective trains it.

A model declares ``noise_input`` (see ``dtx.interface``):

- ``"c_noise"``: EDM's and k-diffusion's ``c_noise = ln(sigma) / 4`` (Karras et al. 2022, Table 1);
- ``"sigma"``: raw sigma (the model maps it itself);
- ``"timestep"``: a DDPM timestep index in ``[0, num_timesteps)``, as DiT's sinusoidal embedding expects;
- ``"flow_time"``, ``"sit_time"``, ``"flow_timestep"``: flow time t (1 at the noise), 1 - t (SiT's, 1 at the data)
  or 1000·t (see ``dtx.diffusion.flow``).

Gaussian (DDPM) objectives step through timesteps t; a continuous model gets the sigma of that step,
``sigma_t = sqrt((1 - abar_t) / abar_t)``. Sigma-space (EDM) objectives draw sigma; a timestep model gets the
(fractional) timestep whose sigma equals it on a reference DDPM schedule -- DiT's linear betas 1e-4..0.02 over
``num_timesteps`` steps -- by linear interpolation in log sigma (k-diffusion's ``DiscreteSchedule.sigma_to_t``),
clamped to ``[0, num_timesteps - 1]`` (sigma 0.0100..157.4 for the 1000-step schedule). This keeps the embedding
in the range it was designed (or pretrained) for, so an official DiT fine-tunes under EDM without surprise.

Flow-matching objectives draw flow time t on a path; a sigma-conditioned model gets the path's noise-to-signal ratio
sigma(t)/alpha(t) (clamped to [1e-4, 1e4]), a timestep model that ratio's timestep. The other way, a flow-time model behind a sigma or DDPM
objective gets the rectified-flow time of that sigma, t = sigma / (1 + sigma) (x_t / alpha(t) = x0 + sigma·eps).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .flow import FlowPath
from .gaussian import linear_beta_schedule

Model = Callable[..., torch.Tensor]
FLOW_TIMES = ("flow_time", "sit_time", "flow_timestep")


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


def flow_time_as(t: torch.Tensor, noise_input: str) -> torch.Tensor:
    """Flow time t (1 at the noise) in one of the declared flow-time conventions."""
    if noise_input == "sit_time":
        return 1 - t
    return t * 1000 if noise_input == "flow_timestep" else t


def velocity_sign(noise_input: str) -> float:
    """-1 where the model's time runs towards the data (SiT's dx/ds = -dx/dt), else 1."""
    return -1.0 if noise_input == "sit_time" else 1.0


def _from_sigma(noise_input: str, num_timesteps: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """sigma -> what a model declared (None: sigma itself)."""
    if noise_input == "sigma":
        return None
    if noise_input in FLOW_TIMES:
        return lambda sigma: flow_time_as(_rf_time(sigma), noise_input)
    if noise_input == "c_noise":
        return c_noise
    return DiscreteSigmas.reference(num_timesteps).sigma_to_t


def from_flow_time(model: Model, noise_input: str, path: FlowPath, num_timesteps: int = 1000) -> Model:
    """``model`` behind a flow objective (called with flow time t) converted to what it declared."""
    if noise_input == "flow_time":
        return model
    if noise_input in FLOW_TIMES:
        return NoiseLevelAdapter(model, lambda t: flow_time_as(t, noise_input))
    convert = _from_sigma(noise_input, num_timesteps) or (lambda sigma: sigma)
    # the ends (sigma 0 at the data, inf at the noise on the linear path) clamped to a finite, embeddable range
    return NoiseLevelAdapter(model, lambda t: convert(path.noise_to_signal(t).clamp(1e-4, 1e4)))


def from_sigma(model: Model, noise_input: str, num_timesteps: int = 1000) -> Model:
    """``model`` behind a sigma-space objective: it is called with sigma converted to what it declared."""
    convert = _from_sigma(noise_input, num_timesteps)
    return model if convert is None else NoiseLevelAdapter(model, convert)


def from_timestep(model: Model, noise_input: str, alphas_cumprod: np.ndarray) -> Model:
    """``model`` behind a DDPM objective (called with original-schedule timesteps) converted to what it declared."""
    if noise_input == "timestep":
        return model
    sigmas = DiscreteSigmas(alphas_cumprod)
    if noise_input == "sigma":
        return NoiseLevelAdapter(model, sigmas.t_to_sigma)
    if noise_input in FLOW_TIMES:
        return NoiseLevelAdapter(model, lambda t: flow_time_as(_rf_time(sigmas.t_to_sigma(t)), noise_input))
    return NoiseLevelAdapter(model, lambda t: c_noise(sigmas.t_to_sigma(t)))


def _rf_time(sigma: torch.Tensor) -> torch.Tensor:
    return sigma / (1 + sigma)
