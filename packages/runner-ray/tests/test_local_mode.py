"""The ray runner without a Ray instance: options, Ray Train local mode (``--workers 0``), the context's resume choice,
error surfacing, TensorBoard scalars and the job-submission helpers."""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

from dtx.checkpoint import CheckpointManager
from dtx.errors import CheckpointError, ConfigError, DataError, PluginError
from dtx.commands.train import configure as configure_train
from dtx.training.local import run_local
from dtx_ray import job_main, jobs
from dtx_ray.runner import RayOptions, check_worker_plugins, raise_worker_failure, run_with_options


def _train_args(argv: list[str]) -> argparse.Namespace:
    """``dtx train``'s own parser, which adds the ray runner's flags through its ``configure_parser``."""
    parser = argparse.ArgumentParser()
    configure_train(parser)
    return parser.parse_args(["recipe.yaml", *argv])


def _save(root: Path, step: int) -> Path:
    return CheckpointManager(root, keep_last=10).save(step, {"model": {"w": torch.full((2,), float(step))},
                                                            "step": step})


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Decode TFRecord event files by hand: u64 length, u32 crc, Event proto, u32 crc per record."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# -- options --------------------------------------------------------------------------------------------------------

def test_options_from_dtx_train_flags():
    assert RayOptions.from_args(_train_args([])) == RayOptions(workers=1)
    opts = RayOptions.from_args(_train_args(["--workers", "2", "--gpus-per-worker", "0", "--address", "auto",
                                             "--resume", "--max-failures", "3", "--strategy", "none",
                                             "--cpus-per-worker", "1.5", "--storage", "s3://b/p"]))
    assert (opts.workers, opts.gpus_per_worker, opts.address, opts.require_resume) == (2, 0.0, "auto", True)
    assert (opts.max_failures, opts.strategy, opts.cpus_per_worker, opts.storage) == (3, "none", 1.5, "s3://b/p")


@pytest.mark.parametrize("field, value, key", [("workers", -1, "--workers"), ("max_failures", -2, "--max-failures"),
                                               ("gpus_per_worker", -1.0, "--gpus-per-worker"),
                                               ("strategy", "zero3", "--strategy")])
def test_bad_options_name_the_flag(field, value, key):
    with pytest.raises(ConfigError, match=key):
        RayOptions.from_args(argparse.Namespace(**{field: value}))


# -- local mode -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_mode_gives_the_local_runners_loss_curve(tiny, losses):
    ref = tiny("local")
    run_local(ref, argparse.Namespace(workers=1, gpus_per_worker=0, resume=False))
    cfg = tiny("ray0")
    summary = run_with_options(cfg, RayOptions(workers=0))
    assert summary["runner"] == "ray" and summary["step"] == 6
    assert losses(cfg.out) == losses(ref.out) and len(losses(ref.out)) == 6
    assert [p.name for p in CheckpointManager(Path(cfg.out) / "checkpoints").list()] == ["step_00000003",
                                                                                         "step_00000006"]


def _probe_resume(ray_reported: Path | None):
    """A stand-in loop: report ``ray_reported`` to Ray (so ``get_checkpoint`` returns it), then ask for resume."""

    def loop(cfg, ctx):
        if ray_reported is not None:
            ctx.report({"step": 1, "loss": torch.tensor(0.25)}, ray_reported)
        return {"rank": ctx.rank, "world": ctx.world_size, "main": ctx.is_main, "device": str(ctx.device),
                "resume": str(ctx.resume_checkpoint())}

    return loop


def test_resume_takes_the_run_folders_newest_valid_checkpoint(tiny):
    cfg = tiny("run")
    root = Path(cfg.out) / "checkpoints"
    _save(root, 2)
    bad = _save(root, 5)
    (bad / "model.safetensors").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match="step_00000005"):
        got = run_with_options(cfg, RayOptions(workers=0, gpus_per_worker=0), loop=_probe_resume(None))
    assert (got["rank"], got["world"], got["main"], got["device"]) == (0, 1, True, "cpu")
    assert got["resume"] == str(root / "step_00000002")


