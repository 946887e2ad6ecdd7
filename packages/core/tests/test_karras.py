"""EDM preconditioning, weightings, σ sampling, schedules and samplers against closed forms.

Gaussian toy: data ~ N(μ, s²) has the exact denoiser D(x, σ) = (s²x + σ²μ)/(s² + σ²), and the probability-flow ODE
gives x(σ) = μ + (x_T − μ)·√(s² + σ²)/√(s² + σ_T²). A point mass is s = 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from dtx.diffusion import karras
from dtx.errors import ConfigError, ShapeError

F64 = torch.float64
MU, S = 0.3, 0.5
SIGMA_MAX = 80.0
DETERMINISTIC = [
    ("euler", {}), ("heun", {}), ("dpmpp-2m", {}), ("dpmpp-2m-sde", {"eta": 0.0, "solver_type": "midpoint"}),
    ("dpmpp-2m-sde", {"eta": 0.0, "solver_type": "heun"}), ("dpmpp-3m-sde", {"eta": 0.0}),
]


def gaussian_denoiser(mu: float, s: float):
    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sig = sigma.reshape(-1, *[1] * (x.ndim - 1))
        return (s**2 * x + sig**2 * mu) / (s**2 + sig**2)

    return model


def ode_solution(x_t: torch.Tensor, sigma_t: float, sigma: float, mu: float, s: float) -> torch.Tensor:
    if s == 0:
        return mu + (x_t - mu) * sigma / sigma_t
    return mu + (x_t - mu) * math.sqrt(s**2 + sigma**2) / math.sqrt(s**2 + sigma_t**2)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """The EDM schedule written out in plain floats."""
    if n == 1:
        return [sigma_max, 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)] + [0.0]


# --- preconditioning --------------------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """F(z, σ) = 2z + σ (per sample), recording what it was given."""

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        self.z, self.sigma, self.cond = z, sigma, cond
        return 2 * z + sigma.reshape(-1, *[1] * (z.ndim - 1))


def test_scalings_match_edm_formulas_and_give_unit_variance_target() -> None:
    den = karras.Denoiser(Recorder(), sigma_data=0.5)
    for sigma in [0.002, 0.1, 0.5, 3.0, 80.0]:
        c_skip, c_out, c_in = (float(c) for c in den.get_scalings(torch.tensor(sigma, dtype=F64)))
        assert c_skip == pytest.approx(0.25 / (sigma**2 + 0.25), rel=1e-12)
        assert c_out == pytest.approx(sigma * 0.5 / math.sqrt(sigma**2 + 0.25), rel=1e-12)
        assert c_in == pytest.approx(1 / math.sqrt(sigma**2 + 0.25), rel=1e-12)
        # EDM's design goals: unit-variance network input and F-target for data of std σd
        assert c_in**2 * (0.25 + sigma**2) == pytest.approx(1.0, rel=1e-12)
        assert ((1 - c_skip) ** 2 * 0.25 + c_skip**2 * sigma**2) / c_out**2 == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (3, 2, 2, 3, 3), (3, 5, 4)])
def test_forward_passes_scaled_input_and_raw_sigma_for_any_rank(shape) -> None:
    inner = Recorder()
    den = karras.Denoiser(inner, sigma_data=0.6)
    x = torch.randn(shape, dtype=F64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    out = den(x, sigma, y=torch.tensor([1, 2, 3]))
    for i, s in enumerate(sigma.tolist()):
        c_in = 1 / math.sqrt(s**2 + 0.36)
        c_skip, c_out = 0.36 / (s**2 + 0.36), s * 0.6 / math.sqrt(s**2 + 0.36)
        torch.testing.assert_close(inner.z[i], x[i] * c_in)
        torch.testing.assert_close(out[i], (2 * c_in * x[i] + s) * c_out + c_skip * x[i])
    torch.testing.assert_close(inner.sigma, sigma)
    assert inner.cond["y"].tolist() == [1, 2, 3]


def test_scalar_sigma_is_shared_by_the_batch_and_bad_sigma_shape_is_rejected() -> None:
    inner = Recorder()
    den = karras.Denoiser(inner)
    x = torch.randn(4, 1, 2, 2)
    den(x, 2.0)
    assert inner.sigma.tolist() == [2.0] * 4
    with pytest.raises(ShapeError, match="sigma"):
        den(x, torch.ones(3))


def test_denoiser_around_exact_f_reproduces_exact_d() -> None:
    sd = 0.5

    def exact_f(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # F = (D − c_skip x)/c_out, x = z/c_in
        sig = sigma.reshape(-1, *[1] * (z.ndim - 1))
        x = z * (sig**2 + sd**2) ** 0.5
        d = (S**2 * x + sig**2 * MU) / (S**2 + sig**2)
        return (d - sd**2 / (sig**2 + sd**2) * x) / (sig * sd / (sig**2 + sd**2) ** 0.5)

    den = karras.Denoiser(exact_f, sigma_data=sd)
    x = torch.randn(5, 1, dtype=F64) * 3
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=F64)
    torch.testing.assert_close(den(x, sigma), gaussian_denoiser(MU, S)(x, sigma))


# --- loss and weightings ---------------------------------------------------------------------------------------

D_SPACE = {  # w_D(σ) such that loss = mean((D − x₀)²)·w_D, with σd = 0.5
    "karras": lambda s: (s**2 + 0.25) / (s * 0.5) ** 2,
    "snr": lambda s: 1 / s**2,
    "soft-min-snr": lambda s: 1 / (s**2 + 1 / 4.0),  # γ = σd⁻² = 4 (HDiT Eq. 5)
    "min-snr": lambda s: min(1 / s**2, 5.0),
}


@pytest.mark.parametrize("name", sorted(D_SPACE))
def test_loss_is_d_space_mse_times_d_space_weighting(name: str) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 1).double()
    den = karras.Denoiser(lambda z, sigma: conv(z) * sigma.log()[:, None, None, None], weighting=name)
    x0, noise = torch.randn(4, 2, 3, 3, dtype=F64), torch.randn(4, 2, 3, 3, dtype=F64)
    sigma = torch.tensor([0.05, 0.4, 0.5, 20.0], dtype=F64)
    loss = den.loss(x0, noise, sigma)
    assert loss.shape == (4,)
    d = den(x0 + noise * sigma[:, None, None, None], sigma)
    mse = ((d - x0) ** 2).flatten(1).mean(1)
    expected = torch.stack([mse[i] * D_SPACE[name](s) for i, s in enumerate(sigma.tolist())])
    torch.testing.assert_close(loss, expected)


def test_weighting_closed_forms_from_the_spec_table() -> None:
    sd = 0.5
    for s in [0.01, 0.2, 0.5, 2.0, 50.0]:
        sig = torch.tensor([s], dtype=F64)
        assert float(karras.WEIGHTINGS["karras"](sig, sd)) == 1.0
        assert float(karras.WEIGHTINGS["snr"](sig, sd)) == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert float(karras.WEIGHTINGS["soft-min-snr"](sig, sd)) == pytest.approx(
            (s * sd) ** 2 / (s**2 + sd**2) ** 2, rel=1e-12)
        c_out2 = (s * sd) ** 2 / (s**2 + sd**2)
        assert float(karras.WEIGHTINGS["min-snr"](sig, sd, gamma=2.0)) == pytest.approx(
            c_out2 * min(1 / s**2, 2.0), rel=1e-12)
    # min-snr switches branch at σ = γ^(-1/2): for γ = 4 that is σ = 0.5 = σd, where w_F = σd²/(2σd²) = 1/2
    assert float(karras.WEIGHTINGS["min-snr"](torch.tensor(0.5), 0.5, gamma=4.0)) == pytest.approx(0.5)


def test_min_snr_gamma_and_callable_weighting_reach_the_loss() -> None:
    inner = torch.nn.Identity()
    x0, noise, sigma = torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0.1, 0.1])
    plain = karras.Denoiser(lambda z, s: z, sigma_data=0.5).loss(x0, noise, sigma)
    custom = karras.Denoiser(lambda z, s: z, sigma_data=0.5, weighting=lambda s: 3 * torch.ones_like(s))
    torch.testing.assert_close(custom.loss(x0, noise, sigma), 3 * plain)
    g = karras.Denoiser(inner, weighting="min-snr", gamma=7.0)
    torch.testing.assert_close(g.weighting(torch.tensor([0.1])), torch.tensor([0.25 * 0.07 / 0.26]))


def test_bad_weightings_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown loss weighting 'snrr'"):
        karras.Denoiser(torch.nn.Identity(), weighting="snrr")
    with pytest.raises(ConfigError, match="accepts options"):
        karras.Denoiser(torch.nn.Identity(), weighting="snr", gamma=5.0)
    with pytest.raises(ConfigError, match="sigma_data"):
        karras.Denoiser(torch.nn.Identity(), sigma_data=0.0)
    with pytest.raises(ShapeError, match="noise shape"):
        karras.Denoiser(torch.nn.Identity()).loss(torch.ones(2, 3), torch.ones(2, 4), 1.0)


# --- σ sampling ------------------------------------------------------------------------------------------------

def test_rand_log_normal_moments_and_generator() -> None:
    g = torch.Generator().manual_seed(1)
    sig = karras.rand_log_normal([20000], loc=-1.2, scale=1.2, generator=g, dtype=F64)
    assert float(sig.log().mean()) == pytest.approx(-1.2, abs=0.05)
    assert float(sig.log().std()) == pytest.approx(1.2, rel=0.03)
    a = karras.rand_log_normal(5, generator=torch.Generator().manual_seed(3))
    b = karras.rand_log_normal(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_rand_log_uniform_has_uniform_log() -> None:
    g = torch.Generator().manual_seed(2)
    sig = karras.rand_log_uniform([20000], 1e-2, 1e2, generator=g, dtype=F64)
    assert float(sig.min()) >= 1e-2 and float(sig.max()) <= 1e2
    u = (sig.log() - math.log(1e-2)) / (math.log(1e2) - math.log(1e-2))
    for q in [0.1, 0.25, 0.5, 0.75, 0.9]:
        assert float(torch.quantile(u, q)) == pytest.approx(q, abs=0.015)
    with pytest.raises(ConfigError):
        karras.rand_log_uniform(3, 0.0, 1.0)


def test_cosine_interpolated_unshifted_follows_the_arctan_law() -> None:
    # noise_d_low = noise_d_high = image_d: no shift, σ = σd·tan(atan(m) + u(atan(M) − atan(m)))
    g = torch.Generator().manual_seed(4)
    sig = karras.rand_cosine_interpolated([20000], 64, 64, 64, generator=g, dtype=F64)
    assert float(sig.min()) >= 1e-3 and float(sig.max()) <= 1e3
    assert float(sig.median()) == pytest.approx(1.0, rel=0.03)  # atan(1e-3) + atan(1e3) = π/2, so tan(π/4)
    lo, hi = math.atan(1e-3), math.atan(1e3)
    for q in [0.1, 0.25, 0.75, 0.9]:
        assert float(torch.quantile(sig, q)) == pytest.approx(math.tan(lo + q * (hi - lo)), rel=0.05)


def test_cosine_interpolated_shifted_quantiles_and_range() -> None:
    image_d, low_d, high_d, sd, lo, hi = 256, 32, 256, 0.5, 1e-3, 1e3

    def shifted(u: float, noise_d: float) -> float:  # cosine schedule shifted by 2 ln(noise_d/image_d)
        r = noise_d / image_d
        a, b = math.atan(lo / sd * r), math.atan(hi / sd * r)
        return sd / r * math.tan(a + u * (b - a))

    g = torch.Generator().manual_seed(5)
    sig = karras.rand_cosine_interpolated([20000], image_d, low_d, high_d, sigma_data=sd, generator=g, dtype=F64)
    assert float(sig.min()) >= lo and float(sig.max()) <= hi
    for q in [0.1, 0.25, 0.5, 0.75, 0.9]:  # σ(u) is increasing, so its q-quantile is σ(q); lerp in logSNR by u
        expected = shifted(q, low_d) ** (1 - q) * shifted(q, high_d) ** q
        assert float(torch.quantile(sig, q)) == pytest.approx(expected, rel=0.05)
    assert shifted(0.0, low_d) == pytest.approx(lo) and shifted(1.0, low_d) == pytest.approx(hi)


def test_stratified_uniform_one_draw_per_stratum() -> None:
    g = torch.Generator().manual_seed(6)
    u = karras.stratified_uniform([2, 8], generator=g)
    assert torch.equal((u * 8).floor().long(), torch.arange(8).expand(2, 8))
    u = karras.stratified_uniform([4], group=1, groups=3, generator=g)
    assert (u * 12).floor().long().tolist() == [1, 4, 7, 10]
    sig = karras.rand_cosine_interpolated([64], 64, 32, 64, generator=g, stratified=True)
    assert bool((sig[1:] > sig[:-1]).all())  # σ(u) is increasing, and stratified u is sorted
    with pytest.raises(ConfigError):
        karras.stratified_uniform([4], group=3, groups=3)


# --- schedules -------------------------------------------------------------------------------------------------

def test_karras_sigmas_follow_the_rho_formula() -> None:
    for n, rho in [(1, 7.0), (2, 7.0), (10, 7.0), (5, 3.0)]:
        got = karras.get_sigmas_karras(n, 0.002, 80.0, rho=rho, dtype=F64)
        assert got.tolist() == pytest.approx(karras_sigmas(n, 0.002, 80.0, rho), rel=1e-12)
    got = karras.get_sigmas_karras(10, 0.002, 80.0)
    assert len(got) == 11 and float(got[0]) == pytest.approx(80.0) and float(got[-2]) == pytest.approx(0.002)
    assert float(got[-1]) == 0.0 and bool((got[1:] < got[:-1]).all())
    linear = karras.get_sigmas_karras(5, 1.0, 5.0, rho=1.0)
    assert linear.tolist() == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])


def test_exponential_and_polyexponential_schedules() -> None:
    exp = karras.get_sigmas_exponential(5, 0.01, 100.0, dtype=F64)
    assert exp.tolist() == pytest.approx([100.0, 10.0, 1.0, 0.1, 0.01, 0.0], rel=1e-12)
    poly = karras.get_sigmas_polyexponential(5, 0.01, 100.0, rho=2.0, dtype=F64)
    expected = [math.exp(math.log(0.01) + (1 - i / 4) ** 2 * math.log(1e4)) for i in range(5)] + [0.0]
    assert poly.tolist() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ConfigError, match="sigma_min"):
        karras.get_sigmas_exponential(5, 0.0, 1.0)
    with pytest.raises(ConfigError, match="n >= 1"):
        karras.get_sigmas_karras(0, 0.1, 1.0)


# --- samplers: exact cases -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,opts", DETERMINISTIC)
def test_deterministic_samplers_are_exact_on_a_point_mass(name: str, opts: dict) -> None:
    # D ≡ μ makes the ODE solution linear in σ and D constant in λ: every solver here integrates it exactly
    x_t = torch.linspace(-2, 2, 5, dtype=F64).reshape(5, 1) * SIGMA_MAX
    sigmas = torch.tensor(karras_sigmas(12, 0.002, SIGMA_MAX), dtype=F64)
    seen = []
    out = karras.SAMPLERS[name](gaussian_denoiser(MU, 0.0), x_t.clone(), sigmas, disable=True,
                                callback=lambda info: seen.append((info["x"], float(info["sigma"]))), **opts)
    assert len(seen) == 12
    for x, sigma in seen:
        torch.testing.assert_close(x, ode_solution(x_t, SIGMA_MAX, sigma, MU, 0.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, torch.full_like(out, MU), rtol=0, atol=1e-12)


def test_exact_in_float32_too() -> None:
    x_t = torch.linspace(-2, 2, 5).reshape(5, 1) * SIGMA_MAX
    sigmas = karras.get_sigmas_karras(12, 0.002, SIGMA_MAX)
    for name, opts in DETERMINISTIC:
        out = karras.SAMPLERS[name](gaussian_denoiser(MU, 0.0), x_t.clone(), sigmas, disable=True, **opts)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.full_like(out, MU), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(karras.SAMPLERS))
def test_single_step_to_zero_returns_the_denoiser_output(name: str) -> None:
    x = torch.randn(6, 1, dtype=F64) * 5
    sigmas = torch.tensor([5.0, 0.0], dtype=F64)
    out = karras.SAMPLERS[name](gaussian_denoiser(MU, S), x.clone(), sigmas, disable=True,
                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, (S**2 * x + 25.0 * MU) / (S**2 + 25.0))


def affine_lambda_denoiser(a: float, b: float):
    """D(x, σ) = a + b·λ with λ = −ln σ, independent of x: the ODE has a closed-form flow in λ."""
    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (a - b * sigma.log()).reshape(-1, *[1] * (x.ndim - 1)).expand_as(x)

    return model


def affine_lambda_flow(x: torch.Tensor, lam_s: float, lam_t: float, a: float, b: float) -> torch.Tensor:
    # x(λ_t) = e^{−Δ}x(λ_s) + e^{−λ_t}∫ e^λ (a + bλ) dλ, with ∫ e^λ λ dλ = e^λ(λ − 1)
    decay = math.exp(-(lam_t - lam_s))
    prim = lambda lam: a + b * (lam - 1)  # noqa: E731
    return decay * x + prim(lam_t) - decay * prim(lam_s)


@pytest.mark.parametrize("name,opts,exact", [
    ("dpmpp-2m-sde", {"eta": 0.0, "solver_type": "heun"}, True),
    ("dpmpp-3m-sde", {"eta": 0.0}, True),
    ("dpmpp-2m-sde", {"eta": 0.0, "solver_type": "midpoint"}, False),
    ("dpmpp-2m", {}, False),
])
def test_exponential_integrators_on_denoisers_affine_in_lambda(name: str, opts: dict, exact: bool) -> None:
    # After the first-order warm-up step, the exponential-integrator correction (h − 1 + e^{−h})·D'(λ) is exact
    # for D linear in λ; the midpoint variants use h(1 − e^{−h})/2 instead and are only second-order accurate.
    a, b = 0.7, 0.3
    sigmas = torch.tensor(karras_sigmas(10, 0.05, 20.0)[:-1], dtype=F64)
    lam = (-sigmas.log()).tolist()
    seen = []
    out = karras.SAMPLERS[name](affine_lambda_denoiser(a, b), torch.tensor([[20.0], [-40.0]], dtype=F64), sigmas,
                                disable=True, callback=lambda info: seen.append(info["x"]), **opts)
    err = (out - affine_lambda_flow(seen[1], lam[1], lam[-1], a, b)).abs().max().item()
    assert (err < 1e-12) if exact else (err > 1e-3)


def test_dpmpp_3m_keeps_half_the_curvature_term_like_the_reference() -> None:
    # For D = a + bλ + cλ² a 3M step (after two warm-up steps) recovers D_i, h·D'_i and h²·c from its history
    # exactly; with φ₃ = φ₂/h − 1/2 as in k-diffusion/DPM-Solver it adds c·(h²/2 − h + 1 − e^{−h}), which is half of
    # the exact curvature integral ∫₀ʰ e^{u−h}·c·u² du = c·(h² − 2h + 2 − 2e^{−h}).
    a, b, c = 0.7, 0.3, 0.05

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        lam = -sigma.log().reshape(-1, *[1] * (x.ndim - 1))
        return (a + b * lam + c * lam**2).expand_as(x)

    sigmas = torch.tensor(karras_sigmas(8, 0.05, 20.0)[:-1], dtype=F64)
    lam = (-sigmas.log()).tolist()
    seen = []
    out = karras.sample_dpmpp_3m_sde(model, torch.tensor([[20.0], [-40.0]], dtype=F64), sigmas, eta=0.0,
                                     disable=True, callback=lambda info: seen.append(info["x"]))
    xs = seen + [out]
    for i in range(2, len(lam) - 1):
        h = lam[i + 1] - lam[i]
        e = math.exp(-h)
        d_i, slope = a + b * lam[i] + c * lam[i] ** 2, b + 2 * c * lam[i]
        expected = e * xs[i] + (1 - e) * d_i + (h - 1 + e) * slope + c * (h * h / 2 - h + 1 - e)
        torch.testing.assert_close(xs[i + 1], expected, rtol=1e-12, atol=1e-12)


# --- samplers: convergence order on s > 0 --------------------------------------------------------------------

@pytest.mark.parametrize("name,opts,order", [
    ("euler", {}, 1.0), ("heun", {}, 2.0), ("dpmpp-2m", {}, 2.0),
    ("dpmpp-2m-sde", {"eta": 0.0, "solver_type": "midpoint"}, 2.0),
    ("dpmpp-2m-sde", {"eta": 0.0, "solver_type": "heun"}, 2.0),
])
def test_convergence_order_by_halving_steps(name: str, opts: dict, order: float) -> None:
    x_t = torch.linspace(-3, 3, 7, dtype=F64).reshape(7, 1) * SIGMA_MAX
    sigma_min = 0.02
    exact = ode_solution(x_t, SIGMA_MAX, sigma_min, MU, S)
    errors = []
    for n in (64, 128, 256):  # stop at σ_min (no step to 0, whose error does not shrink with n)
        sigmas = torch.tensor(karras_sigmas(n, sigma_min, SIGMA_MAX)[:-1], dtype=F64)
        out = karras.SAMPLERS[name](gaussian_denoiser(MU, S), x_t.clone(), sigmas, disable=True, **opts)
        errors.append((out - exact).abs().max().item())
    observed = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(o - order) < 0.15 for o in observed), observed


# --- samplers: stochastic ---------------------------------------------------------------------------------------

STOCHASTIC = [
    ("euler-ancestral", {}), ("euler-ancestral", {"eta": 0.5}), ("dpmpp-2m-sde", {}),
    ("dpmpp-2m-sde", {"solver_type": "heun"}), ("dpmpp-3m-sde", {}), ("euler", {"s_churn": 10.0}),
    ("heun", {"s_churn": 10.0}),
]


@pytest.mark.parametrize("name,opts", STOCHASTIC)
def test_stochastic_samplers_keep_exact_marginals_on_a_point_mass(name: str, opts: dict) -> None:
    # With D ≡ μ each step maps N(μ, σ_i²) exactly onto N(μ, σ_{i+1}²), so every intermediate x is N(μ, σ̂²)
    g = torch.Generator().manual_seed(7)
    n = 20000
    x = torch.randn(n, 1, generator=g, dtype=F64) * SIGMA_MAX
    sigmas = torch.tensor(karras_sigmas(8, 0.01, SIGMA_MAX), dtype=F64)
    seen = []
    karras.SAMPLERS[name](gaussian_denoiser(MU, 0.0), x, sigmas, disable=True, generator=g,
                          callback=lambda info: seen.append((info["x"], float(info["sigma_hat"]))), **opts)
    for x_i, sigma in seen:
        z = (x_i - MU) / sigma
        assert abs(float(z.mean())) < 0.03
        assert float(z.std()) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("name,opts,steps", [
    ("dpmpp-2m-sde", {}, 50), ("dpmpp-2m-sde", {"solver_type": "heun"}, 50), ("dpmpp-3m-sde", {}, 50),
    ("heun", {"s_churn": 10.0}, 50), ("euler-ancestral", {}, 200),
])
def test_stochastic_samplers_reach_the_data_distribution(name: str, opts: dict, steps: int) -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20000, 1, generator=g, dtype=F64) * SIGMA_MAX
    sigmas = torch.tensor(karras_sigmas(steps, 0.01, SIGMA_MAX), dtype=F64)
    out = karras.SAMPLERS[name](gaussian_denoiser(MU, S), x, sigmas, disable=True, generator=g, **opts)
    assert float(out.mean()) == pytest.approx(MU, abs=0.015)
    assert float(out.std()) == pytest.approx(S, rel=0.05)


def test_euler_ancestral_variance_error_shrinks_with_steps() -> None:
    deficits = []
    for steps in (25, 100):
        g = torch.Generator().manual_seed(9)
        x = torch.randn(20000, 1, generator=g, dtype=F64) * SIGMA_MAX
        sigmas = torch.tensor(karras_sigmas(steps, 0.01, SIGMA_MAX), dtype=F64)
        out = karras.sample_euler_ancestral(gaussian_denoiser(MU, S), x, sigmas, disable=True, generator=g)
        deficits.append(abs(float(out.std()) / S - 1))
    assert deficits[1] < deficits[0] / 2.5  # first order: 4x the steps, about 1/4 of the bias


def test_generator_makes_sampling_reproducible() -> None:
    sigmas = karras.get_sigmas_karras(6, 0.01, 10.0)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return karras.sample_dpmpp_3m_sde(gaussian_denoiser(MU, S), torch.randn(4, 2, generator=g) * 10, sigmas,
                                          disable=True, generator=g)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


# --- calling convention ----------------------------------------------------------------------------------------

def test_calling_convention_sigma_vector_extra_args_and_video_tensors() -> None:
    calls = []

    def model(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append((sigma.clone(), y))
        return torch.full_like(x, MU)

    x = torch.randn(2, 3, 4, 5, 5) * 10  # video [N, C, T, H, W]
    sigmas = karras.get_sigmas_karras(4, 0.1, 10.0)
    out = karras.sample_heun(model, x, sigmas, extra_args={"y": torch.tensor([1, 2])}, disable=True)
    torch.testing.assert_close(out, torch.full_like(x, MU), rtol=0, atol=1e-5)
    assert len(calls) == 2 * 3 + 1  # Heun: two evaluations per step, one for the final step to 0
    assert all(s.shape == (2,) and s[0] == s[1] for s, _ in calls)
    assert float(calls[0][0][0]) == pytest.approx(10.0)


def test_sampler_input_errors() -> None:
    with pytest.raises(ShapeError, match="1-D"):
        karras.sample_euler(gaussian_denoiser(MU, S), torch.zeros(2, 1), torch.ones(2, 3), disable=True)
    with pytest.raises(ConfigError, match="solver_type"):
        karras.sample_dpmpp_2m_sde(gaussian_denoiser(MU, S), torch.zeros(2, 1), torch.ones(3), solver_type="rk4")


def test_registries_hold_the_documented_names() -> None:
    assert set(karras.SAMPLERS) == {"euler", "euler-ancestral", "heun", "dpmpp-2m", "dpmpp-2m-sde", "dpmpp-3m-sde"}
    assert set(karras.SCHEDULES) == {"karras", "exponential", "polyexponential"}
    assert set(karras.WEIGHTINGS) == {"karras", "snr", "soft-min-snr", "min-snr"}
