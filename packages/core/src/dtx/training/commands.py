"""``dtx train`` and ``dtx sample``, and the single-process ``local`` runner.

``dtx train PRESET_OR_CONFIG.yaml [key=value ...]`` resolves a registered recipe (or a YAML file) plus overrides into
a ``TrainConfig`` and hands it to a runner: ``ray`` when dtx-runner-ray is installed, else ``local``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from .. import plugins
from ..config import read_yaml
from ..errors import ConfigError
from .config import TrainConfig, load_train_config


# -- dtx train ------------------------------------------------------------------------------------------------------

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


def configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="PRESET_OR_CONFIG.yaml", help="a recipe name (see `dtx plugins`) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")
    p.add_argument("--out", help="run folder (default runs/<recipe>); re-running with the same folder resumes")
    p.add_argument("--max-steps", type=int, help="total optimizer steps")
    p.add_argument("--seed", type=int, help="global seed")
    p.add_argument("--workers", type=int, default=1, help="training workers (ray runner)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (0 forces CPU)")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:port); default: RAY_ADDRESS or local")
    p.add_argument("--runner", help="ray or local (default: ray when dtx-runner-ray is installed)")
    p.add_argument("--resume", action="store_true", help="require resuming from the newest checkpoint in --out")
    for entry in plugins.host().table("runner").values():  # runner-specific flags, e.g. the ray runner's
        configure = entry.meta.get("configure_parser")
        if configure is not None:
            configure(p)
    _overrides_anywhere(p)


def default_runner() -> str:
    return "ray" if "ray" in plugins.names("runner") else "local"


def run_train(args: argparse.Namespace) -> int:
    cfg = resolve_train_config(args.config, args.overrides, out=args.out, max_steps=args.max_steps, seed=args.seed)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"run folder {cfg.out} exists and is not a folder")
    entry = plugins.get("runner", args.runner or default_runner())
    summary = entry.obj(cfg, args)
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "loss" or v == v}, default=str))
    return 0


def run_local(cfg: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The ``local`` runner: one process, no Ray; CUDA if available unless ``--gpus-per-worker 0``."""
    from .context import LocalContext, default_device
    from .loop import train

    workers = getattr(args, "workers", None)
    workers = 1 if workers is None else workers
    if workers != 1:
        raise ConfigError(f"--runner local runs one worker; got --workers {workers} (use --runner ray)")
    gpus = getattr(args, "gpus_per_worker", None)
    ctx = LocalContext(cfg.out, device=default_device(None if gpus is None else gpus > 0),
                       require_resume=bool(getattr(args, "resume", False)))
    return train(cfg, ctx)


# -- dtx sample -----------------------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def configure_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run folder (newest checkpoint) or a checkpoint")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--sampler", help="ddpm, ddim, euler, heun, dpmpp-2m, ... (default: the run's sample.sampler)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--classes", type=_int_list, help="comma-separated class ids (default: the first ten)")
    p.add_argument("--n-per-class", type=int, default=8, help="samples per class (total when unconditional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="PNG grid path; an .npz with the same stem is written beside it "
                                 "(default: RUN/samples/sample.png)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    p.add_argument("--guide-channels", type=int, help="guide only the first N channels (3 = DiT's legacy CFG)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per model batch")
    p.add_argument("--vae", help="local AutoencoderKL folder to decode latent runs (default: the run's data.vae)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--progress", action="store_true", help="show the sampler's progress bar")


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from .context import default_device
    from .sample import decode_latents, default_classes, generate, load_run, save_grid, save_npz

    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--guide-channels", args.guide_channels)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.cfg is not None and not math.isfinite(args.cfg):
        raise ConfigError(f"--cfg must be a finite number, got {args.cfg}")
    device = torch.device(args.device) if args.device else default_device()
    run = load_run(args.source, use_ema=not args.no_ema, device=device)
    s, info = run.cfg.sample, run.data_info
    if args.n_per_class < 1:
        raise ConfigError("--n-per-class must be at least 1")
    classes = default_classes(info["num_classes"], args.classes or s.classes)
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(args.n_per_class) if classes else None
    n = len(labels) if labels is not None else args.n_per_class
    vae = None
    if info["is_latent"]:
        vae_path = args.vae or info.get("vae")
        if not vae_path:
            raise ConfigError("this run trains on latents; pass --vae PATH (a local AutoencoderKL) to decode samples")
        from ..data.extract import load_vae

        vae = load_vae(vae_path).to(device)
    images = generate(run.model, run.objective, (info["channels"], info["image_size"], info["image_size"]), labels, n,
                      sampler=args.sampler or s.sampler, steps=args.steps or s.steps,
                      cfg_scale=s.cfg if args.cfg is None else args.cfg, seed=args.seed,
                      guide_channels=args.guide_channels or s.guide_channels, batch_size=args.batch_size,
                      progress=args.progress)
    if vae is not None:
        images = torch.cat([decode_latents(vae, images[i:i + args.batch_size].to(device)).cpu()
                            for i in range(0, n, args.batch_size)])
    out = Path(args.out) if args.out else run.checkpoint.parent.parent / "samples" / "sample.png"
    grid = save_grid(images, out, nrow=args.n_per_class if classes else int(n ** 0.5 + 0.999))
    npz = save_npz(images, labels, out.with_suffix(".npz"))
    print(json.dumps({"grid": str(grid), "npz": str(npz), "n": n, "checkpoint": str(run.checkpoint),
                      "step": run.step, "ema": not args.no_ema}), file=sys.stdout)
    return 0
