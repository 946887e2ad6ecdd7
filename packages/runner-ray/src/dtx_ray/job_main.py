"""The entrypoint of a submitted Ray job (``python -m dtx_ray.job_main run.json``): run the resolved config of
``run.json`` with its runner options on the cluster the job belongs to and print the summary as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from dtx.errors import DtxError

from .jobs import ERROR_PREFIX, RUN_FILE
from .options import RayOptions


def main(argv: Sequence[str] | None = None) -> int:
    """Job entrypoint: run ``run.json`` on the cluster this job belongs to; print the summary as JSON."""
    from dtx.training.config import config_from_dict

    from .runner import run_with_options

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run = json.loads(Path(argv[0] if argv else RUN_FILE).read_text())
        summary = run_with_options(config_from_dict(run["train"]), RayOptions(**run["options"]))
    except DtxError as exc:
        print(f"{ERROR_PREFIX} {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
