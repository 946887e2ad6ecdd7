"""Parameter and Gflops counts reproduce the DiT paper's Table 4 and agree with PyTorch's own counters."""

from __future__ import annotations

import pytest
import torch

import dtx
from dtx.costs import measure, model_cost
from dtx_dit.flops import dit_cost, dit_counter, measure_flops
from dtx_dit.model import DiTConfig

# Paper Table 4 (256x256 images = 32x32 latents): Gflops and parameters in millions
TABLE4 = {
    "DiT-S/8": (0.36, 33), "DiT-S/4": (1.41, 33), "DiT-S/2": (6.06, 33),
    "DiT-B/8": (1.42, 131), "DiT-B/4": (5.56, 130), "DiT-B/2": (23.01, 130),
    "DiT-L/8": (5.01, 459), "DiT-L/4": (19.70, 458), "DiT-L/2": (80.71, 458),
    "DiT-XL/8": (7.39, 676), "DiT-XL/4": (29.05, 675), "DiT-XL/2": (118.64, 675),
}
# Table 4 block-design ablations of XL/2: Gflops, parameters (M)
ABLATIONS = {"in-context": (119.37, 449), "cross-attention": (137.62, 598), "adaln": (118.56, 600)}


def meta_model(name: str, **overrides):
    with torch.device("meta"):
        return dtx.create_model(name, **overrides)


@pytest.mark.parametrize("name", sorted(TABLE4))
def test_table4_gflops_and_params(name):
    gflops, params_m = TABLE4[name]
    model = meta_model(name, input_size=32, num_classes=1000)
    cost = dit_cost(model.config)
    assert cost.gflops == pytest.approx(gflops, rel=0.01)
    assert cost.params / 1e6 == pytest.approx(params_m, rel=0.005)
    assert round(cost.trainable_params / 1e6) == params_m  # the paper's column: without the fixed pos_embed
    # the closed form counts exactly the parameters the module has, pos_embed as the frozen part
    assert cost.params == dtx.count_parameters(model)
    assert cost.trainable_params == dtx.count_parameters(model, trainable_only=True)


def test_xl2_at_512_and_the_exact_derived_counts():
    assert dit_cost(meta_model("DiT-XL/2", input_size=64).config).gflops == pytest.approx(524.6, rel=0.01)
    xl2 = dit_cost(meta_model("DiT-XL/2", input_size=32).config)
    assert xl2.params == 675_129_632 and xl2.trainable_params == 674_834_720  # fast-DiT's logged count
    assert xl2.real_gflops == pytest.approx(2 * 118.62, abs=0.01)


@pytest.mark.parametrize("block", sorted(ABLATIONS))
def test_block_design_ablations(block):
    gflops, params_m = ABLATIONS[block]
    model = meta_model("DiT-XL/2", input_size=32, block=block)
    cost = dit_cost(model.config)
    assert cost.gflops == pytest.approx(gflops, rel=0.01)
    assert cost.params / 1e6 == pytest.approx(params_m, rel=0.005)
    assert round(cost.trainable_params / 1e6) == params_m
    assert cost.params == dtx.count_parameters(model)


@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "cross-attention", "in-context"])
@pytest.mark.parametrize("num_classes,hw", [(1000, (32, 32)), (0, (16, 24))])
def test_closed_form_equals_torch_flop_counter(block, num_classes, hw):
    model = meta_model("DiT-B/4", input_size=list(hw), num_classes=num_classes, block=block)
    assert measure_flops(model) == 2 * dit_cost(model.config).macs
    assert measure_flops(model, batch=3) == 3 * 2 * dit_cost(model.config).macs


def test_cost_of_a_non_square_latent_follows_the_token_count():
    # 16x48 latents at patch 2 give 8*24 = 192 tokens; the DiT paper's MAC count (its "Gflops") with T = 192
    wide = dit_cost(DiTConfig(input_size=[16, 48], depth=1, hidden_size=64, num_heads=1)).macs
    t = 192
    expected = t * 4 * 4 * 64 + 256 * 64 + 64 ** 2 + (12 * t * 64 ** 2 + 2 * t * t * 64 + 6 * 64 ** 2) \
        + t * 64 * 4 * 8 + 2 * 64 ** 2
    assert wide == expected


@pytest.mark.parametrize("block", ["adaln-zero", "in-context"])
def test_registered_counter_is_the_closed_form_and_the_core_meter_agrees(block):
    cost = model_cost("DiT-XL/2", input_size=32, block=block)  # dtx.costs finds dit_counter through the registry
    closed = dit_cost(meta_model("DiT-XL/2", input_size=32, block=block).config)
    assert cost.method == "analytic" and cost.macs == closed.macs and cost.flops == 2 * closed.macs
    assert (cost.params, cost.trainable_params, cost.extra["frozen_params"]) == \
        (closed.params, closed.trainable_params, closed.frozen_params)
    assert cost.extra["block"] == block and cost.extra["tokens"] == 256 and cost.extra["input_size"] == [32, 32]
    assert cost.extra["train_gflops_per_image"] == round(3 * closed.real_gflops, 2)
    small = meta_model("DiT-B/4", input_size=[16, 24], num_classes=0, block=block)
    assert measure(small) == dit_counter(small).flops == measure_flops(small)  # core meter: declared input_shape
