"""The conformance kit: what every dtx backbone plugin must satisfy, run by the plugin's own tests.

A plugin's test module subclasses ``ModelConformance`` once::

    from dtx.testing import ModelCase, ModelConformance

    class TestConformance(ModelConformance):
        plugin = "mine"                                   # the entry-point name in group "dtx"
        cases = [ModelCase("Mine-S", {"input_size": 8}, zero_init=True)]

and pytest collects one test per check and case (``pytest_generate_tests`` parametrises them, as in pytest's
"scenarios" pattern): registration and option validation, the declared interface, config round-trip, forward
shapes and dtypes for the inputs the model declares (every declared input reaches the output), zero output at init
(when ``zero_init``), gradients to every trainable parameter, save/load through ``dtx.save_model`` /
``dtx.load_model``, determinism under a seed, ``dtx flops``, ``torch.compile`` (opt-in: ``--dtx-compile``), and
that importing the plugin module imports neither heavy optional dependencies nor the model code.

Inputs come from the model's declaration (``dtx.costs.example_inputs``: ``input_shape``, ``noise_input``,
``example_conditions`` or ``y``) with random values, so keep cases tiny: each check builds its model afresh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from .. import hookspecs, plugins
from ..costs import cost_of, example_inputs
from ..errors import ConfigError
from ..interface import interface_of
from ..models import count_parameters, create_model, load_model, model_spec, save_model
from ..options import factory_options
from . import fresh_plugin_host

#: optional dependencies that a plugin module must not import before one of its hooks runs (``dtx plugins`` imports
#: every plugin module; each of these costs seconds or may not be installed)
HEAVY_MODULES: tuple[str, ...] = (
    "transformers", "diffusers", "ray", "natten", "flash_attn", "timm", "accelerate", "huggingface_hub",
    "torchvision", "matplotlib", "sklearn", "scipy", "pandas", "pyarrow", "cv2", "imageio", "tensorboardX",
)

#: the option no factory accepts: building with it must be a ConfigError that names it
UNKNOWN_OPTION = "dtx_conformance_no_such_option"


@dataclass(frozen=True)
class ModelCase:
    """One model configuration the kit checks: a registered name, its (small) options and what it declares.

    ``zero_init``: the output is exactly zero at initialisation (adaLN-Zero, a zeroed output layer).
    ``no_grad``: parameter-name prefixes that may legitimately receive no gradient from one forward pass.
    ``inert``: declared inputs (condition keys, or ``"noise"``) the output may ignore in this configuration.
    ``dtypes``: floating dtypes the forward pass must preserve. ``atol``: tolerance of batch-independence and
    compile comparisons.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    zero_init: bool = False
    no_grad: tuple[str, ...] = ()
    inert: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    batch: int = 2
    atol: float = 1e-5
    id: str | None = None

    def __str__(self) -> str:
        if self.id:
            return self.id
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}[{opts}]" if opts else self.name


# -- helpers (module level, so a plugin's own tests can reuse them) --------------------------------------------------

