"""``dtx convert`` (any loadable checkpoint -> dtx folder, no pickle) and ``dtx flops`` (DiT params and Gflops)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from dtx.config import parse_dotlist
from dtx.errors import ConfigError


def _overrides(items: list[str] | None) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(parse_dotlist(items or []), resolve=True)  # type: ignore[return-value]


def _input_size(text: str) -> int | list[int]:
    parts = text.lower().split("x")
    try:
        sizes = [int(s) for s in parts]
    except ValueError:
        raise ConfigError(f"--input-size must be N or HxW (latent size), got {text!r}") from None
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) == 2:
        return sizes
    raise ConfigError(f"--input-size must be N or HxW (latent size), got {text!r}")


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
    from dtx.models import count_parameters, load_model, save_model

    overrides = _overrides(args.set)
    if args.raw_weights:
        overrides["use_ema"] = False
    model = load_model(args.source, args.name, trust=args.trust_checkpoint, **overrides)
    out = save_model(model, args.output)
    info = getattr(model, "dtx_load_info", {})
    print(f"wrote {out}/ ({model.dtx_spec['name']}, {len(model.state_dict())} tensors, "
          f"{count_parameters(model):,} parameters; read as {info.get('format', '?')}"
          f"{', ' + info['weights'] + ' weights' if 'weights' in info else ''})")
    return 0


def configure_flops(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="DiT preset or architecture, e.g. DiT-XL/2")
    p.add_argument("--input-size", help="latent size N or HxW (default: the model's, 32 = 256x256 images)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[], help="model options, e.g. block=adaln")
    p.add_argument("--measure", action="store_true", help="also count with torch.utils.flop_counter (meta tensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_flops(args: argparse.Namespace) -> int:
    from dtx.models import create_model, model_entry

    from .flops import dit_cost, measure_flops

    entry = model_entry(args.model)
    if entry.meta.get("family") != "dit":
        raise ConfigError(f"dtx flops counts DiT models only; {entry.name!r} is of family "
                          f"{entry.meta.get('family')!r}")
    overrides = _overrides(args.set)
    if args.input_size:
        overrides["input_size"] = _input_size(args.input_size)
    with torch.device("meta"):
        model = create_model(entry.name, **overrides)
    cfg = model.config
    cost = dit_cost(cfg)
    h, w = cfg.input_hw
    row: dict[str, Any] = {
        "model": entry.name, "block": cfg.block, "input_size": [h, w], "tokens": cfg.grid[0] * cfg.grid[1],
        "params": cost.params, "trainable_params": cost.trainable_params, "gflops_macs": round(cost.gflops, 4),
        "gflops_real": round(cost.real_gflops, 4), "train_gflops_per_image": round(3 * cost.real_gflops, 2),
    }
    if args.measure:
        row["gflops_measured"] = round(measure_flops(model) / 1e9, 4)
    if args.json:
        print(json.dumps(row))
        return 0
    print(f"{entry.name} ({cfg.block}) on {h}x{w} latents ({h * 8}x{w * 8} images), {row['tokens']} tokens")
    print(f"parameters: {cost.params:,} ({cost.trainable_params:,} trainable + {cost.frozen_params:,} frozen "
          f"pos_embed)")
    print(f"forward: {cost.gflops:.2f} Gflops as in the DiT paper (multiply-accumulates), "
          f"{cost.real_gflops:.2f} GFLOPs real")
    print(f"training step (forward + backward, ~3x): {3 * cost.real_gflops:.1f} GFLOPs per image")
    if args.measure:
        print(f"measured by torch.utils.flop_counter: {row['gflops_measured']:.2f} GFLOPs real")
    return 0
