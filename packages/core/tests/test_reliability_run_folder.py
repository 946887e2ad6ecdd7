"""Issue 29, run folders and checkpoints: stray files never restart a run, unusable checkpoints are never deleted,
no run file is opened through a symbolic link, ``train --out`` and ``convert`` never overwrite folders that are not
theirs, crafted steps are damage, nothing is read from outside a checkpoint or model folder, and the files of one
sample land together or not at all on a full disk.

conftest's tiny denoiser and its 24 ramp images are registered as a run-time plugin, so these tests need no
backbone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dtx.cli import main
from dtx.errors import CheckpointError, ConfigError


@pytest.fixture(autouse=True)
def tiny_plugin(tiny_denoiser):
    tiny_denoiser("tiny-test", "tiny-denoiser", {"tiny-data": {"ramp": True}})


@pytest.fixture
def recipe(write_tiny_recipe) -> Path:
    return write_tiny_recipe("tiny-denoiser", "tiny-data", max_steps=4, keep_last=5)


def train(recipe: Path, out: Path, *extra: str) -> int:
    return main(["train", str(recipe), "--runner", "local", "--out", str(out), *extra])


def error_line(capsys) -> str:
    """The CLI's one error line (progress bars and warnings dropped); fails unless there is exactly one."""
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.startswith("dtx: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links by their target text), by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def rehash(ckpt: Path) -> None:
    """Recompute the manifest's sizes and hashes after a deliberate edit, so only the edit itself can be caught."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def run(recipe: Path, tmp_path: Path, capsys) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    assert train(recipe, out) == 0
    capsys.readouterr()
    return out


# -- finding 1: stray files and unusable checkpoints ------------------------------------------------------------------

def test_stray_files_in_every_checkpoint_are_ignored_and_the_run_resumes(recipe, run, capsys):
    for ckpt in (run / "checkpoints").glob("step_*"):
        (ckpt / ".DS_Store").write_bytes(b"\0\1")
        (ckpt / "grid.png").write_bytes(b"not part of the checkpoint")
    assert train(recipe, run, "--max-steps", "6") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["steps_run"] == 2  # resumed at step 4, not from scratch
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "step_00000002" / "grid.png").is_file()


def test_all_checkpoints_unusable_stops_with_exit_2_naming_them_and_changes_nothing(recipe, run, capsys):
    for ckpt in (run / "checkpoints").glob("step_*"):  # a newer dtx wrote them
        manifest = json.loads((ckpt / "manifest.json").read_text())
        (ckpt / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    before = digest(run)
    assert train(recipe, run, "--max-steps", "6") == 2
    err = error_line(capsys)
    assert "none is usable" in err and "step_00000004: unsupported checkpoint format version 99" in err
    assert "step_00000002" in err
    assert digest(run) == before and metric_steps(run) == [1, 2, 3, 4]


def test_a_skipped_checkpoint_is_never_deleted(tmp_path):
    from dtx.checkpoint import CheckpointManager

    for step in (10, 20):
        CheckpointManager(tmp_path).save(step, {"model": {"w": torch.full((4,), float(step))}, "step": step})
    newer = tmp_path / "step_00000020"
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "version": 3}))
    mgr = CheckpointManager(tmp_path, keep_last=1)
    kept = digest(newer)
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint .*step_00000020"):
        assert mgr.latest() == tmp_path / "step_00000010"
    mgr.save(15, {"step": 15})  # resumed from 10: the skipped newer one stays where it is
    assert digest(newer) == kept
    mgr.save(20, {"step": 20})  # reaching its step: it is set aside, not replaced
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("skipped-step_00000020-")]
    assert len(aside) == 1 and digest(aside[0]) == kept
    mgr.save(30, {"step": 30})  # retention (keep_last=1) never touches it either
    assert [p.name for p in mgr.list()] == ["step_00000030"] and digest(aside[0]) == kept


def test_sample_never_writes_into_a_checkpoint_folder(run, capsys):
    ckpt = run / "checkpoints" / "step_00000004"
    before = digest(run)
    for out in (ckpt / "grid.png", run / "checkpoints" / "grid.png", ckpt / "sub" / "grid.png"):
        assert main(["sample", str(ckpt), "--steps", "2", "--out", str(out)]) == 2
        err = error_line(capsys)
        assert f"--out {out} lies in the checkpoint folder" in err
    assert digest(run) == before
    # a checkpoint folder outside a run: the default output goes beside it, never into it
    lone = run.parent / "lone" / "step_00000004"
    shutil.copytree(ckpt, lone)
    assert main(["sample", str(lone), "--steps", "2", "--n-per-class", "1"]) == 0
    assert sorted(p.name for p in lone.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    assert (lone.parent / "samples" / "sample.png").is_file()


# -- finding 2: symbolic links in a run folder ------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".dtx-lock", "metrics.jsonl", "config.yaml", "loss.png", "samples", "checkpoints",
                                  "checkpoints/latest"])
@pytest.mark.parametrize("dangling", [False, True])
def test_no_run_file_is_opened_through_a_symbolic_link(recipe, run, tmp_path, capsys, name, dangling):
    victim = tmp_path / "victim"  # e.g. ~/.bashrc
    if not dangling:
        if name in ("samples", "checkpoints"):
            victim.mkdir()
            (victim / "keep.txt").write_text("precious\n")
        else:
            victim.write_text("precious\n")
    entry = run / name
    if entry.is_dir():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)
    entry.symlink_to(victim)
    before_run, before_victim = digest(run), digest(tmp_path / "victim") if victim.is_dir() else None
    victim_text = victim.read_text() if victim.is_file() else None
    assert train(recipe, run, "--max-steps", "6") == 2
    err = error_line(capsys)
    assert f"{entry} is a symbolic link" in err
    assert digest(run) == before_run
    assert victim.exists() == (not dangling)  # a dangling link never creates its target
    if victim.is_file():
        assert victim.read_text() == victim_text
    elif victim.is_dir():
        assert digest(victim) == before_victim


def test_metrics_and_atomic_writes_refuse_links(tmp_path):
    from dtx.io import atomic_write_text
    from dtx.training.metrics import MetricsLog

    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "outside.jsonl")
    with pytest.raises(ConfigError, match="metrics.jsonl is a symbolic link"):
        MetricsLog(tmp_path / "metrics.jsonl", True).write({"step": 1})
    with pytest.raises(ConfigError, match="metrics.jsonl is a symbolic link"):
        MetricsLog(tmp_path / "metrics.jsonl", True).rewind(0)
    (tmp_path / "target.txt").write_text("precious\n")
    (tmp_path / "config.yaml").symlink_to(tmp_path / "target.txt")
    with pytest.raises(ConfigError, match="config.yaml is a symbolic link"):
        atomic_write_text(tmp_path / "config.yaml", "x: 1\n")
    assert not (tmp_path / "outside.jsonl").exists() and (tmp_path / "target.txt").read_text() == "precious\n"


# -- finding 4: train --out and convert never overwrite folders that are not theirs -----------------------------------

def test_train_out_refuses_a_folder_that_is_not_a_run(recipe, run, tmp_path, capsys):
    import dtx

    project = tmp_path / "proj"
    project.mkdir()
    (project / "config.yaml").write_text("name: my project\n")
    model_folder = tmp_path / "model"
    dtx.save_model(dtx.load_model(run), model_folder)
    for folder in (project, model_folder):
        before = digest(folder)
        assert train(recipe, folder) == 2
        err = error_line(capsys)
        assert f"run folder {folder} is not empty" in err and "not a dtx run folder" in err
        assert digest(folder) == before and not (folder / ".dtx-lock").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(recipe, empty, "--max-steps", "2") == 0  # an empty folder is fine, a run folder resumes
    assert train(recipe, empty, "--max-steps", "3") == 0 and metric_steps(empty) == [1, 2, 3]


def test_convert_refuses_an_output_folder_with_files(run, tmp_path, capsys):
    import dtx

    other = tmp_path / "other-model"
    dtx.save_model(dtx.load_model(run), other)
    project = tmp_path / "proj"
    project.mkdir()
    (project / "config.yaml").write_text("name: my project\n")
    second = tmp_path / "second-run"
    shutil.copytree(run, second)
    for folder in (other, project, second):
        before = digest(folder)
        assert main(["convert", str(run), str(folder)]) == 2
        err = error_line(capsys)
        assert f"output {folder} exists and is not an empty folder" in err
        assert digest(folder) == before
    assert main(["convert", str(run), str(tmp_path / "new")]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["config.yaml", "model.safetensors"]


# -- finding 11: crafted steps in state.json --------------------------------------------------------------------------

@pytest.mark.parametrize("step", ["1e400", '"six"', "-5", "1e30", "4.0", "3", "true"])
def test_a_crafted_step_is_damage_and_the_previous_checkpoint_is_used(recipe, run, capsys, step):
    newest = run / "checkpoints" / "step_00000004"
    text = (newest / "state.json").read_text()
    state = json.loads(text)
    assert state["step"] == 4
    (newest / "state.json").write_text(text.replace('"step": 4,', f'"step": {step},', 1))
    rehash(newest)
    assert main(["sample", str(run), "--steps", "2", "--n-per-class", "1"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 2 and printed["source"].endswith("step_00000002")
    before = digest(newest)
    assert train(recipe, run, "--max-steps", "6") == 0  # resumes from step 2; metrics rewound there, not emptied
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]
    assert {p.stem for p in (run / "samples").iterdir()} == {"sample", "step_0000004", "step_0000006"}
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("skipped-step_00000004-")]
    assert len(aside) == 1 and digest(aside[0]) == before  # the damaged one is kept aside, not deleted


def test_step_folder_names_beyond_any_run_are_damage(tmp_path):
    from dtx.checkpoint import CheckpointManager, verify

    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"step": 1})
    huge = 10**30
    mgr.save(huge, {"step": huge})
    assert "over" in verify(tmp_path / f"step_{huge:08d}")
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint"):
        assert mgr.latest() == tmp_path / "step_00000001"


# -- finding 12: nothing is read from outside a checkpoint or model folder --------------------------------------------

def test_symlinked_checkpoint_files_and_step_folders_are_skipped(run, tmp_path, capsys):
    from dtx.checkpoint import CheckpointManager, load_checkpoint

    ckpts = run / "checkpoints"
    outside = tmp_path / "outside"
    shutil.copytree(ckpts / "step_00000004", outside)
    (ckpts / "step_00000006").symlink_to(outside)  # a step folder that is a link out of the folder
    with pytest.warns(RuntimeWarning, match="step_00000006: the step folder is a symbolic link"):
        assert CheckpointManager(ckpts).latest() == ckpts / "step_00000004"
    weights = ckpts / "step_00000004" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "model.safetensors")  # a file that is a link out of the folder
    with pytest.warns(RuntimeWarning, match="model.safetensors is a symbolic link"):
        assert CheckpointManager(ckpts).latest() == ckpts / "step_00000002"
    with pytest.raises(CheckpointError, match="model.safetensors is a symbolic link"):
        load_checkpoint(ckpts / "step_00000004")
    assert main(["sample", str(run), "--steps", "2", "--n-per-class", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2


@pytest.mark.parametrize("entry", ["absolute", "parent", "link"])
def test_a_diffusers_shard_index_entry_outside_its_folder_is_refused(tmp_path, entry):
    from safetensors.torch import save_file

    from dtx.diffusers_interop import WEIGHTS_INDEX, read_weights

    model_dir = tmp_path / "transformer"
    model_dir.mkdir()
    elsewhere = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.zeros(2)}, str(elsewhere))
    save_file({"v": torch.zeros(2)}, str(model_dir / "part-1.safetensors"))
    shard = {"absolute": str(elsewhere), "parent": "../elsewhere.safetensors", "link": "part-2.safetensors"}[entry]
    if entry == "link":
        (model_dir / "part-2.safetensors").symlink_to(elsewhere)
    (model_dir / WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"v": "part-1.safetensors", "w": shard}}))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_INDEX}: shard '{shard}' is outside the model folder"):
        read_weights(model_dir)
    (model_dir / WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"v": "part-1.safetensors"}}))
    assert list(read_weights(model_dir)) == ["v"]


# -- finding 15: a full disk names the file, and one sample's files land together ---------------------------------------

def _enospc_on(monkeypatch, suffix: str) -> None:
    """Make the write of the file ending in ``suffix`` fail as a full disk does: ENOSPC from ``write()``, no name."""
    from dtx import writers

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if suffix == ".png":
        monkeypatch.setattr(writers, "_pil_image", lambda arr: types.SimpleNamespace(save=fail))
    else:
        monkeypatch.setattr(np, "savez", fail)


@pytest.mark.parametrize("suffix", [".npz", ".png"])
def test_a_full_disk_names_the_file_and_leaves_no_partial_sample(run, tmp_path, monkeypatch, capsys, suffix):
    out = tmp_path / "grids" / "grid.png"
    out.parent.mkdir()
    old = {"grid.png": b"old grid", "grid.npz": b"old archive"}
    for name, data in old.items():
        (out.parent / name).write_bytes(data)
    _enospc_on(monkeypatch, suffix)
    assert main(["sample", str(run), "--steps", "2", "--n-per-class", "1", "--out", str(out)]) == 2
    assert error_line(capsys) == f"dtx: error: no space left on device writing {out.with_suffix(suffix)}"
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == old  # no new file, no temporary, old ones kept
    monkeypatch.undo()
    fresh = tmp_path / "fresh" / "sub" / "grid.png"
    _enospc_on(monkeypatch, suffix)
    assert main(["sample", str(run), "--steps", "2", "--n-per-class", "1", "--out", str(fresh)]) == 2
    capsys.readouterr()
    assert not (tmp_path / "fresh" / "sub").exists()  # the folders made for the files are gone again


def test_video_sample_files_land_together(tmp_path, monkeypatch):
    """The archive, the frame grid and the first GIF are written before the MP4 fails: none of them remains."""
    from dtx import writers
    from dtx.training.sampling import Samples, write_samples

    samples = Samples(torch.rand(2, 3, 1, 8, 8) * 2 - 1, {}, per_subject=2, channel_dim=2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers, "save_mp4", full)
    with pytest.raises(OSError):
        write_samples(samples, tmp_path / "v.png")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(writers, "save_mp4", lambda video, path, fps: writers.atomic_write(path, lambda t: t.touch()))
    written = write_samples(samples, tmp_path / "v.png")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["sample_000.gif", "sample_000.mp4", "sample_001.gif",
                                                              "sample_001.mp4"]
    assert Path(written["npz"]).is_file() and Path(written["grid"]).is_file()


def test_metrics_append_names_the_file_on_a_full_disk(tmp_path, monkeypatch):
    import builtins

    from dtx.training.metrics import MetricsLog

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    import dtx.training.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError) as info:
        MetricsLog(tmp_path / "metrics.jsonl", True).write({"step": 1})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "metrics.jsonl")
