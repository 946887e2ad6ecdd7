"""How a run goes onto Ray: ``RayOptions`` (filled from ``dtx train`` flags or built by scripts), the runner's own
flags, and the environment forwarded to the workers; shared by the runner and job submission."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from dtx.config import check

from .context import Strategy

#: environment variables of the driver that must hold on the workers too (plugins, kernels, threads, debugging)
FORWARDED_ENV = ("DTX_PLUGINS", "DTX_DISABLE_PLUGINS", "DTX_DEBUG", "DTX_THREADS", "DTX_LINEAR", "DTX_ATTENTION")


@dataclass
class RayOptions:
    """How to run on Ray; ``dtx train`` flags fill it (``from_args``), scripts may build it directly."""

    workers: int = 1  # 0: Ray Train local mode, in this process
    gpus_per_worker: Optional[float] = None  # None: one per worker when the cluster has enough GPUs, else CPU
    cpus_per_worker: Optional[float] = None  # None: the machine's cores shared out (embedded instance), else 1
    address: Optional[str] = None  # None: RAY_ADDRESS, else an embedded instance
    strategy: Strategy = "ddp"
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the run fails (-1: no limit)
    storage: Optional[str] = None  # Ray storage path or URI (s3://, gs://); default <out>/ray
    require_resume: bool = False  # --resume: fail unless a checkpoint exists
    tensorboard: bool = True  # write <out>/tensorboard when a TensorBoard writer is installed

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RayOptions":
        """Options from a parsed ``dtx train`` command line; flags it does not define keep their defaults."""
        given = {"workers": getattr(args, "workers", None), "gpus_per_worker": getattr(args, "gpus_per_worker", None),
                 "cpus_per_worker": getattr(args, "cpus_per_worker", None), "address": getattr(args, "address", None),
                 "strategy": getattr(args, "strategy", None), "max_failures": getattr(args, "max_failures", None),
                 "storage": getattr(args, "storage", None), "require_resume": getattr(args, "resume", None),
                 "tensorboard": not getattr(args, "no_tensorboard", False)}
        options = cls(**{k: v for k, v in given.items() if v is not None})
        options.validate()
        return options

    def validate(self) -> None:
        check(self.workers >= 0, "--workers", f"must be >= 0 (0 = Ray Train local mode), got {self.workers}")
        check(self.gpus_per_worker is None or self.gpus_per_worker >= 0, "--gpus-per-worker", "must be >= 0")
        check(self.cpus_per_worker is None or self.cpus_per_worker > 0, "--cpus-per-worker", "must be > 0")
        check(self.strategy in ("ddp", "fsdp", "none"), "--strategy", f"{self.strategy!r} is not ddp, fsdp or none")
        check(self.max_failures >= -1, "--max-failures", "must be >= -1 (-1 = retry without limit)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ray runner's own ``dtx train`` flags (beyond --workers, --gpus-per-worker, --address, --resume)."""
    group = parser.add_argument_group("ray runner")
    group.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default: cores / workers locally)")
    group.add_argument("--strategy", choices=["ddp", "fsdp", "none"], help="model parallelism (default ddp)")
    group.add_argument("--max-failures", type=int, help="restart failed workers from the last checkpoint N times")
    group.add_argument("--storage", help="Ray Train storage path or URI (default: <out>/ray)")
    group.add_argument("--no-tensorboard", action="store_true", help="do not write <out>/tensorboard")
