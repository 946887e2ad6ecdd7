"""GenTron model: shapes, the properties the paper's design implies (T2V from T2I, motion-free mask, padding), and
motion-free guidance against its formula."""

from __future__ import annotations

import pytest
import torch

import dtx
from dtx.diffusion.guidance import combine_guidance
from dtx.errors import ConfigError, ShapeError
from dtx_gentron.model import GENTRON_PRESETS, GenTron, GenTronT2V, build_gentron

SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=4, context_dim=12,
             text_length=5, learn_sigma=False)


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its init (zero projections would hide the paths under test)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def text(b: int = 2, length: int = 5, dim: int = 12, valid: tuple[int, ...] = (3, 5)) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    ctx = torch.randn(b, length, dim, generator=gen)
    mask = torch.arange(length)[None] < torch.tensor(valid)[:, None]
    return ctx, mask, torch.randn(b, dim, generator=gen)


@pytest.mark.parametrize("conditioning", ["cross-attention", "adaln"])
def test_t2i_shapes_zero_init_and_gradients(conditioning):
    model = build_gentron(**SMALL, conditioning=conditioning)
    assert isinstance(model, GenTron) and not isinstance(model, GenTronT2V)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    ctx, mask, pooled = text()
    out = model(x, t, ctx, mask, pooled)
    assert out.shape == (2, 3, 8, 8) and torch.equal(out, torch.zeros_like(out))  # adaLN-Zero + zero projections
    perturbed(model)
    model(x, t, ctx, mask, pooled).square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), \
        [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert (model.y_proj is None) == (conditioning == "adaln")


def test_learn_sigma_doubles_channels_and_video_shapes():
    model = build_gentron(**{**SMALL, "learn_sigma": True}, num_frames=3)
    assert isinstance(model, GenTronT2V) and model.channel_dim == 2
    ctx, mask, pooled = text()
    assert model(torch.randn(2, 3, 3, 8, 8), torch.tensor([1, 2]), ctx, mask, pooled).shape == (2, 3, 6, 8, 8)
    assert model.input_shape == (3, 3, 8, 8)


@pytest.mark.parametrize("temporal_pos, frame_embed", [("rope", "none"), ("sincos", "none"), ("rope+sincos", "none"),
                                                        ("none", "none"), ("rope+sincos", "tokens")])
def test_t2v_built_from_t2i_equals_t2i_per_frame(temporal_pos, frame_embed):
    """TempSelfAttn's zero output projection (and the zero frame embedder): at initialisation the T2V model is the
    T2I model on each frame, with any temporal positions."""
    t2i = perturbed(build_gentron(**SMALL)).double()
    t2v = build_gentron(**SMALL, num_frames=4, temporal_pos=temporal_pos, frame_embed=frame_embed).double()
    missing, unexpected = t2v.load_state_dict(t2i.state_dict(), strict=False)
    assert not unexpected and all(".temp_" in k or k.startswith("frame_embedder.") for k in missing)
    x = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([5, 900])
    ctx, mask, pooled = (v.double() if v.is_floating_point() else v for v in text())
    video = t2v(x, t, ctx, mask, pooled)
    frames = torch.stack([t2i(x[:, f], t, ctx, mask, pooled) for f in range(4)], dim=1)
    torch.testing.assert_close(video, frames, rtol=0, atol=1e-12)


def test_motion_free_mask_makes_frames_independent():
    model = perturbed(build_gentron(**SMALL, num_frames=4))
    ctx, mask, pooled = text()
    x = torch.randn(2, 4, 3, 8, 8)
    t = torch.tensor([50, 50])
    free = torch.tensor([True, False])
    changed = x.clone()
    changed[:, 1:] += torch.randn_like(changed[:, 1:])  # every frame but the first
    a, b = model(x, t, ctx, mask, pooled, motion_free=free), model(changed, t, ctx, mask, pooled, motion_free=free)
    torch.testing.assert_close(a[0, 0], b[0, 0], rtol=0, atol=1e-6)  # motion-free: frame 0 sees only itself
    assert (a[1, 0] - b[1, 0]).abs().max() > 1e-3  # motion on: frame 0 attends to the changed frames


def test_motion_free_is_the_identity_mask_not_a_skipped_layer():
    """Each frame attends to itself only: TempSelfAttn's output is proj(W_v LN(x)) per token (softmax over one key
    is 1)."""
    model = perturbed(build_gentron(**SMALL, num_frames=3))
    block = model.blocks[0]
    h = torch.randn(2 * 3, 16, 32)  # [(B F), N, D]
    from dtx_gentron.model import frame_layout
    layout = frame_layout(model.config, 2, 3, 16, torch.tensor([True, True]), h.device)
    out = block._between(h, None, layout)
    d = 32
    v = block.temp_attn.qkv(block.temp_norm(h))[..., 2 * d:]  # value rows of qkv
    torch.testing.assert_close(out, h + block.temp_attn.proj(v), rtol=1e-5, atol=1e-6)
    skipped = torch.zeros(())
    assert not torch.allclose(out, h + skipped)


def test_sincos_temporal_positions_tell_the_frames_apart():
    """``temporal_pos: sincos`` adds sin(f w_k), cos(f w_k) (w_k = 10000^(-k / (D/2))) of frame f to TempSelfAttn's
    normalised input: on motion-free frames (each attends to itself) the output is proj(W_v (LN(x) + table[f]))."""
    import math

    model = perturbed(build_gentron(**SMALL, num_frames=3, temporal_pos="sincos"))
    block, d = model.blocks[0], 32
    from dtx_gentron.model import frame_layout
    same = torch.randn(2, 1, 16, d).expand(2, 3, 16, d).reshape(6, 16, d)  # [(B F), N, D]: three equal frames
    layout = frame_layout(model.config, 2, 3, 16, torch.tensor([True, True]), same.device)
    out = block._between(same, None, layout).view(2, 3, 16, d)
    omega = [10000 ** (-k / (d / 2)) for k in range(d // 2)]
    table = torch.tensor([[math.sin(f * w) for w in omega] + [math.cos(f * w) for w in omega] for f in range(3)])
    for f in range(3):
        v = block.temp_attn.qkv(block.temp_norm(same.view(2, 3, 16, d)[:, f]) + table[f])[..., 2 * d:]
        torch.testing.assert_close(out[:, f], same.view(2, 3, 16, d)[:, f] + block.temp_attn.proj(v),
                                   rtol=1e-5, atol=1e-5)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3  # equal frames, different outputs: the index is seen
    plain = perturbed(build_gentron(**SMALL, num_frames=3, temporal_pos="none"))
    flat = plain.blocks[0]._between(same, None, frame_layout(plain.config, 2, 3, 16, torch.tensor([True, True]),
                                                             same.device)).view(2, 3, 16, d)
    torch.testing.assert_close(flat[:, 0], flat[:, 1], rtol=0, atol=1e-6)  # no positions: equal frames stay equal


def test_padding_tokens_change_nothing():
    model = perturbed(build_gentron(**SMALL, num_frames=2))
    ctx, mask, pooled = text(valid=(2, 4))
    x = torch.randn(2, 2, 3, 8, 8)
    t = torch.tensor([10, 20])
    junk = ctx.clone()
    junk[~mask] = 1e3 * torch.randn_like(junk[~mask])
    torch.testing.assert_close(model(x, t, ctx, mask, pooled), model(x, t, junk, mask, pooled), rtol=0, atol=0)


def test_learned_null_replaces_the_caption():
    model = perturbed(build_gentron(**SMALL, learned_null=True))
    ctx, mask, pooled = text()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 20])
    null = torch.tensor([True, False])
    out = model(x, t, ctx, mask, pooled, text_null=null)
    other = ctx.clone()
    other[0] = torch.randn_like(other[0])  # a dropped caption's content must not matter
    torch.testing.assert_close(out, model(x, t, other, mask, torch.randn_like(pooled) * null[:, None] + pooled
                                          * ~null[:, None], text_null=null))
    expected_null = model.null_context.mean(0)  # pooled of the learned null = its tokens' mean
    manual = model(x[:1], t[:1], model.null_context[None].detach(), torch.ones(1, 5, dtype=torch.bool),
                   expected_null[None].detach())
    torch.testing.assert_close(out[:1], manual, rtol=1e-5, atol=1e-6)


def test_two_encoders_alternate_blocks():
    model = perturbed(build_gentron(**SMALL, context_dim_2=7))
    ctx, mask, pooled = text()
    ctx2 = torch.randn(2, 5, 7)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 20])
    base = model(x, t, ctx, mask, pooled, context_2=ctx2)
    assert (base - model(x, t, ctx, mask, pooled, context_2=ctx2 + 1)).abs().max() > 1e-4
    with pytest.raises(ShapeError, match="context_2"):
        model(x, t, ctx, mask, pooled)


