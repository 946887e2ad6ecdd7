"""Ray job submission: ``dtx train --address http://HEAD:8265`` runs the training as a Ray job and follows it.

The job's working directory holds only ``run.json`` (the resolved config and the runner options); its entrypoint is
this environment's absolute interpreter running ``python -m dtx_ray.job_main run.json``, because a job runs with the
cluster's PATH. The dtx packages (and so their plugin entry points) must be installed in the cluster's environment at
the same path, as on a single machine or a cluster built from one image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dtx.errors import DtxError
from dtx.training.config import TrainConfig, config_dict

from .options import FORWARDED_ENV, RayOptions

RUN_FILE = "run.json"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ERROR_PREFIX = "dtx: error:"  # how the job entrypoint (and the dtx CLI) prints a user error


def job_entrypoint(run_file: str = RUN_FILE) -> str:
    """``<this interpreter> -m dtx_ray.job_main run.json`` with an absolute interpreter path."""
    return shlex.join([str(Path(sys.executable).absolute()), "-m", "dtx_ray.job_main", run_file])


def write_job_dir(cfg: TrainConfig, options: RayOptions, folder: str | Path) -> Path:
    """A job working directory with ``run.json``: the config (absolute ``out``) and options (no address)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = config_dict(cfg)
    train["out"] = str(Path(cfg.out).expanduser().resolve())
    run = {"train": train, "options": {**dataclasses.asdict(options), "address": None}}
    (folder / RUN_FILE).write_text(json.dumps(run, indent=1))
    return folder


def _last_line(logs: str, prefix: str = "") -> str:
    lines = [ln.strip() for ln in logs.splitlines() if ln.strip() and ln.strip().startswith(prefix)]
    return lines[-1] if lines else ""


def submit_train_job(cfg: TrainConfig, options: RayOptions, address: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Submit the run to the Ray cluster at ``address`` (its dashboard URL), stream its logs, return its summary."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="dtx-job-") as tmp:
        write_job_dir(cfg, options, tmp)
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        runtime_env: dict[str, Any] = {"working_dir": tmp, **({"env_vars": env} if env else {})}
        job_id = client.submit_job(entrypoint=job_entrypoint(), runtime_env=runtime_env)
    print(f"submitted Ray job {job_id} to {address}", file=sys.stderr)
    shown = 0
    try:
        while True:
            status = str(client.get_job_status(job_id).value)
            logs = client.get_job_logs(job_id)
            sys.stderr.write(logs[shown:])
            shown = len(logs)
            if status in TERMINAL:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        raise
    if status != "SUCCEEDED":
        reason = (_last_line(logs, ERROR_PREFIX)[len(ERROR_PREFIX):].strip() or _last_line(logs)
                  or client.get_job_info(job_id).message)
        raise DtxError(f"Ray job {job_id} {status.lower()}: {reason}")
    summary = _last_line(logs, "{")
    try:
        result = json.loads(summary) if summary else {}
    except ValueError:
        result = {}
    return {**result, "job_id": job_id, "address": address}
