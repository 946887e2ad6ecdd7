"""Configuration: typed dataclass schemas (owned by each component), YAML recipes, dotlist overrides.

``load_config(Schema, "recipe.yaml", ["train.lr=1e-3"])`` returns a validated dataclass instance or raises a
``ConfigError`` that names the bad key and, where it can, the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from .errors import ConfigError

T = TypeVar("T")


def _dataclass_at(schema: Any, parts: Sequence[str]) -> type | None:
    """The dataclass type reached by following ``parts`` through the schema's field types (no instantiation)."""
    cls = schema if isinstance(schema, type) else type(schema)
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        tp = _hints(cls).get(part)
        options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        cls = next((t for t in options if isinstance(t, type) and dataclasses.is_dataclass(t)), None)
    return cls if cls is not None and dataclasses.is_dataclass(cls) else None


def _with_aliases(schema: Any, src: Any, parts: tuple[str, ...] = ()) -> Any:
    """``src`` (a mapping) with the recipe spellings a section declares (``aliases``: e.g. ``finetune.from`` for the
    field ``source``, a name Python reserves) renamed to their fields, at any depth."""
    if not isinstance(src, (dict, DictConfig)):
        return src
    node = _dataclass_at(schema, parts)
    aliases = getattr(node, "aliases", {}) if node is not None else {}
    items = src if isinstance(src, dict) else OmegaConf.to_container(src)
    out = {}
    for key, value in items.items():  # type: ignore[union-attr]
        name = aliases.get(key, key) if isinstance(key, str) else key
        out[name] = _with_aliases(schema, value, (*parts, str(name))) if node is not None else value
    return out


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _allowed(schema: Any, dotted: str) -> str:
    parts = dotted.split(".")
    node = _dataclass_at(schema, parts[:-1])
    if node is None:
        return ""
    names = [f.name for f in dataclasses.fields(node)]
    close = difflib.get_close_matches(parts[-1], names, n=1)
    hint = f" (did you mean {'.'.join(parts[:-1] + [close[0]])!r}?)" if close else ""
    return f"{hint}; allowed keys here: {', '.join(names)}"


def _renamed(schema: Any, dotted: str) -> str:
    """The key that replaced ``dotted`` where its section declares one (a ``renamed_keys`` class mapping), else ""."""
    parts = dotted.split(".")
    node = _dataclass_at(schema, parts[:-1])
    new = getattr(node, "renamed_keys", {}).get(parts[-1]) if node is not None else None
    return ".".join(parts[:-1] + [new]) if new else ""


def _literal_values(schema: Any, dotted: str) -> str:
    """The allowed values of a Literal-typed field, as a comma-separated list ("" for other fields)."""
    parts = dotted.split(".")
    node = _dataclass_at(schema, parts[:-1])
    tp = _hints(node).get(parts[-1]) if node is not None else None
    if typing.get_origin(tp) is typing.Literal:
        return ", ".join(repr(a) for a in typing.get_args(tp))
    return ""


def _wrap(exc: OmegaConfBaseException, schema: Any) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if isinstance(exc, ConfigKeyError):
        renamed = _renamed(schema, key)
        if renamed:
            return ConfigError(f"config key {key!r} was renamed: use {renamed!r}")
        return ConfigError(f"unknown config key {key!r}{_allowed(schema, key)}")
    if isinstance(exc, MissingMandatoryValue) and key:
        return ConfigError(f"missing value for required config key {key!r}")
    if isinstance(exc, ValidationError):
        allowed = _literal_values(schema, key) if key else ""
        if allowed:
            return ConfigError(f"bad value {getattr(exc, 'value', None)!r} for config key {key!r}; "
                               f"allowed values: {allowed}")
        return ConfigError(f"bad value for config key {key!r}: {msg}" if key else f"bad config value: {msg}")
    return ConfigError(f"config error at {key!r}: {msg}" if key else f"config error: {msg}")


