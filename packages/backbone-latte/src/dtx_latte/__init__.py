"""Latte (Ma et al., 2024) for dtx: the video diffusion transformer in its four variants, its presets, official
checkpoint loading, initialisation from a DiT and cost counting.

The names below are imported on first use (PEP 562), so importing the package -- as ``dtx plugins`` does
through its plugin module -- loads no model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtx.plugins import lazy_exports

__version__ = "0.1.0"

#: public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "infer_config": (".checkpoint", "infer_config"),
    "init_from_dit": (".checkpoint", "init_from_dit"),
    "LatteCost": (".flops", "LatteCost"),
    "latte_cost": (".flops", "latte_cost"),
    "latte_counter": (".flops", "latte_counter"),
    "LATTE_PRESETS": (".model", "LATTE_PRESETS"),
    "AxisBlockSpec": (".blocks", "AxisBlockSpec"),
    "FactorisedBlockSpec": (".blocks", "FactorisedBlockSpec"),
    "Latte": (".model", "Latte"),
    "LatteConfig": (".model", "LatteConfig"),
    "SplitHeadBlockSpec": (".blocks", "SplitHeadBlockSpec"),
    "block_layout": (".model", "block_layout"),
}

__all__ = ["AxisBlockSpec", "FactorisedBlockSpec", "LATTE_PRESETS", "Latte", "LatteConfig", "LatteCost",
    "SplitHeadBlockSpec", "block_layout", "infer_config", "init_from_dit", "latte_cost", "latte_counter"]

if TYPE_CHECKING:
    from .checkpoint import infer_config, init_from_dit
    from .flops import LatteCost, latte_cost, latte_counter
    from .blocks import AxisBlockSpec, FactorisedBlockSpec, SplitHeadBlockSpec
    from .model import LATTE_PRESETS, Latte, LatteConfig, block_layout


__getattr__ = lazy_exports(__name__, _EXPORTS)
