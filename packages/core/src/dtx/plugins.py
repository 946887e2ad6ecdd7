"""Plugin discovery and the registries that plugins fill.

Entry points of group ``dtx`` are loaded one by one (pluggy's own loader aborts on the first broken plugin), so a
plugin that fails to import is recorded with its error and everything else keeps working. ``DTX_PLUGINS=a,b``
loads only the named plugins (the built-in ``core`` plugin is always loaded); ``DTX_DISABLE_PLUGINS=a,b`` skips them.

Plugins load in a fixed order -- ``core`` first, then by entry-point name, then plugins registered at run time -- and
a name registered twice in one kind is never silently replaced: the first registration is kept (it is what
listings and the CLI show), the clash is recorded in ``PluginHost.conflicts`` and reported by ``dtx plugins``, and
looking the bare name up raises a ``PluginError`` naming the plugins. ``get(kind, "plugin:name")`` picks one
plugin's registration of any name.

A broken plugin never breaks dtx: an import error, an exception inside a hook, a misspelled hook or a plugin
written for another hook API (``DTX_HOOK_API``, see ``dtx.hookspecs``) is recorded on the plugin's
``PluginRecord`` with a fix (``hint``), the other plugins load, and ``dtx plugins`` shows it.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import logging
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownNameError, one_line


def lazy_exports(package: str, exports: dict[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for a plugin package: ``exports`` maps public name -> (module relative to
    ``package``, attribute); each is imported on first use and cached, so importing the package (as plugin
    discovery does) loads no model code."""
    import importlib
    import sys

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = exports[name]
        value = getattr(importlib.import_module(module, package), attr)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__

GROUP = "dtx"
BUILTIN = "core"
log = logging.getLogger(__name__)

