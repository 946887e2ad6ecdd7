"""The plugin template, installed as a user installs a third-party plugin, works with an unchanged dtx.

A fresh virtual environment gets torch, ``dtx-core`` and clean copies of ``examples/plugin-template`` and
``examples/plugin-extension``, all NOT editable (the ``fresh_venv`` fixture of ``tests/conftest.py``), plus pytest.
There the template's own tests (the conformance kit and a recipe run) and the extension's tests pass, ``dtx
plugins`` lists both cleanly, and the template trains a few steps with the local runner, samples and answers
``dtx flops``. Then ``dtx-runner-ray`` is installed into the same venv (Ray and its dependencies come from the
package index) and the template trains with the Ray runner too and samples from that run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# quiet, fast Ray settings, as packages/runner-ray/tests/conftest.py sets them
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "RAY_memory_monitor_refresh_ms": "0", "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
TRAIN = ["--max-steps", "4", "sample.every=0", "ckpt_every=4", "log_every=2", "data.batch_size=16"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _copy(name: str, dest: Path) -> Path:
    """A clean copy of examples/<name> (its tests included: they run from the copy)."""
    return Path(shutil.copytree(EXAMPLES / name, dest / name,
                                ignore=shutil.ignore_patterns("*.egg-info", "build", "dist", "__pycache__", "*.pyc")))


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_template_installs_trains_on_both_runners_and_samples(fresh_venv, tmp_path):
    venv = fresh_venv("core")
    template, extension = _copy("plugin-template", tmp_path / "src"), _copy("plugin-extension", tmp_path / "src")
    res = venv.pip_install(str(template), str(extension), "pytest")
    assert res.returncode == 0, f"pip install of the examples failed: {venv.explain(res)}"
    installed = venv.installed()
    assert {"dtx-core", "dtx-backbone-template", "dtx-ext-example"} <= installed, installed
    assert not installed & {"dtx-backbone-dit", "dtx-runner-ray", "ray"}, installed  # only core underneath
    assert venv.editable().strip() == "", venv.editable()

    # the examples' own test suites, against the installed packages
    for folder in (template, extension):
        res = venv.run([venv.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder),
                        str(folder / "tests")], timeout=900)
        assert res.returncode == 0, f"the tests of {folder.name} failed in the fresh venv: {venv.explain(res)}"
        assert " passed" in res.stdout and " failed" not in res.stdout

    dtx = venv.script("dtx")
    res = venv.run([dtx, "plugins", "--json"], timeout=300)
    assert res.returncode == 0, venv.explain(res)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {"core", "template", "ext-example"}, sorted(rows)
    assert rows["template"]["dist"] == "dtx-backbone-template" and rows["template"]["hook_api"] == "1.1"
    assert rows["template"]["registers"] == {"model": ["TemplateViT", "TemplateViT-S"], "recipe": ["template-digits"]}
    assert all(r["error"] is None and r["warnings"] == [] for r in rows.values()), rows
    assert venv.run([dtx, "plugins", "--check"], timeout=300).returncode == 0

    res = venv.run([dtx, "models", "--family", "template", "--json"], timeout=300)
    models = {m["name"]: m for m in json.loads(res.stdout)}
    assert list(models) == ["TemplateViT", "TemplateViT-S"], venv.explain(res)
    res = venv.run([dtx, "flops", "TemplateViT-S", "--input-size", "8", "--json"], timeout=300)
    assert res.returncode == 0, venv.explain(res)
    flops = _summary(res.stdout)
    assert flops["method"] == "measured" and flops["flops"] > 0
    assert flops["params"] == models["TemplateViT-S"]["params"]  # both at the default 8x8 input

    # local runner: train, then sample with the extension's sampler
    run = venv.cwd / "RUN"
    res = venv.run([dtx, "train", "template-digits", "--out", str(run), "--runner", "local", *TRAIN], timeout=900)
    assert res.returncode == 0, f"dtx train --runner local failed: {venv.explain(res)}"
    assert _summary(res.stdout)["step"] == 4
    res = venv.run([dtx, "sample", str(run), "--steps", "3", "--sampler", "midpoint", "--classes", "0,1",
                    "--out", str(run / "s.png")], timeout=600)
    assert res.returncode == 0 and (run / "s.npz").is_file(), f"dtx sample failed: {venv.explain(res)}"

    # the Ray runner, installed into the same venv: dtx itself is unchanged
    runner = shutil.copytree(ROOT / "packages" / "runner-ray", tmp_path / "src" / "runner-ray",
                             ignore=shutil.ignore_patterns("tests", "build", "*.egg-info", "__pycache__"))
    res = venv.pip_install(str(runner), timeout=1800)
    assert res.returncode == 0, f"pip install packages/runner-ray failed: {venv.explain(res)}"
    venv.env.update(RAY_ENV)
    ray_run = venv.cwd / "RAYRUN"
    res = venv.run([dtx, "train", "template-digits", "--out", str(ray_run), "--runner", "ray", "--workers", "1",
                    *TRAIN], timeout=900)
    assert res.returncode == 0, f"dtx train --runner ray failed: {venv.explain(res)}"
    summary = _summary(res.stdout)
    assert (summary["runner"], summary["step"]) == ("ray", 4), summary
    res = venv.run([dtx, "sample", str(ray_run), "--steps", "3", "--classes", "7", "--out", str(ray_run / "s.png")],
                   timeout=600)
    assert res.returncode == 0 and (ray_run / "s.npz").is_file(), f"dtx sample of the Ray run: {venv.explain(res)}"
