"""``dtx recipes``: every registered training recipe with what it trains (the model and its family), on which data,
for how many steps and under which time cap, so that a user can choose one for ``dtx train NAME``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import plugins


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def recipe_row(name: str, entry: plugins.Entry) -> dict[str, Any]:
    """One recipe's facts from its resolved config: model, family, data, batch size, max_steps, max_minutes."""
    from ..errors import DtxError
    from .train import resolve_train_config

    row: dict[str, Any] = {"name": name, "plugin": entry.plugin, "description": entry.meta.get("description", "")}
    try:
        cfg = resolve_train_config(f"{entry.plugin}:{name}", out="unused")
    except DtxError as exc:  # a broken recipe is listed with its error, the others still are
        return {**row, "error": str(exc)}
    try:
        family = plugins.get("model", cfg.model.name).meta.get("family", "")
    except DtxError:  # its model's plugin is missing or clashes
        family = "?"
    return {**row, "model": cfg.model.name, "family": family, "data": cfg.data.name,
            "batch_size": cfg.data.batch_size, "max_steps": cfg.max_steps, "max_minutes": cfg.max_minutes or None}


def run(args: argparse.Namespace) -> int:
    rows = [recipe_row(name, entry) for name, entry in sorted(plugins.host().table("recipe").items())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no recipes registered; install a backbone, e.g. pip install dtx-backbone-dit")
        return 0
    print(f"{'recipe':<24} {'family':<8} {'model':<14} {'data':<24} {'batch':>5} {'max_steps':>9} "
          f"{'max_minutes':>11}  plugin")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<24} ERROR: {r['error']}  {r['plugin']}")
            continue
        cap = f"{r['max_minutes']:g}" if r["max_minutes"] else "-"
        print(f"{r['name']:<24} {r['family']:<8} {r['model']:<14} {r['data']:<24} {r['batch_size']:>5} "
              f"{r['max_steps']:>9} {cap:>11}  {r['plugin']}")
    print("train one with `dtx train NAME`; max_minutes stops a run early (0 or - : no time cap)")
    return 0
