"""The ``dtx`` command: plugins, models, --version, plugin commands, and one-line user errors (exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import dtx
import dtx.errors
from dtx import plugins
from dtx.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtx: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_plugins_table(capsys, dist_plugins, tiny_plugin):
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    lines = out.splitlines()
    assert lines[lines.index("good  (dtx-good-test 0.3)") + 1] == "  models: good-linear"
    broken = lines.index("broken  (dtx-broken-test 0.3)")
    assert lines[broken + 1].startswith("  ERROR: RuntimeError: boom at import")
    assert any(line.startswith("  ERROR: in dtx_register_samplers: ValueError: sampler table is corrupt")
               for line in lines[lines.index("hookfail  (dtx-hookfail-test 0.3)"):])
    assert "tiny  (dtx_tiny_test_plugin)" in lines  # no version: no dangling space
    core = lines.index(f"core  (dtx-core {plugins.host().records['core'].version})")
    end = next((i for i in range(core + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    core_block = lines[core + 1:end]
    assert any(line.startswith("  commands: plugins, models") for line in core_block)


def test_plugins_json(capsys, dist_plugins):
    code, out, _ = run_cli(capsys, "plugins", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows["good"]) == {"name", "dist", "version", "module", "registers", "error", "hint", "warnings",
                                 "hook_api", "conflicts"}
    assert rows["good"] == {"name": "good", "dist": "dtx-good-test", "version": "0.3", "module": "dtx_good_test_mod",
                            "registers": {"model": ["good-linear"]}, "error": None, "hint": None, "warnings": [],
                            "hook_api": None, "conflicts": []}
    assert rows["broken"]["error"].startswith("RuntimeError: boom at import") and rows["broken"]["registers"] == {}
    assert rows["core"]["dist"] == "dtx-core" and rows["core"]["registers"]["command"][:2] == ["plugins", "models"]


def _register_dup(name: str) -> None:
    module = types.ModuleType(f"dup_{name}")

    @dtx.hookimpl
    def dtx_register_models(register):
        register("dup-net", lambda: torch.nn.Linear(2, 2), family="dup")

    module.dtx_register_models = dtx_register_models
    plugins.register_plugin(module, name=name)


def test_plugins_lists_conflicts(capsys, fresh_host):
    _register_dup("first")
    _register_dup("second")
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    lines = out.splitlines()
    section = lines[lines.index("conflicts:") + 1:]
    assert section[0] == "  model 'dup-net': first, second"
    assert "second:dup-net" in section[1] and "DTX_DISABLE_PLUGINS" in section[1]
    code, out, _ = run_cli(capsys, "plugins", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    conflict = {"kind": "model", "name": "dup-net", "plugins": ["first", "second"]}
    assert rows["first"]["conflicts"] == rows["second"]["conflicts"] == [conflict]
    assert rows["core"]["conflicts"] == []


def test_plugins_without_conflicts_has_no_conflict_section(capsys, tiny_plugin):
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0 and "conflicts:" not in out.splitlines()


def test_using_a_conflicting_name_is_a_one_line_error(capsys, fresh_host):
    _register_dup("first")
    _register_dup("second")
    module = types.ModuleType("build_plugin")

    def run_build(args) -> int:
        dtx.create_model(args.model)
        return 0

    @dtx.hookimpl
    def dtx_register_commands(register):
        register("build", lambda p: p.add_argument("model"), run=run_build, help="build a model")

    module.dtx_register_commands = dtx_register_commands
    plugins.register_plugin(module, name="builder")
    assert_one_line_error(*run_cli(capsys, "build", "dup-net")[::2], "model 'dup-net' is registered by several "
                          "plugins: first, second", "'first:dup-net' or 'second:dup-net' picks one")
    assert run_cli(capsys, "build", "second:dup-net")[0] == 0


def test_cli_uses_the_one_error_flattener():
    import dtx.cli

    assert not hasattr(dtx.cli, "_one_line") and dtx.cli.one_line is dtx.errors.one_line


def test_models_json_counts_parameters(capsys, tiny_plugin):
    code, out, _ = run_cli(capsys, "models", "--family", "tiny", "--json")
    assert code == 0
    assert json.loads(out) == [{"name": "tiny-mlp", "family": "tiny", "plugin": "tiny", "params": 4 * 4 + 4,
                                "description": "a stack of Linear(width, width)"}]
    code, out, _ = run_cli(capsys, "models", "--family", "tiny", "--no-params", "--json")
    assert json.loads(out)[0]["params"] is None


def test_models_table(capsys, tiny_plugin):
    code, out, _ = run_cli(capsys, "models", "--family", "tiny-cfg")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["model", "params", "family", "plugin", "description"]
    assert row.split() == ["tiny-cfg", "0.00M", "tiny-cfg", "tiny", "the", "same,", "options", "from", "a", "dataclass"]


def test_models_with_no_models_registered(capsys, fresh_host, monkeypatch):
    monkeypatch.setenv("DTX_PLUGINS", "")
    plugins.reset()
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "no models registered" in out


def test_version_and_help(capsys, fresh_host):
    code, out, _ = run_cli(capsys, "--version")
    assert (code, out) == (0, f"dtx {dtx.__version__}\n")
    code, out, _ = run_cli(capsys)
    assert code == 0 and out.startswith("usage: dtx") and "plugins" in out and "models" in out


def test_plugin_command_runs(capsys, tiny_plugin):
    assert run_cli(capsys, "hello", "--name", "dtx")[:2] == (0, "hello dtx\n")


def test_user_errors_are_one_line_with_exit_2(capsys, tiny_plugin):
    assert_one_line_error(*run_cli(capsys, "nosuchcommand")[::2], "invalid choice: 'nosuchcommand'")
    assert_one_line_error(*run_cli(capsys, "models", "--bogus")[::2], "unrecognized arguments: --bogus")
    assert_one_line_error(*run_cli(capsys, "hello", "--name")[::2], "--name", "expected one argument")
    code, _, err = run_cli(capsys, "hello", "--fail")  # a multi-line DtxError message is folded into one line
    assert_one_line_error(code, err, "hello was asked to fail with a second line")


def test_a_broken_command_parser_does_not_take_the_cli_down(capsys, fresh_host):
    module = types.ModuleType("bad_parser_plugin")

    def configure(p):
        raise AttributeError("no add_argument for you")

    @dtx.hookimpl
    def dtx_register_commands(register):
        register("badcmd", configure, run=lambda args: 0)

    module.dtx_register_commands = dtx_register_commands
    plugins.register_plugin(module, name="badparser")
    assert run_cli(capsys, "plugins", "--json")[0] == 0
    assert_one_line_error(*run_cli(capsys, "badcmd")[::2], "command 'badcmd' of plugin 'badparser' failed",
                          "AttributeError: no add_argument for you")
    assert "in command 'badcmd': AttributeError" in plugins.host().records["badparser"].error


@pytest.mark.slow
@pytest.mark.integration
def test_console_script_user_error_in_a_subprocess():
    script = Path(sys.executable).with_name("dtx")
    command = [str(script)] if script.exists() else [shutil.which("dtx") or "dtx"]
    res = subprocess.run([*command, "models", "--family"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == ["dtx: error: argument --family: expected one argument "
                                       "(see `dtx models --help`)"]
