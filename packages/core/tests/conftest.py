"""Fixtures for the plugin-host and CLI tests: a fresh host, a run-time plugin, and installed-looking plugins."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import types

import pytest
import torch

import dtx
from dtx import plugins
from dtx.errors import ConfigError
from dtx.testing import fresh_plugin_host


@pytest.fixture
def fresh_host():
    """Rediscover plugins from scratch, with no allow/deny list in the environment, and again afterwards."""
    with fresh_plugin_host():
        yield


@dataclasses.dataclass
class TinyConfig:
    width: int = 4
    depth: int = 1


def _tiny_mlp(width: int = 4, depth: int = 1) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


def _tiny_cfg(**overrides) -> torch.nn.Module:
    return _tiny_mlp(**dataclasses.asdict(TinyConfig(**overrides)))


_tiny_cfg.config_class = TinyConfig


def _hello_parser(p):
    p.add_argument("--name", default="world")
    p.add_argument("--fail", action="store_true")


def _hello_run(args) -> int:
    if args.fail:
        raise ConfigError("hello was asked to fail\nwith a second line")
    print(f"hello {args.name}")
    return 0


@pytest.fixture
def tiny_plugin(fresh_host):
    """A plugin registered at run time: two tiny model families and a ``hello`` command."""
    module = types.ModuleType("dtx_tiny_test_plugin")

    @dtx.hookimpl
    def dtx_register_models(register):
        register("tiny-mlp", _tiny_mlp, family="tiny", description="a stack of Linear(width, width)")
        register("tiny-cfg", _tiny_cfg, family="tiny-cfg", description="the same, options from a dataclass")

    @dtx.hookimpl
    def dtx_register_commands(register):
        register("hello", _hello_parser, run=_hello_run, help="say hello")

    module.dtx_register_models = dtx_register_models
    module.dtx_register_commands = dtx_register_commands
    plugins.register_plugin(module, name="tiny")
    return module


_DIST_PLUGINS = {  # distribution name: (entry point name, module name, module source)
    "dtx-good-test": ("good", "dtx_good_test_mod", """
        import torch
        import dtx

        @dtx.hookimpl
        def dtx_register_models(register):
            register("good-linear", lambda features=3: torch.nn.Linear(features, features), family="good")
    """),
    "dtx-broken-test": ("broken", "dtx_broken_test_mod", """
        raise RuntimeError("boom at import")
    """),
    "dtx-hookfail-test": ("hookfail", "dtx_hookfail_test_mod", """
        import dtx

        @dtx.hookimpl
        def dtx_register_samplers(register):
            register("hookfail-sampler", print)
            raise ValueError("sampler table is corrupt")
    """),
}


@pytest.fixture
def dist_plugins(tmp_path, monkeypatch, fresh_host):
    """Three plugins installed the way pip installs them (``*.dist-info`` with entry points) on sys.path:
    ``good`` registers a model, ``broken`` raises on import, ``hookfail`` raises inside its hook."""
    for dist, (ep_name, module, source) in _DIST_PLUGINS.items():
        info = tmp_path / f"{dist.replace('-', '_')}-0.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
        (info / "entry_points.txt").write_text(f"[dtx]\n{ep_name} = {module}\n")
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for _, module, _ in _DIST_PLUGINS.values():
        sys.modules.pop(module, None)
