"""HDiT construction and training on CPU: zero output at init, any input size, every attention type trains,
a tiny model overfits a batch with the EDM loss, the optimizer groups, checkpointing, bf16, options and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import dtx
from dtx.diffusion.karras import Denoiser
from dtx.errors import ConfigError, ShapeError
from dtx.interface import interface_of
from dtx.training.optim import param_groups
from dtx_hdit.model import HDIT_PRESETS, HDiT, HDiTConfig, parse_attention


def attn(kind, **kw):
    return {"type": kind, "d_head": 16, **kw}


NA, SW, GLOBAL, NONE = (attn("neighborhood", kernel_size=3), attn("shifted-window", window_size=4), attn("global"),
                        "none")
TINY = dict(input_size=32, patch_size=2, in_channels=3, depths=[1, 1], widths=[32, 64], d_ffs=[48, 96],
            mapping_width=32, mapping_depth=1, num_classes=10)


def tiny(self_attns=(NA, GLOBAL), **kw) -> HDiT:
    return dtx.create_model("HDiT", **{**TINY, "self_attns": list(self_attns), **kw})


def perturb(model: HDiT, seed: int = 0) -> HDiT:
    """Give every zero-initialised layer random weights, so that every parameter reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def batch(n=2, hw=(32, 32), channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, *hw, generator=g), torch.exp(torch.randn(n, generator=g))


def test_presets_are_registered_at_the_papers_resolution():
    assert set(dtx.list_models(family="hdit")) == {"HDiT", *HDIT_PRESETS}
    assert set(HDIT_PRESETS) == {"HDiT-ImageNet128", "HDiT-FFHQ1024", "HDiT-ImageNet256", "HDiT-Flowers256"}
    sizes = {"HDiT-ImageNet128": (3, 128, 128), "HDiT-FFHQ1024": (3, 1024, 1024), "HDiT-ImageNet256": (3, 256, 256),
             "HDiT-Flowers256": (3, 256, 256), "HDiT": (3, 256, 256)}
    for name, shape in sizes.items():
        with torch.device("meta"):
            model = dtx.create_model(name)
        iface = interface_of(model)
        assert iface.input_shape == shape and iface.noise_input == "sigma" and iface.channel_dim == 1
        assert iface.in_channels == iface.out_channels == 3 and not iface.learn_sigma
    with torch.device("meta"):
        imagenet, ffhq = dtx.create_model("HDiT-ImageNet256"), dtx.create_model("HDiT-FFHQ1024")
    assert imagenet.num_classes == 1000 and imagenet.null_class == 1000
    assert imagenet.class_emb.weight.shape == (1001, 256)  # the null row always exists
    assert ffhq.null_class is None and ffhq.class_emb is None
    assert [lvl.dropout for lvl in ffhq.level_specs] == [0, 0, 0, 0, 0.1]


@pytest.mark.parametrize("attns", [(NA, GLOBAL), (SW, GLOBAL), (NONE, GLOBAL), (GLOBAL, NONE)])
def test_output_is_exactly_zero_at_init(attns):
    model = tiny(attns)
    x, sigma = batch()
    out = model(x, sigma, y=torch.tensor([3, 10]))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))


