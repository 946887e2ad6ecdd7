"""Evaluation-scale sample sets (``dtx sample RUN --num-samples N --out set.npz``): one ADM-format archive with
per-sample seeds, the same however it is split into processes, resumed after a kill without repeating or losing a
sample, any sample regenerated alone; a partly written set with other settings is refused before anything is
written. The Ray-worker split is tested in dtx-runner-ray's tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dtx.cli import main
from dtx.diffusion.noise import per_sample_generators, randn, randn_like

TINY = {
    "model": {"name": "DiT", "options": {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 4,
                                         "learn_sigma": False}},
    "data": {"name": "digits", "options": {"image_size": 8}, "batch_size": 16},
    "optim": {"lr": 1e-3},
    "sample": {"steps": 3, "n_per_class": 1, "sampler": "ddpm"},
    "max_steps": 2,
    "log_every": 1,
    "ckpt_every": 2,
    "precision": "fp32",
}
DTX = str(Path(sys.executable).parent / "dtx")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sets")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["train", str(root / "tiny.yaml"), "--runner", "local", "--out", str(root / "run")]) == 0
    return root / "run"


def sample_set(capsys, run: Path, out: Path, *extra: str) -> dict:
    assert main(["sample", str(run), "--out", str(out), "--seed", "5", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    rows = randn((3, 2, 4), per_sample_generators([7, 8, 9]))
    alone = randn((1, 2, 4), per_sample_generators([8]))
    assert torch.equal(rows[1:2], alone)
    assert torch.equal(rows[0], torch.randn((2, 4), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(randn_like(rows, per_sample_generators([7, 8, 9])), rows)
    with pytest.raises(ValueError, match="one per sample"):
        randn((2, 3), per_sample_generators([1]))


def test_a_set_is_one_adm_archive_with_seeds_and_balanced_classes(run, tmp_path, capsys):
    summary = sample_set(capsys, run, tmp_path / "set.npz", "--num-samples", "23", "--batch-size", "8")
    assert (summary["n"], summary["sampled"], summary["resumed"]) == (23, 23, 0)
    z = load(tmp_path / "set.npz")
    assert z["arr_0"].shape == (23, 8, 8, 1) and z["arr_0"].dtype == np.uint8
    assert z["labels"].tolist() == [i % 10 for i in range(23)]
    assert z["seeds"].tolist() == [5 * 2 ** 32 + i for i in range(23)]
    assert not (tmp_path / "set.npz.parts").exists()

    # other batch sizes cut other chunks: the same samples to float rounding (uint8 pixels within one level)
    again = sample_set(capsys, run, tmp_path / "b5.npz", "--num-samples", "23", "--batch-size", "5")
    assert again["n"] == 23
    other = load(tmp_path / "b5.npz")
    assert np.abs(other["arr_0"].astype(int) - z["arr_0"].astype(int)).max() <= 1
    assert other["labels"].tolist() == z["labels"].tolist()


def test_any_sample_is_regenerated_alone(run, tmp_path, capsys):
    sample_set(capsys, run, tmp_path / "set.npz", "--num-samples", "12", "--batch-size", "4")
    assert main(["sample", str(run), "--seed", "5", "--sample-index", "9", "--sample-index", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "alone.png")]) == 0
    alone, z = load(tmp_path / "alone.npz"), load(tmp_path / "set.npz")
    assert alone["labels"].tolist() == [9, 2]
    assert np.array_equal(alone["arr_0"], z["arr_0"][[9, 2]])


def test_a_killed_set_resumes_without_repeating_or_losing_a_sample(run, tmp_path, capsys):
    whole = sample_set(capsys, run, tmp_path / "whole.npz", "--num-samples", "40", "--batch-size", "4",
                       "--steps", "200")
    assert whole["sampled"] == 40
    out = tmp_path / "killed.npz"
    argv = [DTX, "sample", str(run), "--out", str(out), "--seed", "5", "--num-samples", "40", "--batch-size", "4",
            "--steps", "200"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    parts = tmp_path / "killed.npz.parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("chunk-*.npz"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("chunk-*.npz")))
    assert 3 <= done_before < 10 and not out.exists(), "the run should be killed part way"

    summary = sample_set(capsys, run, out, "--num-samples", "40", "--batch-size", "4", "--steps", "200")
    assert summary["resumed"] == 4 * done_before and summary["sampled"] == 40 - 4 * done_before
    assert {k: v.tolist() for k, v in load(out).items()} == {k: v.tolist() for k, v in
                                                              load(tmp_path / "whole.npz").items()}


class Stopped(Exception):
    pass


def stop_after_plan(run: Path, out: Path, monkeypatch, *extra: str) -> Path:
    """A set whose process died after writing its plan and before its first chunk; returns its parts folder."""
    from dtx.training import sample_set

    def die(job, chunks=None, rank=0):
        raise Stopped()

    with monkeypatch.context() as m:
        m.setattr(sample_set, "run_job", die)
        assert main(["sample", str(run), "--out", str(out), "--seed", "5", *extra]) == 1  # an internal failure
    parts = out.with_name(out.name + ".parts")
    assert [p.name for p in parts.iterdir()] == ["plan.json"]
    return parts


def test_a_torn_chunk_is_sampled_again(run, tmp_path, capsys, monkeypatch):
    sample_set(capsys, run, tmp_path / "whole.npz", "--num-samples", "8", "--batch-size", "4")
    out = tmp_path / "torn.npz"
    parts = stop_after_plan(run, out, monkeypatch, "--num-samples", "8", "--batch-size", "4")
    (parts / "chunk-000000.npz").write_bytes(b"PK\x03\x04 torn")
    summary = sample_set(capsys, run, out, "--num-samples", "8", "--batch-size", "4")
    assert (summary["sampled"], summary["resumed"]) == (8, 0)
    assert np.array_equal(load(out)["arr_0"], load(tmp_path / "whole.npz")["arr_0"])


def test_a_partly_written_set_with_other_settings_is_refused_and_kept(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "set.npz"
    parts = stop_after_plan(run, out, monkeypatch, "--num-samples", "8", "--batch-size", "4")
    (parts / "chunk-000000.npz").write_bytes(b"kept")
    capsys.readouterr()
    assert main(["sample", str(run), "--out", str(out), "--seed", "5", "--num-samples", "8", "--batch-size", "4",
                 "--steps", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtx: error:") and "plan.json" in err and "settings (settings)" in err
    assert (parts / "chunk-000000.npz").read_bytes() == b"kept" and not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--num-samples", "0"], "--num-samples"),
    (["--num-samples", "4", "--out", "x.png"], ".npz"),
    (["--workers", "2"], "--num-samples"),
    (["--sample-index", "-1"], "--sample-index"),
    (["--precision", "fp16", "--device", "cpu"], "--precision"),
])
def test_bad_set_options_are_refused_before_anything_is_written(run, tmp_path, capsys, argv, fragment):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["sample", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtx: error:") and fragment in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
