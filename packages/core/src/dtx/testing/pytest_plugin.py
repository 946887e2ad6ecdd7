"""The pytest plugin of the dtx conformance kit (entry point ``pytest11``: loaded by every pytest run in an
environment with dtx-core, as pytest plugins are).

It adds ``--dtx-compile`` / ``--dtx-compile-backend`` (turn on the kit's ``torch.compile`` check) and the
``dtx_plugin_host`` fixture: the process-wide plugin host rediscovered from the installed plugins, with no
``DTX_PLUGINS`` / ``DTX_DISABLE_PLUGINS`` in the environment, and forgotten again afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dtx", "dtx plugin conformance kit (dtx.testing)")
    group.addoption("--dtx-compile", action="store_true", default=False,
                    help="run the kit's torch.compile check (slow; skipped by default)")
    group.addoption("--dtx-compile-backend", default="inductor", metavar="BACKEND",
                    help="torch.compile backend of that check (default: inductor; aot_eager needs no compiler)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture
def dtx_plugin_host() -> Iterator[Any]:
    """The plugin host (``dtx.plugins.PluginHost``) of the installed plugins alone, reset after the test."""
    from dtx import plugins
    from dtx.testing import fresh_plugin_host

    with fresh_plugin_host():
        yield plugins.host()
