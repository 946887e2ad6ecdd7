"""Flow matching (rectified flow, SiT's interpolants): paths, prediction conversions, losses and time sampling.

One convention throughout: flow time t in [0, 1] with t = 0 at the data and t = 1 at the noise (as Stable
Diffusion 3, Flux and diffusers' FlowMatch schedulers), a sample on the path is x_t = alpha(t)·x0 + sigma(t)·eps,
and the velocity is v = dx_t/dt = alpha'(t)·x0 + sigma'(t)·eps. SiT runs its time the other way (s = 1 - t, data
at s = 1) and its velocity is dx/ds = -v; ``dtx.diffusion.noise_levels`` converts a model's declared time and
velocity direction at the model's boundary, so nothing here depends on it.

Paths (Ma et al. 2024, "SiT", section 3):

- ``linear`` (rectified flow): alpha = 1 - t, sigma = t;
- ``gvp`` (generalised variance preserving): alpha = cos(pi t / 2), sigma = sin(pi t / 2);
- ``vp`` (the VP SDE's path, beta from 0.1 to 20): ln alpha = -t²(beta_max - beta_min)/4 - t·beta_min/2,
  sigma = sqrt(1 - alpha²).

Predictions: ``velocity`` (v), ``noise`` (eps) or ``score`` (grad log p_t(x) = -eps / sigma); each converts to v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ..errors import ConfigError

PathName = Literal["linear", "gvp", "vp"]
Prediction = Literal["velocity", "noise", "score"]
LossWeight = Literal["none", "velocity", "likelihood"]
PATHS: tuple[str, ...] = get_args(PathName)
PREDICTIONS: tuple[str, ...] = get_args(Prediction)
LOSS_WEIGHTS: tuple[str, ...] = get_args(LossWeight)


@dataclass(frozen=True)
class FlowPath:
    """An interpolant x_t = alpha(t)·x0 + sigma(t)·eps; every method takes t shaped to broadcast against x."""

    name: PathName = "linear"
    beta_min: float = 0.1  # vp only
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        if self.name not in PATHS:
            raise ConfigError(f"unknown flow path {self.name!r}; choose one of {', '.join(PATHS)}")

    def alpha(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), alpha'(t)): the data coefficient and its time derivative."""
        if self.name == "linear":
            return 1 - t, -torch.ones_like(t)
        if self.name == "gvp":
            return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)
        alpha = torch.exp(self._log_alpha(t))
        return alpha, alpha * self._d_log_alpha(t)

    def sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma(t), sigma'(t)): the noise coefficient and its time derivative."""
        if self.name == "linear":
            return t, torch.ones_like(t)
        if self.name == "gvp":
            return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)
        alpha2 = torch.exp(2 * self._log_alpha(t))
        sigma = torch.sqrt(1 - alpha2)
        return sigma, -alpha2 * self._d_log_alpha(t) / sigma

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _d_log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min

    def noise_to_signal(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) / alpha(t): the EDM sigma of the same noise level (t / (1 - t) on the linear path)."""
        return self.sigma(t)[0] / self.alpha(t)[0]

    def drift_var(self, t: torch.Tensor) -> torch.Tensor:
        """SiT's diffusion of the path's SDE, sigma·sigma' - (alpha'/alpha)·sigma² (the SBDM coefficient; it also
        sets SiT's loss weights). The vp path gives beta(t)/2 exactly, without dividing by sigma."""
        if self.name == "vp":
            return 0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        return sigma * d_sigma - d_alpha / alpha * sigma**2

    def sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, v_t) for data ``x0``, noise ``eps`` and per-element times ``t``."""
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        return alpha * x0 + sigma * noise, d_alpha * x0 + d_sigma * noise

    def velocity(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, prediction: Prediction) -> torch.Tensor:
        """The velocity a ``prediction`` implies at (x, t): eps gives x0 = (x - sigma·eps)/alpha, then v."""
        if prediction == "velocity":
            return output
        sigma, d_sigma = self.sigma(t)
        noise = output if prediction == "noise" else -sigma * output
        alpha, d_alpha = self.alpha(t)
        return d_alpha * (x - sigma * noise) / alpha + d_sigma * noise

    def noise_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (alpha·v - alpha'·x) / (alpha·sigma' - alpha'·sigma): the noise a velocity implies."""
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        return (alpha * v - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) = -eps / sigma for the eps the velocity implies."""
        return -self.noise_from_velocity(v, x, t) / self.sigma(t)[0]


def flow_loss(path: FlowPath, output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              prediction: Prediction, weight: LossWeight = "none") -> torch.Tensor:
    """Per-sample loss, SiT's: velocity models regress v (unweighted); noise models regress eps and score models
    sigma·score + eps, weighted by 1, (drift_var/sigma)² (``velocity``) or drift_var/sigma² (``likelihood``)."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1)))
    _, target_v = path.sample(x0, noise, t)
    if prediction == "velocity":
        if weight != "none":
            raise ConfigError(f"objective.loss_weight {weight!r} applies to noise and score predictions; a velocity "
                              "model's loss is unweighted (as SiT's)")
        return (output - target_v).pow(2).flatten(1).mean(1)
    sigma = path.sigma(t)[0]
    error = output - noise if prediction == "noise" else output * sigma + noise
    if weight == "none":
        w = torch.ones_like(sigma)
    elif weight == "velocity":
        w = (path.drift_var(t) / sigma) ** 2
    else:
        w = path.drift_var(t) / sigma**2
    return (w * error.pow(2)).flatten(1).mean(1)