@pytest.mark.parametrize("ray_step, expect", [(7, "ray"), (1, "folder"), (2, "ray")])
def test_resume_prefers_the_newer_of_ray_and_folder(tiny, tmp_path, ray_step, expect):
    cfg = tiny("run")
    folder = _save(Path(cfg.out) / "checkpoints", 2)
    ray_copy = _save(tmp_path / "ray_storage", ray_step)
    got = run_with_options(cfg, RayOptions(workers=0, tensorboard=True), loop=_probe_resume(ray_copy))
    assert got["resume"] == str(ray_copy if expect == "ray" else folder)
    # the tensor metric reached TensorBoard (local mode logs from the worker, Ray would refuse a tensor)
    assert _tensorboard_scalars(Path(cfg.out) / "tensorboard")["train/loss"] == [(1, 0.25)]


def test_require_resume_without_checkpoint_is_one_clear_error(tiny):
    with pytest.raises(CheckpointError, match="--resume given"):
        run_with_options(tiny("empty"), RayOptions(workers=0, require_resume=True), loop=_probe_resume(None))


def test_loop_errors_keep_their_type_in_local_mode(tiny):
    cfg = tiny("bad", data={"name": "image-folder", "options": {"root": "/nonexistent/images"}})
    with pytest.raises(DataError, match="/nonexistent/images"):
        run_with_options(cfg, RayOptions(workers=0))


# -- worker-side checks ---------------------------------------------------------------------------------------------

def test_missing_plugin_on_a_worker_is_named():
    check_worker_plugins({"core": None, "ray": None})
    with pytest.raises(PluginError, match="no-such-plugin") as info:
        check_worker_plugins({"core": None, "no-such-plugin": "1.0"})
    assert "\n" not in str(info.value)


def test_worker_failures_surface_as_the_lowest_ranks_error():
    from ray.train import WorkerGroupError

    with pytest.raises(DataError, match="missing /x"):
        raise_worker_failure(WorkerGroupError("boom", {1: DataError("other"), 0: DataError("missing /x")}))
    with pytest.raises(RuntimeError, match="rank 1: ZeroDivisionError: division by zero"):
        raise_worker_failure(WorkerGroupError("boom", {1: ZeroDivisionError("division by zero")}))


# -- job submission helpers -----------------------------------------------------------------------------------------

def test_job_dir_and_entrypoint(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny("rel")
    cfg.out = "runs/rel"  # relative on the submitting machine
    folder = jobs.write_job_dir(cfg, RayOptions(workers=2, address="http://h:8265", max_failures=1), tmp_path / "job")
    run = json.loads((folder / "run.json").read_text())
    assert run["train"]["out"] == str(tmp_path / "runs" / "rel")
    assert run["options"]["address"] is None and run["options"]["workers"] == 2 and run["options"]["max_failures"] == 1
    entry = jobs.job_entrypoint().split()
    assert Path(entry[0]).is_absolute() and Path(entry[0]).samefile(sys.executable)
    assert entry[1:] == ["-m", "dtx_ray.job_main", "run.json"]


@pytest.mark.slow
def test_job_main_runs_the_run_file(tiny, tmp_path, capsys, losses):
    cfg = tiny("job", max_steps=3)
    folder = jobs.write_job_dir(cfg, RayOptions(workers=0), tmp_path / "job-dir")  # a job's own working dir
    assert job_main.main([str(folder / "run.json")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and [s for s, _ in losses(cfg.out)] == [1, 2, 3]
    bad = tiny("job-bad", data={"name": "image-folder", "options": {"root": "/nonexistent/x"}})
    folder = jobs.write_job_dir(bad, RayOptions(workers=0), tmp_path / "job-bad-dir")
    assert job_main.main([str(folder / "run.json")]) == 2
    assert capsys.readouterr().err.strip().startswith("dtx: error:")
