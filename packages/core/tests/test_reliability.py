"""Issue 15, unit level: config values checked before anything is written, environment interpolation off, the
run-folder lock, the non-finite update guard, label rules, untrusted-file limits, and the CLI's error lines."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dtx.errors import ConfigError, DataError, RunLockedError, TrainingError
from dtx.training.config import load_train_config


# -- config ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("sample.cfg=nan", "sample.cfg"),
    ("optim.betas=[1.5,0.9]", "optim.betas"), ("optim.betas=[0.9,-0.1]", "optim.betas"), ("optim.eps=-1", "optim.eps"),
    ("optim.eps=0", "optim.eps"), ("optim.eps=1e39", "optim.eps"), ("optim.lr=1e38", "optim.lr"),
    ("optim.weight_decay=1e43", "optim.weight_decay"), ("optim.weight_decay=-0.5", "optim.weight_decay"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("objective.p_std=-1", "objective.p_std"),
    ("optim.decay_steps=-1", "optim.decay_steps"), ("optim.decay_to=1.5", "optim.decay_to"),
    ("objective.sigma_data=0", "objective.sigma_data"), ("data.num_workers=-1", "data.num_workers"),
    (f"seed={10**24}", "seed"), ("seed=-1", "seed"), ("sample.guide_channels=0", "sample.guide_channels"),
    ("sample.classes=[0,-2]", "sample.classes"), ("max_minutes=inf", "max_minutes"),
    ("ema.decay=nan", "ema.decay"), ("objective.weighting_options={gamma: .inf}", "objective.weighting_options.gamma"),
    ("sample.guidance=[{keys: [y], scale: .nan}]", "sample.guidance[0].scale"),
    ("objective.diffusion_steps=0", "objective.diffusion_steps"), ("objective.rho=0", "objective.rho"),
])
def test_every_bad_value_is_a_config_error_naming_its_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")) as info:
        load_train_config([override])
    assert "\n" not in str(info.value)


def test_free_form_options_may_hold_infinity():
    """Only float-typed schema fields must be finite; e.g. a sampler's s_tmax=inf is a legitimate option."""
    cfg = load_train_config(["sample.sampler_options={s_tmax: .inf}"])
    assert cfg.sample.sampler_options["s_tmax"] == float("inf")


def test_environment_interpolation_is_refused_and_never_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("DTX_SECRET_TEST", "hunter2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  options: {root: '${oc.env:DTX_SECRET_TEST}'}\n")
    with pytest.raises(ConfigError, match=r"'data.options.root' reads an environment variable") as info:
        load_train_config(recipe)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="'out'"):
        load_train_config(["out=${oc.env:HOME}"])
    # ordinary interpolation between keys still works
    assert load_train_config(["sample.steps=7", "max_steps=${sample.steps}"]).max_steps == 7


# -- labels and the null class ---------------------------------------------------------------------------------------

def _info(num_classes: int):
    from dtx.data.info import DataInfo

    return DataInfo(channels=1, height=8, width=8, num_classes=num_classes, fields=("y",) if num_classes else ())


@pytest.mark.parametrize("model_classes, null, data_classes, ok", [
    (3, 3, 3, True), (10, 10, 3, True), (2, 2, 3, False), (3, 1, 3, False), (1, None, 0, True)])
def test_data_labels_must_be_model_classes_and_never_the_null_class(model_classes, null, data_classes, ok):
    from dtx.training.checks import check_labels

    model = SimpleNamespace(num_classes=model_classes, null_class=null)
    if ok:
        check_labels(_info(data_classes), model)
    else:
        with pytest.raises(ConfigError, match="model.options.num_classes"):
            check_labels(_info(data_classes), model)


# -- non-finite update guard -----------------------------------------------------------------------------------------

def test_nonfinite_parameters_names_exactly_the_poisoned_tensors():
    from dtx.training.guards import check_update, nonfinite_parameters

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[0].bias[1] = float("nan")
        model[1].weight[0, 2] = float("-inf")
    assert nonfinite_parameters(model) == ["0.bias", "1.weight"]
    with pytest.raises(TrainingError, match=r"update of step 7 .*parameters: 0.bias, 1.weight.*"
                                            r"last good checkpoint: /run/checkpoints/step_00000005"):
        check_update(7, model, nn.Linear(1, 1), Path("/run/checkpoints/step_00000005"))
    ema = nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.fill_(float("inf"))
    with pytest.raises(TrainingError, match=r"EMA: weight.*no checkpoint was written"):
        check_update(1, nn.Linear(1, 1), ema, None)



def test_nonfinite_parameters_does_not_name_huge_finite_values():
    """The cheap 2-norm screen overflows for finite values beyond ~1e19; the exact re-check must clear them."""
    from dtx.training.guards import nonfinite_parameters

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, but its squares are not
        model[1].bias[0] = float("nan")
    assert torch.isfinite(model[0].weight).all()
    assert nonfinite_parameters(model) == ["1.bias"]

