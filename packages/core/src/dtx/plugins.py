"""Plugin discovery and the registries that plugins fill.

Entry points of group ``dtx`` are loaded one by one (pluggy's own loader aborts on the first broken plugin), so a
plugin that fails to import is recorded with its error and everything else keeps working. ``DTX_PLUGINS=a,b``
loads only the named plugins (the built-in ``core`` plugin is always loaded); ``DTX_DISABLE_PLUGINS=a,b`` skips them.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownNameError

GROUP = "dtx"
BUILTIN = "core"

#: registry kind -> hook name
KINDS: dict[str, str] = {
    "model": "dtx_register_models",
    "conditioner": "dtx_register_conditioners",
    "schedule": "dtx_register_schedules",
    "sampler": "dtx_register_samplers",
    "loss": "dtx_register_losses",
    "dataset": "dtx_register_datasets",
    "runner": "dtx_register_runners",
    "recipe": "dtx_register_recipes",
    "checkpoint_format": "dtx_register_checkpoint_formats",
    "command": "dtx_register_commands",
}


@dataclass
class Entry:
    """One registered thing: its name, the object (factory/function), the plugin that provided it, and metadata."""

    kind: str
    name: str
    obj: Any
    plugin: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginRecord:
    """What ``dtx plugins`` reports for one plugin."""

    name: str
    module: str
    dist: str | None = None
    version: str | None = None
    error: str | None = None
    registers: dict[str, list[str]] = field(default_factory=dict)


def _split_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def plural(kind: str) -> str:
    """Readable plural of a registry kind: "loss" -> "losses", "checkpoint_format" -> "checkpoint formats"."""
    word = kind.replace("_", " ")
    return word + ("es" if word.endswith("s") else "s")


def _short_error(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno})" if frame else ""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {message}{where}"


class PluginHost:
    """The plugin manager plus one registry per kind, filled lazily on first use."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading -----------------------------------------------------------------------------------------------
    def load(self) -> "PluginHost":
        with self._lock:
            if self._loaded:
                return self
            self._loaded = True
            allow, deny = _split_env("DTX_PLUGINS"), _split_env("DTX_DISABLE_PLUGINS") or set()
            seen: set[str] = set()
            for ep in sorted(md.entry_points(group=GROUP), key=lambda e: (e.name != BUILTIN, e.name)):
                if ep.name in seen:
                    continue
                seen.add(ep.name)
                if ep.name != BUILTIN and ((allow is not None and ep.name not in allow) or ep.name in deny):
                    continue
                dist = getattr(ep, "dist", None)
                rec = PluginRecord(ep.name, ep.value, dist.metadata["Name"] if dist else None,
                                   dist.version if dist else None)
                self.records[ep.name] = rec
                try:
                    self._register(ep.load(), ep.name)
                except Exception as exc:  # a broken plugin must not take the others down
                    rec.error = _short_error(exc)
                else:
                    rec.error = self._unknown_hooks(ep.name)
            if BUILTIN not in self.records:  # running from a source tree without installed metadata
                from . import builtin

                self.records[BUILTIN] = PluginRecord(BUILTIN, builtin.__name__, "dtx-core", _version("dtx-core"))
                self.pm.register(builtin, name=BUILTIN)
            for kind in KINDS:
                self._collect(kind)
            return self

    def register_plugin(self, module: Any, name: str) -> None:
        """Register a plugin object at run time (tests, notebooks) and add what it contributes."""
        with self._lock:
            self.load()
            if name in self.records or self.pm.get_plugin(name) is not None:
                raise PluginError(f"a plugin named {name!r} is already registered")
            try:
                self._register(module, name)
            except Exception as exc:  # pluggy's validation: hook arguments the spec does not have
                raise PluginError(f"plugin {name!r} cannot be registered: {_short_error(exc)}") from exc
            self.records[name] = PluginRecord(name, getattr(module, "__name__", repr(module)),
                                              error=self._unknown_hooks(name))
            for kind in KINDS:
                self._collect(kind, only=name)

    def _register(self, module: Any, name: str) -> None:
        """``pm.register`` that leaves nothing behind when pluggy rejects one of the plugin's hooks."""
        try:
            self.pm.register(module, name=name)
        except Exception:
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            raise

    def _unknown_hooks(self, name: str) -> str | None:
        """An error naming the plugin's hook implementations that match no dtx hook (usually a typo), or None."""
        callers = self.pm.get_hookcallers(self.pm.get_plugin(name)) or []
        unknown = sorted(c.name for c in callers if not c.has_spec())
        if not unknown:
            return None
        hints = []
        for hook in unknown:
            close = difflib.get_close_matches(hook, list(KINDS.values()), n=1)
            hints.append(hook + (f" (did you mean {close[0]}?)" if close else " (not a dtx hook)"))
        return f"unknown hook {', '.join(hints)}"

    def unregister_plugin(self, name: str) -> None:
        with self._lock:
            plugin = self.pm.get_plugin(name)
            if plugin is not None:
                self.pm.unregister(plugin)
            self.records.pop(name, None)
            for table in self.entries.values():
                for key in [k for k, e in table.items() if e.plugin == name]:
                    del table[key]

    def _collect(self, kind: str, only: str | None = None) -> None:
        hook = getattr(self.pm.hook, KINDS[kind])
        for impl in hook.get_hookimpls():
            if only is not None and impl.plugin_name != only:
                continue
            rec = self.records.get(impl.plugin_name)

            def register(name: str, obj: Any, *args: Any, _p: str = impl.plugin_name, **meta: Any) -> None:
                if args:
                    meta["args"] = args
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_p!r} registered a {kind} with an invalid name {name!r}")
                self.entries[kind][name] = Entry(kind, name, obj, _p, meta)
                if rec is not None:
                    rec.registers.setdefault(kind, []).append(name)

            try:
                impl.function(**{a: register for a in impl.argnames})
            except Exception as exc:
                if rec is not None:
                    error = f"in {KINDS[kind]}: {_short_error(exc)}"
                    rec.error = error if rec.error is None else f"{rec.error}; {error}"

    # -- lookup ------------------------------------------------------------------------------------------------
    def table(self, kind: str) -> dict[str, Entry]:
        self.load()
        return self.entries[kind]

    def get(self, kind: str, name: str) -> Entry:
        table = self.table(kind)
        if name in table:
            return table[name]
        folded = {k.lower(): k for k in table}
        if name.lower() in folded:
            return table[folded[name.lower()]]
        close = difflib.get_close_matches(name, list(table), n=5, cutoff=0.5)
        providers = sorted({e.plugin for e in table.values()})
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        broken = [r.name for r in self.records.values() if r.error]
        msg = (f"unknown {kind.replace('_', ' ')} {name!r}{hint} "
               f"(installed plugins providing {plural(kind)}: {', '.join(providers) or 'none'}")
        if broken:
            msg += f"; plugins that failed to load: {', '.join(broken)} -- see `dtx plugins`"
        raise UnknownNameError(msg + ")")

    def names(self, kind: str) -> list[str]:
        return sorted(self.table(kind))

    def __iter__(self) -> Iterator[PluginRecord]:
        self.load()
        return iter(self.records.values())


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


_HOST: PluginHost | None = None


def host() -> PluginHost:
    """The process-wide plugin host (created and loaded on first use)."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost()
    return _HOST.load()


def reset() -> None:
    """Forget loaded plugins, so the next ``host()`` call rediscovers them (tests, env-var changes)."""
    global _HOST
    _HOST = None


def get(kind: str, name: str) -> Entry:
    return host().get(kind, name)


def names(kind: str) -> list[str]:
    return host().names(kind)


def register_plugin(module: Any, name: str) -> None:
    host().register_plugin(module, name)


def unregister_plugin(name: str) -> None:
    host().unregister_plugin(name)


Factory = Callable[..., Any]
