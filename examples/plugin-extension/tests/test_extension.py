"""The extension's registrations are found by kind, the sampler solves a known ODE, the weighting is EDM's c_out^2,
and a training run consumes both by name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dtx import plugins
from dtx.cli import main
from dtx.diffusion.karras import get_sigmas_karras

S = 0.5  # data standard deviation of the Gaussian test problem


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact D(x; sigma) for data ~ N(0, S^2): x * S^2 / (S^2 + sigma^2)."""
    return x * (S**2 / (S**2 + sigma**2)).view(-1, *([1] * (x.ndim - 1)))


def test_registered_by_kind(dtx_plugin_host) -> None:
    rec = next(r for r in dtx_plugin_host if r.name == "ext-example")
    assert rec.error is None and not rec.warnings and rec.hook_api == "1.1"
    assert rec.registers == {"sampler": ["midpoint"], "loss": ["d-space-mse"]}
    assert plugins.get("sampler", "midpoint").meta["kind"] == "karras"
    assert plugins.get("loss", "d-space-mse").meta["kind"] == "sigma-weighting"


def test_midpoint_is_second_order_on_the_gaussian_ode(dtx_plugin_host) -> None:
    """Exact solution: x(sigma) = x(sigma_max) * sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma_max^2). Doubling the steps
    divides the midpoint error by about 4 (second order) and the core's Euler error by about 2."""
    x_t = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    exact = x_t * math.sqrt(S**2 + 0.002**2) / math.sqrt(S**2 + 80.0**2)

    def error(name: str, steps: int) -> float:
        sigmas = get_sigmas_karras(steps, 0.002, 80.0).double()
        return (plugins.get("sampler", name).obj(gaussian_denoiser, x_t.clone(), sigmas) - exact).abs().max().item()

    midpoint, euler = [error("midpoint", 32), error("midpoint", 64)], [error("euler", 32), error("euler", 64)]
    assert midpoint[0] / midpoint[1] > 3.5 and euler[0] / euler[1] < 2.5, (midpoint, euler)
    assert midpoint[1] < 0.1 * euler[1]


def test_weighting_is_c_out_squared(dtx_plugin_host) -> None:
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])
    w = plugins.get("loss", "d-space-mse").obj(sigma, sigma_data=0.5)
    c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()  # EDM's c_out, written out
    torch.testing.assert_close(w, c_out**2)


def test_a_recipe_uses_both_by_name(tmp_path: Path, dtx_plugin_host) -> None:
    recipes = [r for r in ("template-digits", "dit-digits") if r in plugins.names("recipe")]
    if not recipes:
        pytest.skip("needs a digits recipe of an installed backbone (dtx-backbone-template or dtx-backbone-dit)")
    run = tmp_path / "run"
    assert main(["train", recipes[0], "--out", str(run), "--max-steps", "3", "--runner", "local",
                 "objective.weighting=d-space-mse", "sample.sampler=midpoint", "sample.every=0", "ckpt_every=3",
                 "log_every=1", "data.batch_size=8"]) == 0
    assert main(["sample", str(run), "--steps", "3", "--classes", "1", "--n-per-class", "1",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.npz").is_file()
    assert main(["train", recipes[0], "--out", str(tmp_path / "bad"), "--max-steps", "1", "--runner", "local",
                 "objective.weighting=midpoint"]) == 2  # a sampler is not a loss: one error line, exit 2
