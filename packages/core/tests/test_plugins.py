"""Plugin host: run-time plugins, broken plugins, allow/deny lists, unknown names and unknown options, names
registered twice (conflicts, ``plugin:name``), a missing core entry point, the objective kind."""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
import types

import pytest
import torch

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
    assert dtx.models.model_spec(model) == {"name": "tiny-mlp", "width": 3, "depth": 2}
    assert dtx.models.model_spec(dtx.create_model("TINY-MLP"))["name"] == "tiny-mlp"  # case-insensitive fallback


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


# -- names registered more than once ----------------------------------------------------------------------------


def _model_plugin(module_name: str, *names: str, width: int = 2) -> types.ModuleType:
    """A run-time plugin whose ``dtx_register_models`` registers each of ``names`` (repeats allowed)."""
    module = types.ModuleType(module_name)

    @dtx.hookimpl
    def dtx_register_models(register):
        for name in names:
            register(name, lambda width=width: torch.nn.Linear(width, width), family=module_name)

    module.dtx_register_models = dtx_register_models
    return module


def test_a_name_two_plugins_register_keeps_the_first_and_is_a_conflict(fresh_host):
    plugins.register_plugin(_model_plugin("one_mod", "dup-net", "only-one", width=2), name="one")
    plugins.register_plugin(_model_plugin("two_mod", "dup-net", width=3), name="two")
    host = plugins.host()
    assert host.conflicts == {("model", "dup-net"): ["one", "two"]}
    assert host.table("model")["dup-net"].plugin == "one"  # the first registration, not a silent replacement
    assert dtx.list_models().count("dup-net") == 1
    assert records()["two"].registers == {"model": ["dup-net"]} and records()["two"].error is None
    for spelling in ("dup-net", "DUP-NET"):
        with pytest.raises(PluginError) as info:
            plugins.get("model", spelling)
        msg = str(info.value)
        assert "\n" not in msg and "model 'dup-net' is registered by several plugins: one, two" in msg
        assert "'one:dup-net' or 'two:dup-net' picks one" in msg and "DTX_DISABLE_PLUGINS=two removes one" in msg
    with pytest.raises(PluginError, match="registered by several plugins"):
        dtx.create_model("dup-net")
    assert plugins.get("model", "one:dup-net").plugin == "one"
    assert plugins.get("model", "two:dup-net").plugin == "two"
    assert tuple(dtx.create_model("two:dup-net").weight.shape) == (3, 3)
    assert [e.plugin for e in host.registrations("model", "dup-net")] == ["one", "two"]
    assert plugins.get("model", "only-one").plugin == "one"  # other names of the plugins are unaffected


def test_unregistering_the_winner_hands_the_name_to_the_next_plugin(fresh_host):
    plugins.register_plugin(_model_plugin("one_mod", "dup-net"), name="one")
    plugins.register_plugin(_model_plugin("two_mod", "dup-net"), name="two")
    plugins.unregister_plugin("one")
    assert plugins.host().conflicts == {}
    assert plugins.get("model", "dup-net").plugin == "two"


def test_a_name_one_plugin_registers_twice_is_a_conflict_too(fresh_host):
    plugins.register_plugin(_model_plugin("twice_mod", "again", "again"), name="twice")
    assert plugins.host().conflicts == {("model", "again"): ["twice", "twice"]}
    assert records()["twice"].registers == {"model": ["again"]}
    with pytest.raises(PluginError, match=r"model 'again' is registered 2 times by plugin 'twice' .*"
                                          r"'twice:again' picks its first registration"):
        plugins.get("model", "again")
    assert plugins.get("model", "twice:again") is plugins.host().registrations("model", "again")[0]


def test_qualified_names_work_for_every_name_and_say_what_a_plugin_has(tiny_plugin):
    assert plugins.get("sampler", "core:ddim") is plugins.get("sampler", "ddim")
    assert plugins.get("model", "tiny:TINY-MLP").name == "tiny-mlp"
    with pytest.raises(UnknownNameError, match=r"plugin 'tiny' registers no model 'tiny-mpl'; did you mean "
                                               r"'tiny:tiny-mlp'.*\? \(its models: tiny-cfg, tiny-mlp\)"):
        plugins.get("model", "tiny:tiny-mpl")
    with pytest.raises(UnknownNameError, match=r"plugin 'core' registers no model 'x' \(its models: none\)"):
        plugins.get("model", "core:x")
    with pytest.raises(UnknownNameError, match=r"unknown model 'nobody:tiny-mlp'"):  # not a plugin: a plain name
        plugins.get("model", "nobody:tiny-mlp")


