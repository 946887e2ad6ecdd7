"""Official Latte checkpoints: the official key layout against an independent reference forward, format detection,
architecture inference, EMA/raw selection, and initialising a Latte from a DiT checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

import dtx
from dtx.errors import CheckpointError
from dtx.init_weights import init_weights
from dtx.models import load_model_with_info
from dtx_dit.checkpoint import detect as dit_detect
from dtx_latte.checkpoint import detect, infer_config

# -- an official models/latte.py (latte_img.py) state dict and forward, written from Vchitect/Latte's code -------------


def official_state(depth: int = 4, d: int = 128, c: int = 4, p: int = 2, grid: int = 2, frames: int = 3,
                   classes: int = 0, out: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of Vchitect/Latte's models/latte.py (extras 1, or 2 with
    ``classes``)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"pos_embed": r(1, grid * grid, d), "temp_embed": r(1, frames, d),
          "x_embedder.proj.weight": r(d, c, p, p), "x_embedder.proj.bias": r(d),
          "t_embedder.mlp.0.weight": r(d, 256), "t_embedder.mlp.0.bias": r(d),
          "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d)}
    if classes:
        sd["y_embedder.embedding_table.weight"] = r(classes + 1, d)
    for i in range(depth):
        sd.update({f"blocks.{i}.attn.qkv.weight": r(3 * d, d), f"blocks.{i}.attn.qkv.bias": r(3 * d),
                   f"blocks.{i}.attn.proj.weight": r(d, d), f"blocks.{i}.attn.proj.bias": r(d),
                   f"blocks.{i}.mlp.fc1.weight": r(4 * d, d), f"blocks.{i}.mlp.fc1.bias": r(4 * d),
                   f"blocks.{i}.mlp.fc2.weight": r(d, 4 * d), f"blocks.{i}.mlp.fc2.bias": r(d),
                   f"blocks.{i}.adaLN_modulation.1.weight": r(6 * d, d),
                   f"blocks.{i}.adaLN_modulation.1.bias": r(6 * d)})
    sd.update({"final_layer.adaLN_modulation.1.weight": r(2 * d, d), "final_layer.adaLN_modulation.1.bias": r(2 * d),
               "final_layer.linear.weight": r(p * p * out, d), "final_layer.linear.bias": r(p * p * out)})
    return sd


def official_key_count(depth: int, extras: int) -> int:
    """pos, temp, x_embedder (2), t_embedder (4), label table (extras 2), 10 per block, final layer (4)."""
    return 2 + 2 + 4 + (1 if extras == 2 else 0) + 10 * depth + 4


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _mod(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _attn(sd, pre, x, heads):
    b, n, c = x.shape
    qkv = F.linear(x, sd[pre + "qkv.weight"], sd[pre + "qkv.bias"]).reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    return F.linear((w.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c), sd[pre + "proj.weight"],
                    sd[pre + "proj.bias"])


def _block(sd, i, x, c, heads):
    pre = f"blocks.{i}."
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = F.linear(
        F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * _attn(sd, pre + "attn.", _mod(_ln(x), shift_msa, scale_msa), heads)
    h = F.linear(_mod(_ln(x), shift_mlp, scale_mlp), sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"])
    h = F.linear(F.gelu(h, approximate="tanh"), sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
    return x + gate_mlp.unsqueeze(1) * h


def reference_latte(sd, x, t, y=None, heads=2, use_image_num=0, y_image=None):
    """models/latte_img.py's forward (models/latte.py when use_image_num=0), Variant 1, by hand."""
    b, frames = x.shape[:2]
    p = sd["x_embedder.proj.weight"].shape[-1]
    x = rearrange(x, "b f c h w -> (b f) c h w")
    x = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128  # DiT timestep features: cos first, frequencies exp(-ln(1e4) k / 128)
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    t_emb = F.linear(F.silu(F.linear(torch.cat([args.cos(), args.sin()], -1), sd["t_embedder.mlp.0.weight"],
                                     sd["t_embedder.mlp.0.bias"])), sd["t_embedder.mlp.2.weight"],
                     sd["t_embedder.mlp.2.bias"])
    n_pos, n_temp = sd["pos_embed"].shape[1], sd["temp_embed"].shape[1]
    c_s = repeat(t_emb, "n d -> (n c) d", c=n_temp + use_image_num)
    c_t = repeat(t_emb, "n d -> (n c) d", c=n_pos)
    if y is not None:
        table = sd["y_embedder.embedding_table.weight"]
        y_spatial = repeat(table[y], "n d -> n c d", c=n_temp)
        if use_image_num:
            y_spatial = torch.cat([y_spatial, table[y_image]], dim=1)
        c_s = c_s + rearrange(y_spatial, "n c d -> (n c) d")
        c_t = c_t + repeat(table[y], "n d -> (n c) d", c=n_pos)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(0, depth, 2):
        x = _block(sd, i, x, c_s, heads)
        x = rearrange(x, "(b f) t d -> (b t) f d", b=b)
        x_video, x_image = x[:, :frames - use_image_num], x[:, frames - use_image_num:]
        if i == 0:
            x_video = x_video + sd["temp_embed"]
        x_video = _block(sd, i + 1, x_video, c_t, heads)
        x = rearrange(torch.cat([x_video, x_image], dim=1), "(b t) f d -> (b f) t d", b=b)
    shift, scale = F.linear(F.silu(c_s), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    x = F.linear(_mod(_ln(x), shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    n, tokens, _ = x.shape
    out, side = x.shape[-1] // (p * p), int(tokens ** 0.5)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(n, side, side, p, p, out)).reshape(n, out, side * p, side * p)
    return rearrange(x, "(b f) c h w -> b f c h w", b=b)


def clip(frames: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, frames, 4, 4, 4, generator=g), torch.tensor([3, 870])


# -- loading official files ----------------------------------------------------------------------------------------

def test_official_key_count_rule():
    assert official_key_count(28, extras=1) == 292 and official_key_count(28, extras=2) == 293
    for depth, classes in ((2, 0), (4, 5)):
        sd = official_state(depth=depth, classes=classes)
        assert len(sd) == official_key_count(depth, 2 if classes else 1)
        model = dtx.create_model("Latte", input_size=4, depth=depth, hidden_size=128, num_heads=2, num_frames=3,
                                 num_classes=classes)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in sd.items()}
    with torch.device("meta"):
        for classes, count in ((0, 292), (101, 293)):
            assert len(dtx.create_model("Latte-XL/2", num_classes=classes).state_dict()) == count


@pytest.mark.parametrize("classes", [0, 5])
def test_official_checkpoint_loads_and_matches_the_reference_forward(tmp_path, classes):
    ema, raw = official_state(classes=classes, seed=0), official_state(classes=classes, seed=1)
    torch.save({"model": raw, "ema": ema}, tmp_path / "0010000.pt")  # a train.py checkpoint
    model, info = load_model_with_info(tmp_path / "0010000.pt")
    assert info["format"] == "latte-official" and info["weights"] == "ema"
    assert model.config.num_frames == 3 and model.config.input_hw == (4, 4) and model.config.num_heads == 2
    assert model.num_classes == classes and model.learn_sigma
    x, t = clip()
    y = torch.tensor([1, 4]) if classes else None
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_latte(ema, x, t, y), rtol=1e-5, atol=1e-5)
        raw_model = dtx.load_model(tmp_path / "0010000.pt", weights="raw")
        torch.testing.assert_close(raw_model(x, t, y), reference_latte(raw, x, t, y), rtol=1e-5, atol=1e-5)


def test_joint_training_checkpoint_matches_the_latte_img_reference(tmp_path):
    sd = official_state(classes=5)
    torch.save({"ema": sd}, tmp_path / "img.pt")
    model = dtx.load_model(tmp_path / "img.pt", use_image_num=2)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 5, 4, 4, 4, generator=g), torch.tensor([10, 500])
    y, y_image = torch.tensor([0, 4]), torch.tensor([[1, 2], [5, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, y_image),
                                   reference_latte(sd, x, t, y, use_image_num=2, y_image=y_image),
                                   rtol=1e-5, atol=1e-5)


def test_detection_accepts_latte_files_and_dit_refuses_them(tmp_path):
    sd = official_state(depth=2)
    path = tmp_path / "x.pt"
    for obj in ({"ema": sd}, {"model": sd}, sd, {"module." + k: v for k, v in sd.items()}):
        assert detect(path, obj) and not dit_detect(path, obj)
    dit_like = {k: v for k, v in sd.items() if k != "temp_embed"}
    assert not detect(path, dit_like) and not detect(path, {"ema": dit_like})
    assert not detect(path, {"ema": {**sd, "unrelated.weight": torch.zeros(1)}}) and not detect(path, [sd])
    clip_text = {**sd, "text_embedding_projection.1.weight": torch.zeros(128, 59136)}
    assert detect(path, clip_text)
    with pytest.raises(CheckpointError, match="CLIP-text"):
        infer_config(clip_text)


def test_heads_come_from_paper_sizes_or_head_dim_else_must_be_given(tmp_path):
    sd = official_state(depth=2, d=96)  # neither a paper size nor 64/72-wide heads
    torch.save({"ema": sd}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="num_heads"):
        dtx.load_model(tmp_path / "odd.pt")
    assert dtx.load_model(tmp_path / "odd.pt", num_heads=4).config.num_heads == 4
    with torch.device("meta"):
        xl = dtx.create_model("Latte-XL/2", num_classes=101)
    name, options = infer_config(xl.state_dict())
    assert name == "Latte-XL/2" and options == {"input_size": 32, "num_frames": 16, "num_classes": 101}


@pytest.mark.parametrize("kw", [dict(variant=3), dict(variant=4, injection="tokens"), dict(learn_sigma=False),
                                dict(patch_embed="tubelet", temporal_stride=2, num_frames=4),
                                dict(num_classes=0, mlp_ratio=2.0), dict(variant=2)])
def test_every_design_round_trips_through_shape_inference(tmp_path, kw):
    torch.manual_seed(0)
    model = dtx.create_model("Latte", **{**dict(input_size=4, depth=2, hidden_size=128, num_heads=2, num_frames=3,
                                                num_classes=5), **kw})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    extra = {"variant": 2} if kw.get("variant") == 2 else {}  # variant 2 has variant 1's keys
    loaded = dtx.load_model(tmp_path / "plain.pt", **extra)
    assert loaded.config == model.config
    x, t = clip(frames=model.num_frames)
    y = torch.tensor([0, 4]) if model.num_classes else None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model.eval()(x, t, y), rtol=0, atol=0)


