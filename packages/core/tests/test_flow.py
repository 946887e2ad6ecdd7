"""Flow matching against closed forms: SiT's three paths (alpha, sigma, drift variance written out here), the
training targets and losses for fixed data, noise and times, the samplers on velocity fields whose ODE/SDE solution
is known, SD3's time shift and Flux's token rule, and the noise-level contract for flow-time models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dtx.data.info import DataInfo
from dtx.diffusion import flow, flow_samplers
from dtx.diffusion.noise_levels import from_flow_time
from dtx.errors import ConfigError
from dtx.training.config import ObjectiveConfig
from dtx.training.objectives import FlowObjective

T = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.95], dtype=torch.float64)
B_MIN, B_MAX = 0.1, 20.0


def closed_form(path: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(alpha, sigma, d alpha/dt, d sigma/dt, drift variance) of SiT's paths in flow time t (1 at the noise)."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t), t / (1 - t)
    if path == "gvp":
        a, s = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
        return a, s, -math.pi / 2 * s, math.pi / 2 * a, math.pi / 2 * torch.tan(math.pi * t / 2)
    beta = B_MIN + t * (B_MAX - B_MIN)
    a = torch.exp(-t**2 * (B_MAX - B_MIN) / 4 - t * B_MIN / 2)
    s = torch.sqrt(1 - a**2)
    return a, s, -a * beta / 2, a**2 * beta / (2 * s), beta / 2


@pytest.mark.parametrize("path", flow.PATHS)
def test_path_coefficients_and_targets_match_the_closed_forms(path):
    p = flow.FlowPath(path)
    a, s, da, ds, var = closed_form(path, T)
    torch.testing.assert_close(p.alpha(T), (a, da))
    torch.testing.assert_close(p.sigma(T), (s, ds))
    torch.testing.assert_close(p.drift_var(T), var)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x_t, v = p.sample(x0, eps, T[:, None])
    torch.testing.assert_close(x_t, a[:, None] * x0 + s[:, None] * eps)
    torch.testing.assert_close(v, da[:, None] * x0 + ds[:, None] * eps)


@pytest.mark.parametrize("path", flow.PATHS)
@pytest.mark.parametrize("prediction", flow.PREDICTIONS)
def test_losses_match_sit_closed_forms(path, prediction):
    a, s, da, ds, var = (c[:, None] for c in closed_form(path, T))
    gen = torch.Generator().manual_seed(1)
    x0, eps, out = (torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    p = flow.FlowPath(path)
    if prediction == "velocity":
        expected = ((out - (da * x0 + ds * eps)) ** 2).mean(1)
        torch.testing.assert_close(flow.flow_loss(p, out, x0, eps, T, prediction), expected)
        with pytest.raises(ConfigError, match="unweighted"):
            flow.flow_loss(p, out, x0, eps, T, prediction, "likelihood")
        return
    error = out - eps if prediction == "noise" else out * s + eps
    for weight, w in (("none", torch.ones_like(s)), ("velocity", (var / s) ** 2), ("likelihood", var / s**2)):
        torch.testing.assert_close(flow.flow_loss(p, out, x0, eps, T, prediction, weight), (w * error**2).mean(1))


@pytest.mark.parametrize("path", flow.PATHS)
@pytest.mark.parametrize("prediction", ["noise", "score"])
def test_each_prediction_of_the_true_noise_gives_the_true_velocity(path, prediction):
    a, s, da, ds, _ = (c[:, None] for c in closed_form(path, T))
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x_t = a * x0 + s * eps
    out = eps if prediction == "noise" else -eps / s
    p = flow.FlowPath(path)
    torch.testing.assert_close(p.velocity(out, x_t, T[:, None], prediction), da * x0 + ds * eps)
    torch.testing.assert_close(p.score_from_velocity(da * x0 + ds * eps, x_t, T[:, None]), -eps / s)


def test_time_shift_is_sd3s_formula_and_the_token_rule_is_fluxs():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(flow.shift_time(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert flow.shift_for_tokens(256) == pytest.approx(math.exp(0.5))
    assert flow.shift_for_tokens(4096) == pytest.approx(math.exp(1.15))
    grid = flow.time_grid(4, shift=3.0)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64))


def test_training_time_draws():
    gen = torch.Generator().manual_seed(0)
    u = flow.sample_times(100_000, "uniform", gen, interval=(0.2, 0.6))
    assert 0.2 <= u.min() and u.max() <= 0.6 and u.mean().item() == pytest.approx(0.4, abs=3e-3)
    ln = flow.sample_times(100_000, "logit-normal", gen, t_mean=1.0, t_std=0.5)
    assert ln.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=3e-3)
    logit = torch.log(ln / (1 - ln))
    assert logit.std().item() == pytest.approx(0.5, abs=5e-3)
    shifted = flow.sample_times(100_000, "shift", gen, shift=3.0)
    # P(t' <= 0.75) = P(u <= 0.5) for s = 3
    assert (shifted <= 0.75).double().mean().item() == pytest.approx(0.5, abs=5e-3)


def _schedule(steps: int, shift: float = 1.0) -> flow.FlowSchedule:
    return flow.FlowSchedule(flow.time_grid(steps, shift), flow.FlowPath("linear"))


def test_flow_euler_lands_on_the_straight_ode_solution():
    """Point-mass data mu: the velocity (x - mu)/t moves every sample on a straight line to mu; Euler steps along
    it exactly, on any grid (here a shifted one)."""
    mu = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    field = lambda x, t: (x - mu) / t[:, None]  # noqa: E731
    grid = flow.time_grid(7, shift=2.5)[:-1]  # stop at the last positive time: x_t = mu + t (x1 - mu)
    out = flow_samplers.flow_euler(field, x1.clone(), flow.FlowSchedule(grid, flow.FlowPath("linear")))
    torch.testing.assert_close(out, mu + grid[-1] * (x1 - mu), atol=1e-5, rtol=0)


def _gaussian_field(m: float, s: float):
    """Data N(m, s²) on the linear path: x_t ~ N((1-t) m, (1-t)² s² + t²); the flow keeps x's standard score."""
    def sd(t):
        return torch.sqrt((1 - t) ** 2 * s**2 + t**2)

    def field(x, t):
        t = t[:, None]
        d_sd = ((t - 1) * s**2 + t) / sd(t)
        return -m + d_sd / sd(t) * (x - (1 - t) * m)

    return field


