"""Latte passes the dtx conformance kit (dtx.testing): tiny video models of the four variants, tubelet patches
with token injection, image-video joint inputs, and a preset."""

from __future__ import annotations

from dtx.testing import ModelCase, ModelConformance

TINY = {"input_size": 4, "in_channels": 2, "depth": 2, "hidden_size": 32, "num_heads": 2, "num_frames": 4,
        "num_classes": 3}


class TestLatteConformance(ModelConformance):
    plugin = "latte"
    cases = [
        ModelCase("Latte", {**TINY, "variant": 1}, zero_init=True, id="v1"),
        ModelCase("Latte", {**TINY, "variant": 2, "learn_sigma": False}, zero_init=True, id="v2"),
        ModelCase("Latte", {**TINY, "variant": 3, "temporal_pos": "rope"}, zero_init=True, id="v3-rope"),
        ModelCase("Latte", {**TINY, "variant": 4, "patch_embed": "tubelet", "injection": "tokens"}, zero_init=True,
                  id="v4-tubelet-tokens"),
        ModelCase("Latte-S/4", {"input_size": 8, "in_channels": 1, "num_frames": 2, "depth": 2}, zero_init=True,
                  id="preset-S4-unconditional"),
    ]
