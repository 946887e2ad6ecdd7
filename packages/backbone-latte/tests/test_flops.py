"""Parameter and MAC counts reproduce the closed-form counts derived from models/latte.py (trainable counts match the
paper's Latte-S 32.48M and Latte-XL 673.68M) and agree with PyTorch's own counters for every variant, injection, patch
embedding and temporal position."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dtx
from dtx.costs import measure, meta_model, model_cost
from dtx_latte.flops import latte_cost, latte_counter

# Derived from models/latte.py, unconditional patch-2 models: trainable, + frozen pos/temp embeds, GMACs at
# 16 x 32 x 32 latents
TABLE = {
    "Latte-S/2": (32_480_672, 32_585_120, 93.63), "Latte-B/2": (129_547_040, 129_755_936, 364.11),
    "Latte-L/2": (456_815_648, 457_094_176, 1285.10), "Latte-XL/2": (673_681_568, 673_994_912, 1892.96),
}


def spec_macs(n: int, d: int, f: int = 16, t: int = 256, p: int = 2, c: int = 4) -> int:
    """The DiT paper's MAC formula applied to Latte's layout (adaLN per frame / per patch)."""
    return (f * t * p * p * c * d + 256 * d + d * d
            + n // 2 * (f * (12 * t * d * d + 2 * t * t * d) + 6 * f * d * d)
            + n // 2 * (t * (12 * f * d * d + 2 * f * f * d) + 6 * t * d * d)
            + f * t * d * p * p * 2 * c + 2 * f * d * d)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_spec_table_params_and_gmacs(name):
    trainable, total, gmacs = TABLE[name]
    model = meta_model(name, input_size=32, num_frames=16)
    cost = latte_cost(model.config)
    assert (cost.trainable_params, cost.params) == (trainable, total)
    assert (dtx.count_parameters(model, trainable_only=True), dtx.count_parameters(model)) == (trainable, total)
    assert round(cost.gflops, 2) == gmacs
    assert cost.macs == spec_macs(model.config.depth, model.config.hidden_size)


def test_ucf101_xl2_and_the_dit_relation():
    cost = latte_cost(meta_model("Latte-XL/2", num_classes=101).config)
    assert (cost.trainable_params, cost.params) == (673_799_072, 674_112_416)
    # Latte-XL/2 unconditional = DiT-XL/2 trainable (674,834,720) minus its 1001 x 1152 label table
    assert TABLE["Latte-XL/2"][0] == 674_834_720 - 1001 * 1152


CONFIGS = list(itertools.product([1, 2, 3, 4], ["adaln", "tokens"], ["uniform", "tubelet"], ["absolute", "rope"]))


@pytest.mark.parametrize("variant, injection, patch_embed, temporal_pos", CONFIGS)
def test_closed_form_equals_torch_flop_counter(variant, injection, patch_embed, temporal_pos):
    model = meta_model("Latte", input_size=[4, 6], depth=2, hidden_size=32, num_heads=2, num_frames=4,
                       num_classes=3 if variant % 2 else 0, variant=variant, injection=injection,
                       patch_embed=patch_embed, temporal_pos=temporal_pos)
    cost = latte_cost(model.config)
    assert measure(model) == 2 * cost.macs
    assert (cost.params, cost.trainable_params) == (dtx.count_parameters(model),
                                                    dtx.count_parameters(model, trainable_only=True))


@pytest.mark.parametrize("variant, injection", [(1, "adaln"), (3, "tokens"), (4, "adaln"), (4, "tokens")])
def test_other_clip_lengths_and_appended_images(variant, injection):
    model = meta_model("Latte", input_size=4, depth=2, hidden_size=32, num_heads=2, num_frames=4, num_classes=3,
                       variant=variant, injection=injection, use_image_num=2, temporal_pos="rope")
    for frames, images in ((4, 2), (7, 0)):
        x = torch.zeros(1, frames + images, 4, 4, 4, device="meta")
        t = torch.zeros(1, dtype=torch.long, device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, t)
        assert counter.get_total_flops() == 2 * latte_cost(model.config, frames=frames, images=images).macs


def test_registered_counter_is_the_closed_form():
    cost = model_cost("Latte-XL/2", input_size=32, num_frames=16)  # found through the registry
    assert cost.method == "analytic" and round(cost.gmacs, 2) == 1892.96 and cost.flops == 2 * cost.macs
    assert cost.trainable_params == 673_681_568 and cost.frozen_params == 313_344
    row = cost.row()
    assert row["variant"] == 1 and row["frames"] == 16 and row["tokens_per_frame"] == 256
    tubelet = latte_counter(meta_model("Latte-B/2", patch_embed="tubelet", temporal_stride=4))
    assert tubelet.extra["token_frames"] == 4 and tubelet.macs < model_cost("Latte-B/2").macs
