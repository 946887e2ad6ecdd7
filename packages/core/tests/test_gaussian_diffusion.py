"""Discrete Gaussian diffusion: schedules, posteriors, losses, respacing and samplers against independent math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dtx.diffusion import gaussian
from dtx.diffusion.gaussian import (SAMPLERS, SCHEDULES, GaussianDiffusion, discretized_gaussian_log_likelihood,
                                    get_beta_schedule, mean_flat, normal_kl)
from dtx.diffusion import diffusers_bridge
from dtx.diffusion.respace import create_diffusion, respace_betas, space_timesteps
from dtx.errors import ConfigError, ShapeError

SAMPLERS = {**SAMPLERS, **diffusers_bridge.SAMPLERS}  # every discrete sampler, in its own (DiT-style) signature

T = 1000


def ref_alpha_bar(num_steps: int = T) -> list[float]:
    """Cumulative alphas of the linear schedule, built with a plain Python loop."""
    scale = 1000 / num_steps
    lo, hi = scale * 1e-4, scale * 0.02
    out, prod = [], 1.0
    for i in range(num_steps):
        beta = lo + (hi - lo) * i / (num_steps - 1)
        prod *= 1.0 - beta
        out.append(prod)
    return out


ABAR = ref_alpha_bar()


def abar_at(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([ABAR[int(i)] for i in t], dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def oracle_eps_model(x0: torch.Tensor, var_channels: bool = True, calls: list | None = None):
    """Model that knows the data is the single point x0: returns the exact eps for (x_t, original t)."""
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar_at(t, x)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if calls is not None:
            calls.append((t.clone(), eps.clone()))
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if var_channels else eps
    return model


def std_normal_cdf_tanh(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def std_normal_cdf_exact(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# --- schedules -----------------------------------------------------------------------------------------------------


def test_linear_schedule_matches_spec():
    betas = get_beta_schedule("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.allclose(np.cumprod(1 - betas), ABAR, rtol=1e-12, atol=0)
    assert np.cumprod(1 - betas)[-1] == pytest.approx(4.04e-5, abs=5e-8)
    short = get_beta_schedule("linear", 250)  # scale = 1000 / 250 = 4
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_and_alias():
    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = [min(1 - abar((i + 1) / 100) / abar(i / 100), 0.999) for i in range(100)]
    betas = get_beta_schedule("cosine", 100)
    assert np.allclose(betas, expected, rtol=1e-12, atol=0)
    assert betas[-1] == 0.999  # the cap is active on the last step
    assert np.array_equal(get_beta_schedule("squaredcos_cap_v2", 100), betas)
    assert set(SCHEDULES) == {"linear", "cosine"}


def test_unknown_schedule_lists_allowed_names():
    with pytest.raises(ConfigError, match="linear.*cosine.*squaredcos_cap_v2"):
        get_beta_schedule("quadratic", 10)


# --- densities -----------------------------------------------------------------------------------------------------


def test_normal_kl_closed_form_and_zero():
    values = ([0.3, -1.0], [-0.5, 1.2], [1.1, -1.0], [0.2, 0.1])
    m1, lv1, m2, lv2 = (torch.tensor(v, dtype=torch.float64) for v in values)
    got = normal_kl(m1, lv1, m2, lv2)
    for i in range(2):
        s1, s2 = math.exp(0.5 * lv1[i].item()), math.exp(0.5 * lv2[i].item())
        ref = math.log(s2 / s1) + (s1 ** 2 + (m1[i].item() - m2[i].item()) ** 2) / (2 * s2 ** 2) - 0.5
        assert got[i].item() == pytest.approx(ref, rel=1e-12)
    assert torch.equal(normal_kl(m1, lv1, m1, lv1), torch.zeros(2, dtype=torch.float64))
    assert normal_kl(m1, 0.0, m1, 0.0).abs().max() == 0  # scalar log-variances broadcast


def test_discretized_gaussian_log_likelihood_vs_cdf():
    xs = [-1.0, -0.6, -2 / 255, 0.0, 0.31, 1.0]
    means = [-0.9, -0.5, 0.05, 0.0, 0.2, 0.8]
    log_scales = [-1.0, -2.0, -0.5, -3.0, -1.5, -1.2]
    got = discretized_gaussian_log_likelihood(*(torch.tensor(v, dtype=torch.float64) for v in (xs, means, log_scales)))
    for i, (x, m, ls) in enumerate(zip(xs, means, log_scales)):
        s = math.exp(ls)
        lo, hi = (x - 1 / 255 - m) / s, (x + 1 / 255 - m) / s
        for cdf, rel in ((std_normal_cdf_tanh, 1e-9), (std_normal_cdf_exact, 2e-3)):
            if x <= -1.0:
                p = cdf(hi)
            elif x >= 1.0:
                p = 1 - cdf(lo)
            else:
                p = cdf(hi) - cdf(lo)
            assert got[i].item() == pytest.approx(math.log(p), rel=rel), (i, cdf.__name__)


def test_mean_flat_keeps_batch():
    x = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(mean_flat(x), torch.tensor([5.5, 17.5]))


# --- forward process and posterior ---------------------------------------------------------------------------------


def test_q_sample_and_posterior_vs_bayes_rule():
    d = GaussianDiffusion(get_beta_schedule("linear", T), model_var_type="fixed_small")
    gen = torch.Generator().manual_seed(0)
    x0, xt, noise = (torch.randn(4, 2, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 1, 500, 999])
    a = abar_at(t, x0)
    assert torch.allclose(d.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-12, atol=0)

    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for row, step in enumerate(t.tolist()):
        abar_prev = ABAR[step - 1] if step > 0 else 1.0
        alpha = ABAR[step] / abar_prev
        beta = 1 - alpha
        # q(x_{t-1}|x0) = N(sqrt(abar_prev) x0, 1 - abar_prev) times q(x_t|x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta)
        precision = alpha / beta + (1 / (1 - abar_prev) if step > 0 else math.inf)
        post_var = 1 / precision
        if step == 0:
            post_mean = x0[row]
        else:
            post_mean = post_var * (math.sqrt(abar_prev) * x0[row] / (1 - abar_prev)
                                    + math.sqrt(alpha) * xt[row] / beta)
        assert torch.allclose(mean[row], post_mean, rtol=1e-9, atol=1e-12)
        assert torch.allclose(var[row], torch.full_like(var[row], post_var), rtol=1e-9, atol=0)
    # the log-variance at t = 0 is clipped to the t = 1 value
    assert torch.allclose(log_var[0], log_var[1].new_full(log_var[1].shape, math.log(var[1, 0, 0].item())))


def test_variance_types():
    betas = get_beta_schedule("linear", T)
    x = torch.zeros(2, 1, 2, dtype=torch.float64)
    t = torch.tensor([0, 5])
    post_var = lambda s: (1 - ABAR[s - 1]) / (1 - ABAR[s]) * (1 - ABAR[s] / ABAR[s - 1])  # noqa: E731  s >= 1
    beta5 = 1 - ABAR[5] / ABAR[4]
    expected = {  # per t: variance; t = 0 uses the t = 1 posterior variance (large) or 0 with log clipped (small)
        "fixed_large": ([post_var(1), beta5], [math.log(post_var(1)), math.log(beta5)]),
        "fixed_small": ([0.0, post_var(5)], [math.log(post_var(1)), math.log(post_var(5))]),
        "learned": ([math.exp(-3.0)] * 2, [-3.0] * 2),
        "learned_range": ([math.exp(0.75 * math.log(beta) + 0.25 * math.log(post_var(max(s, 1))))
                           for s, beta in ((0, 1 - ABAR[0]), (5, beta5))], None),
    }
    for var_type, (variance, log_variance) in expected.items():
        d = GaussianDiffusion(betas, model_var_type=var_type)
        var_out = {"learned": -3.0, "learned_range": 0.5}.get(var_type)
        if var_out is None:
            model = lambda x, tm: x  # noqa: E731
        else:
            model = lambda x, tm, v=var_out: torch.cat([x, torch.full_like(x, v)], 1)  # noqa: E731
        out = d.p_mean_variance(model, x, t)
        assert torch.allclose(out["variance"][:, 0, 0], torch.tensor(variance, dtype=torch.float64),
                              rtol=1e-9), var_type
        if log_variance is not None:
            assert torch.allclose(out["log_variance"][:, 0, 0], torch.tensor(log_variance, dtype=torch.float64),
                                  rtol=1e-9), var_type


def test_float32_inputs_stay_float32_and_half_inputs_compute_in_float32():
    d = create_diffusion()
    t = torch.tensor([3, 700])
    assert d.q_sample(torch.ones(2, 4, 2, 2), t, torch.ones(2, 4, 2, 2)).dtype == torch.float32
    assert d.q_sample(torch.ones(2, 4, 2, 2, dtype=torch.float64), t,
                      torch.ones(2, 4, 2, 2, dtype=torch.float64)).dtype == torch.float64
    assert d.q_sample(torch.ones(2, 4, 2, 2).half(), t, torch.ones(2, 4, 2, 2).half()).dtype == torch.float32


# --- training losses -----------------------------------------------------------------------------------------------


def hand_vb(x0, xt, t, a_coef, var_value, decoder: bool) -> float:
    """VB term of the model eps = a*x_t, var_interp = var_value, for one sample, from scalar formulas."""
    step = int(t)
    abar, abar_prev = ABAR[step], (ABAR[step - 1] if step > 0 else 1.0)
    beta = 1 - abar / abar_prev

    def post_var(s: int) -> float:
        prev = ABAR[s - 1] if s > 0 else 1.0
        return (1 - prev) / (1 - ABAR[s]) * (1 - ABAR[s] / prev)

    log_post_var_clipped = math.log(post_var(max(step, 1)))
    frac = (var_value + 1) / 2
    model_log_var = frac * math.log(beta) + (1 - frac) * log_post_var_clipped
    c1 = beta * math.sqrt(abar_prev) / (1 - abar)
    c2 = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar)
    total = 0.0
    for x0_i, xt_i in zip(x0.flatten().tolist(), xt.flatten().tolist()):
        x0_hat = (xt_i - math.sqrt(1 - abar) * a_coef * xt_i) / math.sqrt(abar)
        model_mean = c1 * x0_hat + c2 * xt_i
        if decoder:
            s = math.exp(0.5 * model_log_var)
            lo, hi = (x0_i - 1 / 255 - model_mean) / s, (x0_i + 1 / 255 - model_mean) / s
            p = std_normal_cdf_tanh(hi) - std_normal_cdf_tanh(lo)
            total += -math.log(p)
        else:
            true_mean = c1 * x0_i + c2 * xt_i
            s1, s2 = math.exp(0.5 * log_post_var_clipped), math.exp(0.5 * model_log_var)
            total += math.log(s2 / s1) + (s1 ** 2 + (true_mean - model_mean) ** 2) / (2 * s2 ** 2) - 0.5
    return total / x0.numel() / math.log(2.0)


def test_hybrid_loss_vb_term_matches_hand_computation_and_trains_only_variance():
    d = create_diffusion()
    gen = torch.Generator().manual_seed(1)
    x0 = (torch.rand(4, 2, 3, 3, generator=gen, dtype=torch.float64) * 1.6 - 0.8)
    noise = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 400, 999])
    a_coef = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    var_value = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def model(x, t_model):
        return torch.cat([a_coef * x, var_value * torch.ones_like(x)], dim=1)

    terms = d.training_losses(model, x0, t, noise=noise)
    a = abar_at(t, x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    for i in range(4):
        ref = hand_vb(x0[i], xt[i], t[i], a_coef.item(), var_value.item(), decoder=(t[i] == 0))
        assert terms["vb"][i].item() == pytest.approx(ref, rel=1e-7)
        assert terms["mse"][i].item() == pytest.approx(((0.7 * xt[i] - noise[i]) ** 2).mean().item(), rel=1e-12)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])

    a_grad_vb, var_grad_vb = torch.autograd.grad(terms["vb"].sum(), [a_coef, var_value], allow_unused=True,
                                                    retain_graph=True)
    assert (a_grad_vb is None or a_grad_vb == 0) and var_grad_vb != 0
    a_grad_mse, = torch.autograd.grad(terms["mse"].sum(), [a_coef])
    assert a_grad_mse != 0


def test_loss_rescaling_and_kl_loss():
    x0 = torch.linspace(-0.9, 0.9, 2 * 4 * 2 * 2, dtype=torch.float64).view(2, 4, 2, 2)
    noise = torch.linspace(1.0, -1.0, x0.numel(), dtype=torch.float64).view_as(x0)
    t = torch.tensor([0, 120])

    def model(x, t_model):
        return torch.cat([0.5 * x, -0.2 * torch.ones_like(x)], dim=1)

    plain = create_diffusion("250").training_losses(model, x0, t, noise=noise)
    rescaled = create_diffusion("250", rescale_learned_sigmas=True).training_losses(model, x0, t, noise=noise)
    assert torch.allclose(rescaled["vb"], plain["vb"] * 250 / 1000)
    assert torch.allclose(rescaled["mse"], plain["mse"])
    kl = create_diffusion("250", use_kl=True).training_losses(model, x0, t, noise=noise)
    assert torch.allclose(kl["loss"], plain["vb"] * 250) and "mse" not in kl
    fixed = create_diffusion("250", learn_sigma=False).training_losses(lambda x, tm: 0.5 * x, x0, t, noise=noise)
    assert "vb" not in fixed and torch.equal(fixed["loss"], fixed["mse"])


def test_wrong_output_channels_and_bad_options_raise():
    d = create_diffusion("10")
    x = torch.zeros(2, 4, 2, 2)
    t = torch.tensor([1, 2])
    with pytest.raises(ShapeError, match="expected \\(2, 8, 2, 2\\)"):
        d.training_losses(lambda x, tm: x, x, t)
    with pytest.raises(ShapeError, match="t must be"):
        d.training_losses(lambda x, tm: torch.cat([x, x], 1), x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="model_mean_type"):
        GaussianDiffusion(d.betas, model_mean_type="eps")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        create_diffusion(predict_xstart=True, predict_v=True)
    from dtx import plugins
    from dtx.training.objectives import call_sampler

    with pytest.raises(ConfigError, match="sampler 'ddim' has no option 'steps'.*options: eta"):
        call_sampler(plugins.get("sampler", "ddim").obj, "ddim", lambda x, tm: torch.cat([x, x], 1), x, d, None,
                     False, {"steps": 5})


# --- respacing -----------------------------------------------------------------------------------------------------


def test_space_timesteps_lists():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[:3] == [0, 4, 8] and steps[-3:] == [991, 995, 999]
    assert set(np.diff(steps)) <= {4, 5}
    assert space_timesteps(1000, "ddim50") == list(range(0, 981, 20))
    assert space_timesteps(202, "10,15") == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100,
                                             101, 108, 115, 122, 130, 137, 144, 151, 158, 165, 172, 180, 187, 194, 201]
    three = space_timesteps(1000, "10,15,20")  # sections [0, 334), [334, 667), [667, 1000)
    assert len(three) == 45 and three[9] == 333 and three[10] == 334 and three[24] == 666 and three[25] == 667
    assert space_timesteps(1000, [1000]) == list(range(1000))
    with pytest.raises(ConfigError, match="integer stride"):
        space_timesteps(1000, "ddim600")
    with pytest.raises(ConfigError, match="cannot keep"):
        space_timesteps(100, "300")


def test_respaced_betas_preserve_alpha_bar():
    betas = get_beta_schedule("linear", T)
    keep = space_timesteps(T, "ddim50")
    new_betas, timestep_map = respace_betas(betas, keep)
    assert timestep_map.tolist() == keep
    assert np.allclose(np.cumprod(1 - new_betas), [ABAR[s] for s in keep], rtol=1e-12, atol=0)
    assert new_betas[0] == pytest.approx(1 - ABAR[0], rel=1e-12)
    assert new_betas[1] == pytest.approx(1 - ABAR[20] / ABAR[0], rel=1e-12)
    full = create_diffusion()
    assert full.num_timesteps == T and np.allclose(full.betas, betas, rtol=1e-9)


# --- samplers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,respacing", [("ddpm", "25"), ("ddim", "ddim20"), ("dpm-solver", "15")])
def test_samplers_recover_x0_with_oracle_model(sampler, respacing):
    x0 = torch.linspace(-0.8, 0.8, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    d = create_diffusion(respacing)
    out = SAMPLERS[sampler](d, oracle_eps_model(x0), noise, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(out, x0, atol=1e-4)


def test_ddim_stays_on_the_oracle_path_and_model_sees_original_timesteps():
    x0 = torch.linspace(-0.5, 0.5, 2 * 2 * 3 * 3, dtype=torch.float64).view(2, 2, 3, 3)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    calls: list = []
    create_diffusion("ddim50").ddim_sample_loop(oracle_eps_model(x0, calls=calls), noise)
    assert [int(t[0]) for t, _ in calls] == list(range(980, -1, -20))
    first_eps = calls[0][1]
    for _, eps in calls:  # with exact eps and eta = 0 every step predicts the same noise direction
        assert torch.allclose(eps, first_eps, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("sampler,opts", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_fixed_generator_reproduces_samples(sampler, opts):
    d = create_diffusion("10")
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], 1)  # noqa: E731
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [SAMPLERS[sampler](d, model, noise, generator=torch.Generator().manual_seed(seed), **opts)
            for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def smooth_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.4 * x + 0.1 * torch.sin(x * 3) * (t.view(-1, *([1] * (x.ndim - 1))) / 1000.0)


def test_x0_and_v_parameterisations_agree_with_eps():
    def as_x0(x, t):
        a = abar_at(t, x)
        return (x - (1 - a).sqrt() * smooth_eps(x, t)) / a.sqrt()

    def as_v(x, t):
        a = abar_at(t, x)
        return a.sqrt() * smooth_eps(x, t) - (1 - a).sqrt() * as_x0(x, t)

    learned = lambda f: (lambda x, t: torch.cat([f(x, t), 0.3 * torch.ones_like(x)], 1))  # noqa: E731
    kinds = {"eps": {}, "x0": {"predict_xstart": True}, "v": {"predict_v": True}}
    models = {"eps": learned(smooth_eps), "x0": learned(as_x0), "v": learned(as_v)}
    diffusions = {k: create_diffusion("ddim25", **kw) for k, kw in kinds.items()}
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([3, 17])
    outs = {k: diffusions[k].p_mean_variance(models[k], x, t) for k in kinds}
    for k in ("x0", "v"):
        for key in ("mean", "log_variance", "pred_xstart"):
            assert torch.allclose(outs[k][key], outs["eps"][key], rtol=1e-9, atol=1e-9), (k, key)
    samples = {k: diffusions[k].ddim_sample_loop(models[k], x) for k in kinds}
    assert torch.allclose(samples["x0"], samples["eps"], atol=1e-8)
    assert torch.allclose(samples["v"], samples["eps"], atol=1e-8)

    # v target: v = sqrt(abar) eps - sqrt(1 - abar) x0; a model returning it exactly has zero MSE
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) - 0.5
    noise = torch.randn_like(x0)
    tt = torch.tensor([5, 600])
    a = abar_at(tt, x0)
    v_true = a.sqrt() * noise - (1 - a).sqrt() * x0
    v_diffusion = create_diffusion(predict_v=True, learn_sigma=False)
    terms = v_diffusion.training_losses(lambda xt, tm: v_true, x0, tt, noise=noise)
    assert terms["mse"].abs().max() < 1e-20


def test_channel_dim_2_matches_permuted_layout():
    weight = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, -0.6], [0.0, 0.2, 0.9]], dtype=torch.float64)

    def model_for(channel_dim):
        def model(x, t):
            mixed = torch.movedim(torch.movedim(x, channel_dim, -1) @ weight, -1, channel_dim)
            return torch.cat([mixed, torch.tanh(x)], dim=channel_dim)
        return model

    gen = torch.Generator().manual_seed(6)
    x0_video = torch.rand(2, 5, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1  # [B, F, C, H, W]
    noise_video = torch.randn(x0_video.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 77])
    video = create_diffusion("100", channel_dim=2).training_losses(model_for(2), x0_video, t, noise=noise_video)
    to_bcfhw = lambda v: v.permute(0, 2, 1, 3, 4)  # noqa: E731
    chw = create_diffusion("100").training_losses(model_for(1), to_bcfhw(x0_video), t, noise=to_bcfhw(noise_video))
    flat = lambda v: to_bcfhw(v).reshape(2, 3, 20, 4)  # noqa: E731  a plain 4-D [B, C, H', W] batch
    image = create_diffusion("100").training_losses(model_for(1), flat(x0_video), t, noise=flat(noise_video))
    for key in ("loss", "mse", "vb"):
        assert torch.allclose(video[key], chw[key], rtol=1e-12, atol=0), key
        assert torch.allclose(video[key], image[key], rtol=1e-12, atol=0), key
    sample_video = create_diffusion("ddim10", channel_dim=2).ddim_sample_loop(model_for(2), noise_video)
    sample_image = create_diffusion("ddim10").ddim_sample_loop(model_for(1), to_bcfhw(noise_video))
    assert torch.allclose(to_bcfhw(sample_video), sample_image, rtol=1e-12, atol=1e-12)


# --- diffusers ---------------------------------------------------------------------------------------------------


def test_ddim_matches_independent_diffusers_ddim():
    from diffusers import DDIMScheduler

    def model(x, t):
        return torch.cat([smooth_eps(x, t), torch.zeros_like(x)], 1)

    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    ours = create_diffusion("ddim50").ddim_sample_loop(model, noise)

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(980, -1, -20))
    x = noise
    for step in scheduler.timesteps:
        eps = model(x, torch.full((2,), int(step)))[:, :4]
        x = scheduler.step(eps, step, x).prev_sample
    assert torch.allclose(ours, x, rtol=1e-5, atol=1e-5)

    bridged = SAMPLERS["ddim-diffusers"](create_diffusion("ddim50"), model, noise)
    assert torch.allclose(bridged, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"predict_v": True}, {"predict_xstart": True}])
def test_diffusers_ddim_bridge_for_other_parameterisations_and_clipping(kw):
    d = create_diffusion("ddim20", **kw)
    model = lambda x, t: torch.cat([0.6 * x, torch.zeros_like(x)], 1)  # noqa: E731
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(11))
    for clip in (False, True):
        ours = d.ddim_sample_loop(model, noise, clip_denoised=clip)
        bridged = SAMPLERS["ddim-diffusers"](d, model, noise, clip_denoised=clip)
        assert torch.allclose(bridged, ours, rtol=1e-5, atol=1e-5), clip


def test_dpm_solver_solves_the_gaussian_probability_flow_ode():
    # Data N(mu, s^2): exact eps = sqrt(1 - abar)(x - sqrt(abar) mu) / (abar s^2 + 1 - abar), and the probability-flow
    # ODE keeps (x_t - sqrt(abar) mu) / sqrt(abar s^2 + 1 - abar) constant.
    mu, s = 0.3, 0.5

    def model(x, t):
        a = abar_at(t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    a_T = ABAR[-1]
    exact = mu + s * (noise - math.sqrt(a_T) * mu) / math.sqrt(a_T * s ** 2 + 1 - a_T)
    errors = {}
    for name, respacing in (("dpm-solver", "21"), ("ddim", "20"), ("dpm-solver", "51")):  # 20, 20 and 50 model calls
        out = SAMPLERS[name](create_diffusion(respacing, learn_sigma=False), model, noise)
        errors[name, respacing] = (out - exact).abs().max().item()
    assert errors["dpm-solver", "21"] < 0.5 * errors["ddim", "20"]  # second order beats DDIM at equal cost
    assert errors["dpm-solver", "51"] < 1e-3
    with pytest.raises(ConfigError, match="algorithm_type"):
        SAMPLERS["dpm-solver"](create_diffusion("5", learn_sigma=False), model, noise, algorithm_type="unipc")


def test_registered_samplers_and_schedules():
    from dtx import plugins

    assert {"ddpm", "ddim", "ddim-diffusers", "dpm-solver"} <= set(SAMPLERS)
    # registered in the one sampler signature sampler(model, x, schedule, *, generator, progress), wrapping these
    assert plugins.get("sampler", "dpm-solver").obj.__wrapped__ is SAMPLERS["dpm-solver"]
    assert plugins.get("sampler", "ddim").obj.__wrapped__ is gaussian.SAMPLERS["ddim"]
    assert plugins.get("schedule", "cosine").obj is gaussian.SCHEDULES["cosine"]
