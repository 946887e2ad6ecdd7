"""The ``local`` runner: one process, no Ray (debugging, notebooks, the clean-install check)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError
from .config import TrainConfig
from .context import LocalContext, default_device
from .trainer import train


def run_local(cfg: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The ``local`` runner: one process, no Ray; CUDA if available unless ``--gpus-per-worker 0``."""
    workers = getattr(args, "workers", None)
    workers = 1 if workers is None else workers
    if workers != 1:
        raise ConfigError(f"--runner local runs one worker; got --workers {workers} (use --runner ray)")
    gpus = getattr(args, "gpus_per_worker", None)
    ctx = LocalContext(cfg.out, device=default_device(None if gpus is None else gpus > 0),
                       require_resume=bool(getattr(args, "resume", False)))
    return {**train(cfg, ctx), "runner": "local"}
