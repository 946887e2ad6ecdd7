"""Guidance: the combination formula written out by hand, one batched forward, DiT's 3-channel legacy CFG,
GenTron's motion-free guidance as configuration, σ- and t-models, video tensors."""

from __future__ import annotations

import pytest
import torch

from dtx.diffusion import karras
from dtx.diffusion.guidance import combine_guidance, guided
from dtx.errors import ConfigError, ShapeError


class LabelModel:
    """out = x·(1 + y) + t, per sample; counts calls and keeps the last inputs."""

    def __init__(self, out_channels: int | None = None) -> None:
        self.calls, self.out_channels = 0, out_channels

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
        self.calls += 1
        self.x, self.t, self.y, self.kw = x, t, y, kw
        shape = (-1,) + (1,) * (x.ndim - 1)
        out = x * (1 + y.to(x.dtype).reshape(shape)) + torch.as_tensor(t, dtype=x.dtype).reshape(-1, *shape[1:])
        if self.out_channels:  # learned-variance style: extra channels = 10·x
            out = torch.cat([out, 10 * x[:, : self.out_channels - x.shape[1]]], dim=1)
        return out


def test_one_term_is_classic_cfg() -> None:
    u, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for s in [0.0, 1.0, 1.5, 4.0]:
        torch.testing.assert_close(combine_guidance([u, c], [s]), u + s * (c - u))
    torch.testing.assert_close(combine_guidance([u, c], [1.0]), c)
    torch.testing.assert_close(combine_guidance([u], []), u)


def test_three_terms_match_the_hand_formula() -> None:
    e0, e1, e2, e3 = (torch.randn(2, 4, 3, 3) for _ in range(4))
    s1, s2, s3 = 1.2, 7.5, 0.5
    expected = e0 + s1 * (e1 - e0) + s2 * (e2 - e1) + s3 * (e3 - e2)
    torch.testing.assert_close(combine_guidance([e0, e1, e2, e3], [s1, s2, s3]), expected)


def test_motion_free_guidance_is_configuration() -> None:
    # GenTron: ε(∅,∅) + λ_T[ε(c_T,c_M) − ε(∅,c_M)] + λ_M[ε(∅,c_M) − ε(∅,∅)], outputs ordered least → most conditioned
    e_none, e_motion, e_full = (torch.randn(2, 4, 3, 5, 5) for _ in range(3))
    lam_t, lam_m = 7.5, 1.2
    expected = e_none + lam_t * (e_full - e_motion) + lam_m * (e_motion - e_none)
    torch.testing.assert_close(combine_guidance([e_none, e_motion, e_full], [lam_m, lam_t]), expected)
    # λ_M = 1 is text CFG with motion on
    torch.testing.assert_close(combine_guidance([e_none, e_motion, e_full], [1.0, lam_t]),
                               e_motion + lam_t * (e_full - e_motion))


def test_guided_runs_one_batched_forward_in_condition_order() -> None:
    model = LabelModel()
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    y_null, y = torch.full((3,), 10), torch.tensor([1, 2, 3])
    fn = guided(model, [{"y": y_null}, {"y": y}], [4.0])
    out = fn(x, t)
    assert model.calls == 1
    assert model.x.shape[0] == 6 and torch.equal(model.x, torch.cat([x, x]))
    assert model.y.tolist() == [10, 10, 10, 1, 2, 3] and model.t.tolist() == [5, 6, 7, 5, 6, 7]
    shape = (3, 1, 1, 1)
    uncond = x * 11 + t.float().reshape(shape)
    cond = x * (1 + y.float().reshape(shape)) + t.float().reshape(shape)
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))


def test_three_condition_sets_in_one_call() -> None:
    model = LabelModel()
    x, t = torch.randn(2, 2, 3, 3), torch.tensor([1.0, 2.0])
    ys = [torch.tensor([0, 0]), torch.tensor([1, 3]), torch.tensor([2, 5])]
    out = guided(model, [{"y": y} for y in ys], [1.3, 2.0])(x, t)
    assert model.calls == 1
    e = [x * (1 + y.float().reshape(2, 1, 1, 1)) + t.reshape(2, 1, 1, 1) for y in ys]
    torch.testing.assert_close(out, e[0] + 1.3 * (e[1] - e[0]) + 2.0 * (e[2] - e[1]))


