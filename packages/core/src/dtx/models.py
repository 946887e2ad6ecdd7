"""Model registry API: build registered architectures and presets, save and load them in any registered format."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import plugins
from .errors import CheckpointError, ConfigError, DtxError
from .io import atomic_write, atomic_write_text
from .options import check_options

DTX_WEIGHTS = "model.safetensors"
DTX_CONFIG = "config.yaml"
_SPECS: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


def list_models(family: str | None = None) -> list[str]:
    """Names of every registered architecture and preset (optionally of one family)."""
    table = plugins.host().table("model")
    return sorted(n for n, e in table.items() if family is None or e.meta.get("family") == family)


def model_entry(name: str) -> plugins.Entry:
    return plugins.get("model", name)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered architecture or preset, e.g. ``create_model("DiT-XL/2", input_size=32)``.

    How it was built is remembered (``model_spec(model)``) so that it can be saved and rebuilt. Its size is checked
    first (``check_model_size``), so that crafted options never allocate or hang.
    """
    entry = model_entry(name)
    factory = entry.obj
    check_options(f"model {entry.name!r}", factory, overrides)
    probe = check_model_size(entry, overrides)
    try:
        on_meta = probe is not None and torch.get_default_device().type == "meta"
        model = probe if on_meta else factory(**overrides)  # a meta build (dtx flops) is the probe itself
    except DtxError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build model {entry.name!r} with {overrides}: {exc}") from exc
    _SPECS[model] = {"name": entry.name, **overrides}
    return model


# -- size limits: checked on the meta device before a model is built ---------------------------------------------------

#: most parameters (and buffers) of a model dtx builds; the largest first-party presets have a few billion
MAX_MODEL_PARAMETERS = 1 << 34
#: most tensors building one model may create (DiT-XL/2 creates about 300): bounds the time a crafted depth takes
MAX_MODEL_TENSORS = 10_000
#: a model loaded from a file may hold at most this many parameters per byte of its weights (1: 8-bit weights),
#: or ``_WEIGHTS_FLOOR`` (a model that small is built, and its keys compared with the file's, in well under a
#: second; the difference also covers tables that files need not store, such as position embeddings)
_PARAMS_PER_WEIGHT_BYTE = 1.1
_WEIGHTS_FLOOR = 1 << 26
_WEIGHTS: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("dtx_weights", default=None)


class _TooLarge(Exception):
    """Raised inside a meta-device build that went over a limit (never leaves ``check_model_size``)."""


class _SizeBudget(TorchFunctionMode):
    """Counts the tensors (and their elements) that factory functions create while a model is built on the meta
    device, and stops the build as soon as either count is over its limit."""

    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
                           torch.empty_strided, torch.tensor, torch.arange, torch.linspace, torch.eye})

    def __init__(self) -> None:
        super().__init__()
        self.tensors = self.elements = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES and isinstance(out, torch.Tensor):
            self.tensors += 1
            self.elements += out.numel()
            if self.elements > MAX_MODEL_PARAMETERS or self.tensors > MAX_MODEL_TENSORS:
                raise _TooLarge()
        return out


@contextlib.contextmanager
def weights_of(source: str | os.PathLike, nbytes: int) -> Iterator[None]:
    """Within this block every model built is checked against the ``nbytes`` of weights that ``source`` holds: a
    model with far more parameters than those bytes can store cannot be that file's model, and is refused before
    it is built."""
    token = _WEIGHTS.set((str(source), int(nbytes)))
    try:
        yield
    finally:
        _WEIGHTS.reset(token)


def _option_defaults(factory: Any) -> dict[str, Any]:
    """Default values of a factory's options: its ``config_class`` fields, else its keyword parameters."""
    import dataclasses
    import inspect

    cfg_cls = getattr(factory, "config_class", None)
    if cfg_cls is not None and dataclasses.is_dataclass(cfg_cls):
        return {f.name: f.default for f in dataclasses.fields(cfg_cls) if f.default is not dataclasses.MISSING}
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not p.empty}


