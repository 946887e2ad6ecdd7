"""k-diffusion checkpoints: a state dict with image_transformer_v2's key names, written here from
``ImageTransformerDenoiserModelV2``'s modules, loads through dtx.load_model and matches an independent float64 forward
written here from k-diffusion's image_transformer_v2.py (no dtx_hdit code); train.py checkpoints, inference
.safetensors and bare state dicts; the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import dtx
from dtx.errors import CheckpointError
from dtx.models import load_model_with_info

KD_DEFAULT_NA = {"type": "neighborhood", "d_head": 16, "kernel_size": 7}


def kd_config(depths, widths, self_attns, *, input_size=32, patch=2, channels=3, num_classes=0, mapping_width=32,
              mapping_depth=2, mapping_cond_dim=0, d_ffs=None):
    """A k-diffusion JSON config (model + dataset sections) as train.py stores it."""
    model = {"type": "image_transformer_v2", "input_channels": channels, "input_size": [input_size, input_size],
             "patch_size": [patch, patch], "depths": depths, "widths": widths, "self_attns": self_attns,
             "d_ffs": d_ffs or [2 * w for w in widths], "mapping_width": mapping_width,
             "mapping_depth": mapping_depth, "mapping_d_ff": 2 * mapping_width, "mapping_cond_dim": mapping_cond_dim,
             "mapping_dropout_rate": 0.0, "dropout_rate": [0.0] * len(widths), "sigma_data": 0.5,
             "sigma_min": 1e-2, "sigma_max": 160, "loss_config": "karras", "loss_weighting": "soft-min-snr",
             "sigma_sample_density": {"type": "cosine-interpolated"}}
    return {"model": model, "dataset": {"type": "imagefolder-class", "num_classes": num_classes}}


def kd_state_dict(config, seed=0):
    """Random weights under image_transformer_v2's key names and shapes (ImageTransformerDenoiserModelV2), every Linear
    bias-free; zero-initialised layers get random values too, so every path contributes to the output."""
    g = torch.Generator().manual_seed(seed)
    m = config["model"]
    c, (ph, pw) = m["input_channels"], m["patch_size"]
    W, dm = m["mapping_width"], m["mapping_d_ff"]
    widths, depths, d_ffs, attns = m["widths"], m["depths"], m["d_ffs"], m["self_attns"]
    n_classes = config["dataset"]["num_classes"]
    shapes = {"patch_in.proj.weight": (widths[0], c * ph * pw), "time_in_proj.weight": (W, W),
              "aug_in_proj.weight": (W, W), "mapping.in_norm.scale": (W,), "mapping.out_norm.scale": (W,),
              "out_norm.scale": (widths[0],), "patch_out.proj.weight": (c * ph * pw, widths[0])}
    if n_classes:
        shapes["class_emb.weight"] = (n_classes + 1, W)
    if m["mapping_cond_dim"]:
        shapes["mapping_cond_in_proj.weight"] = (W, m["mapping_cond_dim"])
    for j in range(m["mapping_depth"]):
        shapes.update({f"mapping.blocks.{j}.norm.scale": (W,), f"mapping.blocks.{j}.up_proj.weight": (2 * dm, W),
                       f"mapping.blocks.{j}.down_proj.weight": (W, dm)})
    L = len(widths)
    for i in range(L):
        w, f = widths[i], d_ffs[i]
        prefixes = [f"down_levels.{i}", f"up_levels.{i}"] if i < L - 1 else ["mid_level"]
        for prefix in prefixes:
            for j in range(depths[i]):
                p = f"{prefix}.{j}"
                if attns[i]["type"] != "none":
                    shapes.update({f"{p}.self_attn.norm.linear.weight": (w, W), f"{p}.self_attn.qkv_proj.weight":
                                   (3 * w, w), f"{p}.self_attn.out_proj.weight": (w, w)})
                shapes.update({f"{p}.ff.norm.linear.weight": (w, W), f"{p}.ff.up_proj.weight": (2 * f, w),
                               f"{p}.ff.down_proj.weight": (w, f)})
        if i < L - 1:
            shapes[f"merges.{i}.proj.weight"] = (widths[i + 1], 4 * w)
            shapes[f"splits.{i}.proj.weight"] = (4 * w, widths[i + 1])
    state = {}
    for key, shape in shapes.items():
        if key.endswith(".scale"):  # norm gains around 1
            state[key] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif key == "class_emb.weight":
            state[key] = torch.randn(shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    state["time_emb.weight"] = torch.randn(W // 2, 1, generator=g)
    state["aug_emb.weight"] = torch.randn(W // 2, 9, generator=g)
    for i in range(L):
        if attns[i]["type"] == "none":
            continue
        heads, e = widths[i] // attns[i]["d_head"], attns[i]["d_head"]
        freqs = torch.linspace(math.log(math.pi), math.log(10 * math.pi), heads * e // 8 + 1)[:-1].exp()
        freqs = freqs.view(e // 8, heads).T.contiguous()
        for prefix in ([f"down_levels.{i}", f"up_levels.{i}"] if i < L - 1 else ["mid_level"]):
            for j in range(depths[i]):
                state[f"{prefix}.{j}.self_attn.scale"] = 10 + 2 * torch.randn(heads, generator=g)
                state[f"{prefix}.{j}.self_attn.pos_emb.freqs"] = freqs.clone()
    for i in range(L - 1):
        state[f"splits.{i}.fac"] = torch.rand(1, generator=g)
    return state


# -- the independent forward (after k-diffusion's image_transformer_v2.py), in float64 ---------------------------------

def rms(x, scale, eps=1e-6):
    return x * scale / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def fourier(x, weight):
    f = 2 * math.pi * x @ weight.T
    return torch.cat([f.cos(), f.sin()], -1)


def geglu_ff(x, up, down):
    u = x @ up.T
    d = u.shape[-1] // 2
    return (u[..., :d] * F.gelu(u[..., d:])) @ down.T


def axial_positions(h, w):
    ar = h / w
    y0, x0 = (1.0, 1 / ar) if ar >= 1 else (ar, 1.0)
    ys = torch.linspace(-y0, y0, h + 1, dtype=torch.float64)
    xs = torch.linspace(-x0, x0, w + 1, dtype=torch.float64)
    ys, xs = (ys[:-1] + ys[1:]) / 2, (xs[:-1] + xs[1:]) / 2
    return torch.stack([ys[:, None].expand(h, w), xs[None, :].expand(h, w)], -1)


def unshuffle(x, ph, pw):  # [B, H, W, C] -> [B, H/ph, W/pw, (ph pw C)], features (p_row, p_col, c), c fastest
    return torch.cat([x[:, r::ph, c::pw] for r in range(ph) for c in range(pw)], -1)


def shuffle(x, ph, pw):
    b, h, w, f = x.shape
    c = f // (ph * pw)
    out = x.new_zeros(b, h * ph, w * pw, c)
    for r in range(ph):
        for col in range(pw):
            out[:, r::ph, col::pw] = x[..., (r * pw + col) * c:(r * pw + col + 1) * c]
    return out


def rope(x, pos, freqs):
    """x [B, N, heads, e]; the first e/2 dims rotate as e/4 complex pairs (i, i + e/4), y angles then x angles."""
    d = x.shape[-1] // 4
    theta = torch.cat([pos[:, None, 0:1] * freqs, pos[:, None, 1:2] * freqs], -1)  # [N, heads, e/4]
    z = torch.complex(x[..., :d], x[..., d:2 * d]) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag, x[..., 2 * d:]], -1)


def allowed_mask(spec, h, w, shift):
    """[N, N] which keys each query sees, for tokens in row-major order of an h x w map."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    if spec["type"] == "global":
        return torch.ones(h * w, h * w, dtype=torch.bool)
    if spec["type"] == "neighborhood":
        def axis(coord, length):
            k = min(spec["kernel_size"], length)
            start = (coord - k // 2).clamp(0, length - k)
            return (coord[None, :] >= start[:, None]) & (coord[None, :] < start[:, None] + k)
        return axis(ys, h) & axis(xs, w)
    ws = spec["window_size"]

    def groups(coord, length):  # rolled window index and whether the roll wrapped the token round the border
        wrapped = coord >= length - shift if shift else torch.zeros_like(coord, dtype=torch.bool)
        return ((coord + shift) % length) // ws, wrapped
    (wy, ry), (wx, rx) = groups(ys, h), groups(xs, w)
    same = lambda a: a[:, None] == a[None, :]  # noqa: E731
    return same(wy) & same(wx) & same(ry) & same(rx)


def attention_block(x, pos, cond, sd, p, spec, shift):
    b, h, w, c = x.shape
    e = spec["d_head"]
    heads = c // e
    y = rms(x, 1 + (cond @ sd[f"{p}.norm.linear.weight"].T)[:, None, None])
    qkv = (y @ sd[f"{p}.qkv_proj.weight"].T).reshape(b, h * w, 3 * c)
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, h * w, heads, e) for i in range(3))
    s = sd[f"{p}.scale"][:, None]
    q = q * s.sqrt() / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
    k = k * s.sqrt() / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    flat = pos.reshape(h * w, 2)
    q, k = rope(q, flat, sd[f"{p}.pos_emb.freqs"]), rope(k, flat, sd[f"{p}.pos_emb.freqs"])
    logits = torch.einsum("bnhe,bmhe->bhnm", q, k)
    logits = logits.masked_fill(~allowed_mask(spec, h, w, shift), float("-inf"))
    out = torch.einsum("bhnm,bmhe->bnhe", logits.softmax(-1), v).reshape(b, h, w, c)
    return x + out @ sd[f"{p}.out_proj.weight"].T