def test_a_file_that_does_not_fit_names_the_keys(tmp_path):
    sd = official_state(depth=2)
    torch.save({"ema": sd}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="missing: blocks.2"):
        dtx.load_model(tmp_path / "a.pt", depth=4)


# -- initialising from a DiT ---------------------------------------------------------------------------------------

def saved_dit(tmp_path, depth: int = 4, classes: int = 10, input_size: int = 4):
    torch.manual_seed(0)
    dit = dtx.create_model("DiT", input_size=input_size, depth=depth, hidden_size=32, num_heads=2,
                           num_classes=classes)
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    return dit.state_dict(), tmp_path / "dit.pt"


def latte(**kw):
    return dtx.create_model("Latte", **{**dict(input_size=4, depth=4, hidden_size=32, num_heads=2, num_frames=3,
                                               num_classes=5), **kw})


def test_dit_fills_spatial_and_temporal_blocks_by_index_and_the_label_table_is_dropped(tmp_path):
    dit, path = saved_dit(tmp_path)
    model = latte()
    temp_before = model.temp_embed.detach().clone()
    report = init_weights(model, path)
    own = model.state_dict()
    table = "y_embedder.embedding_table.weight"
    assert sorted(report.new) == ["temp_embed", table]
    assert table in report.skipped and "class count" in report.skipped[table] and len(report.skipped) == 1
    assert set(report.loaded) == set(own) - {"temp_embed", table}
    for key in report.loaded:  # spatial (even) and temporal (odd) blocks alike: DiT block i -> block i
        assert torch.equal(own[key], dit[key]), key
    assert torch.equal(model.temp_embed, temp_before)
    assert "51 tensors loaded, 1 skipped, 2 newly initialised" in report.summary()

    same_classes = latte(num_classes=10)
    init_weights(same_classes, path)
    assert torch.equal(same_classes.y_embedder.embedding_table.weight, dit[table])


