"""``dtx convert``: any loadable checkpoint -> dtx folder, no pickle. (DiT's ``dtx flops`` figures come from the
core command through the counter registered with each model, ``dtx_dit.flops.dit_counter``.)"""

from __future__ import annotations

import argparse
from typing import Any

from dtx.config import parse_dotlist


def _overrides(items: list[str] | None) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(parse_dotlist(items or []), resolve=True)  # type: ignore[return-value]


def configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint to read: a dtx folder or any file a plugin understands (e.g. DiT .pt)")
    p.add_argument("output", help="folder to write model.safetensors + config.yaml into")
    p.add_argument("--name", help="architecture or preset to load into (default: read or inferred from the file)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[], help="model options, e.g. num_classes=10")
    p.add_argument("--raw-weights", action="store_true",
                   help="take a training checkpoint's 'model' weights instead of its EMA weights")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling arbitrary objects (only for files you trust)")


def run_convert(args: argparse.Namespace) -> int:
    from dtx.models import LoadOptions, count_parameters, load_model_with_info, model_spec, save_model

    options = LoadOptions(weights="raw" if args.raw_weights else "ema", trust=args.trust_checkpoint)
    model, info = load_model_with_info(args.source, args.name, options, **_overrides(args.set))
    out = save_model(model, args.output)
    print(f"wrote {out}/ ({(model_spec(model) or {}).get('name', '?')}, {len(model.state_dict())} tensors, "
          f"{count_parameters(model):,} parameters; read as {info.get('format', '?')}"
          f"{', ' + info['weights'] + ' weights' if 'weights' in info else ''})")
    return 0