@pytest.mark.parametrize("sampler,steps,tol", [("flow_heun", 400, 1e-5), ("flow_dopri5", 8, 1e-5)])
def test_ode_samplers_reach_the_gaussian_flow_map(sampler, steps, tol):
    """The flow of N(m, s²) data maps noise z to m + s·z."""
    m, s = 0.7, 0.4
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    fn = getattr(flow_samplers, sampler)
    options = {"atol": 1e-9, "rtol": 1e-9} if sampler == "flow_dopri5" else {}
    out = fn(_gaussian_field(m, s), z.clone(), _schedule(steps), **options)
    torch.testing.assert_close(out, m + s * z, atol=tol, rtol=0)


def test_flow_euler_is_first_order_on_the_curved_flow():
    m, s = 0.7, 0.4
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    errors = [(flow_samplers.flow_euler(_gaussian_field(m, s), z.clone(), _schedule(n)) - (m + s * z)).abs().max()
              for n in (50, 100, 200)]
    assert 1.8 < errors[0] / errors[1] < 2.2 and 1.8 < errors[1] / errors[2] < 2.2


@pytest.mark.parametrize("form", ["sigma", "SBDM", "constant"])
def test_flow_sde_keeps_the_marginal_variance(form):
    """Data N(0, 0.5²): SiT's SDE with any diffusion coefficient ends at variance 0.25 (the prior's is 1)."""
    s = 0.5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, 1, generator=gen, dtype=torch.float64)
    grid = flow.time_grid(200, interval=flow.time_interval(flow.FlowPath("linear"), "velocity", 1e-3, sde=True))
    out = flow_samplers.flow_sde(_gaussian_field(0.0, s), x, flow.FlowSchedule(grid, flow.FlowPath("linear")),
                                 generator=gen, diffusion_form=form)
    assert out.var().item() == pytest.approx(s**2, rel=0.04)
    assert abs(out.mean().item()) < 0.01


# --- the objective: declared time conventions, learned-variance channels, guidance interval ------------------------