def _magnitude(value: Any) -> float | None:
    """The largest number in an option value (a number, or a list of numbers); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return abs(float(value))
    if isinstance(value, (list, tuple)):
        found = [m for m in map(_magnitude, value) if m is not None]
        return max(found) if found else None
    return None


def _culprit(factory: Any, options: Mapping[str, Any]) -> str:
    """``key=value`` of the option furthest above its default: how a size error names the key to fix."""
    defaults = _option_defaults(factory)
    ranked = []
    for key, value in options.items():
        size = _magnitude(value)
        if size is not None:
            default = _magnitude(defaults.get(key))
            ranked.append((size / default if default else size, key))
    if not ranked:
        return "its default options"
    key = max(ranked)[1]
    return f"{key}={options[key]!r}"


def check_model_size(entry: plugins.Entry, options: Mapping[str, Any]) -> nn.Module | None:
    """Build model ``entry`` with ``options`` on the meta device (no memory) within ``MAX_MODEL_PARAMETERS`` and
    ``MAX_MODEL_TENSORS``, and, inside ``weights_of``, within what the weights file can hold; a ConfigError
    (CheckpointError for a file) naming the option furthest above its default otherwise. Returns the meta model;
    None when the build fails for another reason, which the real build then reports."""
    weights = _WEIGHTS.get()
    budget = _SizeBudget()
    try:
        with torch.device("meta"), budget:
            model = entry.obj(**options)
    except _TooLarge:
        raise ConfigError(f"model {entry.name!r} is too large with {_culprit(entry.obj, options)}: building it "
                          f"needs over {MAX_MODEL_PARAMETERS:,} parameters or {MAX_MODEL_TENSORS:,} tensors"
                          + (f" (from {weights[0]})" if weights else "")) from None
    except Exception:
        return None
    if not isinstance(model, nn.Module):
        return None
    count = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    if weights is not None and count > max(weights[1] * _PARAMS_PER_WEIGHT_BYTE, _WEIGHTS_FLOOR):
        raise CheckpointError(f"{weights[0]}: {_culprit(entry.obj, options)} makes model {entry.name!r} "
                              f"{count:,} parameters, far more than its {weights[1]:,} bytes of weights hold; "
                              f"the options cannot be this file's model")
    return model


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """``{"name": registered name, **options}`` of a model built by ``create_model`` (None for others)."""
    from .interface import unwrap

    spec = _SPECS.get(unwrap(model))
    return dict(spec) if spec is not None else None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -- dtx checkpoint format: a folder with model.safetensors + config.yaml (no pickle) ---------------------------

def save_model(model: nn.Module, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a dtx checkpoint folder: ``model.safetensors`` + ``config.yaml`` (``extra`` adds sections,
    e.g. the ``data_info``, ``objective`` and ``conditioning`` that ``dtx sample`` reads)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    spec = model_spec(model)
    if not spec:
        raise ConfigError("model was not built with dtx.create_model, so its architecture cannot be recorded")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(out / DTX_WEIGHTS,
                 lambda tmp: save_file(state, str(tmp), metadata={"format": "dtx", "name": str(spec["name"])}))
    cfg = {"model": dict(spec), **(extra or {})}
    atomic_write_text(out / DTX_CONFIG, OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return out


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; on any mismatch raise one error listing missing, unexpected and mis-shaped keys."""
    check_state_dict_fits(model, state, source)
    model.load_state_dict(state, strict=True)


def check_state_dict_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one ``CheckpointError`` listing the missing, unexpected and mis-shaped keys of ``state`` for ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", shaped)):
            if keys:
                more = f" ... (+{len(keys) - 6})" if len(keys) > 6 else ""
                parts.append(f"{label}: {', '.join(keys[:6])}{more}")
        raise CheckpointError(f"{source} does not fit {(model_spec(model) or {}).get('name', type(model).__name__)}"
                              f": {'; '.join(parts)}")


@dataclass(frozen=True)
class LoadOptions:
    """How to read weights, separate from what to build: which weights of a training checkpoint (its EMA or raw
    ``model`` weights) and whether pickled objects may be unpickled (only for trusted files)."""

    weights: Literal["ema", "raw"] = "ema"
    trust: bool = False
    format: str | None = None  # a registered checkpoint format to read a foreign file or folder with (no detection)

    def __post_init__(self) -> None:
        if self.weights not in ("ema", "raw"):
            raise ConfigError(f"weights must be 'ema' or 'raw', got {self.weights!r}")


#: wrapper prefixes of saved state dicts: DDP, torch.compile, k-diffusion's Denoiser
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "inner_model.")


