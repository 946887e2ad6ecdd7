"""DiT passes the dtx conformance kit (dtx.testing): tiny configurations of each block type and a preset."""

from __future__ import annotations

from dtx.testing import ModelCase, ModelConformance

TINY = {"input_size": 8, "in_channels": 2, "hidden_size": 32, "depth": 1, "num_heads": 2, "num_classes": 3}


class TestDiTConformance(ModelConformance):
    plugin = "dit"
    cases = [
        ModelCase("DiT", {**TINY, "patch_size": 2}, zero_init=True, id="adaln-zero"),
        ModelCase("DiT", {**TINY, "patch_size": 4, "block": "cross-attention", "learn_sigma": False},
                  zero_init=True, id="cross-attention"),
        ModelCase("DiT", {**TINY, "patch_size": 2, "block": "in-context", "num_classes": 0}, zero_init=True,
                  id="in-context-unconditional"),
        ModelCase("DiT-S/8", {"input_size": 8, "num_classes": 2}, zero_init=True, id="preset-S8"),
    ]
