"""Shared layers against the formulas of facebookresearch/DiT models.py and k-diffusion's image_transformer_v2.py
and axial_rope.py, each written out here independently."""

from __future__ import annotations

import math

import pytest
import torch

from dtx.errors import ConfigError, ShapeError
from dtx.layers import (AdaRMSNorm, Attention, AxialRoPE, CrossAttention, FourierFeatures, LabelEmbedder, LinearGEGLU,
                        Mlp, PatchEmbed, RMSNorm, TimestepEmbedder, frame_positions, grid_positions, make_axial_pos,
                        modulate, sincos_1d_torch, sincos_2d, sincos_2d_torch, timestep_embedding, unpatchify)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- timestep and label embeddings (DiT's TimestepEmbedder, LabelEmbedder) ---------------------------------------------

def test_timestep_embedding_formula():
    ts = [0.0, 1.0, 17.5, 250.0, 999.0]
    emb = timestep_embedding(torch.tensor(ts), 256)
    assert emb.shape == (5, 256) and emb.dtype == torch.float32
    expected = torch.zeros(5, 256, dtype=torch.float64)
    for n, t in enumerate(ts):
        for k in range(128):
            f = math.exp(-math.log(10000) * k / 128)  # divisor 128 = half, not half - 1
            expected[n, k] = math.cos(t * f)  # cos half first
            expected[n, 128 + k] = math.sin(t * f)
    # float32 arguments up to t = 999 carry ~1e-4 absolute rounding; a half-1 divisor or sin/cos swap is >= 7e-3 off
    torch.testing.assert_close(emb.double(), expected, atol=5e-4, rtol=0)
    torch.testing.assert_close(emb[:3].double(), expected[:3], atol=1e-5, rtol=0)


def test_timestep_embedding_odd_dim_is_zero_padded():
    emb = timestep_embedding(torch.tensor([3.0]), 7)
    assert emb.shape == (1, 7)
    assert emb[0, 6] == 0
    torch.testing.assert_close(emb[0, 0].double(), torch.tensor(math.cos(3.0), dtype=torch.float64))


def test_timestep_embedder_is_features_then_mlp():
    emb = TimestepEmbedder(16, frequency_embedding_size=32)
    assert [k for k in emb.state_dict()] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    t = torch.tensor([5.0, 400.0])
    feats = timestep_embedding(t, 32)
    h = feats @ emb.mlp[0].weight.T + emb.mlp[0].bias
    expected = (h * torch.sigmoid(h)) @ emb.mlp[2].weight.T + emb.mlp[2].bias
    torch.testing.assert_close(emb(t), expected, atol=1e-6, rtol=0)


def test_label_embedder_table_and_null_row():
    assert LabelEmbedder(10, 4, 0.1).embedding_table.weight.shape == (11, 4)
    assert LabelEmbedder(10, 4, 0.0).embedding_table.weight.shape == (10, 4)
    assert LabelEmbedder(10, 4, 0.1).null_class == 10 and LabelEmbedder(10, 4, 0.0).null_class is None


def test_label_embedder_dropout_semantics():
    emb = LabelEmbedder(10, 4, 0.1)
    table = emb.embedding_table.weight
    labels = torch.tensor([3, 7, 1, 9])
    torch.testing.assert_close(emb(labels, train=False), table[labels])  # eval: never dropped
    forced = emb(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))  # forced even in eval
    torch.testing.assert_close(forced, table[torch.tensor([10, 7, 10, 9])])
    always = LabelEmbedder(10, 4, 1.0)
    torch.testing.assert_close(always(labels, train=True), always.embedding_table.weight[[10] * 4])
    never = LabelEmbedder(10, 4, 0.0)
    torch.testing.assert_close(never(labels, train=True), never.embedding_table.weight[labels])


def test_label_embedder_drop_mask_is_rand_below_p():
    emb = LabelEmbedder(10, 4, 0.3)
    labels = torch.arange(4000) % 10
    torch.manual_seed(123)
    dropped = emb.token_drop(labels) == 10
    torch.manual_seed(123)
    assert torch.equal(dropped, torch.rand(4000) < 0.3)  # DiT's mask: rand(N) < p, same RNG draw
    assert abs(dropped.float().mean().item() - 0.3) < 0.03


