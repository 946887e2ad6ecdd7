"""Shared pieces of the Ray runner tests: quiet, fast Ray settings and a tiny DiT-on-digits training config."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports Ray. Token auth off is an explicit loopback-only choice: these tests start Ray instances
# bound to 127.0.0.1 inside the test process (tests/test_ray_job_submission.py runs a cluster with auth on).
# Also: fast end-of-run health checks, no memory monitor.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TINY = {
    "model": {"name": "DiT", "options": {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 4,
                                         "learn_sigma": False}},
    "data": {"name": "digits", "options": {"image_size": 8}, "batch_size": 16},
    "optim": {"lr": 1e-3},
    "ema": {"kind": "warmup"},
    "sample": {"steps": 2, "n_per_class": 1},
    "max_steps": 6,
    "log_every": 1,
    "ckpt_every": 3,
    "precision": "fp32",
}


@contextlib.contextmanager
def _local_ray(num_cpus: int) -> Iterator[None]:
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def local_ray():
    """``with local_ray(num_cpus):`` an in-process Ray instance on 127.0.0.1 (for a module-scoped fixture)."""
    return _local_ray


def tiny_config(out: Path, **top: object):
    """A validated ``TrainConfig`` for a one-block DiT on 8x8 digits writing to ``out``."""
    from dtx.training.config import load_train_config

    return load_train_config(TINY, {"out": str(out), **top})


def logged(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record in a run folder's metrics.jsonl, in file order."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "event" not in r]


@pytest.fixture(scope="session")
def make_tiny():
    """``make_tiny(out_folder, **top)`` -> a tiny config (for fixtures wider than one test)."""
    return tiny_config


@pytest.fixture
def tiny(tmp_path):
    """``tiny("name", max_steps=...)`` -> a tiny config writing to ``tmp_path/name``."""
    return lambda name, **top: tiny_config(tmp_path / name, **top)


@pytest.fixture
def losses():
    """``losses(run_folder)`` -> [(step, loss), ...] from its metrics.jsonl."""
    return logged
