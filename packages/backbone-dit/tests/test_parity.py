"""Official-format checkpoints load through dtx.load_model and match DiT's forward pass as written from models.py.

The reference below is an independent re-implementation of facebookresearch/DiT's forward (models.py, on the key
layout of the released checkpoints) in plain torch ops on a raw state dict; it shares no code with dtx_dit.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

import dtx
from dtx.errors import ConfigError
from dtx.models import load_model_with_info, model_spec

D, DEPTH, P, C, CLASSES = 128, 2, 2, 4, 10


# -- independent reference (after facebookresearch/DiT models.py) ------------------------------------------------------

def ref_sincos_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """Token k = i*gw + j gets [sin/cos table of column j (dim/2), sin/cos table of row i (dim/2)]."""
    def table(positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        ang = positions.astype(np.float32)[:, None] * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    rows = np.repeat(np.arange(gh), gw)
    cols = np.tile(np.arange(gw), gh)
    return torch.from_numpy(np.concatenate([table(cols), table(rows)], axis=1)).float()[None]


def ref_layer_norm(x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


def ref_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def lin(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def ref_dit(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, heads: int) -> torch.Tensor:
    n, c, hgt, wid = x.shape
    w = sd["x_embedder.proj.weight"]
    d, p = w.shape[0], w.shape[-1]
    gh, gw = hgt // p, wid // p
    # patchify by hand: token (i, j) is the flattened (c, p, p) patch times the conv weight
    patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)
    h = patches @ w.reshape(d, -1).T + sd["x_embedder.proj.bias"]
    pos = sd["pos_embed"] if sd["pos_embed"].shape[1] == gh * gw else ref_sincos_2d(d, gh, gw).to(x.dtype)
    h = h + pos
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    ang = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).to(x.dtype)
    temb = lin(torch.nn.functional.silu(lin(temb, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    cond = temb + sd["y_embedder.embedding_table.weight"][y] if y is not None else temb
    hd = d // heads
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}."
        mod = lin(torch.nn.functional.silu(cond), sd, b + "adaLN_modulation.1")
        sh1, sc1, g1, sh2, sc2, g2 = (mod[:, k * d:(k + 1) * d, None].transpose(1, 2) for k in range(6))
        a = ref_layer_norm(h) * (1 + sc1) + sh1
        qkv = lin(a, sd, b + "attn.qkv")  # rows [q; k; v], each heads-contiguous
        q, k, v = (qkv[..., s * d:(s + 1) * d].reshape(n, -1, heads, hd).transpose(1, 2) for s in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        h = h + g1 * lin(att.transpose(1, 2).reshape(n, -1, d), sd, b + "attn.proj")
        m = ref_layer_norm(h) * (1 + sc2) + sh2
        h = h + g2 * lin(ref_gelu_tanh(lin(m, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        i += 1
    mod = lin(torch.nn.functional.silu(cond), sd, "final_layer.adaLN_modulation.1")
    shift, scale = mod[:, None, :d], mod[:, None, d:]
    tok = lin(ref_layer_norm(h) * (1 + scale) + shift, sd, "final_layer.linear")
    out_c = tok.shape[-1] // (p * p)
    out = torch.empty(n, out_c, gh * p, gw * p, dtype=x.dtype)
    for r in range(gh):
        for col in range(gw):
            out[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p] = tok[:, r * gw + col].reshape(n, p, p, out_c).permute(
                0, 3, 1, 2)
    return out


def official_state_dict(seed: int, grid: tuple[int, int] = (4, 4), classes: int | None = CLASSES,
                        learn_sigma: bool = True) -> dict[str, torch.Tensor]:
    """Random weights with the key names and shapes of facebookresearch/DiT's released checkpoints."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float | None = None) -> torch.Tensor:
        fan_in = shape[-1] if len(shape) > 1 else 1
        return torch.randn(*shape, generator=g) * (scale if scale is not None else fan_in ** -0.5)

    out_c = 2 * C if learn_sigma else C
    sd = {
        "pos_embed": ref_sincos_2d(D, *grid),
        "x_embedder.proj.weight": rnd(D, C, P, P, scale=(C * P * P) ** -0.5), "x_embedder.proj.bias": rnd(D, scale=0.1),
        "t_embedder.mlp.0.weight": rnd(D, 256), "t_embedder.mlp.0.bias": rnd(D, scale=0.1),
        "t_embedder.mlp.2.weight": rnd(D, D), "t_embedder.mlp.2.bias": rnd(D, scale=0.1),
    }
    if classes:
        sd["y_embedder.embedding_table.weight"] = rnd(classes + 1, D, scale=1.0)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": rnd(3 * D, D), b + "attn.qkv.bias": rnd(3 * D, scale=0.1),
            b + "attn.proj.weight": rnd(D, D), b + "attn.proj.bias": rnd(D, scale=0.1),
            b + "mlp.fc1.weight": rnd(4 * D, D), b + "mlp.fc1.bias": rnd(4 * D, scale=0.1),
            b + "mlp.fc2.weight": rnd(D, 4 * D), b + "mlp.fc2.bias": rnd(D, scale=0.1),
            b + "adaLN_modulation.1.weight": rnd(6 * D, D, scale=0.3 * D ** -0.5),
            b + "adaLN_modulation.1.bias": rnd(6 * D, scale=0.3),
        })
    sd.update({
        "final_layer.adaLN_modulation.1.weight": rnd(2 * D, D, scale=0.3 * D ** -0.5),
        "final_layer.adaLN_modulation.1.bias": rnd(2 * D, scale=0.3),
        "final_layer.linear.weight": rnd(P * P * out_c, D), "final_layer.linear.bias": rnd(P * P * out_c, scale=0.1),
    })
    return sd


