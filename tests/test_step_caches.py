"""Step caches (``sample.cache``): threshold 0 gives exactly the uncached samples for DiT, Latte and GenTron; a cache
decides once per batched forward, so every guidance term of a step uses the same fresh or cached features; models
whose blocks a cache cannot reach are refused with the reason."""

from __future__ import annotations

import pytest
import torch

import dtx
from dtx.data.info import DataInfo
from dtx.errors import ConfigError
from dtx.layers.attention_broadcast import attention_roles
from dtx.layers.caches import CACHES
from dtx.layers.step_cache import step_cache
from dtx.testing import randomize_parameters
from dtx.training.config import ObjectiveConfig
from dtx.training.objectives import build_objective

MODELS = {
    "DiT": (dict(input_size=8, in_channels=2, depth=3, hidden_size=32, num_heads=2, num_classes=3, learn_sigma=False),
            (2, 8, 8), lambda n: {"y": torch.arange(n) % 3}),
    "Latte": (dict(input_size=4, in_channels=2, depth=4, hidden_size=32, num_heads=2, num_frames=3, num_classes=3,
                   learn_sigma=False), (3, 2, 4, 4), lambda n: {"y": torch.arange(n) % 3}),
    "GenTron": (dict(input_size=8, in_channels=2, depth=2, hidden_size=32, num_heads=2, context_dim=16,
                     text_length=4, num_frames=3, learn_sigma=False), (3, 2, 8, 8),
                lambda n: {"context": torch.randn(n, 4, 16, generator=torch.Generator().manual_seed(n)),
                           "pooled": torch.randn(n, 16, generator=torch.Generator().manual_seed(n + 1))}),
}


def setup(name: str):
    kw, shape, cond = MODELS[name]
    model = randomize_parameters(dtx.create_model(name, **kw), 0, std=0.05).eval()
    info = DataInfo(channels=2, height=shape[-1], width=shape[-1], frames=shape[0] if len(shape) == 4 else None)
    return model, build_objective(ObjectiveConfig(kind="flow"), model, info), shape, cond


def sample(model, objective, shape, conds, scales, cache=None, **options):
    with step_cache(model, CACHES[cache] if cache else None, options) as stats:
        x = objective.sample(model, (2, *shape), conds, scales, "flow-euler", 6, torch.Generator().manual_seed(0))
    return x, stats


#: each cache's setting that computes everything: threshold 0, or broadcast ranges of 1
EXACT = {"first-block": {"threshold": 0.0}, "teacache": {"threshold": 0.0},
         "pab": {"spatial": 1, "temporal": 1, "cross": 1}}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache", list(CACHES))
def test_threshold_zero_gives_exactly_the_uncached_samples(name, cache):
    model, objective, shape, cond = setup(name)
    conds = [cond(2)]
    plain, _ = sample(model, objective, shape, conds, [])
    cached, stats = sample(model, objective, shape, conds, [], cache, **EXACT[cache])
    assert torch.equal(cached, plain)
    per_forward = 1 if cache != "pab" else sum(1 for _ in attention_roles(model))
    assert stats.skipped == 0 and stats.full == 6 * per_forward


def test_pab_reuses_each_role_for_its_range_inside_the_window_only():
    """GenTron T2V has all three roles; with 20 Euler steps, window [0.22, 0.88] and the default ranges (spatial
    2, temporal 4, cross 6), the evaluations computed per layer follow from counting (an independent tally below)."""
    model, objective, shape, cond = setup("GenTron")
    roles = attention_roles(model)
    assert sorted({role for role, _ in roles.values()}) == ["cross", "spatial", "temporal"]
    calls: dict[str, list[float]] = {}
    for name, (_, module) in roles.items():
        module.register_forward_pre_hook(lambda m, a, name=name: calls.setdefault(name, []).append(0.0))
    steps = 20
    with step_cache(model, CACHES["pab"], {"window": [0.22, 0.88]}) as stats:  # bounds between grid points
        objective.sample(model, (2, *shape), [cond(2)], [], "flow-euler", steps, torch.Generator().manual_seed(0))
    # flow-euler evaluates at grid times 1, 0.95, ..., 0.05: progress p = 1 - t = 0, 0.05, ..., 0.95
    progress = [i / steps for i in range(steps)]

    def computed(reach: int) -> int:
        count, age = 0, None
        for p in progress:
            if 0.22 <= p <= 0.88 and age is not None and age + 1 < reach:
                age += 1
            else:
                count, age = count + 1, 0
        return count

    want = {name: computed({"spatial": 2, "temporal": 4, "cross": 6}[role]) for name, (role, _) in roles.items()}
    assert stats.full == sum(want.values()) and stats.full + stats.skipped == steps * len(roles)
    assert want[next(n for n, (r, _) in roles.items() if r == "cross")] < want[next(
        n for n, (r, _) in roles.items() if r == "spatial")]
    assert all(len(c) == steps for c in calls.values())  # the layer is entered every step; compute is skipped
    # with guidance the two terms run as one batch: the same decisions, each covering both terms
    with step_cache(model, CACHES["pab"], {"window": [0.22, 0.88]}) as guided_stats:
        objective.sample(model, (2, *shape), [cond(2), cond(2)], [3.0], "flow-euler", steps,
                         torch.Generator().manual_seed(0))
    assert (guided_stats.full, guided_stats.skipped) == (stats.full, stats.skipped)


