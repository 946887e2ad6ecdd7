"""Fault injection: kill `dtx train` at random steps and resume, corrupt checkpoints, feed malformed inputs, start a
second writer on a running run, poison an update.

A tiny class-conditional DiT on 8x8 digits trains in subprocesses (one thread each, so runs are bitwise
reproducible). The counts of kills survived, corruptions detected and malformed inputs rejected are printed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MAX_STEPS = 24
CKPT_EVERY = 3
TINY = f"""\
model:
  name: DiT
  options: {{patch_size: 4, hidden_size: 32, depth: 1, num_heads: 2, learn_sigma: false}}
data:
  name: digits
  options: {{image_size: 8, split: train}}
  batch_size: 8
objective: {{kind: gaussian, noise_schedule: linear, diffusion_steps: 100}}
optim: {{lr: 1.0e-3}}
sample: {{every: 0, steps: 2, n_per_class: 1, classes: [0, 1]}}
precision: fp32
max_steps: {MAX_STEPS}
log_every: 1
ckpt_every: {CKPT_EVERY}
keep_last: 2
milestone_every: 12
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "default",
       "CUDA_VISIBLE_DEVICES": ""}
STARTUP_TIMEOUT = 240  # seconds for one `dtx train` process on a loaded 2-core machine

COUNTS = {"kills": 0, "preemptions": 0, "corruptions": 0, "rejected": 0, "concurrent": 0, "poisoned": 0}


@pytest.fixture(scope="module", autouse=True)
def _print_counts(request):
    yield
    line = (f"fault-injection: kills survived={COUNTS['kills']}, preemptions survived={COUNTS['preemptions']}, "
            f"corruptions detected={COUNTS['corruptions']}, malformed inputs rejected={COUNTS['rejected']}, "
            f"concurrent writers refused={COUNTS['concurrent']}, poisoned updates caught={COUNTS['poisoned']}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}")


# -- helpers -----------------------------------------------------------------------------------------------------------

# `dtx train` with dtx's INFO log lines on stderr ("resumed from ... at step N"), nothing else changed
LAUNCH = ("import logging, sys; logging.basicConfig(level=logging.WARNING); "
          "logging.getLogger('dtx').setLevel(logging.INFO); from dtx.cli import main; sys.exit(main(sys.argv[1:]))")


def _train_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", LAUNCH, "train", str(config), "--runner", "local", "--out", str(out), *extra]


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return [r for r in rows if r.get("loss") is not None]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(run)]


