"""Atomic, verifiable training checkpoints and RNG state capture.

A checkpoint is a folder ``root/step_{step:08d}/`` holding tensor state dicts as safetensors, everything else in one
file that ``torch.load(weights_only=True)`` reads, and ``manifest.json`` with each file's size and sha256. It is
written to a temporary folder, fsynced and renamed into place before the ``latest`` pointer moves, so a process killed
at any moment leaves either the old or the new checkpoint complete; damaged ones are detected and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_write_text, fsync_dir, fsync_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
EXTRA_FILE = "state.pt"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_PLAIN_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.Size, torch.dtype, torch.device)


# -- RNG state -------------------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when available) generator states of this process, as plain data."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": str(np_name), "keys": [int(k) for k in np_keys], "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states captured by :func:`rng_state` (CUDA states are ignored without CUDA)."""
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]),
                             float(n["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} devices, this process sees "
                          f"{torch.cuda.device_count()}; restoring the common ones", stacklevel=2)
        for index, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), index)


# -- file helpers ----------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_tensor_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value) and all(isinstance(k, str) for k in value)
            and all(isinstance(v, torch.Tensor) for v in value.values()))


def _check_weights_only(value: Any, where: str) -> None:
    """Reject values that ``torch.load(weights_only=True)`` would refuse, naming where they sit."""
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            _check_weights_only(k, f"{where} key {k!r}")
            _check_weights_only(v, f"{where}[{k!r}]")
    elif type(value) in (list, tuple, set):
        for i, v in enumerate(value):
            _check_weights_only(v, f"{where}[{i}]")
    elif type(value) not in _PLAIN_LEAVES and not isinstance(value, torch.Tensor):
        raise CheckpointError(f"cannot checkpoint {where}: {type(value).__name__} is not plain data "
                              f"(use dicts, lists, numbers, strings and tensors)")


def _cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies where needed; tensors sharing storage are cloned (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        key = (str(t.device), t.untyped_storage().data_ptr())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add((str(t.device), t.untyped_storage().data_ptr()))
        out[k] = t
    return out


def step_of(path: Path) -> int:
    """Training step encoded in a checkpoint folder name ``step_XXXXXXXX``."""
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path} is not a checkpoint folder (expected a name like step_00001000)")
    return int(m.group(1))