def inputs(n: int = 3, hw: tuple[int, int] = (8, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, *hw, generator=g)
    t = torch.tensor([0, 417, 999][:n])
    y = torch.tensor([3, 9, CLASSES][:n])  # the last one is the null class
    return x, t, y


# -- tests ---------------------------------------------------------------------------------------------------------

def test_plain_state_dict_loads_and_matches_reference(tmp_path):
    sd = official_state_dict(0)
    torch.save(sd, tmp_path / "DiT-tiny.pt")
    model, info = load_model_with_info(tmp_path / "DiT-tiny.pt")
    assert info["format"] == "dit-official" and info["weights"] == "state_dict"
    assert model_spec(model) == {"name": "DiT", "depth": 2, "hidden_size": 128, "num_heads": 2, "patch_size": 2,
                              "input_size": 8, "num_classes": 10}
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
    ref = ref_dit(sd, x, t, y, heads=2)
    assert out.shape == (3, 8, 8, 8)
    assert ref.abs().mean() > 0.1  # a meaningful, non-degenerate comparison
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # bit-compatible loading: every tensor is copied exactly
    own = model.state_dict()
    assert set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)


def test_float64_parity_is_tight(tmp_path):
    sd = official_state_dict(1)
    torch.save(sd, tmp_path / "a.pt")
    model = dtx.load_model(tmp_path / "a.pt").double().eval()
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x.double(), t, y)
    ref = ref_dit({k: v.double() for k, v in sd.items()}, x.double(), t, y, heads=2)
    torch.testing.assert_close(out, ref, atol=1e-11, rtol=1e-11)


def test_named_load_with_other_head_count(tmp_path):
    sd = official_state_dict(2)
    torch.save(sd, tmp_path / "a.pt")
    model = dtx.load_model(tmp_path / "a.pt", "DiT", num_heads=4).eval()
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref_dit(sd, x, t, y, heads=4), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x, t, y), ref_dit(sd, x, t, y, heads=2), atol=1e-3)


