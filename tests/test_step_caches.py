"""Step caches (``sample.cache``): threshold 0 gives exactly the uncached samples for DiT, Latte and GenTron; a cache
decides once per batched forward, so every guidance term of a step uses the same fresh or cached features; models
whose blocks a cache cannot reach are refused with the reason."""

from __future__ import annotations

import pytest
import torch

import dtx
from dtx.data.info import DataInfo
from dtx.errors import ConfigError
from dtx.layers.step_cache import CACHES, step_cache
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


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache", list(CACHES))
def test_threshold_zero_gives_exactly_the_uncached_samples(name, cache):
    model, objective, shape, cond = setup(name)
    conds = [cond(2)]
    plain, _ = sample(model, objective, shape, conds, [])
    cached, stats = sample(model, objective, shape, conds, [], cache, threshold=0.0)
    assert torch.equal(cached, plain)
    assert stats.skipped == 0 and stats.full == 6


@pytest.mark.parametrize("cache", list(CACHES))
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


def test_models_a_cache_cannot_reach_are_refused():
    pixart = dtx.create_model("PixArt", depth=1, hidden_size=32, num_heads=2, input_size=8, context_dim=16,
                              text_length=4)
    with step_cache(pixart, CACHES["first-block"], {}):
        with pytest.raises(ConfigError, match="BlockStack.run"):
            pixart(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 4, 16))
    hdit = dtx.create_model("HDiT", input_size=8, patch_size=2, in_channels=1, depths=[1, 1], widths=[64, 128],
                            d_ffs=[96, 192], self_attns=["neighborhood:7", "global"])
    with pytest.raises(ConfigError, match="sample.cache"):
        with step_cache(hdit, CACHES["teacache"], {}):
            pass
    with pytest.raises(ConfigError, match="threshold"):
        with step_cache(dtx.create_model("DiT", **MODELS["DiT"][0]), CACHES["first-block"], {"threshold": -1}):
            pass