def verify(path: Path) -> str | None:
    """None if the checkpoint folder is complete and intact, else a short reason."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest.json (incomplete write)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest.json ({type(exc).__name__})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return "manifest.json lists no files"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        size = f.stat().st_size
        if size != meta.get("size"):
            return f"{name} has {size} bytes, manifest says {meta.get('size')} (truncated?)"
        if _sha256(f) != meta.get("sha256"):
            return f"{name} sha256 mismatch (corrupted)"
    return None


# -- manager ---------------------------------------------------------------------------------------------------------

class CheckpointManager:
    """Writes, verifies, lists, prunes and loads the checkpoints under ``root``.

    Retention keeps the newest ``keep_last`` checkpoints plus every step that is a multiple of ``milestone_every``.
    One process (rank 0) writes; any number may read.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 3, milestone_every: int | None = None) -> None:
        if keep_last < 1:
            raise CheckpointError(f"keep_last must be at least 1, got {keep_last}")
        if milestone_every is not None and milestone_every < 1:
            raise CheckpointError(f"milestone_every must be a positive number of steps, got {milestone_every}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.milestone_every = milestone_every
        self.skipped: list[tuple[Path, str]] = []

    # writing

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as ``root/step_{step:08d}`` atomically, move ``latest`` to it, prune old ones; return it."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"checkpoint step must be a non-negative int, got {step!r}")
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CheckpointError("checkpoint state must be a dict with string keys")
        tensors = {k: v for k, v in state.items() if _is_tensor_dict(v)}
        rest = {k: v for k, v in state.items() if k not in tensors}
        _check_weights_only(rest, "state")

        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            entries: dict[str, Any] = {}
            for key, sd in tensors.items():
                from safetensors.torch import save_file

                fname = f"{key}.safetensors"
                save_file(_cpu_tensors(sd), str(tmp / fname), metadata={"format": "dtx-checkpoint"})
                entries[key] = {"file": fname, "keys": list(sd)}
            torch.save(rest, tmp / EXTRA_FILE)
            files = sorted({e["file"] for e in entries.values()} | {EXTRA_FILE})
            for fname in files:
                fsync_file(tmp / fname)
            manifest = {"format": "dtx-checkpoint", "version": FORMAT_VERSION, "step": step,
                        "created": time.time(), "order": list(state), "tensors": entries,
                        "files": {f: {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after resume): swap the old copy out first
                old = self.root / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._prune(step)
        return final

    def _remove_stale_temps(self) -> None:
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def _prune(self, current: int) -> None:
        ckpts = self.list()
        newer = [p for p in ckpts if step_of(p) > current]
        for p in newer:  # left over from a timeline that was abandoned by resuming from an older checkpoint
            log.warning("removing %s: newer than the checkpoint just written at step %d", p, current)
            shutil.rmtree(p, ignore_errors=True)
        ckpts = [p for p in ckpts if step_of(p) <= current]
        keep = set(ckpts[-self.keep_last:])
        if self.milestone_every:
            keep |= {p for p in ckpts if step_of(p) % self.milestone_every == 0}
        for p in ckpts:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
        fsync_dir(self.root)

    # reading

    def list(self) -> list[Path]:
        """Checkpoint folders under ``root``, oldest first (complete or not; see :meth:`latest`)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=step_of)

    def _verified_newest_first(self) -> Iterator[Path]:
        for p in reversed(self.list()):
            reason = verify(p)
            if reason is None:
                yield p
                continue
            self.skipped.append((p, reason))
            message = f"skipping damaged checkpoint {p}: {reason}"
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def latest(self) -> Path | None:
        """Newest checkpoint whose manifest verifies; damaged ones are reported (warning + log) and skipped."""
        return next(self._verified_newest_first(), None)

    def load(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """The state saved in ``path`` (default: :meth:`latest`), tensors on CPU, keys in their saved order."""
        if path is None:
            found = self.latest()
            if found is None:
                raise CheckpointError(f"no complete checkpoint under {self.root}")
            path = found
        return load_checkpoint(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify and read one checkpoint folder written by :class:`CheckpointManager` (no code is unpickled)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {reason}")
    manifest = json.loads((path / MANIFEST).read_text())
    try:
        rest = torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=True)
        tensors = {}
        for key, entry in manifest["tensors"].items():
            loaded = load_file(str(path / entry["file"]))
            tensors[key] = {k: loaded[k] for k in entry["keys"]}
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    merged = {**rest, **tensors}
    return {k: merged[k] for k in manifest["order"]}


# -- run folders -------------------------------------------------------------------------------------------------------

RUN_CHECKPOINTS = "checkpoints"


def is_run_folder(path: str | os.PathLike) -> bool:
    """A training run folder (it has ``checkpoints/``) or one of its checkpoint folders (it has a manifest)."""
    path = Path(path)
    return path.is_dir() and ((path / RUN_CHECKPOINTS).is_dir() or (path / MANIFEST).is_file())


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint folder from a run folder (its newest valid checkpoint) or a checkpoint folder itself."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"run or checkpoint not found: {path}")
    if (path / RUN_CHECKPOINTS).is_dir():
        latest = CheckpointManager(path / RUN_CHECKPOINTS).latest()
        if latest is None:
            raise CheckpointError(f"{path / RUN_CHECKPOINTS} holds no complete checkpoint")
        return latest
    if (path / MANIFEST).is_file():
        return path
    raise CheckpointError(f"{path} is neither a run folder (with checkpoints/) nor a checkpoint folder "
                          f"(step_XXXXXXXX with manifest.json)")


def load_training_state(source: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(checkpoint folder, state) of a run folder's newest valid checkpoint, checked to be a dtx training state."""
    ckpt = resolve_checkpoint(source)
    state = load_checkpoint(ckpt)
    missing = [k for k in ("model", "model_spec", "config", "data_info") if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt} is not a dtx training checkpoint (missing {', '.join(missing)})")
    return ckpt, state
