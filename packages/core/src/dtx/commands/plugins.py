"""``dtx plugins``: every installed plugin, its version and hook API, what it registers, and what is wrong with it.

A plugin that failed (import error, exception in a hook, misspelled hook, another major hook API) is listed with
its error and a fix; one that loaded with something to fix (a hook its declared ``DTX_HOOK_API`` lacks, a newer
minor API, a contribution refused at use time: a sample flag taking a core option's name, a checkpoint format
whose ``detect`` raises) with a warning; names registered by more than one plugin are listed under ``conflicts``
with how to pick one. ``--check`` exits 1 when there is any of these (for a plugin's CI).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import plugins
from ..hookspecs import HOOK_API_VERSION


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a plugin has an error or a warning or two plugins register one name")


def _conflicts(host: plugins.PluginHost) -> list[dict[str, Any]]:
    return [{"kind": kind, "name": name, "plugins": plugs} for (kind, name), plugs in host.conflicts.items()]


def run(args: argparse.Namespace) -> int:
    from ..models import probe_formats

    host = plugins.host()
    probe_formats()  # a checkpoint format whose detect() raises becomes a warning of its plugin
    records = list(host)
    conflicts = _conflicts(host)
    if args.json:
        print(json.dumps([{"name": r.name, "dist": r.dist, "version": r.version, "module": r.module,
                           "registers": r.registers, "error": r.error, "hint": r.hint, "warnings": r.warnings,
                           "hook_api": r.hook_api, "conflicts": [c for c in conflicts if r.name in c["plugins"]]}
                          for r in records], indent=2))
    else:
        print(f"dtx hook API {HOOK_API_VERSION}")
        for r in records:
            print(f"{r.name}  ({' '.join(filter(None, (r.dist or r.module, r.version)))})")
            if r.error:
                print(f"  ERROR: {r.error}")
                if r.hint:
                    print(f"    fix: {r.hint}")
            for warning in r.warnings:
                print(f"  WARNING: {warning}")
            for kind, names in sorted(r.registers.items()):
                shown = ", ".join(names[:12]) + (f", ... (+{len(names) - 12})" if len(names) > 12 else "")
                print(f"  {plugins.plural(kind)}: {shown}")
            if r.hook_api:
                print(f"  hook API: {r.hook_api}")
        if conflicts:
            print("conflicts:")
            for c in conflicts:
                print(f"  {c['kind'].replace('_', ' ')} {c['name']!r}: {', '.join(c['plugins'])}")
                print(f"    {host.conflict_message(c['kind'], c['name'])}")
    problems = any(r.error or r.warnings for r in records) or bool(conflicts)
    return 1 if args.check and problems else 0
