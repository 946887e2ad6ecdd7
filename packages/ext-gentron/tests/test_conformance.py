"""GenTron passes the dtx conformance kit (dtx.testing): tiny text-to-image models with cross-attention and adaLN
text conditioning, a learned null caption and a second encoder, and a text-to-video model."""

from __future__ import annotations

from dtx.testing import ModelCase, ModelConformance

SMALL = {"input_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32, "depth": 2, "num_heads": 4,
         "context_dim": 12, "text_length": 5}


class TestGenTronConformance(ModelConformance):
    plugin = "gentron"
    cases = [
        ModelCase("GenTron", {**SMALL, "learn_sigma": False}, zero_init=True, id="t2i-cross-attention"),
        # adaLN conditioning reads the pooled text; the token sequence only stands in when no pooled vector is given
        ModelCase("GenTron", {**SMALL, "conditioning": "adaln"}, zero_init=True, inert=("context", "context_mask"),
                  no_grad=("y_proj",), id="t2i-adaln"),
        # the learned null caption is only used for samples whose text was dropped (text_null)
        ModelCase("GenTron", {**SMALL, "learned_null": True, "context_dim_2": 8}, zero_init=True,
                  no_grad=("null_context",), id="t2i-two-encoders-learned-null"),
        ModelCase("GenTron", {**SMALL, "num_frames": 3, "learn_sigma": False}, zero_init=True, id="t2v"),
        ModelCase("GenTron-S/2", {"input_size": 4, "in_channels": 1, "depth": 1, "context_dim": 8,
                                  "text_length": 3}, zero_init=True, id="preset-S2"),
    ]