def test_runs_at_sizes_other_than_configured_and_rejects_what_does_not_divide():
    model = perturb(tiny((NA, SW, GLOBAL), depths=[1, 2, 1], widths=[32, 32, 64], d_ffs=None))
    y = torch.tensor([0, 1])
    for hw in [(32, 32), (64, 64), (48, 32), (16, 16)]:  # configured at 32: larger, non-square, smaller
        x, sigma = batch(hw=hw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(x, sigma, y)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0
    with pytest.raises(ShapeError, match="not a multiple of 8x8"):
        model(torch.zeros(1, 3, 36, 32), 1.0, torch.tensor([0]))
    with pytest.raises(ShapeError, match=r"expects \[B, 3, H, W\]"):
        model(torch.zeros(1, 1, 32, 32), 1.0, torch.tensor([0]))


def test_a_kernel_larger_than_the_map_is_clamped_with_one_warning_naming_the_level():
    model = tiny((attn("neighborhood", kernel_size=7), GLOBAL))
    x, sigma = batch(hw=(8, 8))  # level 0 runs on 4x4 tokens
    with pytest.warns(UserWarning, match=r"HDiT level 0 \(4x4 tokens\): neighborhood kernel 7 .* clamped to 4x4"):
        model(x, sigma, torch.tensor([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, sigma, torch.tensor([0, 1]))  # once only
    # clamped to the map, neighborhood attention is global attention
    glob = tiny((GLOBAL, GLOBAL))
    glob.load_state_dict(model.state_dict())
    perturb(model)
    glob.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(model(x, sigma, torch.tensor([0, 1])), glob(x, sigma, torch.tensor([0, 1])))


@pytest.mark.parametrize("attns", [(NA, GLOBAL), (SW, GLOBAL), (NONE, GLOBAL), (GLOBAL, SW), (NA, NONE)],
                         ids=["neighborhood", "shifted-window", "none", "global", "none-innermost"])
def test_every_attention_type_trains_on_cpu_and_gradients_reach_every_parameter(attns):
    model = perturb(tiny(attns, depths=[2, 1], mapping_cond_dim=4))
    x, sigma = batch()
    g = torch.Generator().manual_seed(1)
    out = model(x, sigma, y=torch.tensor([2, 10]), aug_cond=torch.randn(2, 9, generator=g),
                mapping_cond=torch.randn(2, 4, generator=g))
    out.pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()  # and the step leaves everything finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tiny_hdit_overfits_a_batch_with_the_edm_loss():
    torch.manual_seed(0)
    model = dtx.create_model("HDiT", input_size=16, patch_size=2, in_channels=1, depths=[1, 1], widths=[32, 64],
                             self_attns=[NA, GLOBAL], mapping_width=32, mapping_depth=1, num_classes=2)
    denoiser = Denoiser(model, sigma_data=0.5, weighting="soft-min-snr")
    g = torch.Generator().manual_seed(0)
    x0 = ((torch.rand(4, 1, 16, 16, generator=g) > 0.5).float() - 0.5)  # binary images, std 0.5
    y = torch.tensor([0, 1, 0, 1])
    noise = torch.randn(4, 4, 1, 16, 16, generator=g)
    sigma = torch.exp(torch.randn(4, 4, generator=g) * 1.2 - 1.2)  # four fixed noise draws per image

    def full_loss():
        return sum(denoiser.loss(x0, noise[j], sigma[j], y=y).mean() for j in range(4)).item() / 4

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    before = full_loss()
    for step in range(200):
        loss = denoiser.loss(x0, noise[step % 4], sigma[step % 4], y=y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert full_loss() < 0.05 * before


def test_param_groups_are_the_references_no_decay_set_and_mapping_at_a_third():
    model = tiny((NA, GLOBAL), mapping_cond_dim=4)
    groups = {(g["weight_decay"] > 0, round(g["lr_scale"], 6)): set(g["param_names"])
              for g in param_groups(model, 5e-4, 0.01)}
    third = round(1 / 3, 6)
    decay, no_decay = groups[(True, 1.0)], groups[(False, 1.0)]
    mapping_decay, mapping_no_decay = groups[(True, third)], groups[(False, third)]
    assert decay == {n for n, _ in model.named_parameters() if n.endswith((
        "qkv_proj.weight", "out_proj.weight", "up_proj.weight", "down_proj.weight", "proj.weight"))
        and not n.startswith(("mapping.", "time_in_proj", "aug_in_proj", "mapping_cond_in_proj"))}
    assert "patch_in.proj.weight" in decay and "merges.0.proj.weight" in decay and "splits.0.proj.weight" in decay
    assert {"splits.0.fac", "class_emb.weight", "time_in_proj.weight", "aug_in_proj.weight",
            "mapping_cond_in_proj.weight", "out_norm.scale", "mid_level.0.self_attn.scale"} <= no_decay
    assert mapping_decay == {n for n, _ in model.named_parameters()
                             if n.endswith("norm.linear.weight") or n.startswith("mapping.blocks.") and
                             n.endswith("proj.weight")}
    assert mapping_no_decay == {"mapping.in_norm.scale", "mapping.out_norm.scale", "mapping.blocks.0.norm.scale"}
    assert sum(map(len, groups.values())) == len(list(model.parameters()))


def test_gradient_checkpointing_per_level_gives_the_same_gradients():
    x, sigma = batch()
    y = torch.tensor([1, 2])
    grads = []
    for ckpt in (False, [True, False], True):
        torch.manual_seed(0)  # the same weights (and Fourier buffers) each time
        model = perturb(tiny((NA, GLOBAL), depths=[2, 1], grad_checkpointing=ckpt))
        model(x, sigma, y).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad)
    model = tiny((NA, GLOBAL))
    model.set_grad_checkpointing(levels=[1])  # k-diffusion's switch; the core's is set_recompute
    assert [layer.checkpointing for layer in model.mid_level] == [True]
    assert [layer.checkpointing for layer in model.down_levels[0]] == [False]


def test_bf16_forward_on_cpu():
    model = perturb(tiny((NA, SW, GLOBAL), depths=[1, 1, 1], widths=[32, 32, 64], d_ffs=None))
    x, sigma = batch()
    y = torch.tensor([0, 10])
    ref = model(x, sigma, y).detach()
    out = model.to(torch.bfloat16)(x.bfloat16(), sigma, y)  # sigma stays fp32: the model casts what it needs
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.1 * ref.abs().mean()  # bf16 keeps ~3 significant digits


def test_conditions_and_their_errors():
    model = perturb(tiny((NA, GLOBAL)))
    x, sigma = batch()
    y = torch.tensor([1, 10])
    out_scalar = model(x, 0.7, y)  # a scalar sigma is shared by the batch
    torch.testing.assert_close(out_scalar, model(x, torch.full((2,), 0.7), y))
    assert not torch.allclose(model(x, sigma, torch.tensor([1, 2])), model(x, sigma, torch.tensor([1, 10])))
    # no augmentation conditioning means zeros, and that still adds the constant aug branch
    torch.testing.assert_close(model(x, sigma, y), model(x, sigma, y, aug_cond=torch.zeros(2, 9)))
    with pytest.raises(ShapeError, match="needs labels y"):
        model(x, sigma)
    with pytest.raises(ShapeError, match=r"class labels must lie in \[0, 10\]"):
        model(x, sigma, torch.tensor([0, 11]))
    with pytest.raises(ShapeError, match="aug_cond must have shape"):
        model(x, sigma, y, aug_cond=torch.zeros(2, 4))
    with pytest.raises(ShapeError, match="has no mapping condition"):
        model(x, sigma, y, mapping_cond=torch.zeros(2, 4))
    with pytest.raises(ShapeError, match="needs mapping_cond"):
        tiny(mapping_cond_dim=4)(x, sigma, y)
    unconditional = tiny(num_classes=0)
    assert unconditional.null_class is None and unconditional.example_conditions(2, torch.device("cpu")) == {}


def test_layer_facts_of_the_reference():
    model = tiny((NA, GLOBAL))
    block = model.mid_level[0].self_attn
    assert torch.equal(block.scale, torch.full((4,), 10.0))
    freqs = torch.linspace(math.log(math.pi), math.log(10 * math.pi), 4 * 16 // 8 + 1)[:-1].exp()
    torch.testing.assert_close(block.pos_emb.freqs, freqs.view(2, 4).T)  # head h, slot j: index j * heads + h
    assert model.splits[0].fac.item() == 0.5
    assert not any(getattr(m, "bias", None) is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    buffers = {n for n, _ in model.named_buffers()}
    assert {"time_emb.weight", "aug_emb.weight", "mid_level.0.self_attn.pos_emb.freqs"} <= buffers
    # the shifted-window alternation: odd layer indices shift, up levels count on from the down level's depth
    sw = tiny((SW, GLOBAL), depths=[2, 1])
    assert [layer.self_attn.window_shift for layer in sw.down_levels[0]] == [0, 2]
    assert [layer.self_attn.window_shift for layer in sw.up_levels[0]] == [0, 2]
    sw3 = tiny((SW, GLOBAL), depths=[3, 1])
    assert [layer.self_attn.window_shift for layer in sw3.up_levels[0]] == [2, 0, 2]


def test_config_errors_name_the_key():
    for bad, match in [({"self_attns": [NA]}, "self_attns"), ({"depths": [1, 1, 1]}, "depths"),
                       ({"input_size": 18}, "input_size"), ({"self_attns": [attn("global") | {"d_head": 12}, GLOBAL]},
                                                            "d_head 12"),
                       ({"dropout": [0.1]}, "dropout"), ({"mapping_width": 31}, "mapping_width")]:
        with pytest.raises(ConfigError, match=match):
            tiny(**bad)
    with pytest.raises(ConfigError, match="has no option 'widht'"):
        dtx.create_model("HDiT", widht=[1])
    assert parse_attention("neighborhood:5") == parse_attention({"type": "neighborhood", "kernel_size": 5})
    assert parse_attention("shifted-window:8").window_size == 8 and parse_attention("global").d_head == 64
    with pytest.raises(ConfigError, match="not one of"):
        parse_attention("local:3")
    with pytest.raises(ConfigError, match="takes no size"):
        parse_attention("global:3")
    assert HDiTConfig().validate().levels()[0].self_attn == parse_attention("neighborhood:7")
