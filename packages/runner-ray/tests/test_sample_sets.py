"""``dtx sample RUN --num-samples N --workers 2``: the set's chunks shared out over two Ray workers of an embedded
instance write the same ``.npz`` as one process for the same seeds, and a set half written by one process is
finished by the workers without repeating a sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

DTX = str(Path(sys.executable).parent / "dtx")


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny) -> Path:
    from dtx.training.context import LocalContext
    from dtx.training.trainer import train

    out = tmp_path_factory.mktemp("ray-sets") / "run"
    train(make_tiny(out, max_steps=2, ckpt_every=2), LocalContext(out))
    return out


def dtx_sample(cwd: Path, *argv: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([DTX, "sample", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def arrays(path: Path) -> dict[str, list]:
    with np.load(path) as z:
        return {k: z[k].tolist() for k in z.files}


def test_two_ray_workers_write_the_same_set_as_one_process(run, tmp_path):
    common = ["--num-samples", "22", "--batch-size", "4", "--steps", "4", "--seed", "11"]
    one = dtx_sample(tmp_path, str(run), "--out", "one.npz", *common)
    two = dtx_sample(tmp_path, str(run), "--out", "two.npz", "--workers", "2", *common)
    assert (one["sampled"], two["sampled"], two["workers"]) == (22, 22, 2)
    assert arrays(tmp_path / "one.npz") == arrays(tmp_path / "two.npz")
    assert arrays(tmp_path / "two.npz")["seeds"] == [11 * 2 ** 32 + i for i in range(22)]


def test_ray_workers_finish_a_set_one_process_began(run, tmp_path, monkeypatch, capsys):
    from dtx.cli import main
    from dtx.training import sample_set

    common = ["--num-samples", "16", "--batch-size", "4", "--steps", "4", "--seed", "2"]
    dtx_sample(tmp_path, str(run), "--out", "whole.npz", *common)
    # one process that samples only the first half of the chunks (0 and 2), then finds the set unfinished
    real = sample_set.run_job
    with monkeypatch.context() as m:
        m.setattr(sample_set, "run_job", lambda job, chunks=None, rank=0: real(
            job, sample_set.share(sample_set.pending_chunks(sample_set.parts_dir(job.out), job.plan), 0, 2)))
        assert main(["sample", str(run), "--out", str(tmp_path / "half.npz"), *common]) == 2
    assert "2 of 4 chunks are not written yet" in capsys.readouterr().err
    finished = dtx_sample(tmp_path, str(run), "--out", "half.npz", "--workers", "2", *common)
    assert (finished["sampled"], finished["resumed"]) == (8, 8)
    assert arrays(tmp_path / "half.npz") == arrays(tmp_path / "whole.npz")