#: registry kind -> hook name
KINDS: dict[str, str] = {
    "model": "dtx_register_models",
    "conditioner": "dtx_register_conditioners",
    "schedule": "dtx_register_schedules",
    "sampler": "dtx_register_samplers",
    "cache": "dtx_register_caches",
    "loss": "dtx_register_losses",
    "objective": "dtx_register_objectives",
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
    hook_api: str | None = None  # the plugin's DTX_HOOK_API (None: not declared, 1.0 assumed)
    warnings: list[str] = field(default_factory=list)  # loaded, but something to fix (hook API declaration)
    hint: str | None = None  # how to fix ``error``

    @property
    def label(self) -> str:
        """What to reinstall or upgrade: the distribution when known, else the module."""
        return self.dist or self.module

    def add_error(self, error: str, hint: str | None = None) -> None:
        """Record one more problem (several hooks may fail); the first hint given is kept."""
        self.error = error if self.error is None else f"{self.error}; {error}"
        self.hint = self.hint or hint

    def skip_hint(self) -> str:
        return f"DTX_DISABLE_PLUGINS={self.name} skips it"


def _split_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _presets(family: str, sizes: str, patches: str) -> tuple[str, ...]:
    return (family, *(f"{family}-{s}/{p}" for s in sizes.split() for p in patches))


#: what the first-party distributions register, by kind, so that a name one of them would provide is answered with
#: the package to install (``dtx train dit-digits`` with only dtx-core); tests/test_first_hour_families.py checks
#: it against their registrations
FIRST_PARTY: dict[str, dict[str, tuple[str, ...]]] = {
    "dtx-backbone-dit": {"model": _presets("DiT", "S B L XL", "248") + _presets("SiT", "S B L XL", "248")[1:],
                         "recipe": ("dit-digits", "dit-digits-flow", "dit-digits-lora")},
    "dtx-backbone-hdit": {"model": ("HDiT", "HDiT-FFHQ1024", "HDiT-Flowers256", "HDiT-ImageNet128",
                                    "HDiT-ImageNet256"), "recipe": ("hdit-digits",)},
    "dtx-backbone-latte": {"model": _presets("Latte", "S B L XL", "248"), "recipe": ("latte-moving-digits",),
                           "dataset": ("moving-digits",), "conditioner": ("image-labels",)},
    "dtx-ext-gentron": {"model": ("GenTron", "GenTron-S/2", "GenTron-B/2", "GenTron-XL/2", "GenTron-G/2", "PixArt",
                                  "PixArt-XL/2", "Latte-1"),
                        "recipe": ("gentron-digits", "gentron-moving-digits"),
                        "dataset": ("captioned-digits", "captioned-moving-digits", "text-embeddings"),
                        "conditioner": ("motion", "text", "text-embeddings")},
    "dtx-runner-ray": {"runner": ("ray",)},
}


def install_hint(kind: str, name: str) -> str:
    """``it comes with DIST: pip install DIST`` when a first-party distribution registers ``name`` (any case) as a
    ``kind``, else empty: the fix for an unknown name that is only missing its package."""
    bare = name.rpartition(":")[2].lower()
    for dist, kinds in FIRST_PARTY.items():
        if bare in (n.lower() for n in kinds.get(kind, ())):
            try:
                md.version(dist)
            except md.PackageNotFoundError:
                return f"it comes with {dist}: pip install {dist}"
            return f"it comes with {dist}, which is installed but not loaded: see `dtx plugins`"
    return ""


def plural(kind: str) -> str:
    """Readable plural of a registry kind: "loss" -> "losses", "checkpoint_format" -> "checkpoint formats"."""
    word = kind.replace("_", " ")
    return word + ("es" if word.endswith("s") else "s")


def _import_hint(exc: BaseException, rec: PluginRecord) -> str:
    """How to fix a plugin that fails to import: a missing dependency is named, anything else is the plugin's."""
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing and missing.split(".")[0] != rec.module.split(".")[0]:
        return (f"{rec.label} imports {missing!r}, which is not installed: install it (pip install "
                f"{missing.split('.')[0]}) or a release of {rec.label} that declares it; {rec.skip_hint()}")
    return (f"{rec.label} cannot be imported: reinstall it (pip install --force-reinstall {rec.label}) or report "
            f"the error to its authors; {rec.skip_hint()}")


def check_hook_api(module: Any, rec: PluginRecord) -> str | None:
    """Read the plugin's ``DTX_HOOK_API`` into ``rec.hook_api``; return an error (with ``rec.hint`` set) when the
    plugin must not be loaded: a malformed declaration or another major version than this dtx's."""
    declared = getattr(module, hookspecs.PLUGIN_API_ATTRIBUTE, None)
    if declared is None:
        return None
    ours = hookspecs.parse_api_version(hookspecs.HOOK_API_VERSION)
    try:
        theirs = hookspecs.parse_api_version(declared)
    except ValueError as exc:
        rec.hint = f"write {hookspecs.PLUGIN_API_ATTRIBUTE} = {hookspecs.HOOK_API_VERSION!r} in {rec.module}"
        return str(exc)
    rec.hook_api = declared
    if theirs[0] == ours[0]:
        return None
    core = f"this dtx-core ({_version('dtx-core') or 'unknown version'}) has hook API {hookspecs.HOOK_API_VERSION}"
    if theirs[0] > ours[0]:
        rec.hint = (f"upgrade dtx-core (pip install -U dtx-core) or install a release of {rec.label} written for "
                    f"hook API {ours[0]}.x; {rec.skip_hint()}")
    else:
        rec.hint = (f"upgrade {rec.label} (pip install -U {rec.label}) to a release written for hook API "
                    f"{ours[0]}.x; {rec.skip_hint()}")
    return f"written for hook API {declared}, but {core}; not loaded"


def _short_error(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno})" if frame else ""
    return f"{type(exc).__name__}: {one_line(exc)}{where}"


