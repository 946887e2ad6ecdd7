"""``dtx convert SOURCE OUT``: any loadable checkpoint (a training run, a dtx folder, a file a registered format reads)
written as a dtx model folder, ``model.safetensors`` + ``config.yaml``, without pickle. A run's data facts, objective,
conditioning and sampling defaults go into ``config.yaml`` too, so ``dtx sample OUT`` samples as the run would.

``--to diffusers`` writes a folder diffusers' ``from_pretrained`` reads instead (a pipeline folder when the run has a
VAE), through the checkpoint format that registered an ``export`` for the model's family; the numerical differences
between dtx and diffusers that the format reports are printed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import parse_options

#: the sections of a run's config that sampling a converted model needs
SAMPLING_SECTIONS = ("objective", "conditioning", "sample")


def _overrides(items: list[str] | None) -> dict[str, Any]:
    return parse_options(items or [])


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a training run, a dtx folder or any file a plugin understands (e.g. a DiT .pt)")
    p.add_argument("output", help="a new or empty folder to write model.safetensors + config.yaml into (--to "
                                  "diffusers: the diffusers model or pipeline)")
    p.add_argument("--to", choices=("dtx", "diffusers"), default="dtx",
                   help="dtx: a dtx model folder (default); diffusers: a folder diffusers' from_pretrained reads")
    p.add_argument("--name", help="architecture or preset to load into (default: read or inferred from the file)")
    p.add_argument("--format", help="the registered checkpoint format to read SOURCE with when its tensors cannot "
                                    "tell (e.g. sit: SiT's files have DiT's key names); default: detected")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[], help="model options, e.g. num_classes=10")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--adapter-only", action="store_true",
                      help="a LoRA run: write only its adapter, in PEFT's format (adapter_model.safetensors + "
                           "adapter_config.json)")
    lora.add_argument("--merge", action="store_true",
                      help="a LoRA run: fold the adapter into the base weights and write a plain model (what "
                           "converting a LoRA run does anyway)")
    p.add_argument("--raw-weights", action="store_true",
                   help="take a training checkpoint's raw 'model' weights instead of its EMA weights")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling arbitrary objects (only for files you trust)")


def sampling_facts(info: dict[str, Any]) -> dict[str, Any]:
    """What a loaded source knows for sampling: a run's data_info and config sections, a dtx folder's own."""
    state = info.get("state")
    if state is not None:
        return {"data_info": state["data_info"], **{k: state["config"][k] for k in SAMPLING_SECTIONS}}
    stored = dict(info.get("config") or {})
    return {k: stored[k] for k in ("data_info", *SAMPLING_SECTIONS) if k in stored}


def run(args: argparse.Namespace) -> int:
    from ..diffusers_interop import check_output_folder
    from ..errors import ConfigError
    from ..models import LoadOptions, count_parameters, load_model_with_info, model_spec, save_model

    check_output_folder(Path(args.output))  # before loading; a folder with files (a run, a model) is never written
    options = LoadOptions(weights="raw" if args.raw_weights else "ema", trust=args.trust_checkpoint,
                          format=args.format)
    model, info = load_model_with_info(args.source, args.name, options, **_overrides(args.set))
    for note in info.get("notes") or []:
        print(f"note: {note}")
    from ..adapters import has_lora, merge_lora, save_adapter

    if (args.adapter_only or args.merge) and not has_lora(model):
        raise ConfigError(f"{'--adapter-only' if args.adapter_only else '--merge'}: {args.source} has no LoRA "
                          f"adapter (a run with finetune.method: lora has one)")
    if args.adapter_only:
        ft = (info.get("state") or {}).get("config", {}).get("finetune") or {}
        if args.to == "diffusers":
            return _adapter_to_diffusers(model, Path(args.output), ft.get("source"))
        out = save_adapter(model, args.output, base=ft.get("source"))
        print(f"wrote {out}/ (PEFT LoRA adapter, dtx module names)")
        return 0
    if has_lora(model):
        merge_lora(model)
        print("note: the LoRA adapter is folded into the base weights (--adapter-only writes it alone)")
    if args.to == "diffusers":
        return _to_diffusers(model, info, Path(args.output))
    out = save_model(model, args.output, extra=sampling_facts(info))
    print(f"wrote {out}/ ({(model_spec(model) or {}).get('name', '?')}, {len(model.state_dict())} tensors, "
          f"{count_parameters(model):,} parameters; read as {info.get('format', '?')}"
          f"{', ' + info['weights'] + ' weights' if 'weights' in info else ''})")
    return 0


def _export_via(meta: str, model: Any, args: tuple[Any, ...], out: Path, wrote: str, missing: str) -> int:
    """Hand ``model`` (and ``args``) to the first registered format whose ``meta`` exporter takes it (a None answer
    is "not my family"), which writes ``out``; print what it notes."""
    from .. import plugins
    from ..errors import ConfigError
    from ..models import model_spec

    for entry in plugins.host().table("checkpoint_format").values():
        export = entry.meta.get(meta)
        notes = export(model, *args) if export is not None else None
        if notes is not None:
            print(f"wrote {out}/ ({wrote}, via {entry.name})")
            for note in notes:
                print(f"note: {note}")
            return 0
    name = (model_spec(model) or {}).get("name", type(model).__name__)
    raise ConfigError(f"no installed plugin exports {name} ({type(model).__name__}) {missing}")


def _adapter_to_diffusers(model: Any, out: Path, base: str | None) -> int:
    """A LoRA adapter under diffusers' module names, through the format that registered ``export_adapter``."""
    return _export_via("export_adapter", model, (out, base), out, "PEFT LoRA adapter, diffusers module names",
                       "adapters to diffusers' module names")


def _to_diffusers(model: Any, info: dict[str, Any], out: Path) -> int:
    """Hand ``model`` to the registered format that exports its family to diffusers; print what it notes."""
    return _export_via("export", model, (sampling_facts(info), out), out, "diffusers", "to diffusers")
