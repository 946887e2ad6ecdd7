"""The Ray instance that ``dtx train`` starts inside its own process when no cluster address is given.

It is a single node with no dashboard (faster start, fewer processes). Every Ray process of the instance runs
``quiet_worker_logs`` at start, which silences two kinds of Ray Train 2.60 console noise:
- Without a dashboard, the placement-group cleaner cannot reach the state API and logs a warning every second. The
  warning is harmless here: the instance ends with the process, and its placement groups end with it.
- A per-report INFO line comes from a logger that is named after its source file, so
  ``RunConfig(logging_config=...)`` does not filter it.
"""

from __future__ import annotations

import logging
import os

NICENESS_ENV = "RAY_worker_niceness"  # Ray starts workers this many nice steps below the raylet (default 15)
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_worker_logs() -> None:
    """Ray ``worker_process_setup_hook``: only errors from the cleaner, only warnings from the report logger."""
    import ray

    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
    report_logger = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(report_logger).setLevel(logging.WARNING)


def start_embedded_ray(workers: int, cpus_per_worker: float | None) -> int:
    """``ray.init`` on loopback with at least one logical CPU per worker (more when the machine has more cores) and
    no dashboard; returns the CPU count it was given."""
    import ray

    cpus = max(os.cpu_count() or 1, int(workers * (cpus_per_worker or 1) + 0.999))
    before = os.environ.get(NICENESS_ENV)
    os.environ[NICENESS_ENV] = "0"  # read by the raylet as it starts: workers at this process's priority
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1",
                 runtime_env={"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"})
    finally:
        if before is None:
            os.environ.pop(NICENESS_ENV, None)
        else:
            os.environ[NICENESS_ENV] = before
    return cpus
