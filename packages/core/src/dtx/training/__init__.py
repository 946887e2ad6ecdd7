"""Training: the config schema, objectives, AdamW groups, EMA, the trainer shared by every runner, and sampling.

``train(cfg, ctx)`` runs one worker; ``LocalContext`` is the single-process context (``dtx train --runner local``).
"""

from .config import TrainConfig, load_train_config
from .context import LocalContext, RunContext
from .trainer import train

__all__ = ["LocalContext", "RunContext", "TrainConfig", "load_train_config", "train"]
