"""Which keyword options a registered factory accepts, read once for models, datasets, conditioners and loaders."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Iterable

from .errors import ConfigError


def factory_options(factory: Any) -> set[str] | None:
    """Option names of ``factory``: the fields of its ``config_class`` dataclass when it names one, else its
    keyword parameters; None when it takes ``**kwargs`` without a config class (anything goes)."""
    cfg_cls = getattr(factory, "config_class", None)
    if cfg_cls is not None and dataclasses.is_dataclass(cfg_cls):
        return {f.name for f in dataclasses.fields(cfg_cls)}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_options(what: str, factory: Any, given: Iterable[str]) -> None:
    """Raise one ``ConfigError`` naming each option ``factory`` does not accept, with a close match and the list."""
    check_names(what, factory_options(factory), given)


def check_names(what: str, accepted: set[str] | None, given: Iterable[str]) -> None:
    """``check_options`` against an explicit set of accepted names (None: anything)."""
    if accepted is None:
        return
    unknown = sorted(set(given) - accepted)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(accepted), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{what} has no option {', '.join(hints)}; options: {', '.join(sorted(accepted)) or 'none'}")