def test_channels_3_is_dits_legacy_cfg() -> None:
    # DiT forward_with_cfg on an 8-channel output (4 ε + 4 variance): ε[:3] guided, channels 3: from the cond half
    model = LabelModel(out_channels=8)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 20])
    y, y_null, s = torch.tensor([3, 7]), torch.full((2,), 1000), 1.5
    cond_out, uncond_out = model(x, t, y), model(x, t, y_null)
    eps = uncond_out[:, :3] + s * (cond_out[:, :3] - uncond_out[:, :3])
    expected = torch.cat([eps, cond_out[:, 3:]], dim=1)
    out = guided(model, [{"y": y_null}, {"y": y}], [s], channels=3)(x, t)
    torch.testing.assert_close(out, expected)
    full = guided(model, [{"y": y_null}, {"y": y}], [s])(x, t)
    assert not torch.allclose(full[:, 3:4], expected[:, 3:4])  # full-channel guidance also guides channel 3


@pytest.mark.parametrize("channel_dim", [1, 2])
def test_video_tensors_with_partial_channels(channel_dim: int) -> None:
    # [N, C, T, H, W] (channel_dim 1) and Latte's [N, T, C, H, W] (channel_dim 2)
    u, c = torch.randn(2, 4, 4, 3, 3), torch.randn(2, 4, 4, 3, 3)
    out = combine_guidance([u, c], [3.0], channels=2, channel_dim=channel_dim)
    idx = [slice(None)] * 5
    idx[channel_dim] = slice(0, 2)
    head = tuple(idx)
    idx[channel_dim] = slice(2, None)
    tail = tuple(idx)
    torch.testing.assert_close(out[head], u[head] + 3.0 * (c[head] - u[head]))
    torch.testing.assert_close(out[tail], c[tail])