def strip_prefixes(state: Mapping[str, Any], prefixes: Sequence[str] = WRAPPER_PREFIXES) -> dict[str, Any]:
    """Drop wrapper prefixes that every key carries (repeatedly: ``module._orig_mod.`` too)."""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def select_state(obj: Any, fits: Callable[[dict[str, Any]], bool], wrappers: Sequence[str] = ("ema", "model"),
                 use_ema: bool = True) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The state dict a family's reader wants inside a loaded checkpoint object, and where it was found.

    Training checkpoints wrap weights under ``wrappers`` (EMA first, the raw ones first with ``use_ema=False``);
    else the object itself may be the state dict. ``fits(state)`` says whether keys (prefixes stripped) are the
    family's. Returns (None, "") when nothing fits.
    """
    if not isinstance(obj, Mapping):
        return None, ""
    for key in (tuple(wrappers) if use_ema else tuple(reversed(wrappers))):
        if isinstance(obj.get(key), Mapping):
            state = strip_prefixes(obj[key])
            if fits(state):
                return state, key
    state = strip_prefixes(obj)
    return (state, "state_dict") if fits(state) else (None, "")


def checkpoint_spec(name: str | None, family: str, base: str, inferred_name: str, inferred: dict[str, Any],
                    presets: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Any],
                    source: Path) -> tuple[str, dict[str, Any]]:
    """(architecture, options) to build for a checkpoint whose options were ``inferred`` from its tensors.

    ``name`` (the user's) wins over ``inferred_name``; a preset keeps its own fixed options (depth, width, heads,
    patch), the bare ``base`` architecture takes the inferred preset's; ``overrides`` win over everything; a model
    of another family gets the overrides alone. A latent size that could not be inferred is an error.
    """
    entry = model_entry(name or inferred_name)
    if entry.meta.get("family") != family:
        return entry.name, dict(overrides)
    if entry.name == base and inferred_name != base:
        inferred = {**presets[inferred_name], **inferred}
    fixed = set(presets.get(entry.name, {}))
    spec = {**{k: v for k, v in inferred.items() if k not in fixed}, **overrides}
    if "input_size" not in spec:
        raise CheckpointError(f"{source}: cannot infer the input size (its pos_embed is not square); "
                              f"pass input_size=[height, width]")
    return entry.name, spec


#: leading bytes of files that are often given by mistake, and what they are
_FILE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG image", b"\xff\xd8\xff": "JPEG image", b"GIF8": "GIF image",
               b"RIFF": "RIFF file (WebP, AVI or WAV)", b"\x1aE\xdf\xa3": "Matroska/WebM video",
               b"%PDF": "PDF document", b"\x1f\x8b": "gzip archive", b"\x93NUMPY": "NumPy .npy array",
               b"\x89HDF": "HDF5 file"}


def _not_a_checkpoint(path: Path) -> str | None:
    """What ``path`` is when its first bytes show it cannot be a torch.save checkpoint (a zip archive, or a pickle
    of protocol 2 or later, as torch.save writes), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror or type(exc).__name__})") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    for magic, kind in _FILE_MAGIC.items():
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":
        return "MP4/QuickTime video"
    return "empty file" if not head else "unknown file type, neither a zip archive nor a pickle"