def build(plugin: str, case: ModelCase, seed: int = 0) -> nn.Module:
    """``case``'s model as registered by ``plugin``, initialised under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return create_model(f"{plugin}:{case.name}", **case.options)


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Add seeded noise to every trainable parameter, so zero-initialised layers no longer hide the rest."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) * scale)
    return model


def random_inputs(model: nn.Module, batch: int = 2, seed: int = 0,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(x, noise level, conditions) shaped as the model declares (``dtx.costs.example_inputs``), random values.

    Timesteps are random integers in ``[0, num_timesteps)``; ``c_noise`` is uniform over the EDM range of
    ``ln(sigma)/4``; ``sigma`` is log-normal; flow times are uniform on [0, 1] (x1000 for ``flow_timestep``); float conditions are Gaussian, ``y`` labels uniform over the classes,
    other integer and boolean conditions keep the declared example values."""
    (x0, _), conds0 = example_inputs(model, batch)
    iface = interface_of(model)
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or x0.dtype
    x = torch.randn(x0.shape, generator=gen).to(dtype)
    if iface.noise_input == "timestep":
        noise = torch.randint(0, iface.num_timesteps, (batch,), generator=gen)
    elif iface.noise_input == "c_noise":
        noise = (torch.rand(batch, generator=gen) * 2.6 - 1.5).to(dtype)
    elif iface.noise_input in ("flow_time", "sit_time", "flow_timestep"):
        scale = 1000.0 if iface.noise_input == "flow_timestep" else 1.0
        noise = (torch.rand(batch, generator=gen) * scale).to(dtype)
    else:
        noise = torch.exp(torch.randn(batch, generator=gen) * 1.2 - 1.2).to(dtype)
    conds: dict[str, torch.Tensor] = {}
    classes = int(getattr(model, "num_classes", 0) or 0)
    for key, value in conds0.items():
        if value.is_floating_point():
            conds[key] = torch.randn(value.shape, generator=gen).to(dtype)
        elif key == "y" and classes > 0 and value.dtype != torch.bool:
            conds[key] = torch.randint(0, classes, value.shape, generator=gen)
        else:
            conds[key] = value.clone()
    return x, noise, conds


def expected_output_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """``x``'s shape with the channel axis holding the declared output channels."""
    iface = interface_of(model)
    in_channels = x.shape[iface.channel_dim]
    out = iface.out_channels or in_channels * (2 if iface.learn_sigma else 1)
    shape = list(x.shape)
    shape[iface.channel_dim] = out
    return tuple(shape)


