"""Configuration: typed dataclass schemas (owned by each component), YAML recipes, dotlist overrides.

``load_config(Schema, "recipe.yaml", ["train.lr=1e-3"])`` returns a validated dataclass instance or raises a
``ConfigError`` that names the bad key and, where it can, the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import ConfigError

T = TypeVar("T")


def _allowed(schema: Any, dotted: str) -> str:
    node = schema
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = getattr(node, part, None) if node is not None else None
    if node is None or not dataclasses.is_dataclass(node):
        return ""
    names = [f.name for f in dataclasses.fields(node)]
    close = difflib.get_close_matches(parts[-1], names, n=1)
    hint = f" (did you mean {'.'.join(parts[:-1] + [close[0]])!r}?)" if close else ""
    return f"{hint}; allowed keys here: {', '.join(names)}"


def _literal_hint(schema: Any, dotted: str) -> str:
    node, parts = schema, dotted.split(".")
    for part in parts[:-1]:
        node = getattr(node, part, None)
        if node is None:
            return ""
    if not dataclasses.is_dataclass(node):
        return ""
    try:
        hints = typing.get_type_hints(type(node) if not isinstance(node, type) else node)
    except Exception:
        return ""
    tp = hints.get(parts[-1])
    if typing.get_origin(tp) is typing.Literal:
        return f"; allowed values: {', '.join(repr(a) for a in typing.get_args(tp))}"
    return ""


def _wrap(exc: OmegaConfBaseException, schema: Any) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if isinstance(exc, ConfigKeyError):
        return ConfigError(f"unknown config key {key!r}{_allowed(schema, key)}")
    if isinstance(exc, ValidationError):
        return ConfigError(f"bad value for config key {key!r}: {msg}{_literal_hint(schema, key)}")
    return ConfigError(f"config error at {key!r}: {msg}" if key else f"config error: {msg}")


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
            base = OmegaConf.merge(base, src)
        OmegaConf.to_container(base, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, schema if not isinstance(schema, type) else schema()) from None
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
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(cfg).__name__}")
    return cfg


def parse_dotlist(items: Sequence[str]) -> DictConfig:
    bad = [s for s in items if "=" not in s or s.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(items))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad override: {str(exc).splitlines()[0]}") from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def check(cond: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``cond``; for range checks in ``validate()`` methods."""
    if not cond:
        raise ConfigError(f"bad value for config key {key!r}: {message}")
