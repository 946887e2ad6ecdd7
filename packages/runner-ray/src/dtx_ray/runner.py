"""The ``ray`` runner: the core training loop on every Ray Train worker, locally or on a cluster.

With no ``--address`` and no ``RAY_ADDRESS`` a Ray instance starts inside the ``dtx train`` process (CPU, no
dashboard); ``auto`` or ``ray://`` join a cluster; an ``http://`` dashboard address submits the run as a Ray job.
``--workers 0`` is Ray Train's local mode (the loop runs in the calling process, no Ray instance). Checkpoints written
by the loop are reported to Ray as pointers to the run folder's copy, kept under ``<out>/ray/<name>``, so each
checkpoint is stored once; with ``--storage`` (a bucket a restarted worker on another node can read) Ray keeps full
copies there. Running again with the same run folder restores from there, as Ray Train V2 defines restoring. Workers
run at the priority of the process that started them, not Ray's default nice 15.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, NoReturn

from dtx import plugins
from dtx.errors import ConfigError, DtxError, PluginError
from dtx.training.config import TrainConfig, config_dict

from .context import RayContext
from .embedded import start_embedded_ray
from .options import FORWARDED_ENV, RayOptions

#: Ray lowers its workers' priority by this many nice steps (15 by default); a run's workers keep the priority of
#: the process that started them (the raylet's: the ``dtx train`` process for an embedded instance, the job's
#: driver on a cluster), so that training never runs below the command the user typed
WORKER_NICENESS = {"RAY_worker_niceness": "0"}

TrainLoop = Callable[[TrainConfig, Any], dict]
log = logging.getLogger(__name__)


# -- building blocks ------------------------------------------------------------------------------------------------

def loaded_plugins() -> dict[str, str | None]:
    """Plugins this process loaded without error, with their versions; the workers must load the same ones."""
    return {r.name: r.version for r in plugins.host() if not r.error}


def check_worker_plugins(expected: dict[str, str | None]) -> None:
    """Fail clearly when a worker's environment lacks a plugin the driver uses (entry points come from dist-info)."""
    missing = sorted(set(expected) - set(loaded_plugins()))
    if missing:
        import ray.util

        raise PluginError(f"Ray worker on node {ray.util.get_node_ip_address()} cannot load plugin(s) "
                          f"{', '.join(missing)}: install the same dtx packages into the cluster's Python environment "
                          f"(or ship them as wheels with runtime_env pip)")


def keep_priority(niceness: int | None) -> None:
    """Raise this worker to the driver's priority where Ray started it lower and the OS allows it; else say how."""
    if niceness is None or not hasattr(os, "getpriority"):
        return
    own = os.getpriority(os.PRIO_PROCESS, 0)
    if own <= niceness:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError:
        log.warning("this Ray worker runs at nice %d, below the driver's %d, and may not raise itself: start the "
                    "cluster's nodes with RAY_worker_niceness=0 (ray start) to train at full priority", own, niceness)


def train_worker(config: dict[str, Any], loop: TrainLoop | None = None) -> dict[str, Any]:
    """What every Ray Train worker runs: check plugins, rebuild the config, run the loop with a ``RayContext``."""
    from dtx.training.config import config_from_dict
    from dtx.training.trainer import train

    if config["cwd"] and os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])  # Ray starts workers in its own folder; relative data paths mean the driver's
    check_worker_plugins(config["plugins"])
    if config.get("threads"):
        import torch

        torch.set_num_threads(config["threads"])  # its share of the cores, not an inherited OMP_NUM_THREADS
    keep_priority(config.get("niceness"))
    cfg = config_from_dict(config["train"])
    ctx = RayContext(cfg.out, strategy=config["strategy"], require_resume=config["require_resume"],
                     tensorboard_dir=config["tensorboard_dir"], full_copies=bool(config.get("full_copies")))
    try:
        return (loop or train)(cfg, ctx)
    finally:
        ctx.close()


def _niceness() -> int | None:
    return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None


def _gpus(options: RayOptions) -> float:
    """GPUs per worker: as given, or one each when the connected Ray instance has enough of them."""
    if options.gpus_per_worker is not None:
        return options.gpus_per_worker
    if options.workers == 0:
        return 0.0
    import ray

    available = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return 1.0 if available >= options.workers else 0.0