def ff_block(x, cond, sd, p):
    y = rms(x, 1 + (cond @ sd[f"{p}.norm.linear.weight"].T)[:, None, None])
    return x + geglu_ff(y, sd[f"{p}.up_proj.weight"], sd[f"{p}.down_proj.weight"])


def run_level(x, pos, cond, sd, prefix, spec, depth, first):
    for j in range(depth):
        if spec["type"] != "none":
            shift = spec["window_size"] // 2 if spec["type"] == "shifted-window" and (first + j) % 2 else 0
            x = attention_block(x, pos, cond, sd, f"{prefix}.{j}.self_attn", spec, shift)
        x = ff_block(x, cond, sd, f"{prefix}.{j}.ff")
    return x


def reference_forward(config, state, x, sigma, y=None, aug_cond=None, mapping_cond=None):
    m = config["model"]
    sd = {k: v.double() for k, v in state.items()}
    ph, pw = m["patch_size"]
    n = x.shape[0]
    c_noise = (sigma.double().log() / 4)[:, None]
    emb = fourier(c_noise, sd["time_emb.weight"]) @ sd["time_in_proj.weight"].T
    aug = torch.zeros(n, 9, dtype=torch.float64) if aug_cond is None else aug_cond.double()
    emb = emb + fourier(aug, sd["aug_emb.weight"]) @ sd["aug_in_proj.weight"].T
    if y is not None:
        emb = emb + sd["class_emb.weight"][y]
    if mapping_cond is not None:
        emb = emb + mapping_cond.double() @ sd["mapping_cond_in_proj.weight"].T
    cond = rms(emb, sd["mapping.in_norm.scale"])
    for j in range(m["mapping_depth"]):
        p = f"mapping.blocks.{j}"
        cond = cond + geglu_ff(rms(cond, sd[f"{p}.norm.scale"]), sd[f"{p}.up_proj.weight"], sd[f"{p}.down_proj.weight"])
    cond = rms(cond, sd["mapping.out_norm.scale"])

    h = unshuffle(x.double().permute(0, 2, 3, 1), ph, pw) @ sd["patch_in.proj.weight"].T
    pos = axial_positions(h.shape[1], h.shape[2])
    L = len(m["widths"])
    skips = []
    for i in range(L - 1):
        h = run_level(h, pos, cond, sd, f"down_levels.{i}", m["self_attns"][i], m["depths"][i], 0)
        skips.append((h, pos))
        h = unshuffle(h, 2, 2) @ sd[f"merges.{i}.proj.weight"].T
        pos = (pos[0::2, 0::2] + pos[0::2, 1::2] + pos[1::2, 0::2] + pos[1::2, 1::2]) / 4
    h = run_level(h, pos, cond, sd, "mid_level", m["self_attns"][-1], m["depths"][-1], 0)
    for i in reversed(range(L - 1)):
        skip, pos = skips[i]
        up = shuffle(h @ sd[f"splits.{i}.proj.weight"].T, 2, 2)
        fac = sd[f"splits.{i}.fac"]
        h = skip + fac * (up - skip)  # the learned factor weights the upsampled branch
        h = run_level(h, pos, cond, sd, f"up_levels.{i}", m["self_attns"][i], m["depths"][i], m["depths"][i])
    h = shuffle(rms(h, sd["out_norm.scale"]) @ sd["patch_out.proj.weight"].T, ph, pw)
    return h.permute(0, 3, 1, 2)