class PointMassModel(nn.Module):
    """The exact prediction for data concentrated at ``mu``, in the time convention it declares."""

    channel_dim, in_channels, learn_sigma = 1, 2, False

    def __init__(self, noise_input: str, mu: torch.Tensor, learn_sigma: bool = False) -> None:
        super().__init__()
        self.noise_input, self.mu, self.learn_sigma = noise_input, mu, learn_sigma
        self.out_channels = 4 if learn_sigma else 2
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, level, **cond):
        self.seen.append(level)
        t = {"flow_time": level, "sit_time": 1 - level, "flow_timestep": level / 1000}[self.noise_input]
        t = t.reshape(-1, 1, 1, 1).to(x.dtype)
        eps = (x - (1 - t) * self.mu) / t
        v = eps - self.mu if self.noise_input != "sit_time" else self.mu - eps  # SiT's velocity points to the data
        return torch.cat([v, torch.full_like(v, 1e3)], 1) if self.learn_sigma else v


INFO = DataInfo(channels=2, height=4, width=4)


@pytest.mark.parametrize("noise_input", ["flow_time", "sit_time", "flow_timestep"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_flow_objective_speaks_each_declared_time_convention(noise_input, learn_sigma):
    """The exact prediction has zero loss and samples the data point, whichever way the model counts time; the
    learned-variance channels are ignored."""
    mu = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = PointMassModel(noise_input, mu, learn_sigma).double()
    obj = FlowObjective(ObjectiveConfig(kind="flow"), model, INFO)
    x0 = mu.expand(8, -1, -1, -1)
    loss = obj.loss(model, x0, {}, torch.Generator().manual_seed(0))
    assert loss.abs().max().item() < 1e-12
    out = obj.sample(model, (3, 2, 4, 4), [{}], [], "flow-euler", 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.double(), mu.expand(3, -1, -1, -1), atol=1e-5, rtol=0)
    first = model.seen[-5]  # the first sampling step sees t = 1 in the model's own convention
    assert first.flatten()[0].item() == {"flow_time": 1.0, "sit_time": 0.0, "flow_timestep": 1000.0}[noise_input]


def test_timestep_models_get_the_ddpm_timestep_of_the_same_noise_level():
    """A DDPM-timestep model (DiT) behind flow time t gets the k with sqrt((1 - abar_k)/abar_k) = t / (1 - t) on
    DiT's linear betas (1e-4 .. 0.02, 1000 steps)."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    k = np.array([10, 200, 500, 900])
    sigma = np.sqrt((1 - abar[k]) / abar[k])
    t = torch.tensor(sigma / (1 + sigma))
    seen = []
    net = from_flow_time(lambda x, level: seen.append(level) or x, "timestep", flow.FlowPath("linear"))
    net(torch.zeros(4), t)
    np.testing.assert_allclose(seen[0].numpy(), k, atol=1e-3)


def test_guidance_acts_only_inside_its_interval():
    """A model whose conditional and unconditional velocities differ by 1: guidance scale 3 moves the sample by
    (3 - 1)·(time spent inside the interval)."""
    class Offset(nn.Module):
        channel_dim, in_channels, noise_input = 1, 1, "flow_time"

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y):
            return torch.zeros_like(x) + y.reshape(-1, 1, 1, 1).to(x.dtype)

    model = Offset()
    base = dict(kind="flow")
    conds = [{"y": torch.zeros(1)}, {"y": torch.ones(1)}]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x_all = FlowObjective(ObjectiveConfig(**base), model, INFO).sample(model, (1, 1, 2, 2), conds, [3.0],
                                                                      "flow-euler", 10, gen())
    x_part = FlowObjective(ObjectiveConfig(**base, guidance_interval=[0.0, 0.5]), model, INFO).sample(
        model, (1, 1, 2, 2), conds, [3.0], "flow-euler", 10, gen())
    # Euler from t = 1 to 0 with v = 3 (guided) or 1: x0 = x1 - integral; steps at t = 0.5 .. 0.1 are inside
    torch.testing.assert_close(x_part - x_all, torch.full_like(x_all, (3.0 - 1.0) * 0.5), atol=1e-6, rtol=0)


def test_config_refuses_bad_flow_keys():
    from dtx.training.config import TrainConfig

    for key, value, match in (("path", "cosine", "objective.path"), ("prediction", "x0", "objective.prediction"),
                              ("t_sample", "beta", "objective.t_sample"), ("t_shift", 0.0, "objective.t_shift"),
                              ("guidance_interval", [0.6, 0.2], "objective.guidance_interval"),
                              ("loss_weight", "likelihood", "objective.loss_weight")):
        cfg = TrainConfig(objective=ObjectiveConfig(kind="flow", **{key: value}))
        with pytest.raises(ConfigError, match=match):
            cfg.validate()