def _complete_checkpoints(run: Path) -> list[int]:
    """Steps of checkpoint folders that have a manifest (a SIGKILL leaves only hidden temporary folders otherwise)."""
    root = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "manifest.json").is_file()) if root.is_dir() else []


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _wait(proc: subprocess.Popen, log: Path, what: str, done) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if done():
            return
        if proc.poll() is not None:
            pytest.fail(f"dtx train exited with {proc.returncode} while waiting for {what}:\n"
                        f"{log.read_text()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"dtx train did not reach {what} within {STARTUP_TIMEOUT}s")


def _resumed_at(log: str) -> int:
    found = re.findall(r"resumed from \S+ at step (\d+)", log)
    return int(found[-1]) if found else 0


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _damage(checkpoint: Path, how: str) -> str:
    """Flip one bit in, or cut the tail off, the model weights; returns the damaged file's sha256."""
    target = checkpoint / "model.safetensors"
    if how == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        os.truncate(target, target.stat().st_size - 7)
    return hashlib.sha256(target.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    (d / "tiny.yaml").write_text(TINY)
    return d


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    """An uninterrupted run: the loss sequence every interrupted run must reproduce exactly."""
    run = workdir / "reference"
    proc = subprocess.run(_train_cmd(workdir / "tiny.yaml", run), env=ENV, capture_output=True, text=True,
                          timeout=STARTUP_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [s for s, _ in _losses(run)] == list(range(1, MAX_STEPS + 1))
    # retention: the newest two (21, 24) plus the milestones (multiples of 12)
    assert _complete_checkpoints(run) == [12, 21, 24] and not list((run / "checkpoints").glob(".*"))
    return run


# -- kills, preemption and corruption ------------------------------------------------------------------------------------

def test_killed_preempted_and_corrupted_runs_resume_bit_for_bit(workdir, reference):
    """SIGKILL at random steps, SIGTERM once, and damage the newest checkpoint before two of the resumes; every
    restart resumes from the newest intact checkpoint and the run ends with the uninterrupted run's exact losses
    and final weights."""
    rng = random.Random(20240607)
    run = workdir / "interrupted"
    plan = [("kill", None), ("kill", "flip"), ("term", "truncate"), ("kill", None), ("kill", None)]
    resume_at, damaged, skipped = 0, {}, None
    for index, (how, damage) in enumerate(plan):
        log = workdir / f"interrupted-{index}.log"
        metrics_inode = _inode(run / "metrics.jsonl")
        with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
            proc = subprocess.Popen(_train_cmd(workdir / "tiny.yaml", run), env=ENV, stdout=out, stderr=err)
        if metrics_inode is not None:  # a restart first rewinds metrics.jsonl (a new file) to its checkpoint
            _wait(proc, log, "the restart", lambda: _inode(run / "metrics.jsonl") != metrics_inode)
            assert _resumed_at(log.read_text()) == resume_at, log.read_text()[-2000:]
            if skipped:
                assert "skipping damaged checkpoint" in log.read_text() and skipped in log.read_text()
                COUNTS["corruptions"] += 1
        target = min(MAX_STEPS - 6, max(resume_at + rng.randint(1, 2 * CKPT_EVERY), CKPT_EVERY + 1))
        _wait(proc, log, f"step {target}", lambda: any(s >= target for s, _ in _losses(run)))
        steps = [s for s, _ in _losses(run)]
        assert steps == list(range(1, max(steps) + 1)), "metrics.jsonl was not rewound to the resumed step"
        time.sleep(rng.uniform(0.0, 0.2))  # land anywhere in a step, checkpoint writes included
        if how == "kill":
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
            COUNTS["kills"] += 1
        else:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=STARTUP_TIMEOUT) == 0, log.read_text()[-2000:]
            summary = json.loads(log.with_suffix(".out").read_text().strip().splitlines()[-1])
            assert summary["stopped_by"] == "signal"
            # the preempted run saved a checkpoint at the step it stopped on
            assert _complete_checkpoints(run)[-1] == summary["step"] == max(s for s, _ in _losses(run))
            COUNTS["preemptions"] += 1
        intact = [c for c in _complete_checkpoints(run) if damaged.get(c) != hashlib.sha256(
            (run / "checkpoints" / f"step_{c:08d}" / "model.safetensors").read_bytes()).hexdigest()]
        assert intact, "interrupted before the first checkpoint"
        skipped = None
        if damage:
            skipped = f"step_{intact[-1]:08d}"
            damaged[intact.pop()] = _damage(run / "checkpoints" / skipped, damage)
        resume_at = intact[-1] if intact else 0
    final = subprocess.run(_train_cmd(workdir / "tiny.yaml", run), env=ENV, capture_output=True, text=True,
                           timeout=STARTUP_TIMEOUT)
    assert final.returncode == 0, final.stderr[-2000:]
    assert _resumed_at(final.stderr) == resume_at
    assert _losses(run) == _losses(reference)
    last = f"checkpoints/step_{MAX_STEPS:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        got, want = load_file(str(run / last / name)), load_file(str(reference / last / name))
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), name


# -- malformed inputs ----------------------------------------------------------------------------------------------------

def _fuzz_cases(d: Path, run: Path) -> list[tuple[str, list[str], str]]:
    """(id, argv, fragment the one-line error must contain); files are written into ``d``."""
    counter = iter(range(1000))

    def cfg(text: str) -> str:
        path = d / f"case{next(counter):02d}.yaml"
        path.write_text(text)
        return str(path)

    def edit(old: str, new: str) -> str:
        assert old in TINY, old
        return cfg(TINY.replace(old, new))

    def data(block: str) -> str:
        return edit("name: digits\n  options: {image_size: 8, split: train}", block)

    (d / "empty-images").mkdir()
    broken = d / "broken-images" / "0"
    broken.mkdir(parents=True)
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"\x89PNG not really")
    marker = d / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": _Payload(marker)}, d / "evil.pt")
    np.savez(d / "no-arr.npz", foo=np.zeros(3))
    (d / "garbage.npz").write_bytes(b"garbage")
    np.savez(d / "float.npz", arr_0=np.zeros((2, 8, 8, 1), np.float32), labels=np.zeros(2, np.int64))
    (d / "a-file").write_text("x")
    three = d / "three-classes"
    for c in range(3):
        (three / str(c)).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 60 * c + i, np.uint8)).save(three / str(c) / f"{i}.png")
    shards = {}
    for name, tensors, meta in [("no-latents", {"labels": torch.zeros(2, dtype=torch.int64)}, {"scale_factor": "0.18"}),
                                ("no-scale", {"latents": torch.zeros(2, 4, 2, 2)}, {}),
                                ("bad-labels", {"latents": torch.zeros(2, 4, 2, 2), "labels": torch.tensor([0, 5])},
                                 {"scale_factor": "0.18", "classes": '["a", "b"]'})]:
        (d / name).mkdir()
        from safetensors.torch import save_file

        save_file(tensors, str(d / name / "shard_00000.safetensors"),
                  metadata={"format": "dtx-latents/1", "image_size": "16", **meta})
        shards[name] = d / name
    _npz_bomb(d / "bomb.npz")
    train, out = ["train"], ["--out", str(run), "--runner", "local"]
    return [
        ("config-missing", train + [str(d / "nope.yaml")] + out, "config file not found"),
        ("config-bad-yaml", train + [cfg("model: [unclosed\n")] + out, "not valid YAML"),
        ("config-not-mapping", train + [cfg("- 1\n- 2\n")] + out, "top level must be a mapping"),
        ("config-python-tag", train + [cfg(f"model: !!python/object/apply:os.makedirs ['{marker}']\n")] + out,
         "not valid YAML"),
        ("unknown-key", train + [cfg(TINY + "foo: 1\n")] + out, "unknown config key 'foo'"),
        ("misspelled-key", train + [edit("optim: {lr", "optim: {lrr")] + out, "did you mean 'optim.lr'"),
        ("steps-not-int", train + [edit(f"max_steps: {MAX_STEPS}", "max_steps: ten")] + out, "max_steps"),
        ("steps-negative", train + [edit(f"max_steps: {MAX_STEPS}", "max_steps: -5")] + out, "max_steps"),
        ("steps-fractional", train + [edit(f"max_steps: {MAX_STEPS}", "max_steps: 2.5")] + out, "max_steps"),
        ("batch-zero", train + [edit("batch_size: 8", "batch_size: 0")] + out, "data.batch_size"),
        ("batch-vs-accum", train + [cfg(TINY + "grad_accum: 3\n")] + out, "grad_accum"),
        ("batch-over-dataset", train + [edit("batch_size: 8", "batch_size: 100000")] + out, "larger than the dataset"),
        ("lr-negative", train + [edit("lr: 1.0e-3", "lr: -1.0")] + out, "optim.lr"),
        ("lr-nan", train + [edit("lr: 1.0e-3", "lr: .nan")] + out, "optim.lr"),
        ("betas-one-value", train + [edit("lr: 1.0e-3", "lr: 1.0e-3, betas: [0.9]")] + out, "optim.betas"),
        ("ema-decay-over-1", train + [cfg(TINY + "ema: {decay: 1.5}\n")] + out, "ema.decay"),
        ("precision-literal", train + [edit("precision: fp32", "precision: fp64")] + out, "'fp32', 'bf16'"),
        ("objective-literal", train + [edit("kind: gaussian", "kind: rectified")] + out, "objective.kind"),
        ("ckpt-every-zero", train + [edit(f"ckpt_every: {CKPT_EVERY}", "ckpt_every: 0")] + out, "ckpt_every"),
        ("keep-last-zero", train + [edit("keep_last: 2", "keep_last: 0")] + out, "keep_last"),
        ("sample-steps-zero", train + [edit("steps: 2", "steps: 0")] + out, "sample.steps"),
        ("milestone-negative", train + [edit("milestone_every: 12", "milestone_every: -1")] + out, "milestone_every"),
        ("model-unknown", train + [edit("name: DiT", "name: NoSuchNet")] + out, "unknown model 'NoSuchNet'"),
        ("model-option-unknown", train + [edit("num_heads: 2", "num_heads: 2, nonsense: 1")] + out, "nonsense"),
        ("patch-not-dividing", train + [edit("patch_size: 4", "patch_size: 3")] + out, "not divisible by patch_size"),
        ("heads-not-dividing", train + [edit("num_heads: 2", "num_heads: 5")] + out, "not divisible by num_heads"),
        ("schedule-unknown", train + [edit("noise_schedule: linear", "noise_schedule: nope")] + out,
         "objective.noise_schedule: unknown schedule 'nope'"),
        ("sampler-unknown", train + [edit("every: 0", "every: 0, sampler: nope")] + out, "unknown sampler 'nope'"),
        ("dataset-unknown", train + [edit("name: digits", "name: cifar")] + out, "unknown dataset 'cifar'"),
        ("digits-size", train + [edit("image_size: 8", "image_size: 12")] + out, "image_size"),
        ("image-folder-missing", train + [data("name: image-folder\n  options: {root: /nonexistent/imgs}")] + out,
         "/nonexistent/imgs"),
        ("image-folder-empty", train + [data(f"name: image-folder\n  options: {{root: {d / 'empty-images'}}}")] + out,
         "no images"),
        ("image-folder-corrupt", train + [data(f"name: image-folder\n  options: {{root: {broken.parent}}}")] + out,
         "unreadable"),
        ("latent-folder-missing", train + [data("name: latent-folder\n  options: {root: /nonexistent/lat}")] + out,
         "/nonexistent/lat"),
        ("vae-missing", train + [edit("batch_size: 8", "batch_size: 8\n  vae: /nonexistent/vae")] + out,
         "/nonexistent/vae"),
        ("override-no-equals", train + [cfg(TINY), "optim.lr"] + out, "key=value"),
        ("override-unknown", train + [cfg(TINY), "foo.bar=1"] + out, "unknown config key 'foo'"),
        ("flag-steps-negative", train + [cfg(TINY), "--max-steps", "-3"] + out, "max_steps"),
        ("flag-steps-not-int", train + [cfg(TINY), "--max-steps", "abc"] + out, "--max-steps"),
        ("flag-workers-zero", train + [cfg(TINY), "--workers", "0"] + out, "--workers"),
        ("runner-unknown", train + [cfg(TINY), "--out", str(run), "--runner", "nope"], "unknown runner 'nope'"),
        ("recipe-unknown", train + ["no-such-recipe"] + out, "unknown recipe"),
        ("resume-nothing", train + [cfg(TINY), "--resume", "--out", str(d / "fresh"), "--runner", "local"],
         "no valid checkpoint"),
        ("checkpoint-mismatch", train + [edit("hidden_size: 32", "hidden_size: 48")] + out, "was trained with model"),
        ("out-is-a-file", train + [cfg(TINY), "--out", str(d / "a-file"), "--runner", "local"], "not a folder"),
        ("sample-missing", ["sample", str(d / "nothing")], "not found"),
        ("sample-steps-zero", ["sample", str(run), "--steps", "0"], "--steps"),
        ("sample-class-range", ["sample", str(run), "--classes", "99"], "out of range"),
        ("sample-sampler", ["sample", str(run), "--sampler", "nope"], "unknown sampler"),
        ("sample-n-zero", ["sample", str(run), "--n-per-class", "0"], "--n-per-class"),
        ("sample-cfg-nan", ["sample", str(run), "--cfg", "nan"], "--cfg"),
        ("convert-pickle-code", ["convert", str(d / "evil.pt"), str(d / "converted")], "--trust-checkpoint"),
        ("eval-missing", ["eval", str(d / "none.npz")], "none.npz"),
        ("eval-no-arr", ["eval", str(d / "no-arr.npz")], "arr_0"),
        ("eval-not-npz", ["eval", str(d / "garbage.npz")], "garbage.npz"),
        ("eval-float-images", ["eval", str(d / "float.npz")], "uint8"),
        # issue 15: every value validated before anything is written, naming the key or file
        ("lr-inf", train + [cfg(TINY), "optim.lr=inf"] + out, "optim.lr"),
        ("lr-overflows-float32", train + [cfg(TINY), "optim.lr=1e39"] + out, "optim.lr"),
        ("sample-cfg-nan", train + [edit("every: 0", "every: 0, cfg: .nan")] + out, "sample.cfg"),
        ("betas-over-1", train + [cfg(TINY), "optim.betas=[1.5,0.9]"] + out, "optim.betas"),
        ("eps-negative", train + [cfg(TINY), "optim.eps=-1"] + out, "optim.eps"),
        ("weight-decay-negative", train + [cfg(TINY), "optim.weight_decay=-0.5"] + out, "optim.weight_decay"),
        ("warmup-negative", train + [cfg(TINY), "optim.warmup_steps=-3"] + out, "optim.warmup_steps"),
        ("p-std-negative", train + [cfg(TINY), "objective.p_std=-1.2"] + out, "objective.p_std"),
        ("sigma-data-zero", train + [cfg(TINY), "objective.sigma_data=0"] + out, "objective.sigma_data"),
        ("num-workers-negative", train + [cfg(TINY), "data.num_workers=-1"] + out, "data.num_workers"),
        ("seed-huge", train + [cfg(TINY), "--seed", str(10**24)] + out, "seed"),
        ("sample-classes-range", train + [edit("classes: [0, 1]", "classes: [0, 99]")] + out, "sample.classes"),
        ("sample-n-zero-config", train + [edit("n_per_class: 1", "n_per_class: 0")] + out, "sample.n_per_class"),
        ("sample-guide-channels", train + [edit("every: 0", "every: 0, guide_channels: 3")] + out,
         "sample.guide_channels"),
        ("labels-vs-num-classes", train + [data(f"name: image-folder\n  options: {{root: {three}, image_size: 8, "
                                                f"channels: 1}}"), "model.options.num_classes=2"] + out,
         "model.options.num_classes"),
        ("env-interpolation", train + [edit("lr: 1.0e-3", "lr: '${oc.env:DTX_TEST_LR,0.001}'")] + out, "optim.lr"),
        ("latents-missing-tensor", train + [data(f"name: latent-folder\n  options: {{root: {shards['no-latents']}}}")]
         + out, "'latents'"),
        ("latents-missing-scale", train + [data(f"name: latent-folder\n  options: {{root: {shards['no-scale']}}}")]
         + out, "scale_factor"),
        ("latents-label-range", train + [data(f"name: latent-folder\n  options: {{root: {shards['bad-labels']}}}")]
         + out, "label 5"),
        ("eval-npz-bomb", ["eval", str(d / "bomb.npz")], "bomb.npz"),
    ]


