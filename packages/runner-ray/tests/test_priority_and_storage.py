"""``dtx train dit-digits --workers 2`` on the embedded Ray instance: the train workers run at the priority of the
``dtx train`` process (not Ray's nice 15) while another process competes for the cores, and each checkpoint is
stored once (Ray keeps pointers), so the run folder is no larger than a one-process run's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DTX = str(Path(sys.executable).parent / "dtx")
SHORT = ["--max-steps", "4", "ckpt_every=2", "log_every=2", "sample.n_per_class=1", "sample.steps=2"]
DRIVER_NICE = 3  # the user's `nice -n 3 dtx train`: workers must not run below it


def _niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])  # field 19: nice


def _train_workers() -> dict[int, int]:
    """pid -> niceness of every live Ray Train worker process on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                found[int(entry.name)] = _niceness(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process niceness from /proc")
def test_workers_keep_the_drivers_priority_and_checkpoints_are_stored_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # at nice 0, like a user's job
    seen: dict[int, int] = {}
    try:
        proc = subprocess.Popen(["nice", "-n", str(DRIVER_NICE), DTX, "train", "dit-digits", "--workers", "2",
                                 "--out", str(tmp_path / "ray-run"), *SHORT],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(_train_workers())
            time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
    finally:
        competitor.kill()
        competitor.wait()
    assert proc.returncode == 0, err[-4000:]
    assert '"runner": "ray"' in out.splitlines()[-1]
    assert len(seen) >= 2, "no Ray Train worker process was seen"
    assert set(seen.values()) == {DRIVER_NICE}, seen  # Ray's default would be DRIVER_NICE + 15

    local = subprocess.run([DTX, "train", "dit-digits", "--out", str(tmp_path / "local-run"), *SHORT],
                           env=env, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-4000:]
    assert '"runner": "local"' in local.stdout.splitlines()[-1]  # --runner auto: one worker, one process, no Ray
    ray_run, local_run = tmp_path / "ray-run", tmp_path / "local-run"
    weights = _size(local_run / "checkpoints")
    assert weights > 1_000_000  # two checkpoints of a 1.3M-parameter model, its EMA and optimizer moments
    assert _size(ray_run) <= _size(local_run) + 0.05 * weights  # Ray's storage holds pointers, tensorboard is small
    assert _size(ray_run / "ray") < 50_000