def build_trainer(cfg: TrainConfig, options: RayOptions, *, loop: TrainLoop | None = None,
                  embedded_cpus: int | None = None) -> Any:
    """A ``TorchTrainer`` that runs ``loop`` (default: the core training loop) on every worker.

    ``cfg.out`` should be absolute: workers may run elsewhere. ``embedded_cpus`` is the CPU count of a Ray instance
    this process started, used to share cores among the workers when ``cpus_per_worker`` is not given.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .tensorboard import summary_writer_class

    out = Path(cfg.out)
    gpus = _gpus(options)
    cpus = options.cpus_per_worker or (max(1, embedded_cpus // max(options.workers, 1)) if embedded_cpus else 1)
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    tensorboard = options.tensorboard and summary_writer_class() is not None
    worker_config = {"train": config_dict(cfg), "plugins": loaded_plugins(), "cwd": os.getcwd(),
                     "strategy": options.strategy, "require_resume": options.require_resume,
                     "threads": max(1, int(cpus)), "niceness": _niceness(), "full_copies": options.storage is not None,
                     "tensorboard_dir": str(out / "tensorboard") if tensorboard else None}
    env = {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **WORKER_NICENESS}
    run_config = RunConfig(
        name=out.name or "run",
        storage_path=options.storage or str(out / "ray"),
        failure_config=FailureConfig(max_failures=options.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
        worker_runtime_env={"env_vars": env},
        logging_config=LoggingConfig(log_level="WARNING"),  # the loop prints progress; Ray's per-report INFO is noise
    )
    scaling = ScalingConfig(num_workers=options.workers, use_gpu=gpus > 0,
                            resources_per_worker=resources if options.workers > 0 else None)
    worker = functools.partial(train_worker, loop=loop) if loop is not None else train_worker
    return TorchTrainer(worker, train_loop_config=worker_config, scaling_config=scaling, run_config=run_config)


def raise_worker_failure(exc: Exception) -> NoReturn:
    """Re-raise the lowest rank's own exception from a Ray ``WorkerGroupError``, so that user errors (``DtxError``)
    reach the command line as the same one-line message as under the local runner."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        raise exc
    rank = min(failures)
    error = failures[rank]
    if isinstance(error, DtxError):
        raise error from None
    raise RuntimeError(f"training failed on Ray worker rank {rank}: {type(error).__name__}: {error}") from exc


def _check_local_gpus(options: RayOptions) -> None:
    import torch

    needed, have = options.workers * (options.gpus_per_worker or 0), torch.cuda.device_count()
    if needed > have:
        raise ConfigError(f"--workers {options.workers} x --gpus-per-worker {options.gpus_per_worker:g} needs "
                          f"{needed:g} GPUs; this machine has {have}")


def run_ray(cfg: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The ``ray`` runner (``dtx train --runner ray``): train on Ray and return rank 0's summary of the run."""
    options = RayOptions.from_args(args)
    return run_with_options(cfg, options)


def run_with_options(cfg: TrainConfig, options: RayOptions, loop: TrainLoop | None = None) -> dict[str, Any]:
    """``run_ray`` for callers that build ``RayOptions`` themselves (scripts, notebooks, tests)."""
    import ray
    from ray.train import WorkerGroupError

    options.validate()
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if options.workers > 0 and address and address.startswith(("http://", "https://")):
        from .jobs import submit_train_job

        return submit_train_job(cfg, options, address)
    cfg = replace(cfg, out=str(Path(cfg.out).expanduser().resolve()))
    started, embedded_cpus = False, None
    if options.workers > 0 and not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            _check_local_gpus(options)
            embedded_cpus = start_embedded_ray(options.workers, options.cpus_per_worker)
        started = True
    elif options.workers > 0 and not address:  # a Ray instance this process already runs: share out local cores
        embedded_cpus = min(int(ray.cluster_resources().get("CPU", 1)), os.cpu_count() or 1)
    try:
        trainer = build_trainer(cfg, options, loop=loop, embedded_cpus=embedded_cpus)
        try:
            result = trainer.fit()
        except WorkerGroupError as exc:
            raise_worker_failure(exc)
    finally:
        if started:
            ray.shutdown()
    summary = dict(result.return_value or {})
    summary.update(runner="ray", workers=options.workers, ray_storage=result.path)
    return summary
