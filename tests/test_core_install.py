"""`pip install packages/core` alone gives a working `dtx plugins`; adding a plugin package makes it appear there.

Both packages are pip-installed (no deps, no torch reinstall) into their own --target folders, then `dtx plugins
--json` runs in a fresh interpreter (`python -S`) whose sys.path is only those folders plus the environment's
site-packages with every dtx distribution and editable finder filtered out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None,
                       reason="needs pip and setuptools in the test environment"),
]


def _copy_package(name: str, dest: Path) -> Path:
    """A clean copy, so that building the wheel writes no build/ or egg-info into the checkout."""
    return Path(shutil.copytree(ROOT / "packages" / name, dest / name,
                                ignore=shutil.ignore_patterns("*.egg-info", "build", "tests", "__pycache__")))


def _site_without_dtx(dest: Path) -> Path:
    """A folder of links to every site-packages entry except dtx distributions and editable finders."""
    dest.mkdir()
    for sp in {Path(p) for p in site.getsitepackages()}:
        for entry in sp.iterdir():
            lowered = entry.name.lower()
            if lowered.startswith(("dtx", "__editable__")) or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


def _dtx_plugins(console_script: Path, path: list[Path]) -> tuple[list[dict], str]:
    """Run the installed console script under `python -S` with exactly ``path``; return its JSON and dtx's file."""
    code = ("import runpy, sys, dtx\n"
            "print(dtx.__file__, file=sys.stderr)\n"
            f"sys.argv = [{str(console_script)!r}, 'plugins', '--json']\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(map(str, path)),
           "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolated")
    jobs = []
    for package, target in (("core", tmp / "core-only"), ("backbone-hdit", tmp / "hdit-only")):
        source = _copy_package(package, tmp / "src")
        jobs.append(subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-compile",
             "--disable-pip-version-check", "--no-index", "--target", str(target), str(source)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for job in jobs:
        out, _ = job.communicate(timeout=300)
        assert job.returncode == 0, out
    return tmp / "core-only", tmp / "hdit-only", _site_without_dtx(tmp / "site")


def test_core_alone_lists_only_core(installs):
    core, _, site_dir = installs
    rows, dtx_file = _dtx_plugins(core / "bin" / "dtx", [core, site_dir])
    assert Path(dtx_file).is_relative_to(core)
    assert [r["name"] for r in rows] == ["core"]
    assert rows[0]["dist"] == "dtx-core" and {"plugins", "models"} <= set(rows[0]["registers"]["command"])


def test_installing_a_plugin_package_makes_it_appear(installs):
    core, hdit, site_dir = installs
    rows, dtx_file = _dtx_plugins(core / "bin" / "dtx", [core, hdit, site_dir])
    assert Path(dtx_file).is_relative_to(core)
    by_name = {r["name"]: r for r in rows}
    assert sorted(by_name) == ["core", "hdit"]
    assert by_name["hdit"]["dist"] == "dtx-backbone-hdit" and by_name["hdit"]["module"] == "dtx_hdit.plugin"
    assert by_name["hdit"]["error"] is None
