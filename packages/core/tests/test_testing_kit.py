"""The conformance kit (``dtx.testing.ModelConformance``) run by pytest on toy plugins installed the way pip installs
them: a conforming one passes every check, and each deliberate flaw of another fails exactly the check meant to
catch it (and nothing else), so the kit's checks can fail. Also: the kit's pytest plugin is loaded through its
``pytest11`` entry point (``--dtx-compile``, the ``dtx_plugin_host`` fixture)."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODELS = '''
    import os

    import torch
    from torch import nn


    class KitNet(nn.Module):
        """A tiny conv denoiser over [B, 2, 4, 4]; ``flaw`` switches on one defect."""

        channel_dim = 1
        noise_input = "c_noise"
        learn_sigma = False
        input_shape = (2, 4, 4)

        def __init__(self, num_classes: int = 3, flaw: str = "") -> None:
            super().__init__()
            self.in_channels = self.out_channels = 2
            self.num_classes, self.flaw = num_classes, flaw
            self.conv = nn.Conv2d(2, 8, 3, padding=1)
            self.t = nn.Linear(1, 8)
            self.y = nn.Embedding(num_classes + 1, 8) if num_classes and flaw != "ignores-y" else None
            self.head = nn.Conv2d(8, 3 if flaw == "shape" else 2, 1)
            if flaw == "dead":
                self.unused = nn.Linear(8, 8)
            if flaw == "seedless":
                gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
                with torch.no_grad():
                    self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.1)
            if flaw == "unsaved":
                self.register_buffer("mix", torch.randn(8), persistent=False)
            if flaw != "nonzero":
                nn.init.zeros_(self.head.weight)
                nn.init.zeros_(self.head.bias)

        def forward(self, x, c_noise, y=None):
            h = self.conv(x) + self.t(c_noise.view(-1, 1).to(x.dtype))[:, :, None, None]
            if self.y is not None:
                h = h + self.y(y)[:, :, None, None]
            if self.flaw == "unsaved":
                h = h * self.mix[None, :, None, None]
            return self.head(torch.nn.functional.silu(h))


    def build(num_classes: int = 3, flaw: str = "") -> KitNet:
        return KitNet(num_classes, flaw)
'''

GOOD = '''
    import dtx

    DTX_HOOK_API = "1.1"


    @dtx.hookimpl
    def dtx_register_models(register):
        from kit_models import build

        register("kit-net", build, family="kit")
'''

BAD = '''
    import dtx
    from dtx.costs import Cost
    from kit_models import build  # the flaw the import check catches: model code loaded with the plugin

    DTX_HOOK_API = "1.1"


    def lying_counter(model):
        return Cost(params=1, trainable_params=1, macs=1, flops=2, method="analytic")


    @dtx.hookimpl
    def dtx_register_models(register):
        register("kit-bad", build, family="kit-bad")
        register("kit-bad-counter", build, family="kit-bad", flops=lying_counter)
'''

TESTS = '''
    from dtx.testing import ModelCase, ModelConformance

    FLAWS = ["shape", "dead", "seedless", "nonzero", "ignores-y", "unsaved"]


    class TestGood(ModelConformance):
        plugin = "kitgood"
        cases = [ModelCase("kit-net", {"num_classes": 3}, zero_init=True, id="classes"),
                 ModelCase("kit-net", {"num_classes": 0}, zero_init=True, id="unconditional")]


    class TestBad(ModelConformance):
        plugin = "kitbad"
        cases = [ModelCase("kit-bad", {"flaw": f}, zero_init=True, id=f) for f in FLAWS]
        cases.append(ModelCase("kit-bad-counter", zero_init=True, id="counter"))


    def test_fixture_of_the_pytest_plugin(dtx_plugin_host):
        assert {"kitgood", "kitbad"} <= {r.name for r in dtx_plugin_host}
'''

EXPECTED_FAILURES = {
    "TestBad::test_import_is_light",
    "TestBad::test_forward_shapes_and_dtypes[shape]",
    "TestBad::test_gradients_reach_every_trainable_parameter[dead]",
    "TestBad::test_deterministic_under_seed[seedless]",
    "TestBad::test_zero_output_at_init[nonzero]",
    "TestBad::test_declared_inputs_reach_the_output[ignores-y]",
    "TestBad::test_save_load_round_trip[unsaved]",
    "TestBad::test_flops[counter]",
}


def _install(site: Path, dist: str, ep: str, module: str, source: str) -> None:
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dtx]\n{ep} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture(scope="module")
def kit_run(tmp_path_factory) -> subprocess.CompletedProcess:
    """pytest, in a subprocess, on a test module that runs the kit against the two toy plugins."""
    root = tmp_path_factory.mktemp("kit")
    site = root / "site"
    site.mkdir()
    (site / "kit_models.py").write_text(textwrap.dedent(MODELS))
    _install(site, "dtx-kitgood", "kitgood", "kitgood_plugin", GOOD)
    _install(site, "dtx-kitbad", "kitbad", "kitbad_plugin", BAD)
    (root / "test_kit.py").write_text(textwrap.dedent(TESTS))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DTX_", "PYTEST_"))}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                           "--dtx-compile", "--dtx-compile-backend", "eager", "test_kit.py"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


def _outcomes(res: subprocess.CompletedProcess) -> dict[str, str]:
    found = re.findall(r"^(PASSED|FAILED|SKIPPED|ERROR) test_kit\.py::(\S+)", res.stdout, flags=re.M)
    return {test: outcome for outcome, test in found}


def test_the_pytest_plugin_is_an_entry_point():
    assert "dtx.testing.pytest_plugin" in {ep.value for ep in md.entry_points(group="pytest11")}


def test_a_conforming_plugin_passes_every_check(kit_run):
    outcomes = _outcomes(kit_run)
    good = {t: o for t, o in outcomes.items() if t.startswith("TestGood::")}
    checks = {t.split("::")[1].split("[")[0] for t in good}
    assert len(checks) == 14, (sorted(checks), kit_run.stdout[-3000:])  # every check ran, compile included
    assert all(o == "PASSED" for o in good.values()), {t: o for t, o in good.items() if o != "PASSED"}
    assert outcomes["test_fixture_of_the_pytest_plugin"] == "PASSED"


def test_each_flaw_fails_exactly_its_check(kit_run):
    outcomes = _outcomes(kit_run)
    failed = {t for t, o in outcomes.items() if o in ("FAILED", "ERROR")}
    assert failed == EXPECTED_FAILURES, (sorted(failed ^ EXPECTED_FAILURES), kit_run.stdout[-6000:])
    bad_passed = [t for t, o in outcomes.items() if t.startswith("TestBad::") and o == "PASSED"]
    assert len(bad_passed) > 60, len(bad_passed)  # the flawed models pass every check their flaw does not touch
    out = kit_run.stdout
    assert "importing kitbad_plugin imports the model code (kit_models)" in out
    assert "no gradient reaches unused.weight, unused.bias" in out
    assert "the output does not depend on y" in out
    assert "the flops counter's parameter count is not the model's" in out