def test_mfg_with_motion_scale_one_is_plain_cfg():
    """eps = e(0,0) + lT (e(cT,cM) - e(0,cM)) + lM (e(0,cM) - e(0,0)); lM = 1 gives CFG at lT over e(0,cM)."""
    gen = torch.Generator().manual_seed(3)
    e00, e0m, etm = (torch.randn(2, 4, 3, 8, 8, generator=gen) for _ in range(3))
    s = 7.5
    mfg = combine_guidance([e00, e0m, etm], [1.0, s], channel_dim=2)
    torch.testing.assert_close(mfg, e0m + s * (etm - e0m))
    lm = 1.2
    formula = e00 + s * (etm - e0m) + lm * (e0m - e00)
    torch.testing.assert_close(combine_guidance([e00, e0m, etm], [lm, s], channel_dim=2), formula)


def test_presets_and_options():
    assert {"GenTron-S/2", "GenTron-B/2", "GenTron-XL/2", "GenTron-G/2"} <= set(dtx.list_models())
    assert GENTRON_PRESETS["GenTron-G/2"] == {"depth": 48, "hidden_size": 1664, "num_heads": 16, "patch_size": 2}
    with pytest.raises(ConfigError, match="conditioning"):
        build_gentron(**SMALL, conditioning="film")
    with pytest.raises(ShapeError, match="text-to-image"):
        build_gentron(**SMALL)(torch.randn(1, 3, 8, 8), torch.tensor([1]), *text(b=1, valid=(5,)),
                               motion_free=torch.tensor([True]))


@pytest.mark.parametrize("name, millions", [("GenTron-XL/2", 930.0), ("GenTron-G/2", 3083.8)])
def test_preset_sizes_near_the_paper(name, millions):
    """Parameter counts on the meta device (no memory) within 12% of the paper's (its breakdown is unpublished)."""
    from dtx.costs import model_cost

    cost = model_cost(name, context_dim=4096, text_length=120, learn_sigma=True)
    assert abs(cost.params / 1e6 - millions) / millions < 0.12, cost.params
    assert cost.flops > 0
