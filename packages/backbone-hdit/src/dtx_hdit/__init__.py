"""HDiT (hourglass diffusion transformer) for dtx: pixel-space, O(n) in pixels, trainable on CPU, loading
k-diffusion ``image_transformer_v2`` checkpoints.

The names below are imported on first use (PEP 562), so importing the package -- as ``dtx plugins`` does
through its plugin module -- loads no model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtx.plugins import lazy_exports

__version__ = "0.1.0"

#: public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "CHECKPOINT_FORMAT": (".checkpoint", "FORMAT"),
    "HDiTCost": (".flops", "HDiTCost"),
    "hdit_cost": (".flops", "hdit_cost"),
    "hdit_counter": (".flops", "hdit_counter"),
    "HDIT_PRESETS": (".model", "HDIT_PRESETS"),
    "GlobalAttentionSpec": (".model", "GlobalAttentionSpec"),
    "HDiT": (".model", "HDiT"),
    "HDiTConfig": (".model", "HDiTConfig"),
    "LevelSpec": (".model", "LevelSpec"),
    "MappingSpec": (".model", "MappingSpec"),
    "NeighborhoodAttentionSpec": (".model", "NeighborhoodAttentionSpec"),
    "NoAttentionSpec": (".model", "NoAttentionSpec"),
    "ShiftedWindowAttentionSpec": (".model", "ShiftedWindowAttentionSpec"),
    "parse_attention": (".model", "parse_attention"),
}

__all__ = ["CHECKPOINT_FORMAT", "GlobalAttentionSpec", "HDIT_PRESETS", "HDiT", "HDiTConfig", "HDiTCost", "LevelSpec",
    "MappingSpec", "NeighborhoodAttentionSpec", "NoAttentionSpec", "ShiftedWindowAttentionSpec", "hdit_cost",
    "hdit_counter", "parse_attention"]

if TYPE_CHECKING:
    from .checkpoint import FORMAT as CHECKPOINT_FORMAT
    from .flops import HDiTCost, hdit_cost, hdit_counter
    from .model import (HDIT_PRESETS, GlobalAttentionSpec, HDiT, HDiTConfig, LevelSpec, MappingSpec,
                        NeighborhoodAttentionSpec, NoAttentionSpec, ShiftedWindowAttentionSpec, parse_attention)


__getattr__ = lazy_exports(__name__, _EXPORTS)