def test_training_checkpoint_uses_ema_and_reads_args(tmp_path):
    ema, raw = official_state_dict(3), official_state_dict(4)
    opt = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "params": [0]}]}
    args = argparse.Namespace(model="DiT-XL/2", image_size=64, num_classes=CLASSES, global_batch_size=256)
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": args}, tmp_path / "0400000.pt")
    x, t, y = inputs()
    model, info = load_model_with_info(tmp_path / "0400000.pt")
    assert info["weights"] == "ema" and info["args"]["num_classes"] == CLASSES
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref_dit(ema, x, t, y, heads=2), atol=1e-5, rtol=1e-5)
    resumed = dtx.load_model(tmp_path / "0400000.pt", "DiT", weights="raw").eval()
    with pytest.raises(ConfigError, match="option 'use_ema'"):  # a loader option is not a model option
        dtx.load_model(tmp_path / "0400000.pt", "DiT", use_ema=False)
    with torch.no_grad():
        torch.testing.assert_close(resumed(x, t, y), ref_dit(raw, x, t, y, heads=2), atol=1e-5, rtol=1e-5)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    sd = official_state_dict(5)
    torch.save({"_orig_mod." + k: v for k, v in sd.items()}, tmp_path / "a.pt")
    model = dtx.load_model(tmp_path / "a.pt")
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])


def test_non_square_latents_match_reference(tmp_path):
    sd = official_state_dict(6, grid=(4, 6))
    torch.save(sd, tmp_path / "wide.pt")
    with pytest.raises(dtx.CheckpointError, match="input_size"):
        dtx.load_model(tmp_path / "wide.pt")
    model = dtx.load_model(tmp_path / "wide.pt", input_size=[8, 12]).eval()
    x, t, y = inputs(hw=(8, 12))
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (3, 8, 8, 12)
    torch.testing.assert_close(out, ref_dit(sd, x, t, y, heads=2), atol=1e-5, rtol=1e-5)


def test_other_input_size_uses_a_sincos_table_for_that_grid(tmp_path):
    sd = official_state_dict(7)  # trained at 8x8 latents
    torch.save(sd, tmp_path / "a.pt")
    model = dtx.load_model(tmp_path / "a.pt").eval()
    x, t, y = inputs(hw=(12, 6))
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (3, 8, 12, 6)
    torch.testing.assert_close(out, ref_dit(sd, x, t, y, heads=2), atol=1e-5, rtol=1e-5)


def test_fresh_position_table_follows_the_spec_and_the_configured_grid():
    model = dtx.create_model("DiT", depth=1, hidden_size=D, num_heads=2, input_size=[6, 10], num_classes=0)
    torch.testing.assert_close(model.pos_embed.data, ref_sincos_2d(D, 3, 5), atol=0, rtol=0)
    # dims [0, D/2) encode the column: token 1 (row 0, column 1) has sin(1) there, token 5 (row 1, column 0) has 0
    assert model.pos_embed[0, 1, 0].item() == pytest.approx(math.sin(1.0)) and model.pos_embed[0, 5, 0].item() == 0
    assert model.pos_embed[0, 5, D // 2].item() == pytest.approx(math.sin(1.0))


def test_unconditional_checkpoint_without_label_table(tmp_path):
    sd = official_state_dict(8, classes=None, learn_sigma=False)
    torch.save(sd, tmp_path / "uncond.pt")
    model = dtx.load_model(tmp_path / "uncond.pt").eval()
    assert model.num_classes == 0 and model.null_class is None and not model.learn_sigma and model.out_channels == C
    x, t, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref_dit(sd, x, t, None, heads=2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guide_channels", [None, 3])
def test_forward_with_cfg_matches_dit_layout(tmp_path, guide_channels):
    sd = official_state_dict(9)
    torch.save(sd, tmp_path / "a.pt")
    model = dtx.load_model(tmp_path / "a.pt").eval()
    x, t, _ = inputs(n=2)
    labels, null = torch.tensor([1, 7]), torch.tensor([CLASSES, CLASSES])
    scale = 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]),
                                     torch.cat([labels, null]), scale, guide_channels=guide_channels)
    cond, uncond = ref_dit(sd, x, t, labels, heads=2), ref_dit(sd, x, t, null, heads=2)
    k = 4 if guide_channels is None else 3  # all eps channels vs DiT's legacy first three
    first = cond.clone()
    first[:, :k] = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    second = uncond.clone()
    second[:, :k] = first[:, :k]
    torch.testing.assert_close(out, torch.cat([first, second]), atol=2e-5, rtol=1e-5)