def _npz_bomb(path: Path) -> None:
    """An .npz of a few hundred bytes whose array header declares 64 TiB of float64."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (1 << 20, 1 << 20, 8)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", header.getvalue())


class _Payload:
    """Unpickling this would run code (create the marker folder)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_malformed_inputs_are_rejected_without_touching_outputs(workdir, reference, capsys):
    """Every case: exit code 2, exactly one `dtx: error:` line naming the problem, and no file of the finished run
    folder (config, checkpoints, metrics, samples) changed."""
    from dtx import cli

    run = workdir / "fuzz-run"
    shutil.copytree(reference, run)
    cases = _fuzz_cases(workdir, run)
    assert len(cases) >= 70
    failures = []
    capsys.readouterr()
    for name, argv, fragment in cases:
        before = _digest(run)
        rc = cli.main(argv)
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("dtx: error:")]
        changed = sorted(k for k in set(before) | set(_digest(run)) if before.get(k) != _digest(run).get(k))
        ok = rc == 2 and len(errors) == 1 and lines[-1] == errors[0] and fragment in errors[0] and not changed
        if ok:
            COUNTS["rejected"] += 1
        else:
            failures.append(f"{name}: rc={rc} changed={changed} stderr={lines[-3:]}")
    assert not (workdir / "pwned").exists(), "a config or checkpoint executed code"
    assert not failures, "\n".join(failures)


