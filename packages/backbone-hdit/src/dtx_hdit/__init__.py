"""HDiT (hourglass diffusion transformer) for dtx: pixel-space, O(n) in pixels, trainable on CPU, loading
k-diffusion ``image_transformer_v2`` checkpoints."""

from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .flops import HDiTCost, hdit_cost, hdit_counter
from .model import (HDIT_PRESETS, GlobalAttentionSpec, HDiT, HDiTConfig, LevelSpec, MappingSpec,
                    NeighborhoodAttentionSpec, NoAttentionSpec, ShiftedWindowAttentionSpec, parse_attention)

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINT_FORMAT", "GlobalAttentionSpec", "HDIT_PRESETS", "HDiT", "HDiTConfig", "HDiTCost", "LevelSpec",
    "MappingSpec", "NeighborhoodAttentionSpec", "NoAttentionSpec", "ShiftedWindowAttentionSpec", "hdit_cost",
    "hdit_counter", "parse_attention",
]
