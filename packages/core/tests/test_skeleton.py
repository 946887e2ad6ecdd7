"""The patch-transformer skeleton (dtx.layers.skeleton) and its sub-layers against hand-written formulas: the config
checks, the residual sub-layer forms, the adaLN-single final layer, patch tokens of images and clips (tubelets too),
DiT's guided batch layout on clips, the label and caption checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from einops import rearrange
from torch import nn

from dtx.errors import ConfigError, ShapeError
from dtx.layers import (AdaLNBlock, BlockStack, FinalLayer, LabelEmbedder, PatchTransformer, TransformerConfig,
                        TubeletEmbed, residual, size_presets, text_tokens)


@dataclass
class ToyConfig(TransformerConfig):
    input_size: object = 8
    in_channels: int = 2
    hidden_size: int = 32
    depth: int = 2
    num_heads: int = 4
    num_frames: int = 0
    mode: Literal["a", "b"] = "a"
    num_classes: int = 3

    def validate_options(self) -> None:
        self.check_min(0, "num_frames", "num_classes")
        if self.mode == "b":
            self.check_head_split(16, "mode b splits heads in 16")


class Toy(PatchTransformer):
    """A DiT in a dozen lines: what a family written over the skeleton looks like."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig | None = None, tubelet: bool = False, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.channel_dim = 2 if cfg.num_frames else 1
        patch = TubeletEmbed(2, cfg.patch_size, cfg.in_channels, cfg.hidden_size) if tubelet else None
        self.add_embedders(cfg.num_classes, 0.1, patch)
        self.blocks = BlockStack([AdaLNBlock(cfg.hidden_size, cfg.num_heads) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, self.out_channels)
        self.init_dit_weights()

    def forward(self, x, t, y):
        self.check_input(x)
        h, grid = self.embed_patches(x)
        c = self.t_embedder(t) + self.y_embedder.embed(y, (x.shape[0],), "Toy")
        if self.channel_dim == 2:
            c = c.repeat_interleave(h.shape[0] // x.shape[0], dim=0)
        return self.output(self.final_layer(self.blocks(h, c), c), x.shape[0], grid)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("change, key", [({"mode": "c"}, "mode"), ({"num_frames": -1}, "num_frames"),
                                         ({"mode": "b"}, "num_heads"), ({"num_heads": 5}, "num_heads"),
                                         ({"patch_size": 3}, "input_size")])
def test_config_refuses_bad_values_naming_the_key(change, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        ToyConfig(**change).validate()


def test_config_derived_sizes():
    cfg = ToyConfig(learn_sigma=True).validate()
    assert (cfg.out_channels, cfg.head_dim, cfg.grid) == (4, 8, (4, 4))
    assert ToyConfig(learn_sigma=False).out_channels == 2


def test_size_presets_are_dit_table_1():
    presets = size_presets("Foo")
    assert len(presets) == 12
    assert presets["Foo-XL/2"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}
    assert presets["Foo-S/8"] == {"depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 8}
    assert presets["Foo-L/4"] == {"depth": 24, "hidden_size": 1024, "num_heads": 16, "patch_size": 4}


def test_residual_forms():
    g = torch.Generator().manual_seed(0)
    x, shift, scale, gate = (torch.randn(s, generator=g) for s in ((2, 5, 8), (2, 8), (2, 8), (2, 8)))
    norm, fn = nn.LayerNorm(8, elementwise_affine=False, eps=1e-6), torch.tanh
    n = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    modulated = n * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(residual(x, norm, fn, (shift, scale, gate)), x + gate[:, None] * torch.tanh(modulated))
    torch.testing.assert_close(residual(x, norm, fn, (shift, scale)), x + torch.tanh(modulated))
    torch.testing.assert_close(residual(x, norm, fn), x + torch.tanh(n))


def test_plain_block_has_affine_norms_and_no_modulation():
    block = AdaLNBlock(16, 2, modulated=False)
    assert block.adaLN_modulation is None and block.norm1.weight is not None
    assert sorted(k.split(".")[0] for k in block.state_dict()) == ["attn"] * 4 + ["mlp"] * 4 + ["norm1"] * 2 + \
        ["norm2"] * 2
    x = torch.randn(2, 3, 16)
    h = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x, None), h + block.mlp(block.norm2(h)))


def test_final_layer_adaln_single_table():
    layer = randomized(FinalLayer(8, 2, 3, table=True))
    assert sorted(layer.state_dict()) == ["linear.bias", "linear.weight", "scale_shift_table"]
    x, t = torch.randn(2, 4, 8), torch.randn(2, 8)
    shift, scale = layer.scale_shift_table[0] + t, layer.scale_shift_table[1] + t
    n = torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    torch.testing.assert_close(layer(x, t), layer.linear(n * (1 + scale[:, None]) + shift[:, None]))


def test_model_starts_at_zero_and_reads_its_interface():
    model = Toy()
    assert model.input_shape == (2, 8, 8) and model.null_class == 3 and model.out_channels == 4
    out = model(torch.randn(2, 2, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 3]))
    assert out.shape == (2, 4, 8, 8) and out.abs().max() == 0
    assert model.pos_embed.requires_grad is False
    with pytest.raises(ShapeError, match=r"\[B, C, H, W\] images with C = 2"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ShapeError, match=r"\[0, 3\]"):
        model(torch.randn(2, 2, 8, 8), torch.tensor([1.0, 1.0]), torch.tensor([0, 4]))


def test_patch_tokens_of_clips_are_each_frames_tokens_and_output_inverts_the_layout():
    model = randomized(Toy(num_frames=3, learn_sigma=False))
    assert model.input_shape == (3, 2, 8, 8) and model.out_channels == 2
    x = torch.randn(2, 3, 2, 8, 8)
    h, grid = model.embed_patches(x, positions=False)
    frame = model.x_embedder(x[1, 2][None])  # frame 2 of clip 1 alone
    torch.testing.assert_close(h[1 * 3 + 2], frame[0])
    tokens = rearrange(x, "b f c (h p) (w q) -> (b f) (h w) (p q c)", p=2, q=2)  # unpatchify's token layout
    torch.testing.assert_close(model.output(tokens, 2, grid), x)


def test_tubelet_embedding_is_a_strided_conv3d():
    embed = randomized(TubeletEmbed(2, 2, 3, 8))
    x = torch.randn(1, 4, 3, 4, 6)
    out = embed(x)
    assert out.shape == (2, 6, 8)
    # token (frame pair 1, row 1, column 2) by hand
    window = x[0, 2:4, :, 2:4, 4:6]  # [s, C, p, p]
    expected = torch.einsum("dcspq,scpq->d", embed.proj.weight, window) + embed.proj.bias
    torch.testing.assert_close(out[1, 1 * 3 + 2], expected)
    with pytest.raises(ShapeError, match="temporal_stride 2"):
        embed(torch.randn(1, 3, 3, 4, 6))


def test_guided_batch_layout_on_clips():
    model = randomized(Toy(num_frames=2))
    x, t = torch.randn(2, 2, 2, 8, 8), torch.tensor([10.0, 10.0])
    y = torch.tensor([1, 3])  # [label; null]
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    both = model(torch.cat([x[:1], x[:1]]), t, y)
    cond, uncond = both[:1], both[1:]
    eps = uncond[:, :, :2] + 4.0 * (cond[:, :, :2] - uncond[:, :, :2])
    torch.testing.assert_close(out[:1], torch.cat([eps, cond[:, :, 2:]], dim=2))
    torch.testing.assert_close(out[1:], torch.cat([eps, uncond[:, :, 2:]], dim=2))


def test_label_embedding_checks():
    table = LabelEmbedder(1, 4, 0.1)
    torch.testing.assert_close(table.embed(None, (3,)), table.embedding_table.weight[[0, 0, 0]])
    with pytest.raises(ShapeError, match="needs class labels"):
        LabelEmbedder(5, 4, 0.1).embed(None, (3,))
    with pytest.raises(ShapeError, match=r"shape \[3\]"):
        table.embed(torch.zeros(3, 1, dtype=torch.long), (3,))
    with pytest.raises(ShapeError, match="integer"):
        table.embed(torch.zeros(3), (3,))


def test_text_tokens_checks_and_default_mask():
    context, mask = text_tokens(torch.zeros(2, 5, 7), None, 2, 7)
    assert mask.dtype == torch.bool and mask.all() and mask.shape == (2, 5)
    assert text_tokens(context, torch.tensor([[1, 1, 0, 0, 0]] * 2), 2, 7)[1].dtype == torch.bool
    with pytest.raises(ShapeError, match="needs text"):
        text_tokens(None, None, 2, 7)
    with pytest.raises(ShapeError, match=r"context must be \[2, L, 7\]"):
        text_tokens(torch.zeros(2, 5, 6), None, 2, 7)
    with pytest.raises(ShapeError, match="mask"):
        text_tokens(context, torch.ones(2, 4, dtype=torch.bool), 2, 7)
