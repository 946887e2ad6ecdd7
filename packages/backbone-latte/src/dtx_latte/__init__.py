"""Latte (Ma et al., 2024) for dtx: the video diffusion transformer in its four variants, its presets, official
checkpoint loading, initialisation from a DiT and cost counting."""

from .checkpoint import infer_config, init_from_dit
from .flops import LatteCost, latte_cost, latte_counter
from .model import (LATTE_PRESETS, AxisBlockSpec, FactorisedBlockSpec, Latte, LatteConfig, SplitHeadBlockSpec,
                    block_layout)

__version__ = "0.1.0"

__all__ = ["LATTE_PRESETS", "AxisBlockSpec", "FactorisedBlockSpec", "Latte", "LatteConfig", "LatteCost",
           "SplitHeadBlockSpec", "block_layout", "infer_config", "init_from_dit", "latte_cost", "latte_counter"]