def read_safe(path: Path, trust: bool = False) -> Any:
    """Read a checkpoint file without executing code: safetensors, or torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    kind = _not_a_checkpoint(path)
    if kind is not None:
        raise CheckpointError(f"{path} is not a model checkpoint: {kind} (dtx reads safetensors files and torch.save "
                              f"archives)")
    try:
        # train scripts (DiT's train.py) store their argparse.Namespace under "args"; it holds plain values only
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:
        if not trust and "weights_only" in str(exc):
            raise CheckpointError(f"{path} contains pickled objects that are not plain tensors; refusing to unpickle it "
                                  f"(pass --trust-checkpoint / trust=True only for files you trust)") from exc
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc


def _load_dtx_folder(path: Path, name: str | None, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    from .config import read_config

    cfg = read_config(path / DTX_CONFIG, path / DTX_CONFIG)
    spec = cfg.get("model")
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(f"{path / DTX_CONFIG} has no model.name")
    spec = dict(spec)
    arch = name or spec.pop("name")
    spec.pop("name", None)
    spec.update(overrides)
    model = create_model(arch, **spec)
    load_state_dict_strict(model, read_safe(path / DTX_WEIGHTS), str(path))
    return model, {"format": "dtx", "config": cfg}


def _load_run(path: Path, options: LoadOptions) -> tuple[nn.Module, dict[str, Any]]:
    """A training run folder (its newest valid checkpoint) or one checkpoint folder: EMA or raw weights."""
    from .checkpoint import load_training_state

    from .config import read_config

    ckpt, state = load_training_state(path)
    state.update(read_config({k: state[k] for k in ("model_spec", "config", "data_info")}, ckpt))
    spec = dict(state["model_spec"])
    key = "ema" if options.weights == "ema" and "ema" in state else "model"
    finetune = (state["config"] or {}).get("finetune") or {}
    if finetune.get("method") == "lora":  # the checkpoint holds the adapters; the base is finetune.from
        return _lora_run_model(spec, finetune, state[key], f"{ckpt} ({key})"), {
            "format": "dtx-run", "checkpoint": str(ckpt), "weights": "EMA" if key == "ema" else "raw",
            "step": int(state["step"]), "state": state}
    with weights_of(ckpt, weight_bytes(ckpt / DTX_WEIGHTS) if (ckpt / DTX_WEIGHTS).is_file() else weight_bytes(ckpt)):
        model = create_model(spec.pop("name"), **spec)
    load_state_dict_strict(model, state[key], f"{ckpt} ({key})")
    return model, {"format": "dtx-run", "checkpoint": str(ckpt), "weights": "EMA" if key == "ema" else "raw",
                   "step": int(state["step"]), "state": state}


def _grow_rows(key: str, new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """A class table with more rows than the checkpoint's: the old class rows kept, the null row (the last) moved to
    the end, each new class row initialised from the null row."""
    if new.ndim != 2 or old.ndim != 2 or new.shape[1] != old.shape[1] or new.shape[0] <= old.shape[0]:
        return None
    grown = old[-1:].expand(new.shape[0], -1).clone()  # every row from the checkpoint's last (null) row
    grown[: old.shape[0] - 1] = old[:-1]
    return grown, (f"{key}: grown from {old.shape[0]} to {new.shape[0]} rows; {new.shape[0] - old.shape[0]} new "
                   f"class rows initialised from the null row")


def load_base_weights(model: nn.Module, source: str, options: LoadOptions = LoadOptions()) -> list[str]:
    """Copy the weights of any loadable ``source`` into ``model`` of the same architecture, strictly, except that a
    class table (``...embedding_table.weight``) may grow for data with more classes; returns what grew."""
    base, _ = load_model_with_info(source, None, options)
    state, own, grown = base.state_dict(), model.state_dict(), []
    for key, tensor in list(state.items()):
        if key in own and own[key].shape != tensor.shape and key.endswith("embedding_table.weight"):
            result = _grow_rows(key, own[key], tensor)
            if result is not None:
                state[key], note = result
                grown.append(note)
    load_state_dict_strict(model, state, f"finetune.from {source}")
    return grown


def _lora_run_model(spec: dict[str, Any], finetune: dict[str, Any], state: dict[str, torch.Tensor],
                    where: str) -> nn.Module:
    """A LoRA run's model: the architecture ``spec``, the base weights of its ``finetune.from`` (as stored), its
    adapters and other trained tensors from ``state``."""
    from .adapters import LoraSpec, add_lora

    spec = dict(spec)
    model = create_model(spec.pop("name"), **spec)
    load_base_weights(model, str(finetune["source"]),
                      LoadOptions(weights=finetune.get("weights", "ema"), format=finetune.get("format")))
    add_lora(model, LoraSpec(**dict(finetune.get("lora") or {})))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{where}: tensors this LoRA model lacks: {', '.join(unexpected[:4])}")
    check_state_dict_fits(model, {**own, **state}, where)
    model.load_state_dict(state, strict=False)
    return model


def load_model(source: str | os.PathLike, name: str | None = None, *, weights: Literal["ema", "raw"] = "ema",
               trust: bool = False, format: str | None = None, **overrides: Any) -> nn.Module:
    """Load a model from a dtx checkpoint folder, a training run (its newest valid checkpoint), or any file a
    plugin understands (e.g. an official DiT ``.pt``).

    ``name`` and ``overrides`` are model options (the architecture is otherwise read from the checkpoint or inferred
    from tensor shapes); ``weights`` ("ema" or "raw") and ``trust`` are loader options: which weights of a training
    checkpoint, and whether pickled objects may be unpickled; ``format`` names the registered checkpoint format to
    read a foreign file with when its tensors cannot tell (``format="sit"``: SiT's files have DiT's keys). The model
    is returned in eval mode.
    """
    model, _ = load_model_with_info(source, name, LoadOptions(weights=weights, trust=trust, format=format),
                                    **overrides)
    return model


def load_model_with_info(source: str | os.PathLike, name: str | None = None, options: LoadOptions = LoadOptions(),
                         **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``load_model`` plus what the reader found: ``format``, ``weights`` and, for dtx folders and runs, the
    stored config (a run's full training ``state`` under ``state``)."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    from .checkpoint import is_run_folder

    with weights_of(path, weight_bytes(path)):
        if options.format is not None and (is_run_folder(path) or (path / DTX_CONFIG).exists()):
            raise ConfigError(f"format {options.format!r}: {path} is a dtx run or model folder; a format applies to "
                              f"foreign checkpoints only")
        if path.is_dir() and (path / DTX_CONFIG).exists() and (path / DTX_WEIGHTS).exists():
            model, info = _load_dtx_folder(path, name, **overrides)
        elif is_run_folder(path):
            model, info = _load_run(path, options)
        elif path.is_dir():
            model, info = _load_folder(path, name, options, **overrides)
        else:
            model, info = _load_file(path, name, options, **overrides)
    return model.eval(), info


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weight_bytes(path: Path) -> int:
    """Bytes of weights at ``path``: a file's size, or the sizes of the weight files (``WEIGHT_SUFFIXES``) in a
    folder and its subfolders (links not followed), the bound ``weights_of`` checks a model built from it against."""
    if not path.is_dir():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            file = Path(folder) / name
            if name.endswith(WEIGHT_SUFFIXES) and not file.is_symlink():
                total += file.stat().st_size
    return total


def _detects(entry: plugins.Entry, path: Path, obj: Any) -> bool:
    """Whether checkpoint format ``entry`` claims ``path`` (``obj``: the file's contents, None for a folder). A
    ``detect`` that raises is a bug of its plugin: named in a warning and in ``dtx plugins``, and taken as a no, so
    the other formats still read every file."""
    try:
        return bool(entry.obj(path, obj))
    except Exception as exc:
        plugins.host().warn(entry.plugin, f"checkpoint format {entry.name!r}: detect() raised "
                                          f"{plugins._short_error(exc)}; the format is skipped")
        return False


def probe_formats() -> None:
    """Ask every checkpoint format whether it reads an empty folder (none should, and none should raise), so that
    ``dtx plugins`` names a format whose ``detect`` raises before a user's file meets it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dtx-probe-") as folder:
        for entry in plugins.host().table("checkpoint_format").values():
            _detects(entry, Path(folder), None)


def _named_format(options: LoadOptions) -> dict[str, plugins.Entry] | None:
    """The one format ``options.format`` names (None: detect among all); an unknown name lists the known ones."""
    if options.format is None:
        return None
    formats = plugins.host().table("checkpoint_format")
    if options.format not in formats:
        raise ConfigError(f"unknown checkpoint format {options.format!r}; formats known: "
                          f"{', '.join(sorted(formats)) or 'none'}")
    return {options.format: formats[options.format]}


def _load_folder(path: Path, name: str | None, options: LoadOptions, **overrides: Any) -> tuple[nn.Module, dict]:
    """A folder a registered format understands (``detect(path, None)``), e.g. a diffusers model or pipeline."""
    named = _named_format(options)
    formats = plugins.host().table("checkpoint_format")
    for entry in (named or formats).values():
        if named or _detects(entry, path, None):
            load = entry.meta.get("load") or entry.meta.get("args", (None,))[0]
            model, info = load(path, None, name, options, **overrides)
            return model, {"format": entry.name, **info}
    raise CheckpointError(f"{path} is neither a run folder (with checkpoints/), a checkpoint folder (with "
                          f"manifest.json), a dtx model folder ({DTX_WEIGHTS} + {DTX_CONFIG}) nor a folder an "
                          f"installed format reads (formats known: {', '.join(sorted(formats)) or 'none'})")


def _load_file(path: Path, name: str | None, options: LoadOptions, **overrides: Any) -> tuple[nn.Module, dict]:
    obj = read_safe(path, trust=options.trust)
    named = _named_format(options)
    formats = plugins.host().table("checkpoint_format")
    for entry in (named or formats).values():
        if named or _detects(entry, path, obj):
            load = entry.meta.get("load") or entry.meta.get("args", (None,))[0]
            model, info = load(path, obj, name, options, **overrides)
            return model, {"format": entry.name, **info}
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: no installed plugin recognises this checkpoint (top-level keys: {keys}); "
                          f"formats known: {', '.join(sorted(formats)) or 'none'}")
