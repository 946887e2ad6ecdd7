"""``dtx sample SOURCE --num-samples N --workers W``: a sample set's chunks shared out over Ray workers.

Each worker is one Ray task that rebuilds the model from the job (the same weights, adapter and settings) and
samples its share of the missing chunks (listed once by the driver) into the set's parts folder, which must be a path every worker
can write (the local disk of an embedded instance, shared storage on a cluster). Because a sample depends only on its
index (its seed and subject), the set equals the one a single process writes, and a killed set resumes anywhere.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from dtx.errors import ConfigError, DtxError

from .embedded import start_embedded_ray
from .options import FORWARDED_ENV
from .runner import WORKER_NICENESS, check_worker_plugins, keep_priority, loaded_plugins

if TYPE_CHECKING:
    from dtx.training.sample_set import SampleSetJob


def sample_worker(job: dict[str, Any], chunks: list[int], rank: int, context: dict[str, Any]) -> dict[str, Any]:
    """What each Ray worker runs: check plugins, take its share of the cores, sample its chunks."""
    import torch
    from dtx.training.sample_set import SampleSetJob, run_job

    if context["cwd"] and os.path.isdir(context["cwd"]):
        os.chdir(context["cwd"])
    check_worker_plugins(context["plugins"])
    torch.set_num_threads(context["threads"])
    keep_priority(context["niceness"])
    job = {**job, "device": "cuda" if context["gpus"] > 0 else "cpu", "progress": job["progress"] and rank == 0}
    return run_job(SampleSetJob.from_dict(job), chunks, rank)


def _gpus(asked: float | None, workers: int) -> float:
    import ray

    if asked is not None:
        return asked
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= workers else 0.0


def sample_ray(job: SampleSetJob, workers: int, address: str | None, gpus_per_worker: float | None
               ) -> list[dict[str, Any]]:
    """Sample the job's missing chunks on ``workers`` Ray tasks (an in-process instance, or the cluster at
    ``address`` / RAY_ADDRESS); returns each worker's counts. A worker's ``DtxError`` reaches the caller as itself."""
    import ray
    from dtx.training.sample_set import parts_dir, pending_chunks, share
    from ray.exceptions import RayTaskError

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: sample sets join a cluster directly (auto or ray://HOST:10001); "
                          f"a dashboard URL submits jobs, which dtx train does")
    started, cpus = False, 1
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            cpus = max(1, start_embedded_ray(workers, None) // workers)
        started = True
    elif not address:
        cpus = max(1, min(int(ray.cluster_resources().get("CPU", 1)), os.cpu_count() or 1) // workers)
    try:
        gpus = _gpus(gpus_per_worker, workers)
        env = {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **WORKER_NICENESS}
        context = {"cwd": os.getcwd(), "plugins": loaded_plugins(), "threads": cpus, "gpus": gpus,
                   "niceness": os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None}
        task = ray.remote(sample_worker).options(num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": env},
                                                 max_retries=0)
        pending = pending_chunks(parts_dir(job.out), job.plan)  # listed once, before any worker writes
        refs = [task.remote(job.to_dict(), share(pending, rank, workers), rank, context) for rank in range(workers)]
        try:
            return ray.get(refs)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DtxError):
                raise cause from None
            raise
    finally:
        if started:
            ray.shutdown()
