"""dtx plugin entry point of dtx-runner-ray: registers the ``ray`` runner (training, and
the sample sets of ``dtx sample --num-samples N --workers W``)."""

from __future__ import annotations

from typing import Any, Callable

from dtx.hookspecs import hookimpl

DTX_HOOK_API = "1.1"  # the dtx hook API this plugin is written for (dtx.hookspecs)


@hookimpl
def dtx_register_runners(register: Callable[..., Any]) -> None:
    from .options import add_arguments
    from .runner import run_ray
    from .sampling import sample_ray

    register("ray", run_ray, configure_parser=add_arguments, sample=sample_ray,
             description="Ray Train: an in-process Ray instance by default, a cluster with --address; "
                         "--workers N --gpus-per-worker G")
