"""diffusers interop for PixArt-alpha and Latte-1: tiny random PixArtTransformer2DModel and LatteTransformer3DModel
folders built and saved by diffusers itself load through dtx.load_model and match diffusers' forward pass; dtx PixArt
models exported with ``dtx convert --to diffusers`` load with from_pretrained and match; GenTron is refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import LatteTransformer3DModel, PixArtTransformer2DModel  # noqa: E402

import dtx  # noqa: E402
from dtx.cli import main  # noqa: E402
from dtx.models import load_model_with_info, save_model  # noqa: E402
from dtx.testing import randomize_parameters

HEADS, HEAD_DIM, LAYERS, SIZE, CAPTION, TOKENS, FRAMES = 2, 16, 2, 8, 24, 5, 3
D = HEADS * HEAD_DIM
COMMON = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
              num_layers=LAYERS, cross_attention_dim=D, attention_bias=True, sample_size=SIZE, patch_size=2,
              activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
              norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=CAPTION)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return randomize_parameters(model, seed, std=0.1)


def text(b: int = 2, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, TOKENS, dtype=torch.bool)
    mask[1, 3:] = False  # caption padding
    return torch.randn(b, TOKENS, CAPTION, generator=g), mask


def test_pixart_folder_loads_and_matches_diffusers(tmp_path):
    theirs = randomize(PixArtTransformer2DModel(**COMMON), 0)
    theirs.save_pretrained(tmp_path / "pixart")
    ours, info = load_model_with_info(tmp_path / "pixart")
    assert info["format"] == "diffusers-pixart" and type(ours).__name__ == "PixArt"
    x = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 870])
    ctx, mask = text()
    with torch.no_grad():
        got = ours(x, t, ctx, mask)
        want = theirs(x, encoder_hidden_states=ctx, encoder_attention_mask=mask.long(), timestep=t,
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    diff = float((got - want).abs().max())
    print(f"PixArt dtx vs diffusers: max |diff| {diff:.2e} (masked caption: -inf in dtx, -10000 bias in diffusers)")
    assert diff < 2e-5


def test_latte_folder_loads_as_latte_1_text_to_video_and_matches_diffusers(tmp_path):
    theirs = randomize(LatteTransformer3DModel(**COMMON, video_length=FRAMES), 1)
    theirs.save_pretrained(tmp_path / "latte", max_shard_size="30KB")
    ours, info = load_model_with_info(tmp_path / "latte")
    assert info["format"] == "diffusers-pixart" and ours.channel_dim == 2 and ours.config.num_frames == FRAMES
    assert len(ours.blocks) == len(ours.temporal_blocks) == LAYERS
    x = torch.randn(2, FRAMES, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))  # dtx: [B, F, C, H, W]
    t = torch.tensor([3, 870])
    ctx, _ = text()
    with torch.no_grad():
        got = ours(x, t, ctx)
        want = theirs(x.transpose(1, 2), timestep=t, encoder_hidden_states=ctx).sample.transpose(1, 2)
        image = theirs(x[:, :1].transpose(1, 2), timestep=t, encoder_hidden_states=ctx).sample.transpose(1, 2)
        ours_image = ours(x[:, :1], t, ctx)
    diff = float((got - want).abs().max())
    print(f"Latte-1 T2V dtx vs diffusers: max |diff| {diff:.2e}; one frame (no temporal table) "
          f"{float((ours_image - image).abs().max()):.2e}")
    assert diff < 2e-5
    assert torch.allclose(ours_image, image, atol=2e-5)


@pytest.mark.parametrize("frames", [0, FRAMES])
def test_dtx_pixart_exports_and_diffusers_loads_it(tmp_path, capsys, frames):
    model = randomize(dtx.create_model("PixArt", depth=LAYERS, hidden_size=D, num_heads=HEADS, input_size=SIZE,
                                       context_dim=CAPTION, text_length=TOKENS, num_frames=frames), 4)
    save_model(model, tmp_path / "dtx")
    assert main(["convert", str(tmp_path / "dtx"), "--to", "diffusers", str(tmp_path / "out")]) == 0
    assert "divide by 128" in capsys.readouterr().out
    cls = LatteTransformer3DModel if frames else PixArtTransformer2DModel
    theirs = cls.from_pretrained(tmp_path / "out").eval()
    ctx, mask = text()
    t = torch.tensor([10, 600])
    with torch.no_grad():
        if frames:
            x = torch.randn(2, frames, 4, SIZE, SIZE)
            got = model(x, t, ctx)
            want = theirs(x.transpose(1, 2), timestep=t, encoder_hidden_states=ctx).sample.transpose(1, 2)
        else:
            x = torch.randn(2, 4, SIZE, SIZE)
            got = model(x, t, ctx, mask)
            want = theirs(x, encoder_hidden_states=ctx, encoder_attention_mask=mask.long(), timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert torch.allclose(got, want, atol=2e-5), float((got - want).abs().max())
    back = dtx.load_model(tmp_path / "out")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_gentron_export_is_refused_with_the_reason(tmp_path, capsys):
    model = dtx.create_model("GenTron", depth=1, hidden_size=32, num_heads=2, input_size=8, context_dim=16)
    save_model(model, tmp_path / "dtx")
    assert main(["convert", str(tmp_path / "dtx"), "--to", "diffusers", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dtx: error:")
    assert "adaLN-Zero" in err and "adaLN-single" in err and "PixArt" in err
    assert not (tmp_path / "out").exists()


def test_pixart_ms_folder_is_refused_naming_the_key(tmp_path, capsys):
    theirs = PixArtTransformer2DModel(**COMMON, use_additional_conditions=True)
    theirs.save_pretrained(tmp_path / "ms")
    assert main(["convert", str(tmp_path / "ms"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "use_additional_conditions" in err and "config.json" in err


@pytest.mark.parametrize("frames", [0, FRAMES])
def test_a_pixart_lora_adapter_exports_under_diffusers_names_and_peft_loads_it_there(tmp_path, capsys, frames):
    """A dtx PixArt / Latte-1 with LoRA on every group (fused q/k/v included): the adapter written under diffusers'
    module names, loaded with PEFT into the exported diffusers transformer, gives dtx's adapted output (diffusers
    0.42 has no LoRA loader for these models, so PEFT loads it)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from dtx.adapters import LoraSpec, add_lora
    from dtx_gentron.diffusers_format import export_adapter

    model = randomize(dtx.create_model("PixArt", depth=LAYERS, hidden_size=D, num_heads=HEADS, input_size=SIZE,
                                       context_dim=CAPTION, text_length=TOKENS, num_frames=frames), 4)
    save_model(model, tmp_path / "dtx")
    assert main(["convert", str(tmp_path / "dtx"), "--to", "diffusers", str(tmp_path / "base")]) == 0
    groups = ["attention", "mlp", "cross-attention"] + (["temporal"] if frames else [])
    add_lora(model, LoraSpec(rank=4, alpha=8, targets=groups))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    notes = export_adapter(model, tmp_path / "adapter", None)
    assert notes and "PEFT" in notes[0]
    cls = LatteTransformer3DModel if frames else PixArtTransformer2DModel
    theirs = cls.from_pretrained(tmp_path / "base").eval()
    config = LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    inject_adapter_in_model(config, theirs)
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items()}
    result = set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    ctx, mask = text()
    t = torch.tensor([10, 600])
    with torch.no_grad():
        if frames:
            x = torch.randn(2, frames, 4, SIZE, SIZE)
            got = model.eval()(x, t, ctx)
            want = theirs(x.transpose(1, 2), timestep=t, encoder_hidden_states=ctx).sample.transpose(1, 2)
        else:
            x = torch.randn(2, 4, SIZE, SIZE)
            got = model.eval()(x, t, ctx, mask)
            want = theirs(x, encoder_hidden_states=ctx, encoder_attention_mask=mask.long(), timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    base = cls.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        plain = (base(x.transpose(1, 2), timestep=t, encoder_hidden_states=ctx).sample.transpose(1, 2) if frames else
                 base(x, encoder_hidden_states=ctx, encoder_attention_mask=mask.long(), timestep=t,
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample)
    assert float((want - plain).abs().max()) > 1e-3  # the adapter acts
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
