"""DiT construction: initialisation, state-dict layout, the four block designs, options, errors, training helpers."""

from __future__ import annotations

import pytest
import torch

import dtx
from dtx_dit.model import DIT_PRESETS, DiT, DiTConfig

TINY = dict(input_size=8, depth=2, hidden_size=64, num_heads=2, num_classes=10)


def tiny(**kw) -> DiT:
    return dtx.create_model("DiT", **{**TINY, **kw})


def batch(n: int = 2, hw=(8, 8), classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, *hw, generator=g), torch.randint(0, 1000, (n,), generator=g), \
        torch.randint(0, classes, (n,), generator=g)


def test_all_twelve_presets_are_registered_with_the_paper_sizes():
    names = set(dtx.list_models(family="dit"))
    sizes_patches = {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    assert names == {"DiT"} | {f"DiT-{sp}" for sp in sizes_patches} | {f"SiT-{sp}" for sp in sizes_patches}
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name, preset in DIT_PRESETS.items():
        size, patch = name[4:].split("/")
        assert (preset["depth"], preset["hidden_size"], preset["num_heads"]) == sizes[size]
        assert preset["patch_size"] == int(patch)


def test_create_xl2_on_meta_has_the_official_292_keys():
    with torch.device("meta"):
        model = dtx.create_model("DiT-XL/2", input_size=32, num_classes=1000)
    sd = model.state_dict()
    assert len(sd) == 8 + 10 * 28 + 4 == 292
    assert sd["pos_embed"].shape == (1, 256, 1152) and sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["blocks.27.adaLN_modulation.1.weight"].shape == (6 * 1152, 1152)
    assert sd["final_layer.linear.weight"].shape == (4 * 8, 1152)
    assert not any("norm" in k for k in sd)
    assert model.null_class == 1000 and model.learn_sigma and model.out_channels == 8 and model.patch_size == 2


def test_init_gives_exactly_zero_output_and_identity_blocks():
    model = tiny()
    sd = model.state_dict()
    assert len(sd) == 8 + 10 * 2 + 4
    assert not model.pos_embed.requires_grad
    for k in ("blocks.0.adaLN_modulation.1.weight", "blocks.1.adaLN_modulation.1.bias",
              "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight", "final_layer.linear.bias"):
        assert torch.count_nonzero(sd[k]) == 0, k
    assert sd["t_embedder.mlp.0.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert sd["y_embedder.embedding_table.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    qkv = sd["blocks.0.attn.qkv.weight"]  # xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    assert qkv.abs().max().item() <= (6 / (64 + 192)) ** 0.5 and torch.count_nonzero(sd["blocks.0.attn.qkv.bias"]) == 0
    x, t, y = batch()
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8) and torch.count_nonzero(out) == 0
    h = torch.randn(2, 16, 64)
    assert torch.equal(model.blocks[0](h, torch.randn(2, 64)), h)


EXTRA_KEYS = {
    "adaln-zero": ({"adaLN_modulation.1.weight": (6 * 64, 64)}, True),
    "adaln": ({"adaLN_modulation.1.weight": (4 * 64, 64)}, True),
    "cross-attention": ({"cross_attn.q.weight": (64, 64), "cross_attn.kv.weight": (128, 64),
                         "cross_attn.proj.weight": (64, 64), "norm3.weight": (64,)}, False),
    "in-context": ({"norm1.weight": (64,), "norm2.bias": (64,)}, False),
}


@pytest.mark.parametrize("block", sorted(EXTRA_KEYS))
def test_block_designs_run_and_have_their_keys(block):
    model = tiny(block=block)
    extra, modulated = EXTRA_KEYS[block]
    sd = model.state_dict()
    for key, shape in extra.items():
        assert sd[f"blocks.1.{key}"].shape == shape
    assert ("final_layer.adaLN_modulation.1.weight" in sd) == modulated
    assert ("blocks.0.adaLN_modulation.1.weight" in sd) == modulated
    assert ("blocks.0.cross_attn.q.weight" in sd) == (block == "cross-attention")
    for name, p in model.named_parameters():  # leave the zero init, so the output depends on every part
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            torch.nn.init.normal_(p, std=0.1)
    x, t, y = batch()
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    # the conditioning reaches the output in every design
    assert not torch.allclose(out, model(x, t, (y + 1) % 10))
    assert not torch.allclose(out, model(x, t + 100, y))


def test_adaln_without_zero_init_is_not_the_identity():
    model = tiny(block="adaln")
    assert torch.count_nonzero(model.blocks[0].adaLN_modulation[1].weight) > 0
    h = torch.randn(2, 16, 64)
    assert not torch.allclose(model.blocks[0](h, torch.randn(2, 64)), h)


def test_in_context_tokens_are_removed_before_the_final_layer():
    model = tiny(block="in-context")
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args[0].shape[1]
        return hook

    model.final_layer.register_forward_pre_hook(record("tokens"))
    model.blocks[0].register_forward_pre_hook(record("block_tokens"))
    model(*batch())
    assert seen == {"tokens": 16, "block_tokens": 18}  # 16 image tokens + t and y


@pytest.mark.parametrize("num_classes,dropout,rows", [(0, 0.1, None), (1, 0.0, 1)])
def test_unconditional_models(num_classes, dropout, rows):
    model = tiny(num_classes=num_classes, class_dropout_prob=dropout)
    assert model.null_class is None
    sd = model.state_dict()
    assert sd.get("y_embedder.embedding_table.weight", torch.empty(0, 0)).shape[0] == (rows or 0)
    assert len(sd) == 8 + 10 * 2 + 4 - (rows is None)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, t, _ = batch()
    out = model(x, t)
    assert out.shape == (2, 8, 8, 8)
    torch.testing.assert_close(model(x, t, torch.zeros(2, dtype=torch.long)), out)


def test_label_dropout_uses_the_null_row_only_in_training():
    model = tiny(class_dropout_prob=0.5)
    assert model.y_embedder.embedding_table.num_embeddings == 11 and model.null_class == 10
    labels = torch.arange(10).repeat(20)
    table = model.y_embedder.embedding_table.weight
    model.train()
    emb = model.y_embedder(labels, model.training)
    dropped = (emb == table[10]).all(-1)
    assert 0.3 < dropped.float().mean().item() < 0.7
    torch.testing.assert_close(emb[~dropped], table[labels[~dropped]])
    model.eval()
    torch.testing.assert_close(model.y_embedder(labels, model.training), table[labels])


def test_custom_class_count_and_channels():
    model = tiny(num_classes=3, in_channels=3, learn_sigma=False, mlp_ratio=2.0)
    assert model.state_dict()["y_embedder.embedding_table.weight"].shape == (4, 64)
    assert model.state_dict()["blocks.0.mlp.fc1.weight"].shape == (128, 64)
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.tensor([1, 2]), torch.tensor([0, 3])).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("overrides,match", [
    (dict(input_size=10, patch_size=4), "not divisible by patch_size"),
    (dict(input_size=[8, 6], patch_size=4), "not divisible by patch_size"),
    (dict(hidden_size=66, num_heads=4), "num_heads"),
    (dict(hidden_size=66, num_heads=6), "divisible by 4"),
    (dict(block="cross"), "block"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (dict(num_classes=-1), "num_classes"),
    (dict(depth=0), "depth"),
    (dict(input_size="big"), "input_size"),
    (dict(hiden_size=64), "did you mean 'hidden_size'"),
])
def test_bad_options_raise_one_clear_config_error(overrides, match):
    with pytest.raises(dtx.ConfigError, match=match):
        tiny(**overrides)


def test_bad_inputs_raise_shape_errors():
    model = tiny()
    x, t, y = batch()
    with pytest.raises(dtx.ShapeError, match="needs class labels"):
        model(x, t)
    with pytest.raises(dtx.ShapeError, match="divisible"):
        model(torch.randn(2, 4, 8, 7), t, y)
    with pytest.raises(dtx.ShapeError, match=r"\[N, 4, H, W\]"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(dtx.ShapeError, match="timestep"):
        model(x, torch.tensor([1, 2, 3]), y)
    with pytest.raises(dtx.ShapeError, match=r"lie in \[0, 10\]"):
        model(x, t, torch.tensor([0, 11]))
    # a scalar timestep is broadcast over the batch
    torch.testing.assert_close(model(x, 500, y), model(x, torch.tensor([500, 500]), y))


def test_recomputation_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny(depth=3)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    x, t, y = batch()
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.blocks.set_recompute(int(flag))
        recomputed = []
        hook = model.blocks[1].register_forward_pre_hook(lambda m, a: recomputed.append(1))
        model(x, t, y).square().mean().backward()
        hook.remove()
        assert len(recomputed) == (2 if flag else 1)  # checkpointed blocks run again in the backward pass
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert DiT(DiTConfig(**TINY, grad_checkpointing=True)).blocks.recompute_every == 1


def test_bf16_autocast_forward_and_backward():
    model = tiny()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, t, y = batch()
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_block_forward_compiles_without_graph_breaks():
    model = tiny(block="adaln-zero")
    torch.nn.init.normal_(model.blocks[0].adaLN_modulation[1].weight, std=0.05)
    block = model.blocks[0]
    h, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    torch._dynamo.reset()
    # fullgraph=True makes any graph break an error; aot_eager traces forward and backward without a C++ build
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h, c), block(h, c), atol=1e-5, rtol=1e-5)
    h.requires_grad_(True)
    compiled(h, c).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_training_step_matches_fp32():
    model = tiny(hidden_size=128, num_heads=2).cuda()
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            torch.nn.init.normal_(p, std=0.05)
    x, t, y = (v.cuda() for v in batch())
    ref = model(x, t, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
