"""DiT (Peebles & Xie, 2023) for dtx: the model, its presets, official-checkpoint loading and cost counting.

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
    "load_weights": (".checkpoint", "load_weights"),
    "dit_cost": (".flops", "dit_cost"),
    "measure_flops": (".flops", "measure_flops"),
    "DIT_PRESETS": (".model", "DIT_PRESETS"),
    "DiT": (".model", "DiT"),
    "DiTConfig": (".model", "DiTConfig"),
}

__all__ = ["DIT_PRESETS", "DiT", "DiTConfig", "dit_cost", "infer_config", "load_weights", "measure_flops"]

if TYPE_CHECKING:
    from .checkpoint import infer_config, load_weights
    from .flops import dit_cost, measure_flops
    from .model import DIT_PRESETS, DiT, DiTConfig


__getattr__ = lazy_exports(__name__, _EXPORTS)