def test_sigma_model_inside_a_karras_sampler() -> None:
    # Point-mass denoisers D_y ≡ μ_y: the guided D is the constant μ_u + s(μ_c − μ_u), which Euler reaches exactly
    mus = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    calls = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(sigma.shape)
        return mus[y].reshape(-1, 1, 1, 1, 1).expand_as(x)

    x = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64) * 10  # video
    fn = guided(denoiser, [{"y": torch.tensor([0, 0])}, {"y": torch.tensor([1, 2])}], [3.0])
    out = karras.sample_euler(fn, x, karras.get_sigmas_karras(5, 0.1, 10.0, dtype=torch.float64), disable=True)
    expected = torch.tensor([3.0, -6.0], dtype=torch.float64).reshape(2, 1, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(out, expected)
    assert len(calls) == 5 and all(s == (4,) for s in calls)


def test_single_condition_set_calls_the_model_directly() -> None:
    model = LabelModel()
    x = torch.randn(3, 2, 2, 2)
    out = guided(model, [{"y": torch.tensor([1, 2, 3])}], [])(x, 4.0)
    assert model.calls == 1 and model.x.shape[0] == 3 and model.t == 4.0
    torch.testing.assert_close(out, x * torch.tensor([2.0, 3.0, 4.0]).reshape(3, 1, 1, 1) + 4.0)


def test_shared_kwargs_none_values_and_scalar_t() -> None:
    model = LabelModel()
    x = torch.randn(2, 1, 2, 2)
    mask = torch.tensor([[1, 0], [1, 1]])
    fn = guided(model, [{"y": torch.tensor([0, 0]), "context": None}, {"y": torch.tensor([1, 1]), "context": None}],
                [2.0])
    fn(x, 3.0, mask=mask, flag="on")
    assert model.calls == 1 and model.t == 3.0
    assert model.kw["context"] is None and model.kw["flag"] == "on"
    assert torch.equal(model.kw["mask"], torch.cat([mask, mask]))


def test_invalid_guidance_configuration() -> None:
    model, y = LabelModel(), torch.tensor([1, 2])
    with pytest.raises(ConfigError, match="2 condition sets need 1 scales, got 2"):
        guided(model, [{"y": y}, {"y": y}], [1.0, 2.0])
    with pytest.raises(ConfigError, match="at least one"):
        guided(model, [], [])
    with pytest.raises(ConfigError, match="'context' is None in some"):
        guided(model, [{"y": y, "context": None}, {"y": y, "context": torch.ones(2, 3)}], [1.0])
    with pytest.raises(ConfigError, match="share their keys"):
        guided(model, [{"y": y}, {"z": y}], [1.0])
    with pytest.raises(ShapeError, match="condition 'y'"):
        guided(model, [{"y": y}, {"y": torch.tensor([1, 2, 3])}], [1.0])(torch.randn(2, 1, 2, 2), 1.0)
    with pytest.raises(ConfigError, match="len\\(scales\\)"):
        combine_guidance([torch.ones(1)], [1.0])
    with pytest.raises(ConfigError, match="guided channels"):
        combine_guidance([torch.ones(1, 4), torch.ones(1, 4)], [1.0], channels=5)
    with pytest.raises(ShapeError, match="differ in shape"):
        combine_guidance([torch.ones(1, 4), torch.ones(1, 3)], [1.0])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_conditions_batched_once_match_per_step_semantics(n: int) -> None:
    model = LabelModel()
    ys = [torch.tensor([0, 4]), torch.tensor([1, 3]), torch.tensor([2, 5])][:n]
    scales = [1.3, 2.0][: n - 1]
    fn = guided(model, [{"y": y.clone()} for y in ys], scales)
    for step in range(3):
        x, t = torch.randn(2, 2, 3, 3), torch.tensor([1.0 + step, 2.0])
        e = [x * (1 + y.float().reshape(2, 1, 1, 1)) + t.reshape(2, 1, 1, 1) for y in ys]
        torch.testing.assert_close(fn(x, t), combine_guidance(e, scales))
    assert model.calls == 3


def test_batched_conditions_are_reused_across_steps() -> None:
    model = LabelModel()
    y_null, y = torch.tensor([0, 0]), torch.tensor([1, 2])
    fn = guided(model, [{"y": y_null}, {"y": y}], [2.0])
    x = torch.randn(2, 1, 2, 2)
    fn(x, 1.0)
    first = model.y
    y.add_(10)  # the concatenation was made on the first call, so later steps do not see this
    fn(x, 2.0)
    assert model.y is first and model.y.tolist() == [0, 0, 1, 2]


def test_prepare_runs_once_per_run_on_the_batched_conditions() -> None:
    seen = []

    def prepare(y: torch.Tensor) -> dict:
        seen.append(y.clone())
        return {"gain": 1 + y.float()}  # the step-invariant part of LabelModel, computed once

    def prepared_model(x: torch.Tensor, t: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return x * gain.reshape(-1, 1, 1, 1) + torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)

    conds = [{"y": torch.tensor([0, 0])}, {"y": torch.tensor([1, 3])}, {"y": torch.tensor([2, 5])}]
    fast = guided(prepared_model, conds, [1.5, 3.0], prepare=prepare)
    slow = guided(LabelModel(), conds, [1.5, 3.0])
    for step in range(4):
        x, t = torch.randn(2, 3, 2, 2), torch.tensor([float(step), 7.0])
        torch.testing.assert_close(fast(x, t), slow(x, t))
    assert len(seen) == 1 and seen[0].tolist() == [0, 0, 1, 3, 2, 5]
    single = guided(prepared_model, conds[1:2], [], prepare=prepare)
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(single(x, 1.0), x * torch.tensor([2.0, 4.0]).reshape(2, 1, 1, 1) + 1.0)
    with pytest.raises(ConfigError, match="both per condition set and shared"):
        fast(x, 1.0, gain=torch.ones(2))
    with pytest.raises(ShapeError, match="condition 'y'"):  # a new batch size is re-checked against the conditions
        fast(torch.randn(3, 3, 2, 2), 1.0)