@pytest.mark.parametrize("cache", ["first-block", "teacache"])
def test_a_cache_decides_once_for_all_guidance_terms_of_a_step(cache):
    """With guidance, every block evaluation sees the whole batched forward (both terms); skipped steps add the
    cached residual to every row at once."""
    model, objective, shape, cond = setup("DiT")
    sizes = []
    handle = model.blocks[1].register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        _, stats = sample(model, objective, shape, [cond(2), cond(2)], [2.0], cache, threshold=10.0)
    finally:
        handle.remove()
    assert stats.skipped > 0 and stats.full + stats.skipped == 6
    assert sizes and set(sizes) == {4}  # 2 samples x 2 guidance terms, never one term alone
    assert len(sizes) == stats.full


def test_pab_reaches_hdit_attention_blocks_and_ranges_of_one_are_exact():
    hdit = dtx.create_model("HDiT", input_size=8, patch_size=2, in_channels=2, depths=[1, 1], widths=[64, 128],
                            d_ffs=[96, 192], self_attns=["global", "global"], num_classes=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the zero-initialised projections made non-zero, so that attention reaches the output
        for p in hdit.parameters():
            if p.ndim == 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    objective = build_objective(ObjectiveConfig(kind="karras"), hdit, DataInfo(channels=2, height=8, width=8))
    assert {role for role, _ in attention_roles(hdit).values()} == {"spatial"} and len(attention_roles(hdit)) == 3

    def run(**options):
        with step_cache(hdit, CACHES["pab"] if options else None, options) as stats:
            x = objective.sample(hdit, (2, 2, 8, 8), [{}], [], "euler", 8, torch.Generator().manual_seed(0))
        return x, stats

    plain, _ = run()
    exact, stats = run(spatial=1)
    assert torch.isfinite(plain).all() and torch.equal(exact, plain) and stats.skipped == 0
    reused, stats = run(window=[0.0, 1.0])
    assert stats.skipped > 0 and not torch.equal(reused, plain) and torch.isfinite(reused).all()


def test_models_a_cache_cannot_reach_are_refused():
    latte1 = dtx.create_model("PixArt", depth=1, hidden_size=32, num_heads=2, input_size=8, context_dim=16,
                              text_length=4, num_frames=2)  # Latte-1's spatial and temporal blocks interleave
    with step_cache(latte1, CACHES["first-block"], {}):
        with pytest.raises(ConfigError, match="BlockStack.run"):
            latte1(torch.randn(1, 2, 4, 8, 8), torch.tensor([5]), torch.randn(1, 4, 16))
    hdit = dtx.create_model("HDiT", input_size=8, patch_size=2, in_channels=1, depths=[1, 1], widths=[64, 128],
                            d_ffs=[96, 192], self_attns=["neighborhood:7", "global"])
    with pytest.raises(ConfigError, match="sample.cache"):
        with step_cache(hdit, CACHES["teacache"], {}):
            pass
    with pytest.raises(ConfigError, match="threshold"):
        with step_cache(dtx.create_model("DiT", **MODELS["DiT"][0]), CACHES["first-block"], {"threshold": -1}):
            pass


def test_a_family_calibrated_default_fills_in_what_the_options_leave_out():
    """GenTron declares its teacache threshold (calibrated on its demo); given options still win, and a family
    without a declaration gets the cache's own default."""
    gentron, _, _, _ = setup("GenTron")
    assert gentron.step_cache_defaults["teacache"]["threshold"] != 0.4
    with step_cache(gentron, CACHES["teacache"], {}, name="teacache"):
        assert gentron.blocks._step_cache.threshold == gentron.step_cache_defaults["teacache"]["threshold"]
    with step_cache(gentron, CACHES["teacache"], {"threshold": 0.1}, name="teacache"):
        assert gentron.blocks._step_cache.threshold == 0.1
    dit, _, _, _ = setup("DiT")
    with step_cache(dit, CACHES["teacache"], {}, name="teacache"):
        assert dit.blocks._step_cache.threshold == 0.4