def test_label_embedder_without_null_class_refuses_to_drop():
    emb = LabelEmbedder(10, 4, 0.0)
    labels = torch.tensor([1, 2])
    torch.testing.assert_close(emb(labels, train=False, force_drop_ids=torch.tensor([0, 0])),
                               emb.embedding_table.weight[labels])
    with pytest.raises(ConfigError, match="no null class"):
        emb(labels, train=False, force_drop_ids=torch.tensor([1, 0]))


def test_fourier_features_cos_first():
    ff = FourierFeatures(2, 6)
    ff.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, 1.0], [1.0, -1.0]]))
    x = torch.tensor([[0.25, 0.5]])
    f = [2 * math.pi * (0.5 * 0.25), 2 * math.pi * 0.5, 2 * math.pi * (0.25 - 0.5)]
    expected = torch.tensor([[*(math.cos(a) for a in f), *(math.sin(a) for a in f)]])
    torch.testing.assert_close(ff(x), expected, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="even out_features"):
        FourierFeatures(1, 5)


# -- sin-cos position tables (DiT's get_2d_sincos_pos_embed) -----------------------------------------------------------

def test_sincos_2d_layout_on_a_non_square_grid():
    dim, gh, gw = 16, 3, 5
    table = sincos_2d(dim, gh, gw)
    assert table.shape == (gh * gw, dim)
    omega = [10000 ** (-m / (dim / 4)) for m in range(dim // 4)]
    q = dim // 4
    for i in range(gh):
        for j in range(gw):
            row = table[i * gw + j]  # row-major token order
            for m, w in enumerate(omega):
                assert row[m] == pytest.approx(math.sin(j * w), abs=1e-12)  # [0:D/2] = column j
                assert row[q + m] == pytest.approx(math.cos(j * w), abs=1e-12)
                assert row[2 * q + m] == pytest.approx(math.sin(i * w), abs=1e-12)  # [D/2:D] = row i
                assert row[3 * q + m] == pytest.approx(math.cos(i * w), abs=1e-12)
    t = sincos_2d_torch(dim, gh, gw)
    assert t.shape == (1, gh * gw, dim) and t.dtype == torch.float32
    assert sincos_2d(dim, 4).shape == (16, dim)  # grid_w defaults to grid_h
    with pytest.raises(ConfigError, match="divisible by 4"):
        sincos_2d(10, 2, 2)


def test_sincos_1d_table():
    dim, length = 8, 6
    t = sincos_1d_torch(dim, length)
    assert t.shape == (1, length, dim)
    for p in range(length):
        for m in range(dim // 2):
            w = 10000 ** (-m / (dim / 2))
            assert t[0, p, m].item() == pytest.approx(math.sin(p * w), abs=1e-6)
            assert t[0, p, dim // 2 + m].item() == pytest.approx(math.cos(p * w), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_of_another_grid_or_length_follow_the_stored_tables_dtype(dtype):
    stored = torch.full((1, 4 * 4, 8), 7.0, dtype=dtype)  # a model's table for a 4x4 grid (values only mark it)
    assert grid_positions(stored, (4, 4), 4, 4) is stored
    other = grid_positions(stored, (4, 4), 2, 8)  # same token count, another grid: built, not the stored one
    assert other.dtype == dtype and other.shape == (1, 16, 8)
    expected = torch.tensor([[math.sin(j * 10000 ** (-m / 2)) for m in range(2)] for i in range(2) for j in range(8)])
    torch.testing.assert_close(other[0, :, :2].float(), expected.to(dtype).float())  # dims [0, D/4): sin(column)
    frames = torch.full((1, 3, 8), 7.0, dtype=dtype)
    assert frame_positions(frames, 3) is frames
    five = frame_positions(frames, 5)
    assert five.dtype == dtype and five.shape == (1, 5, 8)
    torch.testing.assert_close(five[0, :, 0].float(), torch.tensor([math.sin(p) for p in range(5)]).to(dtype).float())


# -- patch embedding (timm's PatchEmbed; DiT's FinalLayer and unpatchify) ----------------------------------------------

@pytest.mark.parametrize("patch", [2, (2, 3)])
def test_patch_embed_unpatchify_round_trip_non_square(patch):
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    c, gh, gw = 3, 3, 5
    d = ph * pw * c
    embed = PatchEmbed(patch, c, d)
    with torch.no_grad():  # identity conv: output feature (r * pw + s) * C + ch = pixel (r, s) of channel ch
        embed.proj.weight.zero_()
        embed.proj.bias.zero_()
        for r in range(ph):
            for s in range(pw):
                for ch in range(c):
                    embed.proj.weight[(r * pw + s) * c + ch, ch, r, s] = 1.0
    x = torch.randn(2, c, gh * ph, gw * pw, generator=gen(1))
    tokens = embed(x)
    assert tokens.shape == (2, gh * gw, d)
    i, j = 1, 3  # token i * gw + j holds the patch at block row i, block column j, laid out (p_row, p_col, c)
    patch_px = x[:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(tokens[:, i * gw + j], patch_px)
    torch.testing.assert_close(unpatchify(tokens, patch, c, gh, gw), x)


def test_patch_shape_errors():
    embed = PatchEmbed(2, 4, 8)
    with pytest.raises(ShapeError, match="input size 7x8 is not divisible by the patch size 2x2"):
        embed(torch.zeros(1, 4, 7, 8))
    with pytest.raises(ShapeError, match=r"patch embed expects \[N, 4, H, W\], got \[1, 3, 8, 8\]"):
        embed(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ShapeError, match="cannot unpatchify"):
        unpatchify(torch.zeros(1, 6, 16), 2, 4, 2, 2)


# -- norms, modulation, GEGLU (DiT's modulate; k-diffusion's RMSNorm, AdaRMSNorm, LinearGEGLU) -------------------------

def test_modulate():
    x, shift, scale = (torch.randn(*s, generator=gen(n)) for n, s in enumerate([(2, 3, 4), (2, 4), (2, 4)]))
    out = modulate(x, shift, scale)
    for n in range(2):
        for t in range(3):
            for d in range(4):
                expected = x[n, t, d] * (1 + scale[n, d]) + shift[n, d]
                assert out[n, t, d].item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(modulate(x, None, scale), x * (1 + scale[:, None]))


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def test_rms_norm():
    norm = RMSNorm(6)
    with torch.no_grad():
        norm.scale.copy_(torch.linspace(0.5, 2.0, 6))
    x = torch.randn(3, 5, 6, generator=gen(2))
    torch.testing.assert_close(norm(x).double(), _rms(x) * norm.scale.double(), atol=1e-6, rtol=0)
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16


def test_ada_rms_norm_zero_init_is_plain_rms_norm_and_scales_per_sample():
    ada = AdaRMSNorm(6, 5)
    assert ada.linear.bias is None and torch.count_nonzero(ada.linear.weight) == 0
    x, cond = torch.randn(2, 3, 4, 6, generator=gen(3)), torch.randn(2, 5, generator=gen(4))
    torch.testing.assert_close(ada(x, cond), RMSNorm(6)(x))
    with torch.no_grad():
        ada.linear.weight.copy_(torch.randn(6, 5, generator=gen(5)))
    scale = 1 + cond.double() @ ada.linear.weight.double().T  # [B, 6], broadcast over H and W
    torch.testing.assert_close(ada(x, cond).double(), _rms(x) * scale[:, None, None, :], atol=1e-5, rtol=0)


def test_linear_geglu_value_then_gate_exact_gelu():
    layer = LinearGEGLU(4, 3).double()
    assert layer.weight.shape == (6, 4)
    x = torch.randn(5, 4, generator=gen(6), dtype=torch.float64)
    value = x @ layer.weight[:3].T + layer.bias[:3]
    gate = x @ layer.weight[3:].T + layer.bias[3:]
    gelu_exact = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    torch.testing.assert_close(layer(x), value * gelu_exact, atol=1e-12, rtol=0)
    assert LinearGEGLU(4, 3, bias=False).bias is None


# -- axial RoPE and positions (k-diffusion's make_axial_pos and AxialRoPE) ---------------------------------------------

def test_axial_rope_freqs_layout():
    d_head, n_heads = 16, 3
    rope = AxialRoPE(d_head, n_heads)
    per_head = d_head // 8
    total = n_heads * per_head
    assert rope.freqs.shape == (n_heads, per_head)
    for h in range(n_heads):
        for j in range(per_head):
            idx = j * n_heads + h  # log-spaced over [pi, 10 pi), interleaved across heads
            expected = math.exp(math.log(math.pi) + (math.log(10 * math.pi) - math.log(math.pi)) * idx / total)
            assert rope.freqs[h, j].item() == pytest.approx(expected, rel=1e-5)


def test_axial_rope_rotation_against_pairwise_loop():
    d_head, n_heads = 16, 2
    rope = AxialRoPE(d_head, n_heads)
    x = torch.randn(2, 5, n_heads, d_head, generator=gen(7), dtype=torch.float64)
    pos = torch.rand(2, 5, 2, generator=gen(8), dtype=torch.float64) * 2 - 1
    out = rope(x, pos)
    d, per_head = d_head // 4, d_head // 8
    expected = x.clone()
    for b in range(2):
        for n in range(5):
            for h in range(n_heads):
                for i in range(d):
                    axis, j = (0, i) if i < per_head else (1, i - per_head)  # first y angles, then x angles
                    theta = pos[b, n, axis].item() * rope.freqs[h, j].item()
                    a, c = x[b, n, h, i].item(), x[b, n, h, i + d].item()
                    expected[b, n, h, i] = a * math.cos(theta) - c * math.sin(theta)
                    expected[b, n, h, i + d] = c * math.cos(theta) + a * math.sin(theta)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., d_head // 2:], x[..., d_head // 2:])  # second half not rotated


def test_axial_rope_which_dims_follow_y_and_x_at_d_head_64():
    rope = AxialRoPE(64, 4)
    x = torch.randn(1, 4, 64, generator=gen(9))
    base = rope(x, torch.tensor([[0.3, -0.2]]))
    moved_y = (rope(x, torch.tensor([[0.7, -0.2]])) - base).abs().amax(0).amax(0) > 1e-6
    moved_x = (rope(x, torch.tensor([[0.3, 0.4]])) - base).abs().amax(0).amax(0) > 1e-6
    dims = torch.arange(64)
    y_dims = ((dims < 8) | ((dims >= 16) & (dims < 24)))
    x_dims = (((dims >= 8) & (dims < 16)) | ((dims >= 24) & (dims < 32)))
    assert torch.equal(moved_y, y_dims) and torch.equal(moved_x, x_dims)
    with pytest.raises(ConfigError, match="divisible by 8"):
        AxialRoPE(12, 2)


def test_make_axial_pos_bin_centres_and_aspect_ratio():
    square = make_axial_pos(3, 3)
    assert square.shape == (3, 3, 2)
    c3 = torch.tensor([-2 / 3, 0.0, 2 / 3])
    torch.testing.assert_close(square[:, 0, 0], c3)  # [..., 0] = y (row)
    torch.testing.assert_close(square[0, :, 1], c3)  # [..., 1] = x (column)
    wide = make_axial_pos(2, 4)  # x spans [-1, 1]; y spans [-1/2, 1/2]
    torch.testing.assert_close(wide[:, 0, 0], torch.tensor([-0.25, 0.25]))
    torch.testing.assert_close(wide[0, :, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    tall = make_axial_pos(4, 2)  # y spans [-1, 1]; x spans [-1/2, 1/2]
    torch.testing.assert_close(tall[:, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(tall[0, :, 1], torch.tensor([-0.25, 0.25]))
    wide_pixels = make_axial_pos(2, 2, pixel_aspect_ratio=2.0)  # a 2x2 grid of 2:1 pixels is twice as wide
    torch.testing.assert_close(wide_pixels[:, 0, 0], torch.tensor([-0.25, 0.25]))
    torch.testing.assert_close(wide_pixels[0, :, 1], torch.tensor([-0.5, 0.5]))


# -- transformer sub-blocks (timm key names, as in DiT's DiTBlock) -----------------------------------------------------

def _naive_mha(q, k, v):
    """[B, N, heads, hd] inputs, softmax(q k^T / sqrt(hd)) v per head, heads re-joined."""
    w = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bmhd->bnhd", w.softmax(-1), v).flatten(2)


def test_attention_module_qkv_layout():
    dim, heads = 8, 2
    attn = Attention(dim, heads).double()
    assert list(attn.state_dict()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    x = torch.randn(2, 5, dim, generator=gen(10), dtype=torch.float64)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # rows [q; k; v], each head's hd dims contiguous
    q, k, v = (qkv[..., i * dim:(i + 1) * dim].reshape(2, 5, heads, dim // heads) for i in range(3))
    expected = _naive_mha(q, k, v) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-10, rtol=0)
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        Attention(10, 4)


def test_attention_with_context_tokens_as_extra_keys_and_values():
    dim, heads = 8, 2
    attn = Attention(dim, heads).double()
    x = torch.randn(2, 5, dim, generator=gen(13), dtype=torch.float64)
    ctx = torch.randn(2, 3, dim, generator=gen(14), dtype=torch.float64)

    def split(t: torch.Tensor, i: int) -> torch.Tensor:  # i-th third of the qkv rows, by head
        qkv = t @ attn.qkv.weight.T + attn.qkv.bias
        return qkv[..., i * dim:(i + 1) * dim].reshape(*t.shape[:2], heads, dim // heads)

    k = torch.cat([split(x, 1), split(ctx, 1)], dim=1)  # keys of the tokens, then of the context
    v = torch.cat([split(x, 2), split(ctx, 2)], dim=1)
    expected = _naive_mha(split(x, 0), k, v) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, context=ctx), expected, atol=1e-10, rtol=0)


def test_cross_attention_key_names_change_nothing_but_the_names():
    plain = CrossAttention(8, 2, context_dim=6)
    pixart = CrossAttention(8, 2, context_dim=6, names=("q_linear", "kv_linear"))
    assert list(pixart.state_dict()) == ["q_linear.weight", "q_linear.bias", "kv_linear.weight", "kv_linear.bias",
                                         "proj.weight", "proj.bias"]
    pixart.load_state_dict({k.replace("q.", "q_linear.").replace("kv.", "kv_linear."): v
                            for k, v in plain.state_dict().items()})
    x, ctx = torch.randn(2, 4, 8, generator=gen(15)), torch.randn(2, 5, 6, generator=gen(16))
    torch.testing.assert_close(pixart(x, ctx), plain(x, ctx), atol=0, rtol=0)


def test_cross_attention_ignores_padded_context():
    ca = CrossAttention(8, 2, context_dim=6)
    assert list(ca.state_dict()) == ["q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"]
    x = torch.randn(2, 4, 8, generator=gen(11))
    ctx = torch.randn(2, 5, 6, generator=gen(12))
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    ctx2 = ctx.clone()
    ctx2[~mask] = 50.0
    torch.testing.assert_close(ca(x, ctx, mask), ca(x, ctx2, mask), atol=1e-6, rtol=0)
    # with every key kept the module equals the naive computation
    q = (x @ ca.q.weight.T + ca.q.bias).reshape(2, 4, 2, 4)
    kv = ctx @ ca.kv.weight.T + ca.kv.bias
    k, v = kv[..., :8].reshape(2, 5, 2, 4), kv[..., 8:].reshape(2, 5, 2, 4)
    torch.testing.assert_close(ca(x, ctx), _naive_mha(q, k, v) @ ca.proj.weight.T + ca.proj.bias,
                               atol=1e-5, rtol=0)


def test_mlp_default_is_tanh_gelu():
    mlp = Mlp(4, 16).double()
    x = torch.randn(3, 4, generator=gen(13), dtype=torch.float64)
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    tanh_gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(mlp(x), tanh_gelu @ mlp.fc2.weight.T + mlp.fc2.bias, atol=1e-12, rtol=0)


@pytest.mark.parametrize("change, key", [({"in_channels": 0}, "in_channels"), ({"depth": 0}, "depth"),
                                         ({"num_heads": 5}, "num_heads"), ({"hidden_size": 6, "num_heads": 3},
                                                                           "hidden_size"),
                                         ({"mlp_ratio": 0.0}, "mlp_ratio"), ({"input_size": 7}, "input_size")])
def test_validate_transformer_names_the_bad_key(change, key):
    import dataclasses

    from dtx.layers import PatchGridConfig

    @dataclasses.dataclass
    class Config(PatchGridConfig):
        input_size: int = 8
        patch_size: int = 2
        in_channels: int = 3
        depth: int = 2
        hidden_size: int = 32
        num_heads: int = 4
        mlp_ratio: float = 4.0

    Config().validate_transformer()
    with pytest.raises(ConfigError, match=key):
        Config(**change).validate_transformer()