# --- time: the interval SiT trains and samples on, training draws, the shift, sampling grids ---------------------

def time_interval(path: FlowPath, prediction: Prediction, eps: float, sde: bool = False) -> tuple[float, float]:
    """(t_lo, t_hi), the times a model is trained and sampled on, as SiT's ``check_interval``: the vp path keeps
    ``eps`` from the data end (sigma' is singular there); linear and gvp keep ``eps`` from both ends for noise and
    score models (x0 divides by alpha, the score by sigma), from the noise end for the SDE (at least 1e-3 there), and
    none for velocity."""
    if path.name == "vp":
        return eps, 1.0
    if prediction != "velocity":
        return eps, 1.0 - eps
    # the SDE starts at least 1e-3 from the noise, where SiT's SBDM coefficient is infinite on the linear path
    return (0.0, 1.0 - max(eps, 1e-3)) if sde else (0.0, 1.0)


def default_eps(path: FlowPath, prediction: Prediction, training: bool) -> float:
    """SiT's defaults: vp 1e-5 (training) / 1e-3 (sampling); noise or score on linear/gvp 1e-3; else 0."""
    if path.name == "vp":
        return 1e-5 if training else 1e-3
    return 1e-3 if prediction != "velocity" else 0.0


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift t' = s·t / (1 + (s - 1)·t): s > 1 spends more time near the noise (Esser et al. 2024)."""
    return shift * t / (1 + (shift - 1) * t)


def shift_for_tokens(tokens: int, base_shift: float = 0.5, max_shift: float = 1.15, base_tokens: int = 256,
                     max_tokens: int = 4096) -> float:
    """Flux's shift from the sequence length: exp(mu), mu linear in the token count through (256, 0.5) and
    (4096, 1.15)."""
    mu = base_shift + (max_shift - base_shift) * (tokens - base_tokens) / (max_tokens - base_tokens)
    return math.exp(mu)


def sample_times(n: int, kind: str, generator: torch.Generator | None = None, t_mean: float = 0.0,
                 t_std: float = 1.0, shift: float = 1.0, interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Training times: ``uniform`` on the interval, ``logit-normal`` (t = sigmoid(N(t_mean, t_std²)), SD3's
    default m = 0, s = 1) or ``shift`` (uniform, then ``shift_time``); each mapped into ``interval``."""
    if kind == "uniform" or kind == "shift":
        u = torch.rand(n, generator=generator)
        if kind == "shift":
            u = shift_time(u, shift)
    elif kind == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=generator) * t_std + t_mean)
    else:
        raise ConfigError(f"objective.t_sample must be one of uniform, logit-normal, shift, got {kind!r}")
    lo, hi = interval
    return lo + (hi - lo) * u


def time_grid(steps: int, shift: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
              device: torch.device | str = "cpu") -> torch.Tensor:
    """``steps + 1`` decreasing times from the noise end of ``interval`` to its data end, evenly spaced then
    shifted (SD3/Flux sample on the shifted grid they train on)."""
    if steps < 1:
        raise ConfigError(f"a flow time grid needs steps >= 1, got {steps}")
    lo, hi = interval
    u = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    return (lo + (hi - lo) * u).to(device)


@dataclass(frozen=True)
class FlowSchedule:
    """What a flow sampler walks: the decreasing ``times`` (noise end first) and the ``path`` (for the SDE's
    score and diffusion)."""

    times: torch.Tensor
    path: FlowPath