def test_api_inputs_are_checked(workdir):
    """Tensor shape/dtype/device mistakes in the public model API raise ShapeError with one line."""
    from dtx.errors import DtxError, ShapeError
    from dtx.models import create_model

    model = create_model("DiT", patch_size=4, hidden_size=32, depth=1, num_heads=2, input_size=8, in_channels=1,
                         num_classes=10, learn_sigma=False)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    cases = {
        "channels": ((torch.randn(2, 3, 8, 8), t, y), "[N, 1, H, W]"),
        "rank": ((torch.randn(1, 8, 8), t, y), "[N, 1, H, W]"),
        "dtype": ((x.double(), t, y), "float64"),
        "integer-pixels": ((x.long(), t, y), "int64"),
        "size-not-divisible": ((torch.randn(2, 1, 10, 10), t, y), "not divisible"),
        "timesteps-length": ((x, torch.tensor([1, 2, 3]), y), "t of shape [2]"),
        "float-labels": ((x, t, y.float()), "integer class labels"),
    }
    failures = []
    for name, (args, fragment) in cases.items():
        try:
            model(*args)
            failures.append(f"{name}: accepted")
        except ShapeError as exc:
            if fragment not in str(exc) or "\n" in str(exc):
                failures.append(f"{name}: {exc}")
            else:
                COUNTS["rejected"] += 1
        except Exception as exc:  # noqa: BLE001 - any other error type is the failure being tested for
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    assert issubclass(ShapeError, DtxError)
    assert not failures, "\n".join(failures)


