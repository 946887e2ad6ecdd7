"""Checkpoint manager: atomic layout, manifest, retention, damage detection, SIGKILL during saves, RNG, safe loading."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dtx.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state, verify
from dtx.errors import CheckpointError, DtxError
from dtx.models import load_model, read_safe
from dtx.preemption import StopOnSignal, stop_on_signals, stop_requested


def _training_state(step: int) -> dict:
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).square().mean().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "ema": {k: v.clone().to(torch.bfloat16) for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "step": step,
        "data": {"epoch": 1, "index": 17},
        "config": {"lr": 1e-3, "model": {"name": "DiT-S/2", "depth": 2}, "betas": [0.9, 0.95]},
        "rng": rng_state(),
        "counts": torch.arange(5),
    }


def _assert_same(a, b, where="state"):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_round_trip_preserves_structure_dtypes_and_order(tmp_path):
    state = _training_state(3)
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, state)
    assert path == tmp_path / "step_00000003"
    _assert_same(state, mgr.load())
    _assert_same(state, mgr.load(path))


def test_layout_manifest_and_pointer(tmp_path):
    state = _training_state(7)
    path = CheckpointManager(tmp_path).save(7, state)
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk == ["ema.safetensors", "model.safetensors", "state.json",
                                                    "state.safetensors"]
    assert manifest["version"] == 2
    for name, meta in manifest["files"].items():
        data = (path / name).read_bytes()
        assert meta["size"] == len(data)
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    # tensors readable by plain safetensors, the rest is JSON: no pickle anywhere
    assert torch.equal(load_file(str(path / "model.safetensors"))["0.weight"], state["model"]["0.weight"])
    rest = json.loads((path / "state.json").read_text())
    assert rest["step"] == 7 and rest["config"]["model"]["depth"] == 2
    inner = load_file(str(path / "state.safetensors"))  # optimizer moments, RNG states, loose tensors
    assert len(inner) == 4 * 3 + 1 + 1 + (1 if "cuda" in state["rng"] else 0)  # 4 params x (step, m, v), RNG, counts
    assert not any(b"\x80\x02" in (path / f).read_bytes()[:2] for f in on_disk)  # no pickle protocol header
    assert (tmp_path / "latest").read_text().strip() == "step_00000007"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_retention_keeps_last_k_and_milestones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, milestone_every=10)
    for step in range(5, 55, 5):
        mgr.save(step, {"step": step})
    # newest two: 45, 50; milestones (multiples of 10): 10, 20, 30, 40, 50
    assert [p.name for p in mgr.list()] == [f"step_{s:08d}" for s in (10, 20, 30, 40, 45, 50)]


def test_resaving_a_step_replaces_it_and_drops_abandoned_newer_ones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        mgr.save(step, {"step": step, "tag": "first"})
    mgr.save(2, {"step": 2, "tag": "second"})
    assert [p.name for p in mgr.list()] == ["step_00000001", "step_00000002"]
    assert mgr.load()["tag"] == "second"
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete-file", "no-manifest", "bad-manifest"])
def test_damaged_newest_is_reported_and_skipped(tmp_path, damage):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (10, 20):
        mgr.save(step, {"model": {"w": torch.full((64,), float(step))}, "step": step})
    newest = tmp_path / "step_00000020"
    target = newest / "model.safetensors"
    if damage == "flip":
        _flip_byte(target, target.stat().st_size - 3)
    elif damage == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    elif damage == "delete-file":
        (newest / "state.json").unlink()
    elif damage == "no-manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    assert verify(newest) is not None
    with pytest.warns(RuntimeWarning, match="step_00000020"):
        found = mgr.latest()
    assert found == tmp_path / "step_00000010"
    assert [p for p, _ in mgr.skipped] == [newest]
    with pytest.warns(RuntimeWarning):
        assert mgr.load()["step"] == 10
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(newest)


def test_no_checkpoint_and_all_damaged(tmp_path):
    mgr = CheckpointManager(tmp_path / "none")
    assert mgr.latest() is None and mgr.list() == []
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        mgr.load()
    mgr = CheckpointManager(tmp_path / "bad")
    p = mgr.save(1, {"step": 1})
    _flip_byte(p / "state.json", 3)
    with pytest.warns(RuntimeWarning):
        assert mgr.latest() is None


def test_failed_save_leaves_previous_state_untouched(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": {"w": torch.ones(3)}, "step": 1})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, {"model": {"w": torch.zeros(3)}, "step": 2})
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert mgr.latest().name == "step_00000001"


def test_unpicklable_state_is_refused_before_writing(tmp_path):
    class Custom:
        pass

    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match=r"state\['config'\]\['obj'\].*Custom"):
        mgr.save(1, {"config": {"obj": Custom()}})
    with pytest.raises(CheckpointError, match="float64"):
        mgr.save(1, {"loss": np.float64(0.5)})
    assert mgr.list() == []


@pytest.mark.parametrize("kwargs", [{"keep_last": 0}, {"milestone_every": 0}])
def test_bad_manager_options(tmp_path, kwargs):
    with pytest.raises(CheckpointError):
        CheckpointManager(tmp_path, **kwargs)


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_bad_step(tmp_path, step):
    with pytest.raises(CheckpointError, match="step"):
        CheckpointManager(tmp_path).save(step, {})


def test_shared_and_strided_tensors_are_saved(tmp_path):
    base = torch.arange(12.0)
    shared = {"a": base, "b": base, "view": base[4:8], "t": base.view(3, 4).t()}
    CheckpointManager(tmp_path).save(1, {"m": shared})
    loaded = CheckpointManager(tmp_path).load()
    for k, v in shared.items():
        assert torch.equal(loaded["m"][k], v), k


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    """Kill a writer at random moments; the newest verified checkpoint must load and be self-consistent."""
    rng = random.Random(0)
    for trial in range(4):
        root = tmp_path / f"run{trial}"
        pid = os.fork()
        if pid == 0:  # child: save forever, each checkpoint filled with its own step number
            try:
                mgr = CheckpointManager(root, keep_last=2)
                step = 0
                while True:
                    step += 1
                    mgr.save(step, {"model": {"w": torch.full((20000,), float(step))}, "step": step})
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.3, 0.8))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mgr = CheckpointManager(root, keep_last=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a killed writer must never leave a damaged step_* folder
            newest = mgr.latest()
        assert newest is not None, "the writer was killed before its first checkpoint"
        state = mgr.load(newest)
        assert torch.equal(state["model"]["w"], torch.full((20000,), float(state["step"])))
        assert newest.name == f"step_{state['step']:08d}"
        # the next save cleans up whatever temporary folder the kill left behind
        mgr.save(state["step"] + 1, state)
        assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's legacy state
    CheckpointManager(tmp_path).save(1, {"rng": rng_state()})
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(CheckpointManager(tmp_path).load()["rng"])
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# -- preemption -------------------------------------------------------------------------------------------------------

def test_sigterm_sets_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_on_signals() as guard:
        assert not guard.stop_requested() and not stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert guard.stop_requested() and stop_requested() and guard.received == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert not stop_requested()


def test_second_sigint_interrupts_immediately():
    # Python's own handler first: a process started in the background by a shell inherits SIGINT ignored
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with StopOnSignal([signal.SIGINT]) as guard:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
                assert guard.stop_requested()
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_guard_outside_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def worker():
        with stop_on_signals() as guard:
            seen.append((signal.getsignal(signal.SIGTERM), guard.stop_requested()))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [(before, False)]


# -- safe loading ------------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs code: it creates the marker folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_pickled_code_is_refused_without_trust(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"model": {"w": torch.ones(1)}, "hook": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="trust"):
        read_safe(path)
    with pytest.raises(CheckpointError, match="trust"):
        load_model(path)
    assert not marker.exists()
    read_safe(path, trust=True)  # the explicit opt-in does unpickle (and so runs the payload)
    assert marker.exists()


def test_plain_tensor_pickles_and_corrupt_safetensors(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.arange(3)}}, path)
    assert torch.equal(read_safe(path)["model"]["w"], torch.arange(3))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_safe(bad)


@pytest.mark.parametrize("config_text, fragment", [("model: just-a-string\n", "no model.name"),
                                                   ("model: [unclosed\n", "not valid YAML")])
def test_dtx_folder_with_bad_config_is_a_clear_error(tmp_path, config_text, fragment):
    (tmp_path / "config.yaml").write_text(config_text)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(DtxError, match=fragment):
        load_model(tmp_path)


# -- format 2: no pickle; every check skips to the previous intact checkpoint ------------------------------------------

def _rehash(path: Path, manifest_edit=None) -> None:
    """Recompute the manifest's sizes and hashes after a deliberate edit (so only the tested check can fail)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        if (path / name).is_file():
            data = (path / name).read_bytes()
            manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if manifest_edit is not None:
        manifest_edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _two_checkpoints(tmp_path: Path) -> tuple[CheckpointManager, Path]:
    mgr = CheckpointManager(tmp_path / "ckpts", keep_last=3)
    for step in (10, 20):
        mgr.save(step, {"model": {"w": torch.full((4,), float(step))}, "step": step})
    return mgr, tmp_path / "ckpts" / "step_00000020"


