"""Shared fixtures of the workspace tests: a fresh virtual environment with packages installed as a user would.

``fresh_venv(*packages)`` (a factory fixture) creates a venv under the test's ``tmp_path``, installs
``torch==2.13.0`` (the CPU wheel from the configured package index; pip's cache makes later installs fast), then
clean copies of ``packages/<name>`` NOT editable, with their declared dependencies and nothing else. It returns a
:class:`FreshVenv` that runs commands with an environment the developer venv cannot leak into.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"


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


def explain(res: subprocess.CompletedProcess) -> str:
    """Exit status and the tails of a finished command's output, for an assertion message."""
    return (f"exit {res.returncode}\n--- stdout (tail) ---\n{res.stdout[-4000:]}\n"
            f"--- stderr (tail) ---\n{res.stderr[-6000:]}")


@dataclass
class FreshVenv:
    """A virtual environment with ``packages`` installed from clean copies (not editable)."""

    root: Path
    cwd: Path
    env: dict[str, str]
    packages: tuple[str, ...]

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    def script(self, name: str) -> str:
        """A console script of the venv (``dtx``)."""
        return str(self.root / "bin" / name)

    explain = staticmethod(explain)

    def run(self, command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
        """Run ``command`` in the venv's clean environment; prints its time and exit status."""
        started = time.monotonic()
        res = subprocess.run(command, env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=timeout)
        print(f"[{time.monotonic() - started:6.1f}s] exit {res.returncode}: {' '.join(command)}")
        return res

    def pip_install(self, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
        return self.run([self.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         "--no-compile", *args], timeout=timeout)

    def installed(self) -> set[str]:
        """Lower-case names of every distribution in the venv."""
        listed = self.run([self.python, "-m", "pip", "list", "--format=freeze"], timeout=120).stdout
        return {line.split("==")[0].lower() for line in listed.splitlines() if line.strip()}

    def editable(self) -> str:
        """``pip list --editable`` (empty for a real install)."""
        return self.run([self.python, "-m", "pip", "list", "--editable", "--format=freeze"], timeout=120).stdout


@pytest.fixture
def fresh_venv(tmp_path: Path) -> Callable[..., FreshVenv]:
    """Factory: ``fresh_venv("core", "backbone-dit")`` -> a :class:`FreshVenv` with torch and those packages.

    Fails the test (with the command's output) when the venv, torch or the packages cannot be installed; skips it
    when this interpreter cannot create virtual environments.
    """
    import importlib.util

    if importlib.util.find_spec("venv") is None or importlib.util.find_spec("ensurepip") is None:
        pytest.skip("needs the venv and ensurepip modules to create a virtual environment")

    def make(*packages: str) -> FreshVenv:
        root = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
        venv = FreshVenv(root=root, cwd=tmp_path, env=_clean_env(root), packages=tuple(packages))
        res = venv.pip_install(TORCH)
        assert res.returncode == 0, f"installing {TORCH} failed: {explain(res)}"
        sources = [str(_copy_package(name, tmp_path / "src")) for name in packages]
        res = venv.pip_install(*sources)
        assert res.returncode == 0, (f"pip install {' '.join('packages/' + p for p in packages)} failed: "
                                     f"{explain(res)}")
        return venv

    return make
