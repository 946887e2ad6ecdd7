"""A clean, non-editable install of dtx-core + dtx-backbone-dit trains and samples the digits demo.

A fresh virtual environment gets ``torch==2.13.0`` (the CPU wheel from the configured package index) and then copies
of ``packages/core`` and ``packages/backbone-dit`` installed the way a user installs them -- not editable, with
their declared dependencies and nothing else (no pytest, no matplotlib unless a package declares it). Its ``dtx``
then trains 30 steps of ``dit-digits`` and samples from the run. An undeclared import anywhere on that path
(a plot at the end of training, a writer, a sampler) fails here, while the developer venv would hide it.
The venv comes from the ``fresh_venv`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_clean_install_trains_and_samples_digits(fresh_venv):
    venv = fresh_venv("core", "backbone-dit")

    installed = venv.installed()
    assert {"dtx-core", "dtx-backbone-dit", "torch"} <= installed, installed
    assert "pytest" not in installed, installed  # only what the two packages declare
    assert venv.editable().strip() == "", venv.editable()  # a real install, not links into the checkout

    dtx = venv.script("dtx")
    run = venv.cwd / "RUN"
    res = venv.run([dtx, "train", "dit-digits", "--out", str(run), "--max-steps", "30", "--runner", "local",
                    "sample.every=0", "ckpt_every=30", "log_every=10"], timeout=900)
    assert res.returncode == 0, f"dtx train in the clean install failed: {venv.explain(res)}"

    png = run / "s.png"
    res = venv.run([dtx, "sample", str(run), "--steps", "5", "--out", str(png)], timeout=600)
    assert res.returncode == 0, f"dtx sample in the clean install failed: {venv.explain(res)}"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert png.is_file(), f"no {png.name} in the run folder: {files}"
    assert png.with_suffix(".npz").is_file(), f"no {png.with_suffix('.npz').name} next to the PNG: {files}"
