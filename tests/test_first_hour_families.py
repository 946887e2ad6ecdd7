"""Issue 30, points 4-7 across the first-party packages: core's table of their names, `dtx recipes` over the shipped
recipes, the video metrics on Latte's moving digits, DiT's diffusers export, and the root README's figures against
the package READMEs'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtx import plugins
from dtx.cli import main
from dtx.testing import fresh_plugin_host

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RECIPES = {"dit-digits": "dit", "hdit-digits": "hdit", "latte-moving-digits": "latte",
                   "gentron-digits": "gentron", "gentron-moving-digits": "gentron"}


@pytest.fixture
def host():
    with fresh_plugin_host():
        yield plugins.host()


def test_core_knows_every_name_the_first_party_packages_register(host):
    """``dtx.plugins.FIRST_PARTY`` (the install hints) equals what each installed first-party package registers."""
    by_dist = {r.dist: r.name for r in host if r.dist in plugins.FIRST_PARTY}
    assert set(by_dist) == set(plugins.FIRST_PARTY), "every first-party package is installed in the test venv"
    for dist, plugin in by_dist.items():
        for kind in ("model", "recipe", "dataset", "conditioner", "runner"):
            registered = {e.name for e in host._registrations[kind] if e.plugin == plugin}
            assert registered == set(plugins.FIRST_PARTY[dist].get(kind, ())), (dist, kind)


def test_recipes_lists_every_shipped_recipe(host, capsys):
    assert main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(SHIPPED_RECIPES)
    for name, family in SHIPPED_RECIPES.items():
        row = rows[name]
        assert row["family"] == family and row["plugin"] == family and "error" not in row
        assert row["data"] and row["max_steps"] >= 1
    assert rows["latte-moving-digits"]["max_minutes"] > 0 and rows["dit-digits"]["max_minutes"] is None


def test_bench_memory_of_a_dit_s2_forward_matches_a_hand_estimate(host, capsys):
    """`dtx bench` on CPU reports the tensors' peak: DiT-S/2's no-grad forward at batch 8 holds at most one block's
    working set, the residual stream, its modulated norm and the MLP's hidden layer before and after the GELU:
    B * T * (2 D + 2 * 4 D) floats, with T = (32 / 2)^2 tokens and D = 384."""
    assert main(["bench", "DiT-S/2", "--batch", "8", "--mode", "forward", "--warmup", "1", "--repeats", "1",
                 "--device", "cpu", "--compile", "off", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    b, t, d = 8, (32 // 2) ** 2, 384
    estimate = b * t * (2 * d + 2 * 4 * d) * 4 / 2 ** 20  # 30 MiB
    assert estimate / 2 <= row["peak_mem_mb"] <= 2 * estimate, (row["peak_mem_mb"], estimate)