def _install_dists(root, dists: dict[str, str]) -> None:
    """Fake pip-installed plugins on ``root``: entry point name -> source of its module ``dtx_<name>_conflict``."""
    for ep_name, source in dists.items():
        module = f"dtx_{ep_name}_conflict"
        info = root / f"dtx_{ep_name}_conflict-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dtx-{ep_name}-conflict\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[dtx]\n{ep_name} = {module}\n")
        (root / f"{module}.py").write_text(textwrap.dedent(source))


_SAME_NAME = """
    import torch
    import dtx

    @dtx.hookimpl
    def dtx_register_models(register):
        register("same-net", lambda: torch.nn.Linear({n}, {n}), family="{ep}")
"""


def test_installed_plugins_conflict_in_entry_point_name_order(tmp_path, monkeypatch, fresh_host):
    _install_dists(tmp_path, {ep: _SAME_NAME.format(n=n, ep=ep) for ep, n in (("zeta", 2), ("alpha", 3))})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        plugins.reset()
        host = plugins.host()
        assert list(host.records).index("core") == 0
        assert host.conflicts[("model", "same-net")] == ["alpha", "zeta"]
        assert host.table("model")["same-net"].plugin == "alpha"
        with pytest.raises(PluginError, match="DTX_DISABLE_PLUGINS=zeta removes one"):
            plugins.get("model", "same-net")
        monkeypatch.setenv("DTX_DISABLE_PLUGINS", "alpha")
        plugins.reset()
        assert plugins.host().conflicts == {}
        assert tuple(dtx.create_model("same-net").weight.shape) == (2, 2)
    finally:
        for ep in ("zeta", "alpha"):
            sys.modules.pop(f"dtx_{ep}_conflict", None)


# -- the core plugin, the objective kind and error messages -----------------------------------------------------


def test_missing_core_entry_point_is_an_error_on_the_core_record(fresh_host, monkeypatch):
    real = plugins.md.entry_points
    monkeypatch.setattr(plugins.md, "entry_points",
                        lambda **kw: [ep for ep in real(**kw) if ep.name != plugins.BUILTIN])
    plugins.reset()
    core = records()["core"]
    assert list(records())[0] == "core" and core.dist == "dtx-core" and core.registers == {}
    assert "dtx-core's package metadata is missing" in core.error and "reinstall dtx-core" in core.error
    assert plugins.host().pm.get_plugin("core") is None and plugins.names("sampler") == []


def test_plugins_module_does_not_import_builtin():
    source = inspect.getsource(plugins)
    assert "import builtin" not in source and "dtx.builtin import" not in source


def test_objective_kind_and_hook_api_version(fresh_host):
    assert plugins.KINDS["objective"] == "dtx_register_objectives" and dtx.hookspecs.HOOK_API_VERSION == "1.2"
    module = types.ModuleType("objective_plugin")

    def factory(cfg, model, info):
        return ("objective", cfg, model, info)

    @dtx.hookimpl
    def dtx_register_objectives(register):
        register("toy-objective", factory, description="for the test")

    module.dtx_register_objectives = dtx_register_objectives
    plugins.register_plugin(module, name="objectives")
    entry = plugins.get("objective", "toy-objective")
    assert entry.obj is factory and entry.meta == {"description": "for the test"} and entry.plugin == "objectives"
    assert records()["objectives"].registers == {"objective": ["toy-objective"]} and records()["objectives"].error is None


def test_hook_errors_are_flattened_to_one_line(fresh_host):
    module = types.ModuleType("multiline_plugin")

    @dtx.hookimpl
    def dtx_register_models(register):
        raise ValueError("first line\n    second line\n")

    module.dtx_register_models = dtx_register_models
    plugins.register_plugin(module, name="multiline")
    assert re.fullmatch(r"in dtx_register_models: ValueError: first line second line \(test_plugins\.py:\d+\)",
                        records()["multiline"].error)


# -- hook API versions, fix hints, broken plugins next to working ones --------------------------------------------


def _versioned(api: object, hooks: str = "models") -> str:
    """Source of a plugin module declaring ``DTX_HOOK_API = api`` that registers one model (or one objective)."""
    declaration = f"DTX_HOOK_API = {api!r}\n" if api is not None else ""
    if hooks == "models":
        body = ("@dtx.hookimpl\ndef dtx_register_models(register):\n"
                "    register('{ep}-net', lambda: torch.nn.Linear(2, 2), family='{ep}')\n")
    else:
        body = "@dtx.hookimpl\ndef dtx_register_objectives(register):\n    register('{ep}-objective', print)\n"
    return "import torch\nimport dtx\n" + declaration + body


