"""Prepared conditions: GenTron's ``prepare_conditions`` output drives ``forward`` to the raw inputs' result, and
sampling computes the text projections once per run, not once per step."""

from __future__ import annotations

import pytest
import torch

from dtx.data.info import DataInfo
from dtx.errors import ShapeError
from dtx.layers import CrossAttention
from dtx.testing import randomize_parameters
from dtx.training import objectives
from dtx.training.config import ObjectiveConfig
from dtx.training.objectives import build_objective
from dtx_gentron.model import build_gentron

SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=5, num_heads=4, context_dim=12,
             text_length=5, learn_sigma=False)
FRAMES = 3


def inputs(model, b: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """x, t and raw text inputs (padded captions, a second encoder when configured) for ``model``."""
    cfg, gen = model.config, torch.Generator().manual_seed(seed)
    shape = (b, FRAMES, 3, 8, 8) if cfg.num_frames else (b, 3, 8, 8)
    mask = torch.arange(5)[None] < torch.tensor([3, 5, 1, 4][:b])[:, None]
    raw = {"context": torch.randn(b, 5, 12, generator=gen), "context_mask": mask,
           "pooled": torch.randn(b, 12, generator=gen)}
    if cfg.context_dim_2:
        raw["context_2"] = torch.randn(b, 5, cfg.context_dim_2, generator=gen)
        raw["context_mask_2"] = mask.flip(0)
    return torch.randn(shape, generator=gen), torch.tensor([3, 250, 600, 999][:b]), raw


CASES = {
    "cross-attention": ({}, {}),
    "adaln": ({"conditioning": "adaln"}, {}),
    "two-encoders": ({"context_dim_2": 8}, {}),
    "learned-null": ({"learned_null": True, "context_dim_2": 8},
                     {"text_null": torch.tensor([True, False, True, False])}),
    "t2v-motion-free": ({"num_frames": FRAMES}, {"motion_free": torch.tensor([True, False, False, True])}),
    "t2v-adaln-pooled-only": ({"num_frames": FRAMES, "conditioning": "adaln"}, {"context": None}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prepared_forward_equals_raw_forward(case: str) -> None:
    options, extra = CASES[case]
    model = randomize_parameters(build_gentron(**SMALL, **options))
    x, t, raw = inputs(model)
    raw = {**raw, **extra}
    with torch.no_grad():
        expected = model(x, t, **raw)
        prepared = model.prepare_conditions(**raw)
        out = model(x, t, **prepared)
    cache = prepared["text_cache"]
    assert cache.cond.shape == (4, 32)
    if model.config.cross_attention:
        blocks = 3 if model.config.context_dim_2 else 5
        assert cache.kv.shape == (4, blocks, 5, 64) and cache.mask.shape == (4, 5)
        assert (cache.kv_2 is not None) == bool(model.config.context_dim_2)
    else:
        assert cache.kv is None
    assert {k: v for k, v in prepared.items() if k != "text_cache"} == {k: v for k, v in raw.items() if v is not None}
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert expected.abs().mean() > 1e-3  # random weights: the comparison can fail


def test_a_text_cache_that_does_not_fit_is_refused() -> None:
    import dataclasses

    model = randomize_parameters(build_gentron(**SMALL, context_dim_2=8))
    x, t, raw = inputs(model)
    cache = model.prepare_conditions(**raw)["text_cache"]
    with pytest.raises(ShapeError, match="text_cache.kv_2 must be"):
        model(x, t, **raw, text_cache=dataclasses.replace(cache, kv_2=None))
    with pytest.raises(ShapeError, match="text_cache.kv must be"):
        model(x, t, **raw, text_cache=dataclasses.replace(cache, kv=cache.kv[:, :2]))
    with pytest.raises(ShapeError, match="text_cache.cond must be"):
        model(x[:2], t[:2], **{k: v[:2] for k, v in raw.items()}, text_cache=cache)
    with pytest.raises(ShapeError, match="needs text"):
        model.prepare_conditions()


def test_cross_attention_takes_precomputed_kv() -> None:
    ca = randomize_parameters(CrossAttention(8, 2, context_dim=6))
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 5, 6, generator=gen)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    kv = ca.project_context(ctx)
    assert kv.shape == (2, 5, 16) and list(ca.state_dict()) == ["q.weight", "q.bias", "kv.weight", "kv.bias",
                                                                 "proj.weight", "proj.bias"]
    torch.testing.assert_close(ca(x, kv=kv, mask=mask), ca(x, ctx, mask), rtol=0, atol=0)
    with pytest.raises(ShapeError, match="needs a context"):
        ca(x)
    with pytest.raises(ShapeError, match="kv must be"):
        ca(x, kv=kv[:1])


class Counter:
    """Counts calls of ``y_proj`` (caption MLP) and of every block's ``project_context`` (cross-attention K/V)."""

    def __init__(self, model, monkeypatch) -> None:
        self.y_proj = self.kv = 0
        model.y_proj.register_forward_hook(lambda *_: self._add("y_proj"))
        project = CrossAttention.project_context

        def counted(ca, context):
            self.kv += 1
            return project(ca, context)

        monkeypatch.setattr(CrossAttention, "project_context", counted)

    def _add(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)


def _mfg_conds(raw: dict, null: dict) -> list[dict]:
    """GenTron's motion-free guidance: (∅, no motion), (∅, motion), (text, motion)."""
    b = raw["context"].shape[0]
    free, moving = torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
    return [{**null, "motion_free": free}, {**null, "motion_free": moving}, {**raw, "motion_free": moving}]


@pytest.mark.parametrize("kind, sampler", [("gaussian", "ddim"), ("karras", "heun")])
def test_sampling_projects_text_once_per_run(kind: str, sampler: str, monkeypatch) -> None:
    model = randomize_parameters(build_gentron(**SMALL, num_frames=FRAMES))
    _, _, raw = inputs(model, b=2)
    null = {k: torch.zeros_like(v) if v.is_floating_point() else torch.ones_like(v) for k, v in raw.items()}
    conds, scales = _mfg_conds(raw, null), [1.5, 4.0]
    info = DataInfo(channels=3, height=8, width=8, frames=FRAMES)
    objective = build_objective(ObjectiveConfig(kind=kind, diffusion_steps=100), model, info)
    counter = Counter(model, monkeypatch)

    def sample(steps: int) -> torch.Tensor:
        with torch.no_grad():
            return objective.sample(model, (2, FRAMES, 3, 8, 8), conds, scales, sampler, steps,
                                    torch.Generator().manual_seed(3))

    fast_counts, slow_counts = [], []
    for steps in (2, 5):
        counter.y_proj = counter.kv = 0
        fast = sample(steps)
        fast_counts.append((counter.y_proj, counter.kv))
        counter.y_proj = counter.kv = 0
        with monkeypatch.context() as m:
            m.setattr(objectives, "prepare_hook", lambda model: None)
            slow = sample(steps)
        slow_counts.append((counter.y_proj, counter.kv))
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
        assert fast.abs().mean() > 1e-3
    assert fast_counts == [(1, 5), (1, 5)]  # once per run: one caption MLP, one K/V projection per block
    assert slow_counts[1][0] > slow_counts[0][0] > 1 and slow_counts[1][1] == 5 * slow_counts[1][0]  # per step