def _changed(key: str, value: torch.Tensor, model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    """Another valid value of a declared input (to see that the output depends on it)."""
    if value.is_floating_point():
        return value + 1.0 + torch.rand(value.shape, generator=gen).to(value)
    if value.dtype == torch.bool:
        flipped = value.clone()
        flipped.view(value.shape[0], -1)[:, max(1, value[0].numel() // 2):] ^= True
        return flipped if value[0].numel() > 1 else ~value
    if key == "noise":
        steps = interface_of(model).num_timesteps
        return (value + steps // 2) % steps
    classes = int(getattr(model, "num_classes", 0) or 0)
    return (value + 1) % classes if key == "y" and classes > 1 else value + 1


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _option_args(options: Mapping[str, Any]) -> list[str]:
    """``--set`` arguments of ``dtx flops`` for model options (YAML values)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in options.items()]


# -- the test class ---------------------------------------------------------------------------------------------------

class ModelConformance:
    """Subclass it in a plugin's tests with ``plugin`` (its entry-point name) and ``cases`` (``ModelCase``s).

    Set ``heavy_modules`` to extend the modules the plugin module must not import (default ``HEAVY_MODULES``).
    ``--dtx-compile`` (the ``dtx.testing`` pytest plugin) or ``DTX_TEST_COMPILE=BACKEND`` turns the compile check
    on; it is skipped otherwise, to keep plugin CI fast.
    """

    plugin: str = ""
    cases: Sequence[ModelCase] = ()
    heavy_modules: Sequence[str] = HEAVY_MODULES

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """One test per check and case (pytest calls this hook on the test class)."""
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", list(self.cases), ids=[str(c) for c in self.cases])

    @pytest.fixture(autouse=True, scope="class")
    def _dtx_installed_plugins(self) -> Iterator[None]:
        """Every check sees the installed plugins and nothing registered at run time by other tests."""
        with fresh_plugin_host():
            yield

    # -- the plugin ------------------------------------------------------------------------------------------------

    def _record(self) -> plugins.PluginRecord:
        records = {r.name: r for r in plugins.host()}
        assert self.plugin, f"{type(self).__name__}.plugin must name the plugin's entry point in group 'dtx'"
        assert self.plugin in records, (f"no plugin {self.plugin!r} is installed (entry point group 'dtx'; "
                                        f"installed: {', '.join(records)}); pip install your package first")
        return records[self.plugin]

    def test_declares_cases(self) -> None:
        assert self.cases, f"{type(self).__name__}.cases is empty: list at least one ModelCase"

    def test_plugin_loads_cleanly(self) -> None:
        """Installed through an entry point, no error or warning, a hook API of this dtx's major version."""
        rec = self._record()
        assert rec.dist is not None, f"plugin {self.plugin!r} is not installed from a distribution (no dist-info)"
        assert rec.error is None, f"plugin {self.plugin!r}: {rec.error} (fix: {rec.hint})"
        assert not rec.warnings, f"plugin {self.plugin!r}: {'; '.join(rec.warnings)}"
        attr = hookspecs.PLUGIN_API_ATTRIBUTE
        assert rec.hook_api is not None, (f"{rec.module} declares no {attr}; write {attr} = "
                                          f"{hookspecs.HOOK_API_VERSION!r} (the hook API it is written for)")
        ours = hookspecs.parse_api_version(hookspecs.HOOK_API_VERSION)
        assert hookspecs.parse_api_version(rec.hook_api)[0] == ours[0]

    def test_import_is_light(self) -> None:
        """Importing the plugin module (what ``dtx plugins`` does) loads no heavy optional dependency and none of
        the model code: that waits until a hook runs."""
        rec = self._record()
        model_modules = set()
        for case in self.cases:
            with torch.device("meta"):
                model = create_model(f"{self.plugin}:{case.name}", **case.options)
            model_modules |= {type(m).__module__ for m in model.modules()}
        # the modules defining the model's layers, except torch's and the core's (``import dtx`` is a given)
        own = sorted(m for m in model_modules if m.split(".")[0] not in ("torch", "dtx") and m != rec.module)
        script = ("import json, sys\nimport dtx\nbefore = set(sys.modules)\n"
                  f"import {rec.module}\nprint(json.dumps(sorted(set(sys.modules) - before)))\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, f"importing {rec.module} failed:\n{done.stderr[-3000:]}"
        loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
        heavy = sorted(m for m in loaded if m.split(".")[0] in set(self.heavy_modules) and "." not in m)
        model_code = sorted(m for m in own if m in loaded)
        assert not heavy, (f"importing {rec.module} imports {', '.join(heavy)}: import them inside the hook or the "
                           f"function that needs them")
        assert not model_code, (f"importing {rec.module} imports the model code ({', '.join(model_code)}): import "
                                f"it inside the hook implementations (and keep the package __init__ light)")

    # -- per case ---------------------------------------------------------------------------------------------------

    def test_registered_with_options(self, case: ModelCase) -> None:
        """Registered by this plugin under the name, with a family, options it names, and unknown options refused."""
        self._record()
        entry = plugins.get("model", f"{self.plugin}:{case.name}")
        assert entry.plugin == self.plugin
        assert plugins.get("model", case.name) is entry, f"{case.name!r} resolves to another registration"
        family = entry.meta.get("family")
        assert isinstance(family, str) and family, f"model {case.name!r} is registered without family=..."
        accepted = factory_options(entry.obj)
        assert accepted is not None, (f"the factory of {case.name!r} takes **kwargs without a config_class: set "
                                      f"factory.config_class to its options dataclass so unknown options are named")
        assert set(case.options) <= accepted, f"options {sorted(set(case.options) - accepted)} are not accepted"
        with pytest.raises(ConfigError, match=UNKNOWN_OPTION):
            create_model(case.name, **case.options, **{UNKNOWN_OPTION: 1})

    def test_declared_interface(self, case: ModelCase) -> None:
        """``channel_dim``, ``noise_input`` and ``input_shape`` are declared and agree with each other."""
        model = build(self.plugin, case)
        iface = interface_of(model)
        assert iface.input_shape is not None, f"{type(model).__name__} declares no input_shape"
        assert len(iface.input_shape) == iface.channel_dim + 2, (
            f"input_shape {iface.input_shape} does not fit channel_dim {iface.channel_dim} "
            f"(images: (C, H, W) with channel_dim 1; videos: (F, C, H, W) with channel_dim 2)")
        if iface.in_channels is not None:
            assert iface.input_shape[iface.channel_dim - 1] == iface.in_channels

    def test_config_round_trip(self, case: ModelCase, tmp_path: Path) -> None:
        """``model_spec`` records name and options; the spec, through YAML, rebuilds the same architecture."""
        from omegaconf import OmegaConf

        model = build(self.plugin, case)
        spec = model_spec(model)
        assert spec == {"name": plugins.get("model", case.name).name, **case.options}
        text = OmegaConf.to_yaml(OmegaConf.create({"model": spec}))
        again = OmegaConf.to_container(OmegaConf.create(text), resolve=True)["model"]
        rebuilt = create_model(again.pop("name"), **again)
        assert type(rebuilt) is type(model)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
        assert interface_of(rebuilt) == interface_of(model)

    def test_forward_shapes_and_dtypes(self, case: ModelCase) -> None:
        """The declared inputs give the declared output shape in the input's dtype, finite, batch-independent; a
        timestep model also takes float timesteps (what the EDM objective passes)."""
        model = build(self.plugin, case).eval()
        for dtype in case.dtypes:
            model = model.to(dtype)
            x, noise, conds = random_inputs(model, case.batch, dtype=dtype)
            with torch.no_grad():
                out = model(x, noise, **conds)
            assert tuple(out.shape) == expected_output_shape(model, x), f"{dtype}: output {list(out.shape)}"
            assert out.dtype == dtype and torch.isfinite(out).all()
        model = model.float()
        x, noise, conds = random_inputs(model, case.batch)
        with torch.no_grad():
            out = model(x, noise, **conds)
            one = model(x[1:2], noise[1:2], **{k: v[1:2] for k, v in conds.items()})
            if interface_of(model).noise_input == "timestep":
                assert torch.isfinite(model(x, noise.float() + 0.5, **conds)).all()
        torch.testing.assert_close(one, out[1:2], atol=case.atol, rtol=1e-4,
                                   msg=lambda m: f"sample 1 alone differs from sample 1 in a batch: {m}")

    def test_declared_inputs_reach_the_output(self, case: ModelCase) -> None:
        """Changing the noise level or any declared condition changes the output (weights perturbed, so zero-init
        layers do not hide it); list legitimately ignored inputs in ``ModelCase.inert``."""
        model = perturb(build(self.plugin, case)).eval()
        x, noise, conds = random_inputs(model, case.batch)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            out = model(x, noise, **conds)
            ignored = []
            if "noise" not in case.inert and torch.allclose(model(x, _changed("noise", noise, model, gen), **conds),
                                                            out):
                ignored.append("the noise level")
            for key in conds:
                changed = {**conds, key: _changed(key, conds[key], model, gen)}
                if key not in case.inert and torch.allclose(model(x, noise, **changed), out):
                    ignored.append(key)
        assert not ignored, f"the output does not depend on {', '.join(ignored)} (declare it in ModelCase.inert?)"

    def test_zero_output_at_init(self, case: ModelCase) -> None:
        if not case.zero_init:
            pytest.skip("the case does not declare zero_init")
        model = build(self.plugin, case).eval()
        with torch.no_grad():
            x, noise, conds = random_inputs(model, case.batch)
            out = model(x, noise, **conds)
        assert torch.count_nonzero(out) == 0, f"max |output| at init is {out.abs().max().item():.3g}"

    def test_gradients_reach_every_trainable_parameter(self, case: ModelCase) -> None:
        model = perturb(build(self.plugin, case)).train()
        x, noise, conds = random_inputs(model, case.batch)
        out = model(x, noise, **conds)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        missing, bad = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad or name.startswith(tuple(case.no_grad)):
                continue
            if p.grad is None or not p.grad.abs().sum() > 0:
                missing.append(name)
            elif not torch.isfinite(p.grad).all():
                bad.append(name)
        assert not missing, f"no gradient reaches {', '.join(missing)} (declare expected ones in ModelCase.no_grad)"
        assert not bad, f"non-finite gradients in {', '.join(bad)}"

    def test_save_load_round_trip(self, case: ModelCase, tmp_path: Path) -> None:
        """``dtx.save_model`` then ``dtx.load_model`` gives the same class, spec, weights and outputs."""
        model = perturb(build(self.plugin, case)).eval()
        save_model(model, tmp_path / "model")
        loaded = load_model(tmp_path / "model")
        assert type(loaded) is type(model) and not loaded.training
        assert model_spec(loaded) == model_spec(model)
        state, again = model.state_dict(), loaded.state_dict()
        assert list(again) == list(state)
        differ = [k for k in state if not torch.equal(state[k], again[k])]
        assert not differ, f"tensors changed by save/load: {', '.join(differ[:8])}"
        x, noise, conds = random_inputs(model, case.batch)
        with torch.no_grad():
            assert torch.equal(loaded(x, noise, **conds), model(x, noise, **conds))

    def test_deterministic_under_seed(self, case: ModelCase) -> None:
        """The same seed builds the same weights and the same outputs; another seed other weights."""
        a, b, c = (build(self.plugin, case, seed=s).eval() for s in (0, 0, 1))
        sa, sb, sc = _state(a), _state(b), _state(c)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "two builds under one seed differ"
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), "the initialisation ignores the seed"
        x, noise, conds = random_inputs(a, case.batch)
        with torch.no_grad():
            assert torch.equal(a(x, noise, **conds), b(x, noise, **conds))
            assert torch.equal(a(x, noise, **conds), a(x, noise, **conds))

    def test_flops(self, case: ModelCase, capsys: pytest.CaptureFixture[str]) -> None:
        """``dtx flops`` answers for the case (analytic counter or measured) with the real parameter count."""
        from ..cli import main

        model = build(self.plugin, case)
        cost = cost_of(model)
        assert cost.params == count_parameters(model), "the flops counter's parameter count is not the model's"
        assert cost.trainable_params == count_parameters(model, trainable_only=True) or cost.method == "analytic"
        assert cost.flops > 0
        capsys.readouterr()
        code = main(["flops", case.name, "--json", *(["--set", *_option_args(case.options)] if case.options else [])])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        row = json.loads(captured.out.strip().splitlines()[-1])
        assert row["params"] == count_parameters(model) and row["flops"] > 0 and row["method"] == cost.method

    @pytest.mark.slow
    def test_torch_compile(self, case: ModelCase, request: pytest.FixtureRequest) -> None:
        """``torch.compile`` runs the model and agrees with eager mode (opt-in: ``--dtx-compile``)."""
        backend = os.environ.get("DTX_TEST_COMPILE") or (
            request.config.getoption("dtx_compile_backend", default=None)
            if request.config.getoption("dtx_compile", default=False) else None)
        if not backend:
            pytest.skip("opt-in: pytest --dtx-compile [--dtx-compile-backend B] or DTX_TEST_COMPILE=BACKEND")
        model = perturb(build(self.plugin, case)).eval()
        x, noise, conds = random_inputs(model, case.batch)
        try:
            compiled = torch.compile(model, backend=backend)
            with torch.no_grad():
                eager, fast = model(x, noise, **conds), compiled(x, noise, **conds)
        finally:
            torch._dynamo.reset()
        torch.testing.assert_close(fast, eager, atol=max(case.atol, 1e-4), rtol=1e-4)


__all__ = ["HEAVY_MODULES", "ModelCase", "ModelConformance", "UNKNOWN_OPTION", "build", "expected_output_shape",
           "perturb", "random_inputs"]
