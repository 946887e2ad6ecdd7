"""DiT (Peebles & Xie, 2023) for dtx: the model, its presets, official-checkpoint loading and cost counting."""

from .checkpoint import infer_config, load_weights
from .flops import dit_cost, measure_flops
from .model import DIT_PRESETS, DiT, DiTConfig

__version__ = "0.1.0"

__all__ = ["DIT_PRESETS", "DiT", "DiTConfig", "dit_cost", "infer_config", "load_weights", "measure_flops"]
