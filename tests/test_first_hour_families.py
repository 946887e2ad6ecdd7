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


def test_video_metrics_fail_on_noise_and_pass_on_moving_digits(tmp_path, capsys):
    """`moving` and `label_agreement` measure a digit: pure noise clips (uniform, dark Gaussian, smooth blobs) score
    near 0 where they scored up to 1.0 / 0.7 before; Latte's moving-digits clips keep 1.0 and >= 0.97."""
    import torch
    from dtx_latte.data import MovingDigits

    from dtx.writers import save_npz

    data = MovingDigits("test", frames=8)
    n = 48
    real = torch.stack([data.clip(i) for i in range(n)])
    g = torch.Generator().manual_seed(0)
    noise = {"uniform": torch.rand(n, 8, 1, 32, 32, generator=g) * 2 - 1,
             "dark": (0.5 * torch.randn(n, 8, 1, 32, 32, generator=g) - 0.5).clamp(-1, 1),
             "blobs": torch.nn.functional.avg_pool2d(torch.randn(n * 8, 1, 32, 32, generator=g), 5, 1, 2)
             .mul(4).clamp(-1, 1).view(n, 8, 1, 32, 32)}

    def scores(videos: torch.Tensor, name: str) -> dict:
        archive = save_npz(videos, tmp_path / f"{name}.npz", labels=data.labels[:n], channel_dim=2)
        assert main(["eval", str(archive), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    good = scores(real, "real")
    assert good["moving"] == 1.0 and good["label_agreement"] >= 0.97 and good["digit_frames"] == 1.0
    assert (good["num_samples"], good["num_frames"]) == (n, n * 8)
    for name, videos in noise.items():
        bad = scores(videos, name)
        assert bad["moving"] == 0.0 and bad["label_agreement"] <= 0.05 and bad["digit_frames"] <= 0.05, (name, bad)
    assert main(["eval", str(tmp_path / "real.npz")]) == 0
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"({n} videos: one digit in every frame, its centre of mass moving >= 1 px;" in table["moving"]
    assert f"({n * 8} frames: one digit, classified with probability >= 0.5" in table["label_agreement"]
