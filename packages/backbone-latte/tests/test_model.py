"""Latte construction and forward: presets and registration, the four variants and their module names, tubelet
embedding, token injection, RoPE, init, gradients, per-axis isolation, joint image-video training, temporal tables."""

from __future__ import annotations

import warnings

import pytest
import torch

import dtx
from dtx import plugins
from dtx.errors import ConfigError, ShapeError
from dtx.interface import interface_of
from dtx_latte.checkpoint import init_from_dit
from dtx_latte.flops import latte_counter
from dtx_latte.model import LATTE_PRESETS, Latte, LatteConfig

D = 32
TINY = dict(input_size=4, depth=4, hidden_size=D, num_heads=2, num_frames=4, num_classes=3)
# every variant, and the paper's other choices on top of them
CASES = {
    "v1": dict(variant=1), "v2": dict(variant=2), "v3": dict(variant=3), "v4": dict(variant=4),
    "tubelet": dict(patch_embed="tubelet", temporal_stride=2), "tokens": dict(injection="tokens"),
    "rope": dict(temporal_pos="rope"),
    "v2-tubelet-tokens": dict(variant=2, patch_embed="tubelet", injection="tokens"),
    "v3-tokens-rope": dict(variant=3, injection="tokens", temporal_pos="rope"),
    "v4-tokens-rope": dict(variant=4, injection="tokens", temporal_pos="rope"),
    "spatial-rope": dict(spatial_pos="rope"), "v3-spatial-rope": dict(variant=3, spatial_pos="rope"),
    "v4-spatial-rope": dict(variant=4, spatial_pos="rope", temporal_pos="rope"),
}


def tiny(**kw) -> Latte:
    return dtx.create_model("Latte", **{**TINY, **kw})