def inputs(config, n=2, seed=1):
    m = config["model"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m["input_channels"], *m["input_size"], generator=g)
    sigma = torch.exp(torch.randn(n, generator=g))
    conds = {}
    if config["dataset"]["num_classes"]:
        conds["y"] = torch.tensor([1, config["dataset"]["num_classes"]])[:n]  # a class and the null row
    if m["mapping_cond_dim"]:
        conds["mapping_cond"] = torch.randn(n, m["mapping_cond_dim"], generator=g)
    return x, sigma, conds


def na(k):
    return {"type": "neighborhood", "d_head": 16, "kernel_size": k}


SW = {"type": "shifted-window", "d_head": 16, "window_size": 4}
GLOBAL = {"type": "global", "d_head": 16}
CONFIGS = {
    "na-sw-global": kd_config([1, 2, 1], [32, 48, 64], [na(3), SW, GLOBAL], num_classes=5, mapping_cond_dim=3),
    "none-global": kd_config([2, 1], [32, 64], [{"type": "none"}, GLOBAL], mapping_depth=1),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_training_checkpoint_loads_ema_and_raw_and_matches_the_independent_forward(tmp_path, case):
    config = CONFIGS[case]
    ema, raw = kd_state_dict(config, seed=0), kd_state_dict(config, seed=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"config": config, "model": raw, "model_ema": ema, "opt": {}, "epoch": 1, "step": 10}, path)
    x, sigma, conds = inputs(config)

    model, info = load_model_with_info(path)
    assert info["format"] == "k-diffusion-hdit" and info["weights"] == "model_ema" and info["assumed"] == []
    assert model.noise_input == "sigma" and model.num_classes == config["dataset"]["num_classes"]
    with torch.no_grad():
        out = model(x, sigma, **conds)
    expected = reference_forward(config, ema, x, sigma, **conds)
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    assert set(model.state_dict()) == set(ema)

    raw_model = dtx.load_model(path, weights="raw")
    out_raw = raw_model(x, sigma, **conds)  # with autograd on: the pure-PyTorch neighborhood path, also on CPU
    torch.testing.assert_close(out_raw.detach().double(), reference_forward(config, raw, x, sigma, **conds),
                               rtol=1e-4, atol=1e-4)