def _yaml_problem(exc: Exception) -> str:
    """One line for a YAML parse error: the problem and where, instead of PyYAML's multi-line report."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


_ENV_INTERPOLATION = re.compile(r"\$\{\s*(oc\.env|env)\s*:")


def _reject_env(src: Any, where: str = "") -> None:
    """Environment interpolation (``${oc.env:VAR}``) is off: its value would be written into config.yaml and every
    checkpoint. Raise a ConfigError naming the first key that uses it."""
    if isinstance(src, (DictConfig, ListConfig)):
        src = OmegaConf.to_container(src, resolve=False)
    if isinstance(src, dict):
        for k, v in src.items():
            _reject_env(v, f"{where}.{k}" if where else str(k))
    elif isinstance(src, (list, tuple)):
        for i, v in enumerate(src):
            _reject_env(v, f"{where}[{i}]")
    elif isinstance(src, str) and _ENV_INTERPOLATION.search(src):
        raise ConfigError(f"config key {where!r} reads an environment variable ({src}); environment interpolation "
                          f"is off so that no variable's value is written into config.yaml or checkpoints: pass the "
                          f"value as an override instead (e.g. {where}=\"$VAR\" in the shell)")


def reject_env(data: Any, source: str | os.PathLike) -> None:
    """Refuse environment interpolation anywhere in ``data`` read from ``source`` (a JSON file dtx reads, such as a
    diffusers ``config.json``), naming the file and the key, so that no such string reaches a config.yaml dtx
    writes."""
    try:
        _reject_env(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def read_config(src: Any, source: str | os.PathLike) -> dict[str, Any]:
    """The one reader of configs that dtx stored or was handed as files (a dtx model folder's ``config.yaml``, a
    run checkpoint's config, data facts and model spec): ``src`` (a YAML path, a DictConfig or a dict) as plain
    containers, environment interpolation refused and interpolation between keys resolved. Every problem (an
    environment variable, a recursive or dangling interpolation) is one ConfigError naming ``source`` and the key."""
    if isinstance(src, (str, os.PathLike)):
        src = read_yaml(src)
    reject_env(src, source)
    try:
        cfg = src if isinstance(src, DictConfig) else OmegaConf.create(src)
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_wrap(exc, None)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    return data


def structured(schema: type[T] | T) -> DictConfig:
    return OmegaConf.structured(schema)


def merge(schema: type[T] | T, *sources: Any) -> DictConfig:
    """Merge dicts/DictConfigs/YAML paths/dotlists onto a structured schema, validating types and keys."""
    base = OmegaConf.structured(schema)
    try:
        for src in sources:
            if src is None:
                continue
            if isinstance(src, (str, os.PathLike)):
                src = read_yaml(src)
            elif isinstance(src, (list, tuple)):
                src = parse_dotlist(src)
            _reject_env(src)
            base = OmegaConf.merge(base, _with_aliases(schema, src))
        OmegaConf.to_container(base, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, schema) from None
    return base


def load_config(schema: type[T] | T, *sources: Any) -> T:
    """Validated dataclass instance from a schema and any number of overrides (later wins)."""
    cfg = merge(schema, *sources)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, schema) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj  # type: ignore[return-value]


def read_yaml(path: str | os.PathLike) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        cfg = OmegaConf.load(p)
    except Exception as exc:
        raise ConfigError(f"{p}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(cfg).__name__}")
    if len(cfg) == 0:
        raise ConfigError(f"{p}: config file is empty")
    return cfg


def parse_dotlist(items: Sequence[str]) -> DictConfig:
    bad = [s for s in items if "=" not in s or s.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    for item in items:
        try:
            OmegaConf.from_dotlist([item])
        except Exception as exc:  # OmegaConf grammar errors and PyYAML errors in the value
            raise ConfigError(f"bad override {item!r}: {_yaml_problem(exc)}") from None
    return OmegaConf.from_dotlist(list(items))


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` command-line items as a plain nested dict (values typed as YAML reads them)."""
    return OmegaConf.to_container(parse_dotlist(items), resolve=True)  # type: ignore[return-value]


#: seeds are 64-bit signed integers wherever they reach a generator (``seed`` in a config, ``--seed``)
SEED_RANGE = (0, 2**63)


def seed_arg(text: str) -> int:
    """An argparse ``type`` for ``--seed``: an integer in ``SEED_RANGE`` (a larger one overflows torch's
    generators); argparse reports anything else as one line naming the option."""
    import argparse

    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return seed


def parse_device(text: str | None, flag: str = "--device") -> Any:
    """The ``torch.device`` a command-line option names (None: CUDA when available, else CPU): a name torch does
    not know, a CUDA device this machine lacks or a device dtx does not run on is a ConfigError naming ``flag``."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {text!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag} {text!r}: dtx runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {text}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def check(cond: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``cond``; for range checks in ``validate()`` methods."""
    if not cond:
        raise ConfigError(f"bad value for config key {key!r}: {message}")


def _mentions_float(tp: Any) -> bool:
    return tp is float or any(_mentions_float(a) for a in typing.get_args(tp))


def check_finite(obj: Any, prefix: str = "") -> None:
    """Raise a ConfigError naming the first float-typed field (also inside lists, dicts and nested dataclasses)
    that holds NaN or an infinity; free-form ``Any`` options are left to their owners."""
    import math

    def visit(value: Any, key: str, typed: bool) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            hints = _hints(type(value))
            for f in dataclasses.fields(value):
                visit(getattr(value, f.name), f"{key}.{f.name}" if key else f.name, _mentions_float(hints.get(f.name)))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{key}[{i}]", typed)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{key}.{k}", typed)
        elif typed and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"bad value for config key {key!r}: must be a finite number, got {value}")

    visit(obj, prefix, False)


def register_recipe_folder(register: Any, folder: str | os.PathLike) -> None:
    """Register every ``*.yaml`` in ``folder`` as a recipe named by its stem, described by its first comment line
    (for a plugin's ``dtx_register_recipes`` hook)."""
    for path in sorted(Path(folder).glob("*.yaml")):
        first = next((line.strip() for line in path.read_text().splitlines() if line.strip()), "")
        register(path.stem, str(path), description=first.lstrip("#").strip() if first.startswith("#") else "")
