"""Test helpers for dtx and its plugins (the start of the conformance kit): isolate the process-wide plugin host."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from . import plugins

PLUGIN_ENV = ("DTX_PLUGINS", "DTX_DISABLE_PLUGINS")


@contextlib.contextmanager
def fresh_plugin_host() -> Iterator[None]:
    """Rediscover every installed plugin with no allow/deny list, and forget them again afterwards."""
    saved = {name: os.environ.pop(name) for name in PLUGIN_ENV if name in os.environ}
    plugins.reset()
    try:
        yield
    finally:
        plugins.reset()
        for name in PLUGIN_ENV:
            os.environ.pop(name, None)
        os.environ.update(saved)