# -- run-folder lock -------------------------------------------------------------------------------------------------

_HOLD = ("import sys, time; from dtx.training.lock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
         "print('locked', flush=True); time.sleep(600)")


def test_lock_refuses_a_second_holder_with_its_pid_and_a_killed_holder_never_blocks(tmp_path):
    from dtx.training.lock import LOCK_FILE, RunLock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(RunLockedError, match=rf"{run} is in use by pid {holder.pid} on "):
            RunLock(run).acquire()
        assert time.monotonic() - started < 1.0  # refused at once, no waiting
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (run / LOCK_FILE).read_text().startswith(f"pid {holder.pid}")  # the stale file is still there ...
    with RunLock(run):  # ... and does not block
        assert (run / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


def test_a_folder_created_only_for_the_lock_is_removed_again(tmp_path):
    from dtx.training.lock import RunLock

    with RunLock(tmp_path / "new"):
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()
    with RunLock(tmp_path / "kept"):
        (tmp_path / "kept" / "metrics.jsonl").write_text("{}\n")
    assert (tmp_path / "kept" / "metrics.jsonl").is_file()
    with RunLock(tmp_path / "off", enabled=False):
        assert not (tmp_path / "off").exists()


# -- limits on untrusted files ---------------------------------------------------------------------------------------

def test_npz_headers_are_checked_against_the_file_before_allocation(tmp_path):
    from dtx.file_headers import npz_members

    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    assert npz_members(tmp_path / "ok.npz") == {"arr_0": ((2, 4, 4, 3), np.dtype(np.uint8))}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 40,)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        archive.writestr("arr_0.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(DataError, match=r"bomb.npz: array 'arr_0' declares shape \(1099511627776,\)"):
        npz_members(tmp_path / "bomb.npz")


def test_safetensors_headers_are_checked_against_the_file(tmp_path):
    import json

    from dtx.file_headers import safetensors_header
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(4)}, str(tmp_path / "ok.safetensors"))
    assert safetensors_header(tmp_path / "ok.safetensors")["x"]["shape"] == [4]
    for name, header in [("huge", {"x": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}),
                         ("lying", {"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}),
                         ("negative", {"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})]:
        text = json.dumps(header).encode()
        (tmp_path / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 16)
        with pytest.raises(DataError, match=f"{name}.safetensors"):
            safetensors_header(tmp_path / f"{name}.safetensors")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 1 << 50) + b"{}")
    with pytest.raises(DataError, match="does not fit the file"):
        safetensors_header(tmp_path / "long.safetensors")


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose IHDR is rewritten to claim ``width`` x ``height`` (CRC fixed)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_images_over_the_pixel_limit_are_refused_from_their_header(tmp_path):
    from dtx.data.images import ImageFolderDataset
    from dtx.file_headers import MAX_IMAGE_PIXELS

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        _png_claiming(tmp_path / c / "huge.png", 30000, 30000)
    assert 30000 * 30000 > MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match="2 of 2 images .* are unreadable"):
        ImageFolderDataset(tmp_path, image_size=8)


# -- CLI error lines -------------------------------------------------------------------------------------------------

def _cli_with(monkeypatch, capsys, exc: BaseException, partial: str = "") -> tuple[int, str]:
    """Run `dtx` with a command that writes ``partial`` to stderr (a progress bar mid-line) and raises ``exc``."""
    import argparse

    from dtx import cli

    def run(args):
        sys.stderr.write(partial)
        raise exc

    parser = argparse.ArgumentParser()
    parser.set_defaults(_run=run)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    capsys.readouterr()
    rc = cli.main([])
    return rc, capsys.readouterr().err


def test_an_error_after_a_progress_bar_starts_its_own_line(monkeypatch, capsys):
    rc, err = _cli_with(monkeypatch, capsys, ConfigError("bad"), partial="\rtrain:  40%|####  | 4/10")
    assert rc == 2 and err.splitlines()[-1] == "dtx: error: bad"
    rc, err = _cli_with(monkeypatch, capsys, ConfigError("bad"), partial="done\n")
    assert err == "done\ndtx: error: bad\n"


def test_error_kinds_and_exit_codes(monkeypatch, capsys):
    # a message that merely mentions memory is not an out-of-memory error: it is named by its type, exit 1
    rc, err = _cli_with(monkeypatch, capsys, RuntimeError("the agent is killed by the OS (e.g., out of memory)"))
    assert rc == 1 and err.startswith("dtx: error: RuntimeError: the agent is killed") and "reduce" not in err
    rc, err = _cli_with(monkeypatch, capsys, OSError(errno.ENOSPC, "No space left on device", "/data/run/x"))
    assert rc == 2 and err == "dtx: error: no space left on device writing /data/run/x\n"
    rc, err = _cli_with(monkeypatch, capsys, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert rc == 1 and err.startswith("dtx: error: out of GPU memory")
    rc, err = _cli_with(monkeypatch, capsys, RunLockedError("run folder x is in use by pid 1"))
    assert rc == 2
