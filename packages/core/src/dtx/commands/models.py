"""``dtx models``: the registered model architectures and presets, with parameter counts (built on the meta
device) and their family and plugin."""

from __future__ import annotations

import argparse
import json

from .. import plugins


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", help="only models of this family")
    p.add_argument("--no-params", action="store_true", help="skip building models to count parameters")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models import count_parameters, create_model

    rows = []
    for name, entry in sorted(plugins.host().table("model").items()):
        if args.family is not None and entry.meta.get("family") != args.family:
            continue
        params = None
        if not args.no_params:
            with torch.device("meta"):
                try:  # by plugin:name, so a name two plugins register is still listed (as the one in use)
                    params = count_parameters(create_model(f"{entry.plugin}:{name}"))
                except Exception:  # architectures without defaults for every option
                    params = None
        rows.append({"name": name, "family": entry.meta.get("family", ""), "plugin": entry.plugin,
                     "params": params, "description": entry.meta.get("description", "")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models registered; install a backbone, e.g. pip install dtx-backbone-dit")
    else:
        print(f"{'model':<20} {'params':>10}  {'family':<8} {'plugin':<8} description")
    for r in rows:
        p = f"{r['params'] / 1e6:9.2f}M" if r["params"] is not None else "        -"
        print(f"{r['name']:<20} {p}  {r['family']:<8} {r['plugin']:<8} {r['description']}")
    return 0
