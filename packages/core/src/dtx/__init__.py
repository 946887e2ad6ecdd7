"""dtx: diffusion transformers as plugins over one core.

Public API: ``create_model``, ``list_models``, ``load_model``, ``save_model`` and the ``hookimpl`` marker for plugins.
"""

from __future__ import annotations

from .errors import CheckpointError, ConfigError, DtxError, ShapeError, UnknownNameError
from .hookspecs import HOOK_API_VERSION, hookimpl
from .models import count_parameters, create_model, list_models, load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "HOOK_API_VERSION", "CheckpointError", "ConfigError", "DtxError", "ShapeError", "UnknownNameError",
    "count_parameters", "create_model", "hookimpl", "list_models", "load_model", "save_model",
]
