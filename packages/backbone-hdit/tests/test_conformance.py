"""HDiT passes the dtx conformance kit (dtx.testing): tiny two-level hourglasses (neighborhood, shifted-window and
global attention, class labels and a mapping condition) and the digits recipe's architecture at 8x8."""

from __future__ import annotations

from dtx.testing import ModelCase, ModelConformance

TINY = {"input_size": 8, "patch_size": 2, "in_channels": 1, "depths": [1, 1], "widths": [16, 32],
        "d_ffs": [24, 48], "mapping_width": 16, "mapping_depth": 1}
NA = {"type": "neighborhood", "d_head": 8, "kernel_size": 3}
SW = {"type": "shifted-window", "d_head": 8, "window_size": 2}
GLOBAL = {"type": "global", "d_head": 8}


class TestHDiTConformance(ModelConformance):
    plugin = "hdit"
    cases = [
        ModelCase("HDiT", {**TINY, "self_attns": [NA, GLOBAL], "num_classes": 3}, zero_init=True, id="na-classes"),
        ModelCase("HDiT", {**TINY, "self_attns": [SW, GLOBAL], "mapping_cond_dim": 4}, zero_init=True,
                  id="sw-mapping-cond"),
        ModelCase("HDiT", {"input_size": 16, "patch_size": 2, "in_channels": 1, "depths": [1, 1], "widths": [64, 64],
                           "d_ffs": [64, 64], "self_attns": ["neighborhood:7", "global"], "mapping_width": 32,
                           "mapping_depth": 1, "num_classes": 10}, zero_init=True, id="shorthand-attention"),
    ]
