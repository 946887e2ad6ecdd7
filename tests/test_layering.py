"""Packaging truth: the import-linter contracts of the root pyproject.toml hold, and every package declares what it
imports (deptry: no missing DEP001 and no transitive DEP003 dependency).

Both tools run as the console scripts installed next to this interpreter (``scripts/install.sh`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())


def _tool(name: str) -> str:
    """The console script ``name`` of this interpreter's environment (falling back to PATH)."""
    script = Path(sys.executable).with_name(name)
    found = str(script) if script.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed next to {sys.executable}; run scripts/install.sh "
                    "(it installs import-linter and deptry)")
    return found


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def test_import_contracts_hold():
    res = subprocess.run([_tool("lint-imports"), "--no-cache", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True, env=_env(), timeout=600)
    report = res.stdout + res.stderr
    assert res.returncode == 0, f"lint-imports found broken contracts (exit {res.returncode}):\n{report}"
    assert "BROKEN" not in report and " KEPT" in report, report


@pytest.mark.parametrize("package", PACKAGES)
def test_package_declares_what_it_imports(package, tmp_path):
    source = ROOT / "packages" / package / "src"
    out = tmp_path / "deptry.json"
    res = subprocess.run([_tool("deptry"), str(source), "--config", str(ROOT / "packages" / package / "pyproject.toml"),
                          "--no-ansi", "--json-output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    report = res.stdout + res.stderr
    assert out.is_file(), f"deptry did not run (exit {res.returncode}):\n{report}"
    problems = [v for v in json.loads(out.read_text()) if v["error"]["code"] in ("DEP001", "DEP003")]
    shown = "\n".join(f"{v['location']['file']}:{v['location']['line']}: {v['error']['code']} {v['error']['message']}"
                      for v in problems)
    assert not problems, (f"packages/{package} imports modules its pyproject.toml does not declare "
                          f"(DEP001 missing, DEP003 only transitive):\n{shown}\n\nfull deptry output:\n{report}")
