"""Context parallelism on Ray Train workers (gloo on CPU): two workers splitting each sample's tokens train the loss
curve of one process, a run checkpointed with parallel.context 2 resumes with 1 and continues that curve, and four
workers (2 data x 2 context ranks) under FSDP2 train the curve of two data-parallel workers; `dtx train
latte-moving-digits --workers 2 --context-parallel 2` trains and samples."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dtx.training.local import run_local
from dtx_ray.runner import RayOptions, run_with_options

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_instance(local_ray):
    with local_ray(4):
        yield


def _values(rows: list[tuple[int, float]]) -> list[float]:
    return [v for _, v in rows]


def test_two_context_ranks_train_the_single_process_curve_and_resume_with_one(tiny, losses):
    local = tiny("local")  # 4 tokens per 8x8 digit (patch 4), 2 heads: both split in two
    run_local(local, argparse.Namespace(workers=1, gpus_per_worker=0, resume=False))
    split = tiny("split", parallel={"context": 2})
    summary = run_with_options(split, RayOptions(workers=2, gpus_per_worker=0))
    assert (summary["workers"], summary["step"]) == (2, 6)
    assert [s for s, _ in losses(split.out)] == [1, 2, 3, 4, 5, 6]
    assert _values(losses(split.out)) == pytest.approx(_values(losses(local.out)), rel=1e-5)

    resumed = tiny("resumed")  # the split run's step-3 checkpoint, continued in one process
    shutil.copytree(split.out, resumed.out)
    shutil.rmtree(f"{resumed.out}/checkpoints/step_00000006")
    run_local(resumed, argparse.Namespace(workers=1, gpus_per_worker=0, resume=True))
    assert [s for s, _ in losses(resumed.out)][-3:] == [4, 5, 6]
    assert _values(losses(resumed.out))[-3:] == pytest.approx(_values(losses(local.out))[-3:], rel=1e-5)


def test_fsdp_over_two_data_by_two_context_ranks_trains_the_data_parallel_curve(tiny, losses):
    ddp = tiny("ddp2")
    run_with_options(ddp, RayOptions(workers=2, gpus_per_worker=0))
    mesh = tiny("fsdp4", parallel={"context": 2})
    summary = run_with_options(mesh, RayOptions(workers=4, gpus_per_worker=0, strategy="fsdp"))
    assert (summary["workers"], summary["step"]) == (4, 6)
    assert _values(losses(mesh.out)) == pytest.approx(_values(losses(ddp.out)), rel=1e-5)


def test_dtx_train_latte_moving_digits_with_two_context_ranks_trains_and_samples(tmp_path):
    """The command of the docs, on CPU workers: each clip (16 frames and 2 joint images) split over 2 ranks."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([str(Path(sys.executable).parent / "dtx"), "train", "latte-moving-digits", "--out", "run",
                           "--workers", "2", "--context-parallel", "2", "--max-steps", "2", "data.batch_size=2",
                           "ckpt_every=2", "sample.n_per_class=1", "sample.steps=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["runner"], summary["workers"], summary["step"]) == ("ray", 2, 2)
    assert Path(summary["samples"]).is_file()
    assert (tmp_path / "run" / "config.yaml").read_text().count("context: 2") == 1