def test_depth_and_grid_mismatches_are_reported(tmp_path):
    dit, path = saved_dit(tmp_path, depth=2, input_size=8)
    report = init_weights(latte(num_classes=0), path)
    assert "blocks.2.attn.qkv.weight" in report.new and "blocks.1.mlp.fc2.bias" in report.loaded
    assert report.skipped["pos_embed"] == "shape (1, 16, 32) vs (1, 4, 32)" and "pos_embed" in report.new
    assert report.skipped["y_embedder.embedding_table.weight"] == "not in this model"
    deeper = init_weights(latte(depth=2), saved_dit(tmp_path, depth=4)[1])
    assert deeper.skipped["blocks.3.adaLN_modulation.1.weight"] == "not in this model"


def test_variant_3_copies_the_dit_attention_to_both_axes(tmp_path):
    dit, path = saved_dit(tmp_path)
    model = latte(variant=3)
    report = init_weights(model, path)
    b = model.blocks[2]
    assert torch.equal(b.attn_s.qkv.weight, dit["blocks.2.attn.qkv.weight"])
    assert torch.equal(b.attn_t.qkv.weight, dit["blocks.2.attn.qkv.weight"])
    assert torch.equal(b.attn_t.proj.bias, dit["blocks.2.attn.proj.bias"])
    assert torch.equal(b.mlp.fc1.weight, dit["blocks.2.mlp.fc1.weight"])
    assert torch.equal(b.adaLN_modulation[1].weight, dit["blocks.2.adaLN_modulation.1.weight"])
    assert torch.equal(b.adaLN_modulation_t[1].bias, dit["blocks.2.adaLN_modulation.1.bias"][:3 * 32])
    assert sorted(report.new) == ["temp_embed", "y_embedder.embedding_table.weight"]


def test_variant_4_takes_the_dit_attention_as_its_split_heads(tmp_path):
    dit, path = saved_dit(tmp_path)
    model = latte(variant=4)
    report = init_weights(model, path)
    assert torch.equal(model.blocks[3].split_attn.qkv.weight, dit["blocks.3.attn.qkv.weight"])
    assert torch.equal(model.blocks[3].split_attn.proj.weight, dit["blocks.3.attn.proj.weight"])
    assert sorted(report.new) == ["temp_embed", "y_embedder.embedding_table.weight"]
