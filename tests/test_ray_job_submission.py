"""Ray job submission against a real loopback cluster with token authentication on (``RAY_AUTH_MODE=token``, the
token in a file named by ``RAY_AUTH_TOKEN_PATH``): ``ray start --head``, then ``ray job submit --working-dir DIR --
<env>/bin/dtx train config.yaml --runner ray`` and ``dtx train --address http://...``; both must succeed and leave a
complete run folder, and a client without the token is refused. The cluster is started and stopped by the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
CONFIG = """\
model:
  name: DiT
  options: {depth: 1, hidden_size: 32, num_heads: 2, patch_size: 4, learn_sigma: false}
data:
  name: digits
  options: {image_size: 8}
  batch_size: 16
ema: {kind: warmup}
optim: {lr: 0.001}
sample: {steps: 2, n_per_class: 1}
precision: fp32
max_steps: 4
log_every: 1
ckpt_every: 2
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


TOKEN_DIR = Path(tempfile.mkdtemp(prefix="dtxray-token-"))
TOKEN_FILE = TOKEN_DIR / "auth_token"  # never ~/.ray/auth_token: the test must not touch the user's token


def _token() -> Path:
    if not TOKEN_FILE.is_file():
        import secrets

        TOKEN_FILE.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
        TOKEN_FILE.chmod(0o600)
    return TOKEN_FILE


def _env(with_token: bool = True) -> dict[str, str]:
    """Token authentication on; the cluster and every client read the token from RAY_AUTH_TOKEN_PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                "RAY_memory_monitor_refresh_ms": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    if with_token:
        env["RAY_AUTH_TOKEN_PATH"] = str(_token())
    else:
        env["HOME"] = str(TOKEN_DIR / "no-home")  # no ~/.ray/auth_token either
    return env


def _kill_cluster(temp_dir: str) -> None:
    """End exactly this cluster's processes (those naming its temp dir, and their children), by pid."""
    import ray  # noqa: F401  -- Ray bundles psutil and puts it on sys.path when imported
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU head node on loopback; yields its dashboard (job submission) address."""
    gcs, dashboard, client, agent, metrics = _free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="dtxray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
           "--node-ip-address=127.0.0.1",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        started = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except urllib.error.HTTPError as exc:  # up, and asking for the token
                if exc.code in (401, 403):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the Ray dashboard did not come up"
            time.sleep(1)
        yield address
    finally:
        _kill_cluster(temp_dir)
        if os.environ.get("CI"):  # a CI machine runs nothing else: also stop any Ray left behind, as Ray advises
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env=_env(), capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(TOKEN_DIR, ignore_errors=True)


def _assert_complete_run(out: Path, steps: int) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert (out / "config.yaml").is_file() and (out / "loss.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert list((out / "samples").glob("step_*.png"))
    assert list((out / "ray").glob("*/step_00000004"))  # Ray Train's copy of the last reported checkpoint


def test_a_client_without_the_token_is_refused(cluster):
    listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", cluster], env=_env(with_token=False),
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode != 0, listed.stdout[-2000:]
    assert "auth" in (listed.stdout + listed.stderr).lower(), listed.stderr[-2000:]


def test_ray_job_submit_runs_dtx_train(cluster, tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(CONFIG)
    out = tmp_path / "run"
    submission_id = f"dtx-test-{os.getpid()}-{int(time.time())}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster, "--submission-id", submission_id,
           "--working-dir", str(workdir), "--",
           str(BIN / "dtx"), "train", "config.yaml", "--runner", "ray", "--out", str(out), "--workers", "1",
           "--gpus-per-worker", "0"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    # asked by a client process of its own: Ray reads the auth settings once per process, at import
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", cluster, submission_id], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "succeeded" in status.stdout.lower(), \
        done.stdout[-4000:] + done.stderr[-4000:] + status.stdout[-2000:] + status.stderr[-2000:]
    _assert_complete_run(out, 4)


def test_dtx_train_with_a_dashboard_address_submits_a_job(cluster, tmp_path):
    (tmp_path / "config.yaml").write_text(CONFIG)
    out = tmp_path / "run"
    cmd = [str(BIN / "dtx"), "train", "config.yaml", "--runner", "ray", "--address", cluster, "--out", str(out),
           "--gpus-per-worker", "0"]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["job_id"] and summary["step"] == 4 and summary["workers"] == 1
    _assert_complete_run(out, 4)
