"""Flow-matching samplers in the core's one signature: ``sampler(model, x, schedule, *, generator, progress, **options)``.

``model(x, t·1_N)`` returns the velocity dx/dt in flow time (t = 1 at the noise, 0 at the data; see
``dtx.diffusion.flow``), ``x`` is the noise at ``schedule.times[0]`` and ``schedule.times`` decreases to the data
end. Each sampler is one function naming its method.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import trange

from ..errors import ConfigError
from .flow import FlowPath, FlowSchedule
from .noise import randn_like
from .sampler_api import SamplerOption, takes

Model = Callable[..., torch.Tensor]

DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "tweedie", "euler", "none")


def _times(x: torch.Tensor, schedule: FlowSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule's times in x's dtype and device, and a ones vector to give each step's t to every sample."""
    return schedule.times.to(device=x.device, dtype=x.dtype), x.new_ones([x.shape[0]])


@takes()
@torch.no_grad()
def flow_euler(model: Model, x: torch.Tensor, schedule: FlowSchedule, *, generator: torch.Generator | None = None,
               progress: bool = False) -> torch.Tensor:
    """Euler steps of the flow ODE dx/dt = v(x, t): x_{i+1} = x_i + (t_{i+1} - t_i)·v(x_i, t_i)."""
    times, ones = _times(x, schedule)
    for i in trange(len(times) - 1, disable=not progress):
        x = x + (times[i + 1] - times[i]) * model(x, times[i] * ones)
    return x


@takes()
@torch.no_grad()
def flow_heun(model: Model, x: torch.Tensor, schedule: FlowSchedule, *, generator: torch.Generator | None = None,
              progress: bool = False) -> torch.Tensor:
    """Heun's method (explicit trapezoid, second order) on the flow ODE: an Euler predictor, then the mean of the
    slopes at both ends; two model evaluations per step."""
    times, ones = _times(x, schedule)
    for i in trange(len(times) - 1, disable=not progress):
        h = times[i + 1] - times[i]
        d = model(x, times[i] * ones)
        x_pred = x + h * d
        x = x + h * (d + model(x_pred, times[i + 1] * ones)) / 2
    return x


def diffusion_coefficient(path: FlowPath, t: torch.Tensor, form: str, norm: float) -> torch.Tensor:
    """SiT's diffusion coefficient w(t) of the sampling SDE, in flow time t (SiT's s = 1 - t)."""
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "SBDM":
        return norm * path.drift_var(t)
    if form == "sigma":
        return norm * path.sigma(t)[0]
    if form == "linear":
        return norm * t
    if form == "decreasing":
        return 0.25 * (1 - norm * torch.cos(math.pi * t)) ** 2
    if form == "increasing-decreasing":
        return norm * torch.sin(math.pi * t) ** 2
    raise ConfigError(f"unknown diffusion form {form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")


@takes(SamplerOption("diffusion_form", str, choices=DIFFUSION_FORMS), SamplerOption("diffusion_norm", float, 0.0, 100.0),
       SamplerOption("last_step", str, choices=LAST_STEPS))
@torch.no_grad()
def flow_sde(model: Model, x: torch.Tensor, schedule: FlowSchedule, *, generator: torch.Generator | None = None,
             progress: bool = False, diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
             last_step: str = "mean") -> torch.Tensor:
    """Euler-Maruyama on SiT's sampling SDE, which keeps the path's marginals for any w(t) >= 0: towards the data,
    dx = [-v + w(t)·score] dh + sqrt(2 w(t)) dW with h = -t; the score comes from the velocity. The last interval
    is SiT's last step: ``mean`` (the drift without noise), ``tweedie`` (E[x0 | x] = (x + sigma²·score)/alpha),
    ``euler`` (an ODE step) or ``none``."""
    times, ones = _times(x, schedule)
    path = schedule.path
    n = len(times) - 1
    for i in trange(n, disable=not progress):
        t = times[i] * ones
        h = times[i] - times[i + 1]
        v = model(x, t)
        t_b = t.reshape(-1, *([1] * (x.ndim - 1)))
        w = diffusion_coefficient(path, t_b, diffusion_form, diffusion_norm)
        drift = -v + w * path.score_from_velocity(v, x, t_b)
        if i < n - 1:
            x = x + drift * h + torch.sqrt(2 * w * h) * randn_like(x, generator)
        elif last_step == "mean":
            x = x + drift * h
        elif last_step == "tweedie":
            alpha, sigma = path.alpha(t_b)[0], path.sigma(t_b)[0]
            x = (x + sigma**2 * path.score_from_velocity(v, x, t_b)) / alpha
        elif last_step == "euler":
            x = x - v * h
    return x


@takes(SamplerOption("atol", float, 0.0, 1.0), SamplerOption("rtol", float, 0.0, 1.0))
@torch.no_grad()
def flow_dopri5(model: Model, x: torch.Tensor, schedule: FlowSchedule, *, generator: torch.Generator | None = None,
                progress: bool = False, atol: float = 1e-6, rtol: float = 1e-3) -> torch.Tensor:
    """Dormand-Prince 5(4), the adaptive Runge-Kutta solver SiT samples with by default (torchdiffeq's ``dopri5``),
    from the first to the last time of the schedule; the step count is the solver's own."""
    from torchdiffeq import odeint

    times, ones = _times(x, schedule)

    def velocity(t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return model(x_t, t * ones)

    return odeint(velocity, x, times[[0, -1]], method="dopri5", atol=atol, rtol=rtol)[-1]


SAMPLERS: dict[str, Callable[..., Any]] = {
    "flow-euler": flow_euler,
    "flow-heun": flow_heun,
    "flow-sde": flow_sde,
    "flow-dopri5": flow_dopri5,
}
