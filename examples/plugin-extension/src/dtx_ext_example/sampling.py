"""The extension's sampler and loss weighting, in dtx's calling conventions (``dtx.diffusion.sampler_api``)."""

from __future__ import annotations

from typing import Callable

import torch

from dtx.diffusion.samplers import to_d


@torch.no_grad()
def sample_midpoint(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor, *,
                    generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Explicit midpoint steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

    ``model(x, sigma)`` is the preconditioned (and guided) denoiser D with ``sigma`` an [N] vector; ``sigmas`` ends
    in 0, where the last step is an Euler step. Deterministic: ``generator`` is accepted and unused.
    """
    ones = x.new_ones(x.shape[0])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = to_d(x, sigma, model(x, sigma * ones))
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        sigma_mid = (sigma * sigma_next).sqrt()
        x_mid = x + d * (sigma_mid - sigma)
        x = x + to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * ones)) * (sigma_next - sigma)
    return x


def weighting_d_space_mse(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """F-space weight of an unweighted D-space MSE: c_out^2 = sigma^2 sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return (sigma * sigma_data) ** 2 / (sigma**2 + sigma_data**2)
