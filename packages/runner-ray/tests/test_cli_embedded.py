"""``dtx train`` with no address: the ray runner starts its own Ray instance in the process, trains, writes the run
folder and keeps the console free of Ray Train's dashboard-less warnings and per-report lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_dtx_train_starts_an_embedded_ray_instance(tmp_path, make_tiny):
    from dtx.training.config import config_dict

    recipe = config_dict(make_tiny(tmp_path / "unused", max_steps=4, ckpt_every=2))
    del recipe["out"]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([str(Path(sys.executable).parent / "dtx"), "train", "tiny.yaml", "--out", "run",
                           "--runner", "ray"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["runner"], summary["workers"], summary["step"]) == ("ray", 1, 4)
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (out / "ray" / "run" / "step_00000004").is_dir() and list((out / "tensorboard").iterdir())
    assert "Started a local Ray instance" in done.stderr
    assert "PlacementGroupCleaner" not in done.stderr and "Reporting training result" not in done.stderr