def _legacy_v1(folder: Path, rest: dict, weights: dict[str, torch.Tensor]) -> Path:
    """A checkpoint as dtx wrote it before format 2: safetensors weights, the rest in a weights-only state.pt."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"))
    torch.save(rest, folder / "state.pt")
    files = {n: {"size": (folder / n).stat().st_size, "sha256": hashlib.sha256((folder / n).read_bytes()).hexdigest()}
             for n in ("model.safetensors", "state.pt")}
    manifest = {"format": "dtx-checkpoint", "version": 1, "step": rest["step"], "order": ["model", *rest],
                "tensors": {"model": {"file": "model.safetensors", "keys": list(weights)}}, "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_format_1_checkpoints_still_load(tmp_path):
    rest = {"step": 5, "rng": {"torch": torch.get_rng_state()}, "config": {"betas": (0.9, 0.99)}}
    path = _legacy_v1(tmp_path / "step_00000005", rest, {"w": torch.arange(3.0)})
    state = load_checkpoint(path)
    assert list(state) == ["model", "step", "rng", "config"] and state["step"] == 5
    assert torch.equal(state["model"]["w"], torch.arange(3.0)) and state["config"]["betas"] == (0.9, 0.99)


def test_a_plain_data_bomb_in_state_pt_is_refused_quickly_and_skipped(tmp_path):
    """Shared nested lists: a few hundred bytes on disk, 2**60 values when walked. Refused within the value budget,
    and the previous checkpoint is used instead."""
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": {"w": torch.ones(2)}, "step": 1})
    bomb = [0]
    for _ in range(60):
        bomb = [bomb, bomb]
    path = _legacy_v1(tmp_path / "step_00000002", {"step": 2, "bomb": bomb}, {"w": torch.ones(2)})
    assert (path / "state.pt").stat().st_size < 4096
    started = time.monotonic()
    assert "bomb" in verify(path)
    with pytest.warns(RuntimeWarning, match="step_00000002"):
        assert mgr.load()["step"] == 1
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("case", ["state-json-garbage", "state-json-nan-constant", "state-tensors-missing-name",
                                  "unlisted-weights", "outside-folder", "missing-order-key", "nonfinite-weights",
                                  "future-version"])
def test_every_failed_check_falls_back_to_the_previous_checkpoint(tmp_path, case):
    """Hashes are recomputed after each edit, so the checksum cannot be what catches it."""
    mgr, newest = _two_checkpoints(tmp_path)
    if case == "state-json-garbage":
        (newest / "state.json").write_text("{\"step\": [[[")
        _rehash(newest)
    elif case == "state-json-nan-constant":
        (newest / "state.json").write_text('{"step": NaN}')
        _rehash(newest)
    elif case == "state-tensors-missing-name":
        (newest / "state.json").write_text('{"step": {"__dtx__": "tensor", "name": "t99"}}')
        _rehash(newest)
    elif case == "unlisted-weights":
        _rehash(newest, lambda m: m["files"].pop("model.safetensors"))
    elif case == "outside-folder":
        (tmp_path / "foreign.safetensors").write_bytes((newest / "model.safetensors").read_bytes())
        _rehash(newest, lambda m: (m["files"].update({"../foreign.safetensors": m["files"]["model.safetensors"]}),
                                   m["tensors"]["model"].update(file="../foreign.safetensors")))
    elif case == "missing-order-key":
        _rehash(newest, lambda m: m["order"].append("optimizer"))
    elif case == "nonfinite-weights":
        from safetensors.torch import save_file

        save_file({"w": torch.tensor([1.0, float("nan"), 0.0, 0.0])}, str(newest / "model.safetensors"))
        _rehash(newest)
    else:
        _rehash(newest, lambda m: m.update(version=99))
    reason = verify(newest)
    expected = {"state-json-garbage": "state.json is unreadable", "state-json-nan-constant": "state.json is unreadable",
                "state-tensors-missing-name": "malformed 'tensor' entry", "unlisted-weights": "not listed",
                "outside-folder": "not a file of the checkpoint folder", "missing-order-key": "'optimizer'",
                "nonfinite-weights": "non-finite values in model.w", "future-version": "version 99"}[case]
    assert reason is not None and expected in reason, reason
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint"):
        assert mgr.load()["step"] == 10
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(newest)


def test_non_finite_tensors_are_never_saved(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for bad in ({"model": {"w": torch.tensor([float("inf")])}}, {"opt": {"state": {0: torch.tensor(float("nan"))}}}):
        with pytest.raises(CheckpointError, match="non-finite"):
            mgr.save(1, {**bad, "step": 1})
    assert mgr.list() == []
    mgr.save(1, {"step": 1, "lr": float("inf")})  # a non-finite Python number is data, not a poisoned tensor
    assert mgr.load()["lr"] == float("inf")


def test_disk_full_is_named_with_folder_and_size(tmp_path, monkeypatch):
    """Before writing, a save that cannot fit fails naming the folder and the megabytes needed; a write that fails
    while the device is full (here: safetensors failing with the free space at 0) is reported the same way, and the
    previous checkpoint is untouched."""
    import dtx.io
    import safetensors.torch
    from dtx.errors import DiskFullError

    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": {"w": torch.zeros(3)}, "step": 1})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    big = {"model": {"w": torch.zeros(1 << 20)}, "step": 2}  # 4 MiB of float32
    monkeypatch.setattr(dtx.io, "free_bytes", lambda folder: 1 << 20)
    with pytest.raises(DiskFullError, match=rf"no space left on device \(needed 4\.\d MB in {tmp_path}"):
        mgr.save(2, big)

    free = iter([1 << 40, 0, 0])  # enough at the check, none once the write has failed
    monkeypatch.setattr(dtx.io, "free_bytes", lambda folder: next(free))

    def enospc(*args, **kwargs):
        raise RuntimeError("enforce fail: unexpected pos")  # what a full disk looks like from inside a writer

    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    with pytest.raises(DiskFullError, match="no space left on device") as info:
        mgr.save(2, big)
    assert isinstance(info.value, DtxError) and info.value.exit_code == 2
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