def perturbed(model: Latte, seed: int = 0, std: float = 0.2) -> Latte:
    """Every trainable tensor random (so the zero-init adaLN, final and gate layers pass signals and gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def inputs(model: Latte, b: int = 2, frames: int | None = None, hw=(4, 4), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    f = model.num_frames + model.use_image_num if frames is None else frames
    x = torch.randn(b, f, 4, *hw, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randint(0, model.num_classes, (b,), generator=g) if model.num_classes else None
    return x, t, y


# -- registration ------------------------------------------------------------------------------------------------

def test_presets_are_registered_with_the_paper_sizes_and_the_family_hooks():
    names = set(dtx.list_models(family="latte"))
    assert names == {"Latte"} | {f"Latte-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name, preset in LATTE_PRESETS.items():
        size, patch = name[len("Latte-"):].split("/")
        assert (preset["depth"], preset["hidden_size"], preset["num_heads"], preset["patch_size"]) == \
            (*sizes[size], int(patch))
    for name in names:
        entry = plugins.get("model", name)
        assert entry.meta["flops"] is latte_counter and entry.meta["init_from"] is init_from_dit
        assert entry.obj.config_class is LatteConfig and entry.meta["family"] == "latte"


def test_xl2_variant1_is_14_spatial_and_14_temporal_blocks_with_dits_key_names():
    with torch.device("meta"):
        model = dtx.create_model("Latte-XL/2", variant=1, num_frames=16, input_size=32, num_classes=101)
    assert [b.axis for b in model.blocks] == ["spatial", "temporal"] * 14
    sd = model.state_dict()
    assert len(sd) == 293 and sd["temp_embed"].shape == (1, 16, 1152) and sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["blocks.27.attn.qkv.weight"].shape == (3456, 1152) and sd["blocks.1.mlp.fc1.weight"].shape == (4608, 1152)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6912, 1152)
    assert sd["y_embedder.embedding_table.weight"].shape == (102, 1152) and model.null_class == 101
    assert not model.temp_embed.requires_grad and not model.pos_embed.requires_grad
    iface = interface_of(model)
    assert (iface.channel_dim, iface.noise_input, iface.num_timesteps) == (2, "timestep", 1000)
    assert (iface.in_channels, iface.out_channels, iface.learn_sigma, iface.input_shape) == (4, 8, True,
                                                                                             (16, 4, 32, 32))


def test_variant_layouts_and_module_names():
    v2 = tiny(variant=2, depth=6)
    assert [b.axis for b in v2.blocks] == ["spatial"] * 3 + ["temporal"] * 3
    v1_keys = set(tiny(variant=1).state_dict())
    assert v1_keys == set(v2.state_dict()) - {f"blocks.{i}.{k}" for i in (4, 5) for k in
                                              ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                                               "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                                               "mlp.fc2.bias", "adaLN_modulation.1.weight",
                                               "adaLN_modulation.1.bias")}
    v3 = set(tiny(variant=3).state_dict())
    assert {"blocks.0.attn_s.qkv.weight", "blocks.0.attn_t.proj.bias", "blocks.3.mlp.fc2.weight",
            "blocks.0.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation_t.1.weight"} <= v3
    v4 = set(tiny(variant=4).state_dict())
    assert {"blocks.0.split_attn.qkv.weight", "blocks.3.split_attn.proj.weight"} <= v4
    for keys in (v3, v4):  # never DiT's / Variant 1's attention names
        assert not any(".attn." in k for k in keys)
    tokens = set(tiny(injection="tokens").state_dict())
    assert "blocks.0.norm1.weight" in tokens and not any("adaLN" in k for k in tokens)
    assert "final_layer.norm_final.weight" in tokens
    assert "temp_embed" not in tiny(temporal_pos="rope").state_dict()
    tub = tiny(patch_embed="tubelet", temporal_stride=2).state_dict()
    assert tub["x_embedder.proj.weight"].shape == (D, 4, 2, 2, 2) and tub["temp_embed"].shape == (1, 2, D)
    assert tub["temporal_upsample.weight"].shape == (8, 8, 2, 1, 1)


@pytest.mark.parametrize("overrides, key", [
    (dict(variant=5), "variant"), (dict(depth=3), "depth"), (dict(variant=4, num_heads=1), "num_heads"),
    (dict(patch_embed="cube"), "patch_embed"), (dict(injection="cross"), "injection"),
    (dict(temporal_pos="learned"), "temporal_pos"), (dict(patch_embed="tubelet", num_frames=5), "num_frames"),
    (dict(patch_embed="tubelet", use_image_num=2), "use_image_num"), (dict(input_size=5), "input_size"),
    (dict(num_heads=3), "num_heads"), (dict(hidden_size=36, num_heads=12, temporal_pos="rope"), "num_heads"),
])
def test_bad_options_raise_one_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        tiny(**overrides)


def test_unknown_options_are_named():
    with pytest.raises(ConfigError, match="did you mean 'num_frames'"):
        tiny(num_frame=8)


# -- forward, init, gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_shapes_zero_output_at_init_and_gradients_reach_every_parameter(case):
    model = tiny(**CASES[case]).train()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (2, 4, 8, 4, 4)
    assert torch.count_nonzero(out) == 0  # zero final linear (and adaLN-Zero): exactly 0 at init
    out.square().add(out).sum().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0  # the tubelet upsampler does not block it

    model = perturbed(tiny(**CASES[case])).train()
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    used = torch.zeros(4, dtype=torch.bool)
    used[y] = True  # only the rows of the labels seen get gradient
    assert (model.y_embedder.embedding_table.weight.grad.abs().sum(1) > 0).tolist() == used.tolist()


def test_adaln_zero_blocks_gradients_to_block_weights_at_step_0():
    model = tiny().train()
    x, t, y = inputs(model)
    model(x, t, y).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() == 0
    assert model.blocks[1].mlp.fc1.weight.grad.abs().sum() == 0


def _disable(model: Latte, axis: str) -> Latte:
    """Zero the attention output of one axis: the rest of the model then only ever sees the other axis."""
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block, "axis"):
                if block.axis == axis:
                    block.attn.proj.weight.zero_()
                    block.attn.proj.bias.zero_()
            elif hasattr(block, "attn_s"):
                attn = block.attn_s if axis == "spatial" else block.attn_t
                attn.proj.weight.zero_()
                attn.proj.bias.zero_()
            else:  # split heads: the first half of the heads' columns of proj are spatial, the second temporal
                cols = slice(0, D // 2) if axis == "spatial" else slice(D // 2, D)
                block.split_attn.proj.weight[:, cols] = 0
    return model


ISOLATION = ["v1", "v2", "v3", "v4", "tokens", "rope", "v3-tokens-rope", "v4-tokens-rope", "v4-spatial-rope"]


@pytest.mark.parametrize("case", ISOLATION)
def test_spatial_path_never_mixes_frames_and_temporal_path_never_mixes_positions(case):
    x, t, y = inputs(tiny())
    changed = x.clone()
    changed[:, 2, :, 0:2, 2:4] += 1.0  # frame 2, the patch at grid (0, 1)

    spatial_only = _disable(perturbed(tiny(**CASES[case])), "temporal")
    with torch.no_grad():
        diff = (spatial_only(changed, t, y) - spatial_only(x, t, y)).abs().amax(dim=(2,))  # [B, F, H, W]
    frames = diff.amax(dim=(0, 2, 3))
    assert frames[2] > 1e-4 and frames[[0, 1, 3]].max() == 0  # only frame 2 changes ...
    assert diff[:, 2, 2:4, :].max() > 1e-4  # ... everywhere in it (spatial attention mixes positions)

    temporal_only = _disable(perturbed(tiny(**CASES[case])), "spatial")
    with torch.no_grad():
        diff = (temporal_only(changed, t, y) - temporal_only(x, t, y)).abs().amax(dim=(0, 2))  # [F, H, W]
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[0:2, 2:4] = True
    assert diff[:, ~inside].max() == 0  # no other position changes ...
    assert all(diff[f][inside].max() > 1e-4 for f in range(4))  # ... in any frame, and every frame sees it


@pytest.mark.parametrize("case", ["v1", "v3", "v4", "v4-tokens-rope"])
def test_joint_training_images_never_reach_the_video_frames(case):
    model = perturbed(tiny(**CASES[case], use_image_num=2))
    x, t, y = inputs(model)
    assert x.shape[1] == 6  # 4 frames + 2 images
    y_image = torch.tensor([[0, 1], [2, 0]])
    with torch.no_grad():
        out = model(x, t, y, y_image)
        other = x.clone()
        other[:, 4:] = torch.randn(2, 2, 4, 4, 4)
        out2 = model(other, t, y, torch.tensor([[2, 2], [1, 1]]))
        torch.testing.assert_close(out2[:, :4], out[:, :4], rtol=0, atol=1e-6)  # the clip's frames: unchanged
        assert (out2[:, 4:] - out[:, 4:]).abs().max() > 1e-3
        # each image is its own spatial sequence with its own label: changing image 4 leaves image 5 alone
        one = x.clone()
        one[:, 4] += 1.0
        out3 = model(one, t, y, y_image)
        torch.testing.assert_close(out3[:, 5], out[:, 5], rtol=0, atol=1e-6)
        assert (out3[:, 4] - out[:, 4]).abs().max() > 1e-4
        relabel = model(x, t, y, torch.tensor([[1, 1], [2, 0]]))  # image 4 of sample 0 relabelled
        assert (relabel[0, 4] - out[0, 4]).abs().max() > 1e-4
        torch.testing.assert_close(relabel[0, 5], out[0, 5], rtol=0, atol=1e-6)
        torch.testing.assert_close(relabel[1], out[1], rtol=0, atol=1e-6)
        # the default image labels are the clip's label; a clip without the images is a plain video
        torch.testing.assert_close(model(x, t, y), model(x, t, y, y.repeat_interleave(2).view(2, 2)))
        assert model(x[:, :4], t, y).shape == (2, 4, 8, 4, 4)
    with pytest.raises(ShapeError, match="y_image"):
        model(x, t, y, torch.zeros(2, 3, dtype=torch.long))


# -- temporal and spatial tables ---------------------------------------------------------------------------------

def test_other_frame_counts_interpolate_the_absolute_table_with_one_warning():
    model = perturbed(tiny())
    x, t, y = inputs(model, frames=7)
    with pytest.warns(UserWarning, match="interpolated to 7 frames"):
        out = model(x, t, y)
    assert out.shape == (2, 7, 8, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, t, y)  # once per length
    table = model.temp_embed[0]  # [4, D]: positions 0..3 spread over 7 frames at j * 3 / 6
    expected = []
    for j in range(7):
        pos = j * 3 / 6
        lo, frac = int(pos), pos - int(pos)
        hi = min(lo + 1, 3)
        expected.append(table[lo] * (1 - frac) + table[hi] * frac)
    torch.testing.assert_close(model.temporal_table(7)[0], torch.stack(expected))
    assert model.temporal_table(4) is model.temp_embed


def test_rope_runs_any_frame_count_without_a_table():
    model = perturbed(tiny(temporal_pos="rope"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for frames in (2, 4, 9):
            x, t, y = inputs(model, frames=frames)
            assert model(x, t, y).shape == (2, frames, 8, 4, 4)


def test_rope_makes_temporal_attention_order_aware():
    x, t, y = inputs(tiny())

    def flip_error(model: Latte) -> float:
        with torch.no_grad():
            return (model(x.flip(1), t, y).flip(1) - model(x, t, y)).abs().max().item()

    blind = perturbed(tiny(variant=2, depth=2))
    blind.temp_embed.data.zero_()  # no position signal: reversing the frames reverses the outputs
    assert flip_error(blind) < 1e-5
    assert flip_error(perturbed(tiny(temporal_pos="rope", variant=2, depth=2))) > 1e-3


def test_spatial_rope_makes_spatial_attention_depend_on_relative_positions_only():
    """With spatial_pos="rope" no table is added, and the logits between equal tokens depend on their offset."""
    model = tiny(spatial_pos="rope")
    theta = model._spatial_angles(4, 4, torch.device("cpu"))  # [H, 16, hd/2]
    assert theta.shape == (2, 16, D // 8)  # a quarter of each head per axis (k-diffusion); the rest unrotated
    from dtx.layers import apply_rotary

    v = torch.randn(1, 2, 1, D // 2).expand(1, 2, 16, D // 2)  # the same content at every grid position
    q = apply_rotary(v, theta)
    logits = (q @ q.transpose(-1, -2))[0].view(2, 4, 4, 4, 4)  # [H, y_i, x_i, y_j, x_j]
    torch.testing.assert_close(logits[:, 0, 0, 1, 2], logits[:, 2, 1, 3, 3])  # offset (1, 2) wherever it is
    torch.testing.assert_close(logits[:, 1, 1, 1, 1], logits[:, 3, 2, 3, 2])  # offset (0, 0)
    x, t, y = inputs(model)
    base = perturbed(tiny())
    rope = perturbed(tiny(spatial_pos="rope"))
    with torch.no_grad():
        assert not torch.allclose(base(x, t, y), rope(x, t, y))  # same weights, other positions


def test_spatial_table_follows_the_input_size():
    model = perturbed(tiny())
    x, t, y = inputs(model, hw=(6, 8))
    assert model(x, t, y).shape == (2, 4, 8, 6, 8)
    with pytest.raises(ShapeError, match="divisible"):
        model(torch.zeros(2, 4, 4, 5, 4), t, y)


def test_tubelet_embedding_round_trips_the_frame_count():
    model = tiny(patch_embed="tubelet", temporal_stride=2)
    x, t, y = inputs(model)
    assert model.x_embedder(x).shape == (2 * 2, 4, D)  # [(B F/s), t, D]: 2 token frames
    with torch.no_grad():
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.5)
        torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.5)
        out = model(x, t, y)
    assert out.shape == (2, 4, 8, 4, 4) and out.abs().max() > 0
    # the upsampler starts as nearest-neighbour: the two frames of each tube get the same output
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 2], out[:, 3], rtol=0, atol=0)
    with pytest.warns(UserWarning, match="interpolated"):
        assert model(torch.zeros(1, 6, 4, 4, 4), t[:1], y[:1]).shape == (1, 6, 8, 4, 4)
    with pytest.raises(ShapeError, match="temporal_stride 2"):
        model(torch.zeros(1, 5, 4, 4, 4), t[:1], y[:1])


# -- inputs, options, helpers ------------------------------------------------------------------------------------

def test_labels_and_shapes_are_checked():
    model = tiny()
    x, t, y = inputs(model)
    with pytest.raises(ShapeError, match="needs class labels"):
        model(x, t)
    with pytest.raises(ShapeError, match=r"\[0, 3\]"):
        model(x, t, torch.tensor([0, 4]))
    with pytest.raises(ShapeError, match="frames"):
        model(x[:, 0], t, y)
    unconditional = tiny(num_classes=0)
    assert unconditional.y_embedder is None and unconditional.null_class is None
    assert unconditional(x, t).shape == (2, 4, 8, 4, 4)
    assert tiny(learn_sigma=False)(x, t, y).shape == (2, 4, 4, 4, 4)


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    x, t, y = inputs(tiny())
    grads = []
    for flag in (False, True):
        model = perturbed(tiny(variant=3, grad_checkpointing=flag)).train()
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_forward_with_cfg_guides_the_eps_channels_along_dim_2():
    model = perturbed(tiny())
    x, t, y = inputs(model, b=2)
    x = torch.cat([x[:1], x[:1]])
    labels = torch.tensor([1, model.null_class])
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t[:1].repeat(2), labels, cfg_scale=4.0)
        cond = model(x[:1], t[:1], labels[:1])
        uncond = model(x[:1], t[:1], labels[1:])
    expected = uncond[:, :, :4] + 4.0 * (cond[:, :, :4] - uncond[:, :, :4])
    tol = dict(rtol=1e-4, atol=1e-4)  # batch 2 vs batch 1 forwards
    torch.testing.assert_close(guided[:1, :, :4], expected, **tol)
    torch.testing.assert_close(guided[1:, :, :4], expected, **tol)
    torch.testing.assert_close(guided[:, :, 4:], torch.cat([cond[:, :, 4:], uncond[:, :, 4:]]), **tol)
