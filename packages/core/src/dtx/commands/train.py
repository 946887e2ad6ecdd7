"""``dtx train PRESET_OR_CONFIG.yaml [key=value ...]``: a registered recipe (or a YAML file) plus overrides becomes a
validated ``TrainConfig`` that a runner executes: one process (``local``) unless more workers or a cluster are asked
for (``ray``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .. import plugins
from ..config import read_yaml
from ..cpu import requested_threads
from ..errors import ConfigError
from ..checkpoint import RUN_CHECKPOINTS
from ..io import check_output_path
from ..training.config import TrainConfig, load_train_config


def recipe_source(spec: str) -> tuple[Any, str]:
    """(YAML path or dict, short name) for a recipe name or a config file path."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path, path.stem
    entry = plugins.get("recipe", spec)
    return entry.obj, entry.name


def resolve_train_config(spec: str, overrides: Sequence[str] = (), *, out: str | None = None,
                         max_steps: int | None = None, seed: int | None = None) -> TrainConfig:
    """Recipe + ``key=value`` overrides + command-line flags -> validated ``TrainConfig`` (default out: runs/NAME)."""
    source, name = recipe_source(spec)
    recipe = read_yaml(source) if isinstance(source, (str, Path)) else source
    default_out = [] if "out" in recipe else [f"out=runs/{name}"]
    flags = [f"out={out}"] if out else []
    if max_steps is not None:
        flags.append(f"max_steps={max_steps}")
    if seed is not None:
        flags.append(f"seed={seed}")
    return load_train_config(recipe, default_out, list(overrides), flags)


def _overrides_anywhere(p: argparse.ArgumentParser) -> None:
    """Let ``key=value`` overrides stand before, between or after the options (argparse alone takes them only
    before the first option): they are lifted out of the arguments and parsed as the ``overrides`` positional."""
    takes_value = {s for a in p._actions if a.nargs != 0 for s in a.option_strings}

    def parse_known_args(args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        rest, overrides = [], []
        for i, a in enumerate(args):
            is_value = i > 0 and args[i - 1] in takes_value
            (overrides if "=" in a and not a.startswith("-") and not is_value and rest else rest).append(a)
        ns, extra = type(p).parse_known_args(p, rest, namespace)
        ns.overrides = list(ns.overrides) + overrides
        return ns, extra

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


RECIPE_KEYS = ("recipe keys (in the YAML or as key=value): model.name/options, data.name/options/batch_size, "
               "conditioning.*, objective.*, optim.lr/warmup_steps/decay_steps, ema.*, sample.*, max_steps, "
               "max_minutes (a time cap: the run stops early when it is reached, with a warning; 0 = none), seed, "
               "precision (fp32|bf16), cpu_bf16 (auto: bf16 on CPUs with native bf16|true|false), compile, "
               "log_every, ckpt_every, keep_last; `dtx recipes` lists the shipped recipes")


def configure(p: argparse.ArgumentParser) -> None:
    p.epilog = RECIPE_KEYS
    p.add_argument("config", metavar="PRESET_OR_CONFIG.yaml", help="a recipe name (see `dtx plugins`) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")
    p.add_argument("--out", help="run folder (default runs/<recipe>); re-running with the same folder resumes")
    p.add_argument("--max-steps", type=int, help="total optimizer steps")
    p.add_argument("--seed", type=int, help="global seed")
    p.add_argument("--workers", type=int, default=1, help="training workers (ray runner)")
    p.add_argument("--context-parallel", type=int, metavar="N",
                   help="workers splitting each sample's tokens (recipe key parallel.context; data parallel = "
                        "workers / N)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (0 forces CPU)")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:port); default: RAY_ADDRESS or local")
    p.add_argument("--runner", default="auto",
                   help="auto (default: one process for one worker; ray for --workers > 1, --address or "
                        "RAY_ADDRESS), local or ray")
    p.add_argument("--max-minutes", type=float, help="time cap: stop early after this much training time, with a "
                                                     "warning (recipe key max_minutes; 0 = none)")
    p.add_argument("--threads", type=int, help="fixed torch CPU threads per worker (also DTX_THREADS; default: the "
                                               "cores other processes leave free, re-checked as the run goes)")
    p.add_argument("--resume", action="store_true", help="require resuming from the newest checkpoint in --out")
    for entry in plugins.host().table("runner").values():  # runner-specific flags, e.g. the ray runner's
        configure = entry.meta.get("configure_parser")
        if configure is not None:
            configure(p)
    _overrides_anywhere(p)


def choose_runner(requested: str | None, workers: int | None, address: str | None) -> str:
    """The runner ``--runner auto`` means: one process for one worker on this machine, Ray when more is asked for
    (``--workers > 1``, ``--address`` or ``RAY_ADDRESS``); any other name is taken as given."""
    if requested not in (None, "auto"):
        return requested
    wants_ray = (workers or 1) > 1 or bool(address) or bool(os.environ.get("RAY_ADDRESS"))
    if not wants_ray:
        return "local"
    if "ray" not in plugins.names("runner"):
        why = f"--workers {workers}" if (workers or 1) > 1 else "--address" if address else "RAY_ADDRESS"
        raise ConfigError(f"{why} needs the ray runner: pip install dtx-runner-ray")
    return "ray"


def check_init_source(cfg: TrainConfig) -> None:
    """``model.init_from`` and ``finetune.from`` must exist before anything is written, unless the run resumes and
    holds its own weights (a LoRA run never does: it rebuilds its base); a missing ``runs/NAME`` of a recipe NAME
    names the command that makes it."""
    resuming = (Path(cfg.out) / RUN_CHECKPOINTS).is_dir()
    for key, source, needed_on_resume in (("model.init_from", cfg.model.init_from, False),
                                          ("finetune.from", cfg.finetune.source, cfg.finetune.method == "lora")):
        if not source or Path(source).exists() or (resuming and not needed_on_resume):
            continue
        path = Path(source)
        hint = "; point it at a training run, a dtx model folder or a weights file"
        if path.parent == Path("runs") and path.name in plugins.names("recipe"):
            hint = (f": it is the run `dtx train {path.name}` writes (this recipe starts from it), so run that first "
                    f"from this folder, or set {key}=PATH to another run")
        raise ConfigError(f"bad value for config key {key!r}: {source} not found{hint}")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"max_minutes={args.max_minutes}"] if args.max_minutes is not None else [])
    if getattr(args, "context_parallel", None) is not None:
        overrides.append(f"parallel.context={args.context_parallel}")
    cfg = resolve_train_config(args.config, overrides, out=args.out, max_steps=args.max_steps, seed=args.seed)
    if args.threads is not None:
        os.environ["DTX_THREADS"] = str(requested_threads(args.threads))  # workers (local or Ray) read it
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    n = cfg.parallel.context
    if n > 1 and (args.workers or 1) % n:
        raise ConfigError(f"--context-parallel {n} splits each sample's tokens over {n} workers: --workers must be a "
                          f"multiple of {n}, got {args.workers or 1}")
    check_output_path(cfg.out, "run folder", folder=True)
    check_init_source(cfg)
    entry = plugins.get("runner", choose_runner(args.runner, args.workers, args.address))
    summary = entry.obj(cfg, args)
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "loss" or v == v}, default=str))
    return 0