def _install_sources(root, sources: dict[str, str]) -> None:
    """Like ``_install_dists`` but the sources may use ``{ep}`` for the entry-point name."""
    _install_dists(root, {ep: src.replace("{ep}", ep) for ep, src in sources.items()})


@pytest.fixture
def versioned_plugins(tmp_path, monkeypatch, fresh_host):
    sources = {"newmajor": _versioned("2.0"), "oldmajor": _versioned("0.9"), "floatapi": _versioned(1.1),
               "newminor": _versioned("1.9"), "declares10": _versioned("1.0", hooks="objectives"),
               "undeclared": _versioned(None, hooks="objectives"), "current": _versioned("1.1")}
    _install_sources(tmp_path, sources)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    yield records()
    for ep in sources:
        sys.modules.pop(f"dtx_{ep}_conflict", None)


def test_another_major_hook_api_is_reported_and_not_loaded(versioned_plugins):
    recs = versioned_plugins
    new, old = recs["newmajor"], recs["oldmajor"]
    assert new.error.startswith("written for hook API 2.0, but this dtx-core") and "has hook API 1.2" in new.error
    assert "upgrade dtx-core (pip install -U dtx-core)" in new.hint and "DTX_DISABLE_PLUGINS=newmajor" in new.hint
    assert "upgrade dtx-newmajor-conflict" not in new.hint
    assert old.error.startswith("written for hook API 0.9") and "pip install -U dtx-oldmajor-conflict" in old.hint
    for rec in (new, old):
        assert rec.registers == {} and plugins.host().pm.get_plugin(rec.name) is None
    assert "newmajor-net" not in dtx.list_models()
    assert tuple(dtx.create_model("current-net").weight.shape) == (2, 2)  # the rest loads
    assert recs["current"].hook_api == "1.1" and recs["current"].error is None and recs["current"].warnings == []


def test_a_malformed_declaration_names_the_attribute(versioned_plugins):
    rec = versioned_plugins["floatapi"]
    assert rec.error == "DTX_HOOK_API must be a string 'MAJOR.MINOR' such as '1.2', got 1.1"
    assert rec.hint == "write DTX_HOOK_API = '1.2' in dtx_floatapi_conflict" and rec.registers == {}


def test_newer_minor_and_hooks_newer_than_declared_load_with_a_warning(versioned_plugins):
    recs = versioned_plugins
    assert recs["newminor"].error is None and recs["newminor"].registers == {"model": ["newminor-net"]}
    assert recs["newminor"].warnings == ["written for hook API 1.9, newer than this dtx's 1.2: hooks added since are "
                                         "not called; upgrade dtx-core (pip install -U dtx-core)"]
    assert recs["declares10"].warnings == ["implements dtx_register_objectives, added in hook API 1.1, but declares "
                                           "1.0: write DTX_HOOK_API = '1.1' in dtx_declares10_conflict"]
    assert "declares 1.0 (no DTX_HOOK_API)" in recs["undeclared"].warnings[0]
    assert plugins.get("objective", "declares10-objective").plugin == "declares10"  # still works
    assert recs["core"].hook_api == "1.2" and recs["core"].warnings == [] and recs["core"].error is None


def test_run_time_plugin_of_another_major_is_refused(fresh_host):
    module = types.ModuleType("future_plugin")
    module.DTX_HOOK_API = "3.0"
    with pytest.raises(PluginError, match=r"plugin 'future' cannot be registered: written for hook API 3\.0.*"
                                          r"upgrade dtx-core"):
        plugins.register_plugin(module, name="future")
    assert "future" not in records()


def test_every_broken_plugin_gets_a_fix(dist_plugins, tmp_path):
    recs = records()
    assert "pip install --force-reinstall dtx-broken-test" in recs["broken"].hint
    assert "DTX_DISABLE_PLUGINS=broken skips it" in recs["broken"].hint
    assert "a bug in dtx-hookfail-test: report it to its authors" in recs["hookfail"].hint
    assert recs["good"].hint is None


