"""Plugin host: run-time plugins, broken plugins, allow/deny lists, unknown names and unknown options."""

from __future__ import annotations

import re
import types

import pytest

import dtx
from dtx import plugins
from dtx.errors import ConfigError, PluginError, UnknownNameError


def records() -> dict[str, plugins.PluginRecord]:
    return {r.name: r for r in plugins.host()}


def test_runtime_plugin_contributes_models_and_commands(tiny_plugin):
    assert {"tiny-mlp", "tiny-cfg"} <= set(dtx.list_models())
    assert dtx.list_models("tiny") == ["tiny-mlp"]
    entry = plugins.get("command", "hello")
    assert entry.plugin == "tiny" and entry.meta["help"] == "say hello"
    assert records()["tiny"].registers == {"model": ["tiny-mlp", "tiny-cfg"], "command": ["hello"]}
    model = dtx.create_model("tiny-mlp", width=3, depth=2)
    assert [tuple(m.weight.shape) for m in model] == [(3, 3), (3, 3)]
    assert model.dtx_spec == {"name": "tiny-mlp", "width": 3, "depth": 2}
    assert dtx.create_model("TINY-MLP").dtx_spec["name"] == "tiny-mlp"  # case-insensitive fallback


def test_unregister_removes_contributions(tiny_plugin):
    plugins.unregister_plugin("tiny")
    assert "tiny-mlp" not in dtx.list_models() and "tiny" not in records()
    with pytest.raises(UnknownNameError):
        plugins.get("command", "hello")


def test_registering_a_name_twice_is_a_plugin_error(tiny_plugin):
    with pytest.raises(PluginError, match="'tiny' is already registered"):
        plugins.register_plugin(types.ModuleType("another"), name="tiny")


def test_unknown_model_lists_close_matches_and_providers(tiny_plugin):
    with pytest.raises(UnknownNameError) as info:
        dtx.create_model("tiny-mpl")
    msg = str(info.value)
    assert "unknown model 'tiny-mpl'" in msg and "did you mean 'tiny-mlp'" in msg
    providers = re.search(r"installed plugins providing models: ([^;)]*)", msg).group(1).split(", ")
    assert "tiny" in providers and "core" not in providers
    assert "\n" not in msg and not msg.startswith('"')  # KeyError would have repr()'d it
    with pytest.raises(UnknownNameError, match=r"unknown model 'nope' \(installed plugins providing models: "):
        dtx.create_model("nope")


def test_unknown_name_of_other_kinds_pluralises_and_mentions_broken_plugins(dist_plugins):
    with pytest.raises(UnknownNameError) as info:
        plugins.get("loss", "no-such-loss")
    msg = str(info.value)
    assert "installed plugins providing losses:" in msg
    assert "plugins that failed to load:" in msg and "broken" in msg and "hookfail" in msg


def test_unknown_override_names_the_option(tiny_plugin):
    with pytest.raises(ConfigError) as info:
        dtx.create_model("tiny-mlp", widht=3)
    assert "'widht' (did you mean 'width'?)" in str(info.value) and "options: depth, width" in str(info.value)
    with pytest.raises(ConfigError, match=r"model 'tiny-cfg' has no option 'dpth' \(did you mean 'depth'\?\)"):
        dtx.create_model("tiny-cfg", dpth=2)  # **kwargs factory: options come from factory.config_class
    assert len(dtx.create_model("tiny-cfg", depth=3)) == 3


def test_broken_plugins_are_recorded_and_others_keep_working(dist_plugins):
    recs = records()
    assert recs["good"].error is None and recs["good"].dist == "dtx-good-test" and recs["good"].version == "0.3"
    assert recs["good"].registers == {"model": ["good-linear"]}
    assert recs["broken"].error.startswith("RuntimeError: boom at import")
    assert recs["broken"].module == "dtx_broken_test_mod" and recs["broken"].dist == "dtx-broken-test"
    assert "in dtx_register_samplers: ValueError: sampler table is corrupt" in recs["hookfail"].error
    assert "core" in recs and "plugins" in plugins.names("command")
    assert tuple(dtx.create_model("good-linear", features=5).weight.shape) == (5, 5)


def test_errors_of_several_hooks_are_all_kept(fresh_host):
    module = types.ModuleType("two_bad_hooks")

    @dtx.hookimpl
    def dtx_register_models(register):
        raise KeyError("first")

    @dtx.hookimpl
    def dtx_register_datasets(register):
        raise OSError("second")

    module.dtx_register_models, module.dtx_register_datasets = dtx_register_models, dtx_register_datasets
    plugins.register_plugin(module, name="twobad")
    error = records()["twobad"].error
    assert "in dtx_register_models: KeyError" in error and "in dtx_register_datasets: OSError: second" in error


def test_allow_list_loads_only_named_plugins_plus_core(dist_plugins, monkeypatch):
    monkeypatch.setenv("DTX_PLUGINS", "good, hookfail")
    plugins.reset()
    assert set(records()) == {"core", "good", "hookfail"}


def test_deny_list_skips_plugins_but_never_core(dist_plugins, monkeypatch):
    monkeypatch.setenv("DTX_DISABLE_PLUGINS", "broken,core")
    plugins.reset()
    recs = records()
    assert "broken" not in recs and {"core", "good", "hookfail"} <= set(recs)


def test_empty_allow_list_keeps_only_core(dist_plugins, monkeypatch):
    monkeypatch.setenv("DTX_PLUGINS", "")
    plugins.reset()
    assert set(records()) == {"core"}


def test_misspelled_hook_is_reported(fresh_host):
    module = types.ModuleType("typo_plugin")

    @dtx.hookimpl
    def dtx_register_model(register):
        register("never-seen", object)

    module.dtx_register_model = dtx_register_model
    plugins.register_plugin(module, name="typo")
    assert records()["typo"].error == "unknown hook dtx_register_model (did you mean dtx_register_models?)"
    assert "never-seen" not in dtx.list_models()


def test_hook_with_arguments_the_spec_lacks_is_a_plugin_error(fresh_host):
    module = types.ModuleType("bad_signature_plugin")

    @dtx.hookimpl
    def dtx_register_models(register, device):
        pass

    module.dtx_register_models = dtx_register_models
    with pytest.raises(PluginError, match="plugin 'badsig' cannot be registered: PluginValidationError: .*device"):
        plugins.register_plugin(module, name="badsig")
    assert "badsig" not in records() and plugins.host().pm.get_plugin("badsig") is None
