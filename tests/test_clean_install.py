"""A clean, non-editable install of dtx-core + dtx-backbone-dit trains and samples the digits demo.

A fresh virtual environment gets ``torch==2.13.0`` (the CPU wheel from the configured package index) and then copies
of ``packages/core`` and ``packages/backbone-dit`` installed the way a user installs them -- not editable, with
their declared dependencies and nothing else (no pytest, no matplotlib unless a package declares it). Its ``dtx``
then trains 30 steps of ``dit-digits`` and samples from the run. An undeclared import anywhere on that path
(a plot at the end of training, a writer, a sampler) fails here, while the developer venv would hide it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("venv") is None or importlib.util.find_spec("ensurepip") is None,
                       reason="needs the venv and ensurepip modules to create a virtual environment"),
]


def _copy_package(name: str, dest: Path) -> Path:
    """A clean copy, so that building the wheel writes no build/ or egg-info into the checkout."""
    return Path(shutil.copytree(ROOT / "packages" / name, dest / name,
                                ignore=shutil.ignore_patterns("*.egg-info", "build", "dist", "tests", "benchmarks",
                                                              "__pycache__", "*.pyc")))


def _clean_env(venv: Path) -> dict[str, str]:
    """This environment minus anything that would let the developer venv leak in, with the new venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE")
           and not k.startswith(("DTX_", "PYTEST_"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", OMP_NUM_THREADS="2",
               HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1", MPLCONFIGDIR=str(venv / "mplconfig"))
    return env


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    started = time.monotonic()
    res = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    print(f"[{time.monotonic() - started:6.1f}s] exit {res.returncode}: {' '.join(command)}")
    return res


def _explain(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\n--- stdout (tail) ---\n{res.stdout[-4000:]}\n--- stderr (tail) ---\n{res.stderr[-6000:]}"


def test_clean_install_trains_and_samples_digits(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = _clean_env(venv)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]

    res = _run([*pip, TORCH], env, tmp_path, timeout=1200)
    assert res.returncode == 0, f"installing {TORCH} failed: {_explain(res)}"
    sources = [str(_copy_package(name, tmp_path / "src")) for name in ("core", "backbone-dit")]
    res = _run([*pip, *sources], env, tmp_path, timeout=1200)
    assert res.returncode == 0, f"pip install packages/core packages/backbone-dit failed: {_explain(res)}"

    listed = _run([python, "-m", "pip", "list", "--format=freeze"], env, tmp_path, timeout=120).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert {"dtx-core", "dtx-backbone-dit", "torch"} <= installed, listed
    assert "pytest" not in installed, listed  # only what the two packages declare
    editable = _run([python, "-m", "pip", "list", "--editable", "--format=freeze"], env, tmp_path, timeout=120)
    assert editable.stdout.strip() == "", editable.stdout  # a real install, not links into the checkout

    dtx = str(venv / "bin" / "dtx")
    run = tmp_path / "RUN"
    res = _run([dtx, "train", "dit-digits", "--out", str(run), "--max-steps", "30", "--runner", "local",
                "sample.every=0", "ckpt_every=30", "log_every=10"], env, tmp_path, timeout=900)
    assert res.returncode == 0, f"dtx train in the clean install failed: {_explain(res)}"

    png = run / "s.png"
    res = _run([dtx, "sample", str(run), "--steps", "5", "--out", str(png)], env, tmp_path, timeout=600)
    assert res.returncode == 0, f"dtx sample in the clean install failed: {_explain(res)}"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert png.is_file(), f"no {png.name} in the run folder: {files}"
    assert png.with_suffix(".npz").is_file(), f"no {png.with_suffix('.npz').name} next to the PNG: {files}"