def test_a_missing_dependency_and_sys_exit_at_import(tmp_path, monkeypatch, fresh_host):
    _install_sources(tmp_path, {"needsdep": "import dtx_no_such_dependency_xyz\n",
                                "exits": "import sys\nsys.exit(3)\n", "current": _versioned("1.1")})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        plugins.reset()
        recs = records()
        assert recs["needsdep"].error.startswith("ModuleNotFoundError: No module named 'dtx_no_such_dependency_xyz'")
        assert recs["needsdep"].hint.startswith("dtx-needsdep-conflict imports 'dtx_no_such_dependency_xyz', which "
                                                "is not installed: install it (pip install dtx_no_such_dependency_xyz)")
        assert recs["exits"].error.startswith("SystemExit: 3")  # a plugin calling sys.exit() does not end dtx
        assert recs["current"].error is None and "current-net" in dtx.list_models()
    finally:
        for ep in ("needsdep", "exits", "current"):
            sys.modules.pop(f"dtx_{ep}_conflict", None)


def test_misspelled_hook_hint_names_the_module(fresh_host):
    module = types.ModuleType("typo_plugin2")

    @dtx.hookimpl
    def dtx_register_sampler(register):
        pass

    module.dtx_register_sampler = dtx_register_sampler
    plugins.register_plugin(module, name="typo2")
    rec = records()["typo2"]
    assert rec.error == "unknown hook dtx_register_sampler (did you mean dtx_register_samplers?)"
    assert rec.hint.startswith("rename the function in typo_plugin2 to a dtx hook")


_BROKEN_SET = {
    "importfail": "raise ImportError('cannot import name X from y')\n",
    "hookraise": "import dtx\n\n@dtx.hookimpl\ndef dtx_register_models(register):\n    raise RuntimeError('oops')\n",
    "misspelt": "import dtx\n\n@dtx.hookimpl\ndef dtx_register_modles(register):\n    pass\n",
    "future": _versioned("2.0"),
    "dupa": _SAME_NAME.format(n=2, ep="dupa"),
    "dupb": _SAME_NAME.format(n=3, ep="dupb"),
    "fine": _versioned("1.1"),
}


def test_dtx_keeps_working_next_to_broken_installed_plugins(tmp_path):
    """``dtx plugins`` / ``dtx models`` / ``dtx flops`` as a user runs them, with seven installed plugins: an import
    error, an exception in a hook, a misspelled hook, a newer major hook API, two registering one name, one fine."""
    import json
    import os
    import subprocess

    _install_dists(tmp_path, {ep: src.replace("{ep}", ep) for ep, src in _BROKEN_SET.items()})
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTX_")}
    env.update(PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    dtx_bin = str(__import__("pathlib").Path(sys.executable).with_name("dtx"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([dtx_bin, *args], env=env, capture_output=True, text=True, timeout=300)

    listing = run("plugins")
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    for ep, fragment in (("importfail", "ImportError: cannot import name X from y"),
                         ("hookraise", "in dtx_register_models: RuntimeError: oops"),
                         ("misspelt", "unknown hook dtx_register_modles (did you mean dtx_register_models?)"),
                         ("future", "written for hook API 2.0")):
        block = out[out.index(f"\n{ep}  (dtx-{ep}-conflict 1.0)"):]
        assert block.splitlines()[2].startswith(f"  ERROR: {fragment}"), block[:400]
        fix = block.splitlines()[3]
        assert fix.startswith("    fix: ") and (ep == "misspelt" or f"DTX_DISABLE_PLUGINS={ep} skips it" in fix), fix
    conflicts = out[out.index("\nconflicts:") + 1:].splitlines()
    assert conflicts[1:3] == ["  model 'same-net': dupa, dupb",
                              "    model 'same-net' is registered by several plugins: dupa, dupb; listings show "
                              "dupa's, the bare name is refused: 'dupa:same-net' or 'dupb:same-net' picks one, or "
                              "DTX_DISABLE_PLUGINS=dupb removes one (see `dtx plugins`)"]
    assert run("plugins", "--check").returncode == 1
    models = {row["name"]: row for row in json.loads(run("models", "--json").stdout)}
    assert models["fine-net"]["params"] == 6 and models["same-net"]["plugin"] == "dupa"
    if "DiT-S/8" in models:  # an installed backbone keeps working next to them
        flops = run("flops", "DiT-S/8", "--input-size", "8", "--json")
        assert flops.returncode == 0 and json.loads(flops.stdout)["method"] == "analytic", flops.stderr
    refused = run("flops", "same-net")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("dtx: error: model 'same-net' is registered by several plugins: dupa, dupb")
    env["DTX_DISABLE_PLUGINS"] = "importfail,hookraise,misspelt,future,dupb"
    assert run("plugins", "--check").returncode == 0