def test_other_input_sizes_and_aug_cond_match_the_independent_forward(tmp_path):
    config = CONFIGS["na-sw-global"]
    state = kd_state_dict(config)
    torch.save({"config": config, "model_ema": state, "model": state}, tmp_path / "c.pth")
    model = dtx.load_model(tmp_path / "c.pth")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 48, 32, generator=g)  # configured 32x32: non-square, another size
    sigma, aug = torch.tensor([0.05, 20.0]), torch.randn(2, 9, generator=g)
    conds = {"y": torch.tensor([0, 4]), "mapping_cond": torch.randn(2, 3, generator=g)}
    with torch.no_grad():
        out = model(x, sigma, aug_cond=aug, **conds)
    ref = reference_forward(config, state, x, sigma, aug_cond=aug, **conds)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_bare_state_dict_assumes_the_defaults_and_says_so(tmp_path):
    config = kd_config([1, 1], [32, 64], [KD_DEFAULT_NA, GLOBAL], num_classes=3, input_size=64, patch=4)
    state = kd_state_dict(config)
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "bare.pt")  # DDP prefix, no config
    model, info = load_model_with_info(tmp_path / "bare.pt")
    assert info["weights"] == "state_dict" and info["kdiffusion_config"] is None
    assert any(a.startswith("self_attns") for a in info["assumed"])
    assert any(a.startswith("input_size=[128, 128]") for a in info["assumed"])  # 16x16 innermost tokens, patch 4
    assert any("in_channels=3" in a for a in info["assumed"])  # 48 inputs: only 3 channels x 4x4 is square
    assert model.config.input_hw == (128, 128) and model.num_classes == 3 and model.null_class == 3
    assert info["config"]["objective"] == {"kind": "karras", "sigma_data": 0.5}
    x, sigma, conds = inputs(config)
    with torch.no_grad():
        out = model(x, sigma, **conds)
    torch.testing.assert_close(out.double(), reference_forward(config, state, x, sigma, **conds), rtol=1e-4,
                               atol=1e-4)


