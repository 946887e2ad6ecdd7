"""Training: the config schema, objectives, AdamW groups, EMA, the loop shared by every runner, sampling and CLI.

``train(cfg, ctx)`` runs one worker; ``LocalContext`` is the single-process context (``dtx train --runner local``).
"""

from .config import TrainConfig, load_train_config
from .context import LocalContext, RunContext
from .loop import train

__all__ = ["LocalContext", "RunContext", "TrainConfig", "load_train_config", "train"]
