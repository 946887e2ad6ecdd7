"""The ray runner on real Ray Train workers (one in-process Ray instance with 2 CPUs for the module): one worker
matches ``--runner local``, two gloo workers train and checkpoint, a killed worker resumes from the last checkpoint,
and a user error on a worker reaches the caller unchanged."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dtx.checkpoint import CheckpointManager, load_checkpoint
from dtx.errors import DataError
from dtx.training.local import run_local
from dtx.training.sampling import load_for_sampling
from dtx_ray.runner import RayOptions, run_with_options

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_instance(local_ray):
    with local_ray(2):
        yield


def test_one_worker_gives_the_local_runners_loss_curve(tiny, losses):
    ref = tiny("local")
    run_local(ref, argparse.Namespace(workers=1, gpus_per_worker=0, resume=False))
    cfg = tiny("ray1")
    summary = run_with_options(cfg, RayOptions(workers=1, gpus_per_worker=0))
    assert (summary["runner"], summary["workers"], summary["step"]) == ("ray", 1, 6)
    ours, theirs = losses(cfg.out), losses(ref.out)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=1e-6, abs=0)


@pytest.fixture(scope="module")
def two_workers(make_tiny, tmp_path_factory):
    """One uninterrupted 2-worker run, shared by the tests that inspect it or compare against it."""
    cfg = make_tiny(tmp_path_factory.mktemp("ray2") / "run")
    return cfg, run_with_options(cfg, RayOptions(workers=2, gpus_per_worker=0))


def test_two_workers_train_report_and_write_loadable_checkpoints(two_workers, losses):
    cfg, summary = two_workers
    out = Path(cfg.out)
    assert (summary["workers"], summary["step"], summary["steps_run"]) == (2, 6, 6)
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5, 6]

    mgr = CheckpointManager(out / "checkpoints")
    assert [p.name for p in mgr.list()] == ["step_00000003", "step_00000006"]
    state = mgr.load()
    assert state["step"] == 6
    run = load_for_sampling(out)  # what `dtx sample` does: model rebuilt from the checkpoint's spec, EMA weights loaded
    assert run.step == 6 and sum(p.numel() for p in run.model.parameters()) > 0

    # Ray keeps a pointer to every reported checkpoint under the run folder, not a second copy of its tensors
    ray_copy = Path(summary["ray_storage"]) / "step_00000006"
    assert ray_copy.is_dir() and str(ray_copy).startswith(str(out / "ray"))
    assert [p.name for p in ray_copy.iterdir()] == ["dtx-checkpoint.json"]
    pointed = Path(json.loads((ray_copy / "dtx-checkpoint.json").read_text())["checkpoint"])
    assert pointed == (out / "checkpoints" / "step_00000006").resolve()
    copied = load_checkpoint(pointed)
    for key, tensor in state["model"].items():
        assert torch.equal(copied["model"][key], tensor), key
    assert sorted(os.listdir(out / "tensorboard"))[0].startswith("events.out.tfevents")


def _crash_rank1_once(cfg, ctx):
    """The real loop, but rank 1 dies (as a killed process would) before step 5 on the first attempt."""
    from dtx.training import trainer as core_loop

    marker = Path(cfg.out) / "crashed-once"
    if ctx.rank == 1 and not marker.exists():
        original = core_loop.Trainer.train_step

        def train_step(self):
            if self.step == 4:
                marker.touch()
                os._exit(1)
            return original(self)

        core_loop.Trainer.train_step = train_step
    return core_loop.train(cfg, ctx)


def test_killed_worker_resumes_from_the_last_checkpoint(tiny, losses, two_workers):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    cfg = tiny("crash")
    summary = run_with_options(cfg, RayOptions(workers=2, gpus_per_worker=0, max_failures=1), loop=_crash_rank1_once)
    assert (Path(cfg.out) / "crashed-once").exists()
    assert summary["step"] == 6 and summary["steps_run"] == 3  # the restarted group resumed at step 3 (checkpoint)
    # ... and continued exactly as the uninterrupted run did (same losses, bit for bit)
    assert losses(cfg.out) == losses(two_workers[0].out)


def test_user_error_on_a_worker_reaches_the_caller(tiny):
    cfg = tiny("bad", data={"name": "image-folder", "options": {"root": "/nonexistent/images"}})
    with pytest.raises(DataError, match="/nonexistent/images"):
        run_with_options(cfg, RayOptions(workers=1, gpus_per_worker=0))


def test_fsdp_workers_train_like_ddp_and_resume_from_full_checkpoints(make_tiny, tmp_path, two_workers, losses):
    """FSDP2 on 2 gloo workers: same losses as DDP (both average the gradients of the same shards of data), full
    (unsharded) tensors in the checkpoints, and a run resumed from a sharded run's checkpoint continues exactly."""
    cfg = make_tiny(tmp_path / "fsdp", max_steps=9)
    summary = run_with_options(cfg, RayOptions(workers=2, gpus_per_worker=0, strategy="fsdp"))
    assert summary["step"] == 9
    fsdp = losses(cfg.out)
    assert [v for _, v in fsdp[:6]] == pytest.approx([v for _, v in losses(two_workers[0].out)], rel=1e-5)

    mgr = CheckpointManager(Path(cfg.out) / "checkpoints")
    six = mgr.load(mgr.list()[-2])
    ddp = CheckpointManager(Path(two_workers[0].out) / "checkpoints").load()
    assert six["step"] == ddp["step"] == 6
    for part in ("model", "ema"):
        assert six[part].keys() == ddp[part].keys()
        for key, tensor in ddp[part].items():
            assert six[part][key].shape == tensor.shape, key
            assert torch.allclose(six[part][key], tensor, atol=1e-5), key
    params = dict(load_for_sampling(Path(cfg.out)).model.named_parameters())
    moments = six["optimizer"]["state"]  # keyed by parameter name, each moment the full parameter's shape
    assert set(moments) == {n for n, p in params.items() if p.requires_grad}
    assert all(moments[n]["exp_avg"].shape == params[n].shape for n in moments)

    resumed = make_tiny(tmp_path / "resumed", max_steps=9)
    shutil.copytree(mgr.list()[-2], Path(resumed.out) / "checkpoints" / "step_00000006")
    summary = run_with_options(resumed, RayOptions(workers=2, gpus_per_worker=0, strategy="fsdp"))
    assert (summary["step"], summary["steps_run"]) == (9, 3)
    assert losses(resumed.out)[-3:] == fsdp[-3:]


def test_lora_trains_on_ddp_and_fsdp_workers_alike_and_saves_only_adapters(make_tiny, tmp_path, two_workers, losses):
    """LoRA from the 2-worker run's weights: DDP and FSDP2 workers give the same losses; both save only adapters."""
    from dtx.adapters import is_adapter_key

    base = two_workers[0].out
    lora = {"finetune": {"from": base, "method": "lora", "lora": {"rank": 4}}}
    runs = {}
    for strategy in ("ddp", "fsdp"):
        cfg = make_tiny(tmp_path / strategy, **lora)
        summary = run_with_options(cfg, RayOptions(workers=2, gpus_per_worker=0, strategy=strategy))
        assert summary["step"] == 6
        state = CheckpointManager(Path(cfg.out) / "checkpoints").load()
        assert state["model"] and all(is_adapter_key(k) for k in state["model"]), strategy
        assert set(state["ema"]) == set(state["model"])
        runs[strategy] = losses(cfg.out)
    assert [v for _, v in runs["fsdp"]] == pytest.approx([v for _, v in runs["ddp"]], rel=1e-5)
    assert load_for_sampling(Path(tmp_path / "fsdp")).model is not None
