"""The dtx entry point of dtx-ext-example: one sampler and one loss weighting, no model."""

from __future__ import annotations

from typing import Any, Callable

import dtx

DTX_HOOK_API = "1.1"


@dtx.hookimpl
def dtx_register_samplers(register: Callable[..., Any]) -> None:
    from .sampling import sample_midpoint

    register("midpoint", sample_midpoint, kind="karras",
             description="explicit midpoint (2nd order, geometric-mean sigma), 2 model calls per step")


@dtx.hookimpl
def dtx_register_losses(register: Callable[..., Any]) -> None:
    from .sampling import weighting_d_space_mse

    register("d-space-mse", weighting_d_space_mse, kind="sigma-weighting",
             description="plain MSE of the denoised sample: w_F(sigma) = c_out(sigma)^2")