def test_bare_state_dict_with_other_attention_needs_and_takes_overrides(tmp_path):
    config = CONFIGS["na-sw-global"]
    state = kd_state_dict(config)
    torch.save(state, tmp_path / "bare.pt")
    # string overrides take d_head from the checkpoint's heads
    model, info = load_model_with_info(tmp_path / "bare.pt", input_size=32,
                                       self_attns=["neighborhood:3", "shifted-window:4", "global"])
    assert info["assumed"] == ["in_channels=3 and patch_size=2"]
    x, sigma, conds = inputs(config)
    with torch.no_grad():
        out = model(x, sigma, **conds)
    torch.testing.assert_close(out.double(), reference_forward(config, state, x, sigma, **conds), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(CheckpointError, match="level 1: self_attns says 'none'"):
        dtx.load_model(tmp_path / "bare.pt", self_attns=["neighborhood:3", "none", "global"])
    with pytest.raises(CheckpointError, match="d_head 64 but the checkpoint's heads give d_head 16"):
        dtx.load_model(tmp_path / "bare.pt", self_attns=[{"type": "global", "d_head": 64}, "global", "global"])
    with pytest.raises(CheckpointError, match="self_attns lists 2 levels; the checkpoint has 3"):
        dtx.load_model(tmp_path / "bare.pt", self_attns=["global", "global"])


def test_ambiguous_channels_and_patch_is_a_clear_error(tmp_path):
    config = kd_config([1, 1], [32, 64], [KD_DEFAULT_NA, GLOBAL], channels=1, patch=4)  # 16 inputs: 1x4x4 or 4x2x2
    state = kd_state_dict(config)
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="cannot tell the channels and patch size.*pass in_channels"):
        dtx.load_model(tmp_path / "bare.pt")
    model = dtx.load_model(tmp_path / "bare.pt", in_channels=1)
    assert model.config.patch_hw == (4, 4) and model.in_channels == 1


def test_inference_safetensors_with_its_config_in_the_metadata(tmp_path):
    from safetensors.torch import save_file

    config = CONFIGS["none-global"]
    state = kd_state_dict(config)
    half = {k: v.half() for k, v in state.items()}  # convert_for_inference.py writes fp16 by default
    save_file(half, str(tmp_path / "m.safetensors"), metadata={"config": json.dumps(config)})
    model, info = load_model_with_info(tmp_path / "m.safetensors")
    assert info["assumed"] == [] and info["kdiffusion_config"] == config
    assert info["config"]["objective"]["weighting"] == "soft-min-snr"
    x, sigma, conds = inputs(config)
    with torch.no_grad():
        out = model(x, sigma, **conds)
    ref = reference_forward(config, {k: v.float() for k, v in half.items()}, x, sigma, **conds)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_sampling_setup_of_a_kdiffusion_checkpoint_is_sigma_space(tmp_path):
    from dtx.training.sampling import load_for_sampling

    config = CONFIGS["none-global"]
    state = kd_state_dict(config)
    torch.save({"config": config, "model": state, "model_ema": state}, tmp_path / "c.pth")
    setup = load_for_sampling(tmp_path / "c.pth")
    assert setup.objective.kind == "karras" and setup.cfg.objective.sigma_data == 0.5
    assert setup.cfg.objective.sigma_max == 160 and setup.cfg.sample.sampler == "dpmpp-2m-sde"
    assert (setup.info.channels, setup.info.height, setup.info.width) == (3, 32, 32)


def test_preset_architectures_are_recognised():
    from dtx_hdit.checkpoint import match_preset
    from dtx_hdit.model import HDIT_PRESETS

    flowers = {**HDIT_PRESETS["HDiT-Flowers256"], "d_ffs": [384, 768, 1536], "input_size": [512, 512],
               "self_attns": [KD_DEFAULT_NA | {"d_head": 64}, KD_DEFAULT_NA | {"d_head": 64},
                              {"type": "global", "d_head": 64}], "in_channels": 3}
    assert match_preset(flowers) == ("HDiT-Flowers256", {"input_size": [512, 512]})
    assert match_preset({**flowers, "widths": [128, 256, 640], "d_ffs": None})[0] == "HDiT"


def test_other_files_are_not_claimed(tmp_path):
    from dtx_hdit.checkpoint import detect

    state = kd_state_dict(CONFIGS["none-global"])
    assert detect(tmp_path, state) and detect(tmp_path, {"model_ema": state, "config": {}})
    assert not detect(tmp_path, {**state, "pos_embed": torch.zeros(1)})  # a foreign top-level key
    assert not detect(tmp_path, {"x_embedder.proj.weight": torch.zeros(1)})
    assert not detect(tmp_path, [state])