class PluginHost:
    """The plugin manager plus one registry per kind, filled lazily on first use.

    ``entries[kind][name]`` is the registration a bare name resolves to (the first one, in plugin load order);
    ``conflicts[(kind, name)]`` lists, in load order, the plugins that registered a name more than once between
    them (a plugin that registered it twice appears twice).
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.conflicts: dict[tuple[str, str], list[str]] = {}
        self._registrations: dict[str, list[Entry]] = {k: [] for k in KINDS}  # every register() call, in order
        self._loaded = False
        self._lock = threading.RLock()
        self.skipped: dict[str, tuple[str | None, str]] = {}  # entry point -> (distribution, why it is not loaded)

    # -- loading -----------------------------------------------------------------------------------------------
    def load(self) -> "PluginHost":
        with self._lock:
            if self._loaded:
                return self
            allow, deny = _split_env("DTX_PLUGINS"), _split_env("DTX_DISABLE_PLUGINS") or set()
            points = sorted(md.entry_points(group=GROUP), key=lambda e: (e.name != BUILTIN, e.name))
            _check_allow_list(allow, [ep.name for ep in points])
            self._loaded = True
            seen: set[str] = set()
            for ep in points:
                if ep.name in seen:
                    continue
                seen.add(ep.name)
                dist = getattr(ep, "dist", None)
                if ep.name != BUILTIN and ((allow is not None and ep.name not in allow) or ep.name in deny):
                    why = ("disabled by DTX_DISABLE_PLUGINS" if ep.name in deny else
                           f"not loaded: DTX_PLUGINS={os.environ.get('DTX_PLUGINS', '')} does not name it")
                    self.skipped[ep.name] = (dist.metadata["Name"] if dist else None, why)
                    continue
                rec = PluginRecord(ep.name, ep.value, dist.metadata["Name"] if dist else None,
                                   dist.version if dist else None)
                self.records[ep.name] = rec
                try:
                    module = ep.load()
                except (Exception, SystemExit) as exc:  # a broken plugin must not take the others down
                    rec.add_error(_short_error(exc), _import_hint(exc, rec))
                    continue
                self._add(module, rec)
            if BUILTIN not in self.records:  # dtx-core is importable but its entry point is not installed
                self.records = {BUILTIN: PluginRecord(
                    BUILTIN, "dtx.builtin", "dtx-core", _version("dtx-core"),
                    error=f"dtx-core's package metadata is missing (no entry point {BUILTIN!r} in group {GROUP!r}), "
                          "so core models, samplers and commands are not registered; reinstall dtx-core "
                          "(pip install --force-reinstall dtx-core, or pip install -e packages/core)"),
                    **self.records}
            for kind in KINDS:
                self._collect(kind)
            return self

    def _add(self, module: Any, rec: PluginRecord) -> None:
        """Register an installed plugin's module unless its hook API rules it out; record what to fix."""
        error = check_hook_api(module, rec)
        if error is not None:
            rec.add_error(error)
            return
        try:
            self._register(module, rec.name)
        except Exception as exc:  # pluggy's validation: hook arguments the spec does not have
            rec.add_error(_short_error(exc), f"fix the hook signatures in {rec.module} (see dtx.hookspecs); "
                                             f"{rec.skip_hint()}")
            return
        self._check_hooks(rec)

    def _check_hooks(self, rec: PluginRecord) -> None:
        """Unknown (misspelled) hooks become the record's error, hooks newer than its declared API and a newer
        minor API than ours its warnings."""
        unknown = self._unknown_hooks(rec.name)
        if unknown:
            rec.add_error(unknown, f"rename the function in {rec.module} to a dtx hook (listed in dtx.hookspecs "
                                   f"and docs/plugins.md); its other hooks are loaded")
        ours = hookspecs.parse_api_version(hookspecs.HOOK_API_VERSION)
        declared = hookspecs.parse_api_version(rec.hook_api) if rec.hook_api else (1, 0)
        attr = hookspecs.PLUGIN_API_ATTRIBUTE
        if declared > ours:
            rec.warnings.append(f"written for hook API {rec.hook_api}, newer than this dtx's "
                                f"{hookspecs.HOOK_API_VERSION}: hooks added since are not called; upgrade dtx-core "
                                f"(pip install -U dtx-core)")
        callers = self.pm.get_hookcallers(self.pm.get_plugin(rec.name)) or []
        for hook in sorted(c.name for c in callers if c.has_spec()):
            added = hookspecs.HOOK_ADDED.get(hook, (1, 0))
            if added > declared:
                version = f"{added[0]}.{added[1]}"
                rec.warnings.append(f"implements {hook}, added in hook API {version}, but declares "
                                    f"{rec.hook_api or '1.0 (no ' + attr + ')'}: write {attr} = {version!r} in "
                                    f"{rec.module}")

    def warn(self, plugin: str, message: str) -> None:
        """A contribution of ``plugin`` refused at use time (a sample flag taking a core option's name, a format's
        ``detect`` that raises): logged once and kept on its record, so ``dtx plugins`` shows it against the
        plugin; everything else keeps working."""
        rec = self.records.get(plugin)
        if rec is not None:
            if message in rec.warnings:
                return
            rec.warnings.append(message)
        log.warning("plugin %r: %s", plugin, message)

    def register_plugin(self, module: Any, name: str) -> None:
        """Register a plugin object at run time (tests, notebooks) and add what it contributes.

        Run-time plugins come after every installed plugin: a name they share with one is a conflict, not an
        override. A plugin written for another major hook API is refused (``PluginError``)."""
        with self._lock:
            self.load()
            if name in self.records or self.pm.get_plugin(name) is not None:
                raise PluginError(f"a plugin named {name!r} is already registered")
            rec = PluginRecord(name, getattr(module, "__name__", repr(module)))
            error = check_hook_api(module, rec)
            if error is not None:
                raise PluginError(f"plugin {name!r} cannot be registered: {error} ({rec.hint})")
            try:
                self._register(module, name)
            except Exception as exc:  # pluggy's validation: hook arguments the spec does not have
                raise PluginError(f"plugin {name!r} cannot be registered: {_short_error(exc)}") from exc
            self.records[name] = rec
            self._check_hooks(rec)
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
            for kind in KINDS:
                self._registrations[kind] = [e for e in self._registrations[kind] if e.plugin != name]
                self._index(kind)

    def _collect(self, kind: str, only: str | None = None) -> None:
        hook = getattr(self.pm.hook, KINDS[kind])
        order = {name: i for i, name in enumerate(self.records)}
        # load order decides which registration of a name wins, whatever order pluggy keeps its hooks in
        impls = sorted(hook.get_hookimpls(), key=lambda impl: order.get(impl.plugin_name, len(order)))
        for impl in impls:
            if only is not None and impl.plugin_name != only:
                continue
            rec = self.records.get(impl.plugin_name)

            def register(name: str, obj: Any, *args: Any, _p: str = impl.plugin_name, **meta: Any) -> None:
                if args:
                    meta["args"] = args
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_p!r} registered a {kind} with an invalid name {name!r}")
                self._registrations[kind].append(Entry(kind, name, obj, _p, meta))
                if rec is not None and name not in rec.registers.get(kind, []):
                    rec.registers.setdefault(kind, []).append(name)

            try:
                impl.function(**{a: register for a in impl.argnames})
            except Exception as exc:
                if rec is not None:
                    rec.add_error(f"in {KINDS[kind]}: {_short_error(exc)}",
                                  f"a bug in {rec.label}: report it to its authors (what the hook registered "
                                  f"before failing is kept); {rec.skip_hint()}")
        self._index(kind)

    def _index(self, kind: str) -> None:
        """Rebuild ``entries[kind]`` (first registration of each name wins) and this kind's ``conflicts``."""
        table: dict[str, Entry] = {}
        providers: dict[str, list[str]] = {}
        for entry in self._registrations[kind]:
            table.setdefault(entry.name, entry)
            providers.setdefault(entry.name, []).append(entry.plugin)
        self.entries[kind] = table
        for key in [key for key in self.conflicts if key[0] == kind]:
            del self.conflicts[key]
        for name, plugs in providers.items():
            if len(plugs) > 1:
                self.conflicts[(kind, name)] = plugs

    # -- lookup ------------------------------------------------------------------------------------------------
    def table(self, kind: str) -> dict[str, Entry]:
        """Every name of a kind and the registration it resolves to (the first one where plugins conflict)."""
        self.load()
        return self.entries[kind]

    def registrations(self, kind: str, name: str | None = None) -> list[Entry]:
        """Every registration of a kind (of one name, if given), in plugin load order, conflicting ones included."""
        self.load()
        return [e for e in self._registrations[kind] if name is None or e.name == name]

    def get(self, kind: str, name: str) -> Entry:
        """The registration of ``name``, or of ``plugin:name`` -- one plugin's registration of the name.

        Raises ``UnknownNameError`` (listing close matches) when nothing is registered under the name, and
        ``PluginError`` when several registrations of the bare name conflict."""
        table = self.table(kind)
        key = name if name in table else {k.lower(): k for k in table}.get(name.lower())
        if key is not None:
            if (kind, key) in self.conflicts:
                raise PluginError(self.conflict_message(kind, key))
            return table[key]
        plugin, sep, bare = name.partition(":")
        if sep and plugin in self.records:
            return self._get_qualified(kind, plugin, bare)
        close = difflib.get_close_matches(name, list(table), n=5, cutoff=0.5)
        providers = sorted({e.plugin for e in table.values()})
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        broken = [r.name for r in self.records.values() if r.error]
        skipped = self._skipped_provider(kind, name)
        missing = skipped or install_hint(kind, name)
        hint = "" if skipped else hint  # a close name of another family ("did you mean 'HDiT'?") would mislead
        msg = (f"unknown {kind.replace('_', ' ')} {name!r}{f' ({missing})' if missing else ''}{hint} "
               f"(installed plugins providing {plural(kind)}: {', '.join(providers) or 'none'}")
        if broken:
            msg += f"; plugins that failed to load: {', '.join(broken)} -- see `dtx plugins`"
        raise UnknownNameError(msg + ")")

    def _skipped_provider(self, kind: str, name: str) -> str:
        """``plugin 'P', which registers it, is disabled by ...`` when an installed first-party plugin that
        registers ``name`` as a ``kind`` was skipped by ``DTX_PLUGINS`` / ``DTX_DISABLE_PLUGINS``, else empty."""
        bare = name.rpartition(":")[2].lower()
        for plugin, (dist, why) in self.skipped.items():
            names = FIRST_PARTY.get(dist or "", {}).get(kind, ())
            if dist and bare in (n.lower() for n in names) and _version(dist) is not None:
                return f"plugin {plugin!r}, which registers it, is {why}"
        return ""

    def _get_qualified(self, kind: str, plugin: str, name: str) -> Entry:
        own = {}
        for entry in self._registrations[kind]:
            if entry.plugin == plugin:
                own.setdefault(entry.name, entry)  # a plugin that registered a name twice: its first one
        key = name if name in own else {k.lower(): k for k in own}.get(name.lower())
        if key is not None:
            return own[key]
        close = difflib.get_close_matches(name, list(own), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(f'{plugin}:{c}') for c in close)}?" if close else ""
        raise UnknownNameError(f"plugin {plugin!r} registers no {kind.replace('_', ' ')} {name!r}{hint} "
                               f"(its {plural(kind)}: {', '.join(sorted(own)) or 'none'})")

    def conflict_message(self, kind: str, name: str) -> str:
        """One line on a name registered more than once: every plugin, what a bare name does, how to choose."""
        plugs = self.conflicts[(kind, name)]
        distinct = list(dict.fromkeys(plugs))
        what = f"{kind.replace('_', ' ')} {name!r}"
        if len(distinct) == 1:
            return (f"{what} is registered {len(plugs)} times by plugin {distinct[0]!r} (a bug in that plugin); "
                    f"{distinct[0] + ':' + name!r} picks its first registration")
        picks = " or ".join(repr(f"{p}:{name}") for p in distinct)
        removable = [p for p in distinct if p != BUILTIN]
        return (f"{what} is registered by several plugins: {', '.join(distinct)}; listings show {distinct[0]}'s, "
                f"the bare name is refused: {picks} picks one, or DTX_DISABLE_PLUGINS={removable[-1]} removes one "
                f"(see `dtx plugins`)")

    def names(self, kind: str) -> list[str]:
        return sorted(self.table(kind))

    def __iter__(self) -> Iterator[PluginRecord]:
        self.load()
        return iter(self.records.values())


def _check_allow_list(allow: set[str] | None, installed: list[str]) -> None:
    """Refuse a ``DTX_PLUGINS`` that names a plugin no entry point provides (a typo would silently load nothing)."""
    unknown = sorted((allow or set()) - set(installed))
    if unknown:
        raise PluginError(f"DTX_PLUGINS names unknown plugin {', '.join(map(repr, unknown))}; installed: "
                          f"{', '.join(sorted(set(installed))) or 'none'}")


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
