"""Atomic, verifiable training checkpoints and RNG state capture.

A checkpoint is a folder ``root/step_{step:08d}/`` holding tensor state dicts as safetensors, everything else as
``state.json`` (structure and plain values) plus ``state.safetensors`` (the tensors inside it, e.g. optimizer moments
and RNG states), and ``manifest.json`` with each file's size and sha256. Nothing in it is pickled. It is written to a
temporary folder, fsynced and renamed into place before the ``latest`` pointer moves, so a process killed at any
moment leaves either the old or the new checkpoint complete. A checkpoint that fails any check (manifest, sizes,
hashes, headers, readable state, finite tensors) is skipped with a warning for the previous intact one. Checkpoints of
format version 1 (the rest in a weights-only ``state.pt``) still load, with limits on the size and structure of what
they unpickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
from .io import atomic_write_text, fsync_dir, fsync_file, set_default_mode

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LEGACY_STATE = "state.pt"  # format 1: the non-tensor-dict state, pickled (weights-only)
STATE_JSON = "state.json"  # format 2: the structure and plain values of the rest
STATE_TENSORS = "state.safetensors"  # format 2: the tensors inside the rest
LATEST = "latest"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_MAX_STATE_JSON = 256 << 20  # bytes of state.json
_MAX_NODES = 2_000_000  # containers and values visited while decoding the rest (shared references count each time)
_MAX_DEPTH = 64
MAX_STEP = 10**12  # no run takes more steps; a larger step in a folder name or state.json is crafted or damaged
_TAG = "__dtx__"  # marks JSON objects that encode a tuple, a tensor, a non-finite float or a non-string-keyed dict


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


class _Damaged(Exception):
    """A checkpoint check failed; the message is the short reason shown when it is skipped."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str, depth: int = 0) -> Any:
    """JSON form of plain data; each tensor is moved into ``tensors`` and replaced by a reference to its name."""
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"cannot checkpoint {where}: nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value
        return {_TAG: "tensor", "name": name}
    if value is None or type(value) in (str, bool, int):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {_TAG: "float", "value": repr(value)}
    if type(value) in (list, tuple, torch.Size):
        items = [_encode(v, tensors, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        return items if type(value) is list else {_TAG: "tuple", "items": items}
    if type(value) in (dict, OrderedDict):
        if all(type(k) is str for k in value) and _TAG not in value:
            return {k: _encode(v, tensors, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
        return {_TAG: "dict", "items": [[_encode(k, tensors, f"{where} key {k!r}", depth + 1),
                                         _encode(v, tensors, f"{where}[{k!r}]", depth + 1)]
                                        for k, v in value.items()]}
    raise CheckpointError(f"cannot checkpoint {where}: {type(value).__name__} is not plain data "
                          f"(use dicts, lists, tuples, numbers, strings and tensors)")


class _Budget:
    """Counts the values visited while decoding untrusted state, so a small file cannot expand into a huge one."""

    def __init__(self, limit: int = _MAX_NODES) -> None:
        self.left = limit

    def visit(self, depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise _Damaged(f"state holds more than {_MAX_NODES} values (a decompression bomb?)")
        if depth > _MAX_DEPTH:
            raise _Damaged(f"state is nested more than {_MAX_DEPTH} levels deep")


def _decode(value: Any, tensors: dict[str, torch.Tensor], budget: _Budget, depth: int = 0) -> Any:
    """Inverse of :func:`_encode` for a parsed ``state.json``; anything unexpected is damage."""
    budget.visit(depth)
    if value is None or type(value) in (str, bool, int, float):
        return value
    if type(value) is list:
        return [_decode(v, tensors, budget, depth + 1) for v in value]
    if type(value) is not dict:
        raise _Damaged(f"state.json holds a {type(value).__name__}")
    tag = value.get(_TAG)
    if tag is None:
        return {k: _decode(v, tensors, budget, depth + 1) for k, v in value.items()}
    if tag == "tensor" and value.get("name") in tensors:
        return tensors[value["name"]]
    if tag == "float" and value.get("value") in ("nan", "inf", "-inf"):
        return float(value["value"])
    if tag == "tuple" and type(value.get("items")) is list:
        return tuple(_decode(v, tensors, budget, depth + 1) for v in value["items"])
    if tag == "dict" and type(value.get("items")) is list and all(type(i) is list and len(i) == 2
                                                                    for i in value["items"]):
        out = {}
        for k, v in value["items"]:
            key = _decode(k, tensors, budget, depth + 1)
            if not isinstance(key, (str, int, float, bool, tuple, type(None))):
                raise _Damaged("state.json has a dict key that is not a plain value")
            out[key] = _decode(v, tensors, budget, depth + 1)
        return out
    raise _Damaged(f"state.json has a malformed {tag!r} entry")


def _check_plain(value: Any, budget: _Budget, depth: int = 0) -> None:
    """Walk an unpickled (format 1) state within the budget: only plain containers, values and tensors."""
    budget.visit(depth)
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            _check_plain(k, budget, depth + 1)
            _check_plain(v, budget, depth + 1)
    elif type(value) in (list, tuple, set, torch.Size):
        for v in value:
            _check_plain(v, budget, depth + 1)
    elif not isinstance(value, (str, bytes, int, float, complex, type(None), torch.dtype, torch.device,
                                torch.Tensor)):
        raise _Damaged(f"state.pt holds a {type(value).__name__}")


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (one reduction per tensor)."""
    floats = {k: t for k, t in tensors.items() if t.is_floating_point() or t.is_complex()}
    if not floats:
        return []
    flags = torch.stack([torch.isfinite(t).all() for t in floats.values()]).cpu()
    return [k for k, ok in zip(floats, flags.tolist()) if not ok]


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


def _safe_name(name: Any) -> bool:
    """A plain file name inside the checkpoint folder: no separators, no parent or hidden entries."""
    return (isinstance(name, str) and name == Path(name).name and "/" not in name and "\\" not in name
            and not name.startswith(".") and name != MANIFEST)


def _manifest(path: Path) -> dict[str, Any]:
    """The checkpoint's manifest after every structural check and the size and sha256 of every listed file."""
    if (path / MANIFEST).is_symlink():
        raise _Damaged(f"{MANIFEST} is a symbolic link (a checkpoint's files are read only from its own folder)")
    try:
        if (path / MANIFEST).stat().st_size > _MAX_STATE_JSON:
            raise _Damaged("manifest.json is too large")
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise _Damaged("no manifest.json (incomplete write)") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise _Damaged(f"unreadable manifest.json ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "dtx-checkpoint":
        raise _Damaged("manifest.json is not a dtx checkpoint manifest")
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        raise _Damaged(f"unsupported checkpoint format version {version!r} (this dtx reads {READABLE_VERSIONS})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _Damaged("manifest.json lists no files")
    for name, meta in files.items():
        if not _safe_name(name):
            raise _Damaged(f"manifest.json names {name!r}, which is not a file of the checkpoint folder")
        if not isinstance(meta, dict) or type(meta.get("size")) is not int or not isinstance(meta.get("sha256"), str):
            raise _Damaged(f"manifest.json has no size and sha256 for {name}")
    entries, order = manifest.get("tensors"), manifest.get("order")
    if not isinstance(entries, dict) or not isinstance(order, list) or not all(isinstance(k, str) for k in order):
        raise _Damaged("manifest.json has no tensor table or key order")
    for key, entry in entries.items():
        if isinstance(entry, dict) and _safe_name(entry.get("file")) and entry["file"] not in files:
            raise _Damaged(f"{entry['file']} is not listed in manifest.json")
        if not (isinstance(entry, dict) and entry.get("file") in files and str(entry["file"]).endswith(".safetensors")
                and isinstance(entry.get("keys"), list) and all(isinstance(k, str) for k in entry["keys"])):
            raise _Damaged(f"manifest.json has a malformed tensor entry {key!r}")
    needed = [LEGACY_STATE] if version == 1 else [STATE_JSON]
    for name in needed:
        if name not in files:
            raise _Damaged(f"manifest.json does not list {name}")
    for name, meta in files.items():
        f = path / name
        if f.is_symlink():
            raise _Damaged(f"{name} is a symbolic link (a checkpoint's files are read only from its own folder)")
        if not f.is_file():
            raise _Damaged(f"missing file {name}")
        size = f.stat().st_size
        if size != meta["size"]:
            raise _Damaged(f"{name} has {size} bytes, manifest says {meta['size']} (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise _Damaged(f"{name} sha256 mismatch (corrupted)")
    _note_extra_files(path, files)
    return manifest


def _note_extra_files(path: Path, files: dict[str, Any]) -> None:
    """Files the manifest does not list (a ``.DS_Store``, a grid someone wrote there) are not part of the checkpoint:
    they are never read, and a note names them instead of the checkpoint counting as damaged."""
    extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)
    if extra:
        log.warning("note: ignoring %s in %s: not part of the checkpoint (not listed in manifest.json)",
                    ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""), path)


def _check_step(path: Path, state: dict[str, Any]) -> None:
    """A saved step is an int in [0, MAX_STEP] equal to its step folder's: a crafted one must not crash a resume,
    rewind ``metrics.jsonl`` or name sample files."""
    match = _STEP_DIR.match(path.name)
    folder = int(match.group(1)) if match else None
    if folder is not None and folder > MAX_STEP:
        raise _Damaged(f"step {folder} in the folder name is over {MAX_STEP}")
    if "step" not in state:
        return
    step = state["step"]
    if type(step) is not int or not 0 <= step <= MAX_STEP or step != (step if folder is None else folder):
        where = "" if folder is None else f", not the folder's step {folder}"
        raise _Damaged(f"the saved step is {str(step)[:40]!r}{where}")


def _load_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file after its header is checked against the file (``keys``: exactly these)."""
    from safetensors.torch import load_file

    from .errors import DataError
    from .file_headers import safetensors_header

    try:
        header = safetensors_header(path)
    except DataError as exc:
        raise _Damaged(f"{path.name}: {exc}".replace(f"{path}: ", "")) from None
    present = set(header) - {"__metadata__"}
    if keys is not None:
        missing = [k for k in keys if k not in present]
        if missing:
            raise _Damaged(f"{path.name} lacks {missing[0]!r}, which manifest.json names")
    try:
        loaded = load_file(str(path))
    except Exception as exc:  # safetensors reports every malformed file with its own error type
        raise _Damaged(f"{path.name} is unreadable ({type(exc).__name__})") from None
    return loaded if keys is None else {k: loaded[k] for k in keys}


def _read_rest(path: Path, manifest: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    """The non-tensor-dict part of the state: ``state.json`` + ``state.safetensors`` (format 2) or a weights-only
    ``state.pt`` (format 1), decoded within size, depth and value-count limits."""
    budget = _Budget()
    if manifest["version"] == 1:
        try:
            rest = torch.load(path / LEGACY_STATE, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch reports unreadable pickles with many error types
            raise _Damaged(f"{LEGACY_STATE} is unreadable ({type(exc).__name__})") from None
        _check_plain(rest, budget)
    else:
        if (path / STATE_JSON).stat().st_size > _MAX_STATE_JSON:
            raise _Damaged(f"{STATE_JSON} is larger than {_MAX_STATE_JSON} bytes")
        # own copies: optimizer state must not stay views into the file's mapping
        tensors = {k: v.clone() for k, v in _load_safetensors(path / STATE_TENSORS).items()} \
            if STATE_TENSORS in files else {}
        try:
            skeleton = json.loads((path / STATE_JSON).read_text(),
                                  parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except (OSError, ValueError, RecursionError) as exc:
            raise _Damaged(f"{STATE_JSON} is unreadable ({type(exc).__name__})") from None
        rest = _decode(skeleton, tensors, budget)
    if not isinstance(rest, dict) or not all(isinstance(k, str) for k in rest):
        raise _Damaged("the checkpoint state is not a mapping with string keys")
    return rest


def _read(path: Path) -> dict[str, Any]:
    """Every check of one checkpoint folder, then its state (keys in saved order); raises ``_Damaged``."""
    manifest = _manifest(path)
    files = manifest["files"]
    rest = _read_rest(path, manifest, files)
    tensors = {key: _load_safetensors(path / entry["file"], entry["keys"])
               for key, entry in manifest["tensors"].items()}
    merged = {**rest, **tensors}
    missing = [k for k in manifest["order"] if k not in merged]
    if missing:
        raise _Damaged(f"manifest.json names state key {missing[0]!r}, which the checkpoint does not hold")
    state = {k: merged[k] for k in manifest["order"]}
    _check_step(path, state)
    for key, value in state.items():
        found = nonfinite_names(_all_tensors(value, key))
        if found:
            raise _Damaged(f"non-finite values in {', '.join(found[:3])}")
    return state


def _all_tensors(value: Any, where: str, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor inside a (decoded) state value, by its path."""
    out = {} if out is None else out
    if isinstance(value, torch.Tensor):
        out[where] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            _all_tensors(v, f"{where}.{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _all_tensors(v, f"{where}[{i}]", out)
    return out


def verify(path: Path) -> str | None:
    """None if the checkpoint folder passes every check (manifest, files, hashes, headers, readable state, finite
    tensors), else a short reason."""
    try:
        _read(Path(path))
    except _Damaged as exc:
        return str(exc)
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
        self._kept: set[Path] = set()  # unusable checkpoints newer than the one written last; never deleted

    # writing

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as ``root/step_{step:08d}`` atomically, move ``latest`` to it, prune old ones; return it."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"checkpoint step must be a non-negative int, got {step!r}")
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CheckpointError("checkpoint state must be a dict with string keys")
        tensors = {k: _cpu_tensors(v) for k, v in state.items() if _is_tensor_dict(v)}
        rest_tensors: dict[str, torch.Tensor] = {}
        skeleton = _encode({k: v for k, v in state.items() if k not in tensors}, rest_tensors, "state")
        rest_tensors = _cpu_tensors(rest_tensors) if rest_tensors else {}
        for key, value in [*tensors.items(), ("state", rest_tensors)]:
            bad = nonfinite_names(value)
            if bad:
                raise CheckpointError(f"refusing to save step {step}: non-finite values in {key} "
                                      f"({', '.join(bad[:3])})")
        state_text = json.dumps(skeleton, allow_nan=False)
        needed = (sum(t.numel() * t.element_size() for sd in [*tensors.values(), rest_tensors] for t in sd.values())
                  + len(state_text) + 64 * 1024 * (len(tensors) + 2))

        from .io import check_free_space, disk_full_error, free_bytes

        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        check_free_space(self.root, needed)
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            from safetensors.torch import save_file

            entries: dict[str, Any] = {}
            for key, sd in tensors.items():
                fname = f"{key}.safetensors"
                save_file(sd, str(tmp / fname), metadata={"format": "dtx-checkpoint"})
                entries[key] = {"file": fname, "keys": list(sd)}
            files = sorted({e["file"] for e in entries.values()} | {STATE_JSON})
            (tmp / STATE_JSON).write_text(state_text)
            if rest_tensors:
                save_file(rest_tensors, str(tmp / STATE_TENSORS), metadata={"format": "dtx-checkpoint"})
                files = sorted(set(files) | {STATE_TENSORS})
            for fname in files:
                set_default_mode(tmp / fname)  # save_file writes 0600; every checkpoint file follows the umask
                fsync_file(tmp / fname)
            manifest = {"format": "dtx-checkpoint", "version": FORMAT_VERSION, "step": step,
                        "created": time.time(), "order": list(state), "tensors": entries,
                        "files": {f: {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            if os.path.lexists(final):  # re-saving a step (e.g. after resume): swap the old copy out first
                old = self._set_aside(final)
                os.replace(tmp, final)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(self.root)
        except BaseException as exc:
            full = isinstance(exc, Exception) and free_bytes(self.root) < needed
            shutil.rmtree(tmp, ignore_errors=True)
            if full:  # safetensors and the OS report a full disk in different ways; the free space tells
                raise disk_full_error(self.root, needed) from exc
            raise
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._prune(step)
        return final

    def _remove_stale_temps(self) -> None:
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            _remove(p)

    def _unusable(self, path: Path) -> str | None:
        """Why ``path`` would be skipped (a symbolic link is never followed), or None for an intact checkpoint."""
        return "the step folder is a symbolic link" if path.is_symlink() else verify(path)

    def _set_aside(self, final: Path) -> Path | None:
        """Before ``final`` is replaced: an intact old copy is moved to a temporary name for removal (returned); a
        skipped one (damaged, of a newer format, a link) is kept as ``skipped-step_XXXXXXXX-ID``, never deleted."""
        reason = self._unusable(final)
        if reason is None:
            old = self.root / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            return old
        kept = self.root / f"skipped-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, kept)
        log.warning("kept the unusable checkpoint %s as %s (%s); delete it yourself if you do not need it",
                    final, kept.name, reason)
        return None

    def _prune(self, current: int) -> None:
        """Drop intact checkpoints newer than ``current`` (a timeline abandoned by resuming from an older one) and
        those retention does not keep; an unusable newer one was skipped, not abandoned, and is never deleted."""
        ckpts = self.list()
        for p in (p for p in ckpts if step_of(p) > current and p not in self._kept):
            reason = self._unusable(p)
            if reason is None:
                log.warning("removing %s: newer than the checkpoint just written at step %d", p, current)
                _remove(p)
            else:
                self._kept.add(p)
                log.warning("keeping %s although it is newer than step %d: it was skipped (%s), never deleted",
                            p, current, reason)
        ckpts = [p for p in ckpts if step_of(p) <= current]
        keep = set(ckpts[-self.keep_last:])
        if self.milestone_every:
            keep |= {p for p in ckpts if step_of(p) % self.milestone_every == 0}
        for p in ckpts:
            if p not in keep:
                _remove(p)
        fsync_dir(self.root)

    # reading

    def list(self) -> list[Path]:
        """Checkpoint folders under ``root``, oldest first (complete or not; see :meth:`latest`)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=step_of)

    def _readable_newest_first(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """(folder, state) of each checkpoint that passes every check, newest first; the others are reported."""
        for p in reversed(self.list()):
            try:
                if p.is_symlink():  # its files would be read from outside the checkpoints folder
                    raise _Damaged("the step folder is a symbolic link")
                yield p, _read(p)
                continue
            except _Damaged as exc:
                reason = str(exc)
            self.skipped.append((p, reason))
            message = f"skipping damaged checkpoint {p}: {reason}"
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def latest(self) -> Path | None:
        """Newest checkpoint that passes every check; damaged ones are reported (warning + log) and skipped."""
        return next((p for p, _ in self._readable_newest_first()), None)

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """(folder, state) of :meth:`latest`, read once."""
        return next(self._readable_newest_first(), None)

    def load(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """The state saved in ``path`` (default: :meth:`latest`), tensors on CPU, keys in their saved order."""
        if path is None:
            found = self.load_latest()
            if found is None:
                raise CheckpointError(f"no complete checkpoint under {self.root}")
            return found[1]
        return load_checkpoint(path)


def _remove(path: Path) -> None:
    """Delete a checkpoint or temporary folder; a symbolic link is unlinked, its target never touched."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify and read one checkpoint folder written by :class:`CheckpointManager` (nothing is unpickled from
    format 2; format 1's ``state.pt`` is read weights-only within limits)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    try:
        return _read(path)
    except _Damaged as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from None


# -- run folders -------------------------------------------------------------------------------------------------------

RUN_CHECKPOINTS = "checkpoints"


def is_run_folder(path: str | os.PathLike) -> bool:
    """A training run folder (it has ``checkpoints/``) or one of its checkpoint folders (it has a manifest)."""
    path = Path(path)
    return path.is_dir() and ((path / RUN_CHECKPOINTS).is_dir() or (path / MANIFEST).is_file())


def checkpoints_holding(path: str | os.PathLike) -> Path | None:
    """The checkpoint folder (``step_XXXXXXXX`` with a manifest) or run ``checkpoints/`` folder that ``path`` would
    lie in, or None: nothing but checkpoints is written there."""
    for folder in Path(path).resolve().parents:
        if _STEP_DIR.match(folder.name) and (folder / MANIFEST).is_file():
            return folder
        if folder.name == RUN_CHECKPOINTS and folder.is_dir() and (
                (folder / LATEST).is_file() or any(_STEP_DIR.match(p.name) for p in folder.iterdir())):
            return folder
    return None


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
    path = Path(source)
    found = CheckpointManager(path / RUN_CHECKPOINTS).load_latest() if (path / RUN_CHECKPOINTS).is_dir() else None
    if found is not None:
        ckpt, state = found
    else:
        ckpt = resolve_checkpoint(source)
        state = load_checkpoint(ckpt)
    missing = [k for k in ("model", "model_spec", "config", "data_info", "step") if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt} is not a dtx training checkpoint (missing {', '.join(missing)})")
    return ckpt, state