def test_corrupt_checkpoint_file_is_reported_by_sample(workdir, reference, capsys):
    """A run whose every checkpoint is damaged: `dtx sample` names the damage and writes nothing."""
    from dtx import cli

    run = workdir / "all-damaged"
    shutil.copytree(reference, run)
    for ckpt in (run / "checkpoints").glob("step_*"):
        _damage(ckpt, "flip")
    before = _digest(run)
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint"):
        rc = cli.main(["sample", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "dtx: error:" in err and "checkpoint" in err.splitlines()[-1]
    assert _digest(run) == before
    COUNTS["corruptions"] += 1


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(workdir, reference, capsys, caplog):
    """Resume a finished run with an absurd learning rate: the weights blow up, the non-finite steps are skipped and
    counted, the run stops with the step number, and every checkpoint written before is left as it was."""
    from dtx import cli

    run = workdir / "nonfinite"
    shutil.copytree(reference, run)
    before = _digest(run / "checkpoints")
    capsys.readouterr()
    rc = cli.main(["train", str(workdir / "tiny.yaml"), "--out", str(run), "--runner", "local",
                   "--max-steps", str(MAX_STEPS + 4), "optim.lr=3e37", "max_nonfinite=2"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dtx: error:")]
    assert rc == 2 and len(lines) == 1, lines
    assert [r.getMessage().count("step skipped") for r in caplog.records if "non-finite" in r.getMessage()] == [1, 1]
    assert re.search(r"not finite at step \d+", lines[0]) and f"step_{MAX_STEPS:08d}" in lines[0], lines[0]
    after = _digest(run / "checkpoints")
    assert {k: v for k, v in after.items() if k in before} == before
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["streak"] for e in events if e.get("event") == "nonfinite"] == [1, 2]


# -- issue 15: one writer per run folder, poisoned updates, unreadable state ------------------------------------------

def test_a_second_writer_is_refused_at_once_and_a_killed_holder_never_blocks(workdir):
    """While one `dtx train` runs, a second into the same --out exits 2 naming the first one's PID and touches
    nothing (no checkpoint deleted, no line added to metrics.jsonl); after the first is SIGKILLed its lock is gone
    and the next run resumes."""
    run = workdir / "locked"
    log = workdir / "locked-first.log"
    with open(log, "w") as err:
        first = subprocess.Popen(_train_cmd(workdir / "tiny.yaml", run, "--max-steps", "100000"), env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait(first, log, "the first checkpoint", lambda: len(_complete_checkpoints(run)) >= 1)
        before = _losses(run)
        started = time.monotonic()
        second = subprocess.run(_train_cmd(workdir / "tiny.yaml", run), env=ENV, capture_output=True, text=True,
                                timeout=STARTUP_TIMEOUT)
        elapsed = time.monotonic() - started
        errors = [line for line in second.stderr.splitlines() if line.startswith("dtx: error:")]
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-2000:]
        assert f"pid {first.pid}" in errors[0] and str(run) in errors[0], errors[0]
        # the first run's metrics only ever grow by its own consecutive steps
        after = _losses(run)
        assert after[:len(before)] == before and [s for s, _ in after] == list(range(1, len(after) + 1))
        assert first.poll() is None, "the first run must keep running"
        COUNTS["concurrent"] += 1
        print(f"second writer refused after {elapsed:.1f}s")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    resumed_from = _complete_checkpoints(run)[-1]
    third = subprocess.run(_train_cmd(workdir / "tiny.yaml", run, "--max-steps", str(resumed_from + 1)), env=ENV,
                           capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
    assert third.returncode == 0, third.stderr[-2000:]
    assert _resumed_at(third.stderr) == resumed_from


def test_a_poisoned_update_is_caught_and_never_saved(workdir, reference, capsys, monkeypatch):
    """An update that leaves non-finite weights although its loss was finite (injected: the third optimizer step of
    the resumed run writes a NaN into one weight, as an overflowing update or a hardware fault would). The run stops
    at that step with exit 2, before the checkpoint that step would have written, names the last good checkpoint,
    and every checkpoint left holds finite tensors and still samples."""
    from dtx import cli

    run = workdir / "poisoned"
    shutil.copytree(reference, run)
    before = _digest(run / "checkpoints")
    original, updates = torch.optim.AdamW.step, []

    def poisoned_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == CKPT_EVERY:  # the update of step MAX_STEPS + 3, which ends with a checkpoint
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    capsys.readouterr()
    rc = cli.main(["train", str(workdir / "tiny.yaml"), "--out", str(run), "--runner", "local",
                   "--max-steps", str(MAX_STEPS + 6)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dtx: error:")]
    assert rc == 2 and len(lines) == 1, err[-2000:]
    poisoned = MAX_STEPS + CKPT_EVERY
    assert f"update of step {poisoned} made weights non-finite" in lines[0], lines[0]
    assert f"last good checkpoint: {run / 'checkpoints' / f'step_{MAX_STEPS:08d}'}" in lines[0], lines[0]
    assert _digest(run / "checkpoints") == before  # no checkpoint of step 27 (nor any other) was written
    for ckpt in (run / "checkpoints").glob("step_*"):
        for name in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / name)).values()), ckpt
    rc = cli.main(["sample", str(run), "--steps", "2", "--n-per-class", "1", "--out", str(workdir / "p.png")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    images = np.load(workdir / "p.npz")["arr_0"]
    assert images.std() > 0, "samples of the last good checkpoint must not be blank"
    COUNTS["poisoned"] += 1


@pytest.mark.parametrize("damage", ["state-json", "pickle-bomb"])
def test_unreadable_newest_state_falls_back_to_the_previous_checkpoint(workdir, reference, capsys, damage):
    """The newest checkpoint's state is unreadable (garbage JSON) or a plain-data bomb in an old-format state.pt,
    with the manifest's hashes updated to match: resume and `dtx sample` skip it with a warning and use the
    previous intact one, quickly."""
    from dtx import cli

    run = workdir / f"unreadable-{damage}"
    shutil.copytree(reference, run)
    newest = run / "checkpoints" / f"step_{MAX_STEPS:08d}"
    manifest = json.loads((newest / "manifest.json").read_text())
    if damage == "state-json":
        (newest / "state.json").write_text('{"step": [1, 2')
    else:
        bomb = [0]
        for _ in range(60):
            bomb = [bomb, bomb]
        (newest / "state.json").unlink()
        del manifest["files"]["state.json"]
        torch.save({"step": MAX_STEPS, "config": {"bomb": bomb}}, newest / "state.pt")
        manifest["version"] = 1
        manifest["files"]["state.pt"] = {}
    for name in manifest["files"]:
        data = (newest / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match=f"skipping damaged checkpoint .*step_{MAX_STEPS:08d}"):
        rc = cli.main(["sample", str(run), "--steps", "2", "--n-per-class", "1",
                       "--out", str(workdir / f"u-{damage}.png")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 21
    assert time.monotonic() - started < 60
    COUNTS["corruptions"] += 1
