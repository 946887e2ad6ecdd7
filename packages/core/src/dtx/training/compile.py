"""``torch.compile`` of a run's model with an eager fallback that says why.

Modes: ``auto`` (the default; ``compile: null`` in a recipe) compiles on CUDA and stays eager elsewhere; ``on``
(``true``) compiles on any device where inductor can build kernels (a C++ compiler on CPU); ``off`` (``false``)
never compiles. A compiler failure at the first call
(a missing toolchain, an unsupported op) falls back to the eager model once, with a warning naming the error; errors
of the model itself (bad shapes, labels) propagate unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")


def check_compile_mode(mode: Any, option: str = "compile") -> str:
    """``mode`` as one of ``COMPILE_MODES`` (None is auto, booleans on/off); else a ConfigError naming ``option``."""
    if mode is None:
        return "auto"
    if isinstance(mode, bool):
        return "on" if mode else "off"
    if mode not in COMPILE_MODES:
        raise ConfigError(f"{option}={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return str(mode)


def _cxx_compiler() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "g++", "clang++", "c++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def eager_reason(mode: Any, device: torch.device | str) -> str | None:
    """Why the model stays eager under ``mode`` on ``device`` (None: it is compiled)."""
    mode = check_compile_mode(mode)
    device = torch.device(device)
    if mode == "off":
        return "compile=off"
    if mode == "auto" and device.type != "cuda":
        return f"compile=auto compiles on CUDA only ({device.type} stays eager; compile=on tries it there)"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python/platform"
    except Exception as exc:  # pragma: no cover - broken installs
        return f"torch._dynamo cannot be imported ({type(exc).__name__}: {exc})"
    if device.type == "cpu" and _cxx_compiler() is None:
        return "inductor needs a C++ compiler on CPU and none was found (set CXX or install g++)"
    return None


def _is_compiler_error(exc: BaseException) -> bool:
    try:
        from torch._dynamo.exc import TorchDynamoException
    except Exception:  # pragma: no cover
        return False
    return isinstance(exc, TorchDynamoException)


class CompiledModel(nn.Module):
    """``torch.compile(model)`` that falls back to ``model`` (eager) when compiling fails at the first call.

    Attributes the wrapper lacks (``no_sync``, ``config``, ...) are read from the eager model; ``eager_reason``
    is None while compiled, else why it runs eager. Keep saving ``eager``'s state dict (the keys are unchanged).
    """

    def __init__(self, model: nn.Module, **compile_options: Any) -> None:
        super().__init__()
        self.eager = model
        self.compiled = torch.compile(model, **compile_options)
        self.eager_reason: str | None = None
        self._proved = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager_reason is not None:
            return self.eager(*args, **kwargs)
        if self._proved:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:
            if not _is_compiler_error(exc):
                raise
            first = str(exc).strip().splitlines()
            self.eager_reason = f"torch.compile failed, running eager: {type(exc).__name__}: " \
                                f"{first[0] if first else ''}"[:400]
            log.warning("%s", self.eager_reason)
            return self.eager(*args, **kwargs)
        self._proved = True
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["eager"], name)


def compile_model(model: nn.Module, mode: Any, device: torch.device | str) -> tuple[nn.Module, str | None]:
    """(model to call, why it is eager or None): a ``CompiledModel`` when ``mode`` compiles on ``device``."""
    reason = eager_reason(mode, device)
    if reason is not None:
        return model, reason
    return CompiledModel(model), None


__all__ = ["COMPILE_MODES", "CompiledModel", "check_compile_mode", "compile_model", "eager_reason"]
