"""``dtx sample SOURCE``: samples from a training run, a checkpoint folder, a dtx model folder or any checkpoint a
registered format loads, through the run's conditioning stage (``--classes``, ``--prompt``, flags plugins declare)
and the one sampling path; writes a PNG grid and an ADM ``.npz`` (videos also a frame grid, GIFs and MP4s)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from .. import plugins
from ..conditioning import MAX_SAMPLES, GuidanceStep, SampleRequest
from ..config import parse_device, seed_arg
from ..errors import ConfigError


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _guide_step(text: str) -> GuidanceStep:
    keys, sep, scale = text.rpartition("=")
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not sep or not keys or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected CONDITIONER[,CONDITIONER]=SCALE, got {text!r}")
    return GuidanceStep(keys=[k.strip() for k in keys.split(",") if k.strip()], scale=value)


_PLUGIN_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


@functools.cache
def _core_flags() -> frozenset[str]:
    """The option strings of ``dtx sample`` itself, which no plugin's flag may take."""
    p = argparse.ArgumentParser()
    _core_arguments(p)
    return frozenset(p._option_string_actions)


def _flag_problem(flag: Any, taken: set[str]) -> str | None:
    """Why a sample option a conditioner declares cannot be added to ``dtx sample``, or None."""
    if not isinstance(flag, str) or not _PLUGIN_FLAG.fullmatch(flag):
        return "is not a --long-option"
    if flag in _core_flags():
        return "is a core option of dtx sample"
    return "is declared by another conditioner" if flag in taken else None


def _plugin_options() -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(flags, scales) that registered conditioners declare, each ``--flag`` -> (field or conditioner name, help).
    One that is malformed or already taken (by a core option or an earlier conditioner's), or a second scale of one
    conditioner, is refused: a warning names its plugin, ``dtx plugins`` shows it, ``dtx sample`` works without it."""
    host = plugins.host()
    taken: set[str] = set()
    flags: dict[str, tuple[str, str]] = {}
    scales: dict[str, tuple[str, str]] = {}
    for name, entry in host.table("conditioner").items():
        for meta_key, out in (("sample_flags", flags), ("sample_scales", scales)):
            declared = entry.meta.get(meta_key) or {}
            for flag, help_text in (declared.items() if isinstance(declared, Mapping) else [(declared, "")]):
                problem = _flag_problem(flag, taken)
                if problem is None and out is scales and any(n == name for n, _ in scales.values()):
                    problem = "is a second guidance scale of this conditioner"
                if problem is not None:
                    host.warn(entry.plugin, f"conditioner {name!r} declares the sample option {flag!r} "
                                            f"({meta_key}), which {problem}; refused")
                    continue
                taken.add(flag)
                out[flag] = (flag[2:].replace("-", "_") if out is flags else name, str(help_text))
    return flags, scales


def plugin_flags() -> dict[str, tuple[str, str]]:
    """Per-sample flags that registered conditioners declare: ``--flag`` -> (field name, help)."""
    return _plugin_options()[0]


def plugin_scales() -> dict[str, tuple[str, str]]:
    """Guidance scales that registered conditioners declare: ``--flag`` -> (conditioner name, help)."""
    return _plugin_options()[1]


def configure(p: argparse.ArgumentParser) -> None:
    _core_arguments(p)
    flags, scales = _plugin_options()
    for flag, (dest, help_text) in flags.items():
        p.add_argument(flag, dest=f"flag_{dest}", action="store_true", help=help_text)
    for flag, (name, help_text) in scales.items():
        p.add_argument(flag, dest=f"scale_{name.replace('-', '_')}", type=float, metavar="SCALE", help=help_text)


def _core_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="a run folder (newest checkpoint), a checkpoint folder, a dtx "
                                                    "model folder or a checkpoint file a plugin reads")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--sampler", help="ddpm, ddim, euler, heun, dpmpp-2m, ... (default: the run's sample.sampler)")
    p.add_argument("--sampler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampler option (repeatable), e.g. eta=0 or solver_type=heun (default: the run's)")
    p.add_argument("--timestep-spacing", choices=["sections", "leading"],
                   help="Gaussian samplers: the training timesteps N steps visit, DiT's even sections or diffusers' "
                        "leading 0, T/N, 2T/N, ... (default: the run's; a DDIM/DDPM pipeline folder: leading)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale over every condition (1 = off)")
    p.add_argument("--guide", type=_guide_step, action="append", metavar="KEYS=SCALE",
                   help="a nested guidance term (repeatable, in order), e.g. --guide motion=1.2 --guide text=7.5")
    p.add_argument("--classes", type=_int_list, help="comma-separated class ids (default: the first ten)")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", help="text for the unconditional guidance term instead of the empty prompt")
    p.add_argument("--set-flag", action="append", default=[], metavar="FIELD",
                   help="set a per-sample boolean condition field for every sample (repeatable)")
    p.add_argument("--n-per-class", type=int, default=8,
                   help="samples per class or prompt (the total when unconditional)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--out", help="PNG path; the .npz (and videos) go beside it (default: SOURCE/samples/sample.png)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling objects (trusted files only)")
    p.add_argument("--format", help="the registered checkpoint format to read SOURCE with when its tensors cannot "
                                    "tell (e.g. sit for SiT's .pt files); default: detected")
    p.add_argument("--cache", help="a registered step cache skipping block work between steps: first-block, "
                                   "teacache (default: the run's sample.cache, usually none)")
    p.add_argument("--cache-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the cache, e.g. threshold=0.1 (repeatable)")
    p.add_argument("--adapter", help="a LoRA adapter folder in PEFT's format (dtx convert RUN --adapter-only) to "
                                     "apply to SOURCE")
    p.add_argument("--adapter-scale", type=float, help="scale of the adapter's update (1: as trained; 0: the base); "
                                                       "with --adapter, or SOURCE's own (a LoRA run)")
    p.add_argument("--guide-channels", type=int, help="guide only the first N channels (3 = DiT's legacy CFG)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per model batch")
    p.add_argument("--vae", help="local AutoencoderKL folder to decode latents (default: the run's data.vae)")
    p.add_argument("--fps", type=float, help="frames per second of GIF/MP4 videos (default: the run's sample.fps)")
    p.add_argument("--scale", type=int, help="enlarge each sample in the PNG grid by this integer factor, nearest "
                                            "neighbour (default: to at least 64 px; 1: actual size)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast precision of the model (auto: bf16 on a GPU that has it, else fp16 on a GPU, "
                        "fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: for sample sets of at least 1000 samples on a GPU)")
    set_group = p.add_argument_group("evaluation-scale sample sets")
    set_group.add_argument("--num-samples", type=int,
                           help="write a sample set of N samples to --out (a .npz in the ADM evaluation format, "
                                "with per-sample seeds); resumes a partly written one")
    set_group.add_argument("--sample-index", type=int, action="append", metavar="I",
                           help="regenerate sample I of the set of this --seed alone (repeatable); written as usual "
                                "(PNG grid and .npz)")
    set_group.add_argument("--workers", type=int, default=1,
                           help="sampling processes (more than 1: Ray workers, embedded or at --address)")
    set_group.add_argument("--address", help="a Ray cluster to sample on (auto, ray://HOST:10001); default: "
                                             "RAY_ADDRESS, else an in-process Ray instance")
    set_group.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray worker (default: one each when the "
                                                                 "cluster has enough)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show the sampler's progress bar (default: when stderr is a terminal)")


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--guide-channels", args.guide_channels), ("--n-per-class", args.n_per_class)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.n_per_class > MAX_SAMPLES:
        raise ConfigError(f"--n-per-class must be at most {MAX_SAMPLES}, got {args.n_per_class}")
    if args.cfg is not None and not math.isfinite(args.cfg):
        raise ConfigError(f"--cfg must be a finite number, got {args.cfg}")
    for flag, (name, _) in plugin_scales().items():
        value = getattr(args, f"scale_{name.replace('-', '_')}", None)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise ConfigError(f"--fps must be a positive number, got {args.fps}")
    if args.adapter_scale is not None and not math.isfinite(args.adapter_scale):
        raise ConfigError(f"--adapter-scale must be a finite number, got {args.adapter_scale}")
    if args.scale is not None and not 1 <= args.scale <= 64:
        raise ConfigError(f"--scale must be an integer in 1..64, got {args.scale}")
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.sample_index and (args.num_samples is not None or min(args.sample_index) < 0):
        raise ConfigError("--sample-index takes indices >= 0 and regenerates them alone (without --num-samples)")
    if args.num_samples is None and (args.workers > 1 or args.address):
        raise ConfigError("--workers/--address sample sets: add --num-samples N (and --out SET.npz)")
    suffix = ".npz" if args.num_samples is not None else ".png"
    if args.out and Path(args.out).suffix.lower() != suffix:
        raise ConfigError(f"--out must be a .npz path for a sample set (--num-samples), got {args.out}"
                          if suffix == ".npz" else
                          f"--out must be a .png path (the .npz and videos are written beside it), got {args.out}")
    if args.out:
        from ..checkpoint import checkpoints_holding
        from ..io import check_output_path

        check_output_path(args.out, "--out")
        if suffix == ".png":
            check_output_path(Path(args.out).with_suffix(".npz"), "--out (its .npz)")

        holder = checkpoints_holding(args.out)
        if holder is not None:
            raise ConfigError(f"--out {args.out} lies in the checkpoint folder {holder}, which holds only "
                              f"checkpoints; write samples elsewhere (default: the run's samples/)")


def _prompt_lines(path: Path, text: str) -> list[str]:
    """The prompts of a ``--prompts-file``: one per line, split on ``\\n`` and ``\\r\\n`` only (other separators
    such as U+2028 stay inside their prompt), blank lines skipped. A lone ``\\r`` (an old Mac line end, or a stray
    one inside a prompt) and a file without any prompt are errors naming the file."""
    prompts = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if "\r" in line:
            raise ConfigError(f"--prompts-file {path}: line {number} holds a carriage return (\\r) that does not end "
                              f"the line; prompts are split on newlines (\\n or \\r\\n) only")
        if line.strip():
            prompts.append(line.strip())
    if not prompts:
        raise ConfigError(f"--prompts-file {path} holds no prompt (every line is blank)")
    return prompts


def _request(args: argparse.Namespace) -> SampleRequest:
    prompts = list(args.prompt)
    if args.prompts_file:
        from ..io import read_text_file

        path = Path(args.prompts_file)
        prompts += _prompt_lines(path, read_text_file(path, "--prompts-file"))
    flags = {dest: True for _, (dest, _) in plugin_flags().items() if getattr(args, f"flag_{dest}", False)}
    flags.update({name.replace("-", "_"): True for name in args.set_flag})
    return SampleRequest(classes=list(args.classes or []), prompts=prompts, negative_prompt=args.negative_prompt,
                         flags=flags)


def _check_request(args: argparse.Namespace, request: SampleRequest, stage: Any) -> None:
    """Refuse a condition the model cannot use (``--prompt`` for a class model, ``--classes`` for a text model, a
    flag it has no field for) instead of ignoring it; the error names the option and what the model takes."""
    prompts = "--prompts-file" if args.prompts_file and not args.prompt else "--prompt"
    names = {"classes": "--classes", "prompts": prompts, "negative_prompt": "--negative-prompt", "flags": "--set-flag"}
    explicit = {name.replace("-", "_") for name in args.set_flag}
    names.update({f"flags.{dest}": flag for flag, (dest, _) in plugin_flags().items() if dest not in explicit})
    problem = stage.request_problem(request, names)
    if problem is not None:
        raise ConfigError(f"{problem[0]}: {problem[1]}")


def _vae(args: argparse.Namespace, setup: Any, device: Any) -> Any:
    if not (setup.info.is_latent or args.vae):
        return None
    path = args.vae or setup.info.vae
    if not path:
        raise ConfigError("this model samples latents; pass --vae PATH (a local AutoencoderKL) to decode them")
    from ..data.vae import check_decodes, load_vae

    vae = load_vae(path)
    check_decodes(vae, setup.info.channels, f"--vae {path}" if args.vae else f"the model's VAE {path}")
    return vae.to(device)


def _sample_overrides(args: argparse.Namespace, setup: Any) -> dict[str, Any]:
    """The sampling settings given on the command line, as ``{sample key: value}`` for ``resolve_sample``;
    ``--sampler-option`` values checked against what the chosen sampler declares, naming the flag."""
    from ..config import parse_options
    from ..diffusion.sampler_api import check_options
    from ..training.objectives import sampler_entry

    given: dict[str, Any] = {key: value for key, value in (
        ("steps", args.steps), ("sampler", args.sampler), ("cfg", args.cfg), ("guide_channels", args.guide_channels),
        ("fps", args.fps), ("timestep_spacing", args.timestep_spacing)) if value is not None}
    if args.guide:
        given["guidance"] = [dataclasses.asdict(step) for step in args.guide]
    scales = {name: getattr(args, f"scale_{name.replace('-', '_')}", None) for _, (name, _) in plugin_scales().items()}
    if any(v is not None for v in scales.values()):
        given["guidance_scales"] = {k: v for k, v in scales.items() if v is not None}
    if args.cache is not None:
        given["cache"] = None if args.cache == "none" else args.cache
    if args.cache_option:
        given["cache_options"] = parse_options(args.cache_option)
    if args.sampler_option:
        name = args.sampler or setup.cfg.sample.sampler
        given["sampler_options"] = check_options(name, sampler_entry(name, setup.objective.kind),
                                                 parse_options(args.sampler_option), "--sampler-option")
    return given


def _default_out(source: Path) -> Path:
    """``RUN/samples/sample.png`` for a run (also when given one of its checkpoints), else beside the source (a
    checkpoint folder's parent: nothing is written into a checkpoint)."""
    from ..checkpoint import MANIFEST, RUN_CHECKPOINTS

    if (source / MANIFEST).is_file():
        source = source.parent.parent if source.parent.name == RUN_CHECKPOINTS else source.parent
    return (source if source.is_dir() else source.parent) / "samples" / "sample.png"


def run(args: argparse.Namespace) -> int:
    from ..adapters import apply_adapter
    from ..training.checks import check_sampler
    from ..training.config import resolve_sample
    from ..training.context import default_device
    from ..training.sampling import generate, load_for_sampling, precision_context, write_samples

    _check_args(args)
    request = _request(args)
    device = parse_device(args.device) if args.device else default_device()
    setup = load_for_sampling(args.source, weights="raw" if args.no_ema else "ema", trust=args.trust_checkpoint,
                              device=device, format=args.format)
    apply_adapter(setup.model, args.adapter, args.adapter_scale)
    _check_request(args, request, setup.stage)
    sample = resolve_sample(setup.cfg.sample, _sample_overrides(args, setup))
    check_sampler(sample, setup.objective.kind)
    if not request.classes and sample.classes:
        request.classes = list(sample.classes)
    if not request.prompts and sample.prompts:
        request.prompts = list(sample.prompts)
    vae = _vae(args, setup, device)
    precision = _precision(args.precision, device)
    if args.num_samples is not None:
        return _sample_set(args, setup, request, sample, vae, device, precision)
    default_out = _default_out(Path(args.source))
    per_subject, seeds = args.n_per_class, None
    if args.sample_index:
        request, seeds = _indexed(args, setup, request, sample)
        per_subject = 1
    with precision_context(precision, device):
        samples = generate(setup, request, sample, per_subject=per_subject, seed=args.seed, seeds=seeds,
                           batch_size=args.batch_size, vae=vae,
                           progress=sys.stderr.isatty() if args.progress is None else args.progress)
    written = write_samples(samples, Path(args.out) if args.out else default_out, fps=sample.fps, scale=args.scale)
    cache = {"cache": {"name": sample.cache, **samples.cache}} if samples.cache is not None else {}
    print(json.dumps({**written, "source": setup.source, "step": setup.step, "ema": not args.no_ema, **cache}))
    return 0


def _precision(asked: str, device: Any) -> str:
    """``--precision auto``: bf16 autocast on a GPU with bf16, fp16 on other GPUs, float32 on CPU (where dtx sample
    reproduces the training-time samples exactly)."""
    import torch

    if asked == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 runs on a GPU only; on CPU use bf16 or fp32")
    if asked != "auto":
        return asked
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _set_subjects(args: argparse.Namespace, request: SampleRequest, setup: Any) -> None:
    """A text model's sample set needs prompts to cycle through (a prompts file of the evaluation captions)."""
    if request.prompts or request.classes:
        return
    if setup.stage.request_reads("prompts"):
        raise ConfigError("--num-samples: this model samples from text; give the prompts to cycle through "
                          "(--prompts-file FILE or --prompt)")


def _set_plan(args: argparse.Namespace, setup: Any, request: SampleRequest, sample: Any, num_samples: int,
              settings: dict[str, Any]) -> Any:
    from ..training.sample_set import make_plan

    _set_subjects(args, request, setup)
    num_classes = int(setup.info.num_classes or 0) if setup.stage.request_reads("classes") else 0
    return make_plan(num_samples, args.seed, args.batch_size, request, num_classes, settings)


def _indexed(args: argparse.Namespace, setup: Any, request: SampleRequest, sample: Any
             ) -> tuple[SampleRequest, list[int]]:
    """``--sample-index``: the requests and seeds of those samples of the set of ``--seed``."""
    plan = _set_plan(args, setup, request, sample, max(args.sample_index) + 1, {})
    parts = [plan.request(i, i + 1) for i in args.sample_index]
    joined = SampleRequest(classes=[c for p in parts for c in p.classes], prompts=[t for p in parts for t in p.prompts],
                           negative_prompt=request.negative_prompt, flags=dict(request.flags))
    return joined, [plan.seeds(i, i + 1)[0] for i in args.sample_index]


def _sample_set(args: argparse.Namespace, setup: Any, request: SampleRequest, sample: Any, vae: Any, device: Any,
                precision: str) -> int:
    """``--num-samples``: an evaluation-scale set in one ``.npz``, sampled here or on Ray workers, resumable."""
    from ..training.config import config_dict
    from ..training.sample_set import SampleSetJob, assemble, open_parts, run_job, sample_settings

    out = Path(args.out) if args.out else _default_out(Path(args.source)).with_name("samples.npz")
    vae_path = args.vae or (setup.info.vae if vae is not None else None)
    settings = sample_settings(args.source, "raw" if args.no_ema else "ema", sample,
                               {"adapter": args.adapter, "adapter_scale": args.adapter_scale, "vae": vae_path,
                                "precision": precision, "format": args.format})
    plan = _set_plan(args, setup, request, sample, args.num_samples, settings)
    compile_model = (args.compile if args.compile is not None
                     else device.type == "cuda" and args.num_samples >= 1000)
    job = SampleSetJob(plan, str(out.resolve()), str(Path(args.source).resolve()) if Path(args.source).exists()
                       else args.source, config_dict(sample), "raw" if args.no_ema else "ema", args.trust_checkpoint,
                       args.format, str(device), args.adapter, args.adapter_scale, vae_path, precision, compile_model,
                       sys.stderr.isatty() if args.progress is None else args.progress)
    del setup  # each sampling process loads its own copy
    open_parts(out, plan)
    if args.workers > 1 or args.address:
        counts = _ray_sampler()(job, args.workers, args.address, args.gpus_per_worker)
    else:
        counts = [run_job(job)]
    written = assemble(out, plan)
    sampled = sum(c["samples"] for c in counts)
    print(json.dumps({**written, "sampled": sampled, "resumed": written["n"] - sampled, "workers": args.workers,
                      "seed": args.seed, "precision": precision}))
    return 0


def _ray_sampler() -> Any:
    """The registered runner's set sampler (dtx-runner-ray's ``ray``)."""
    entry = plugins.host().table("runner").get("ray")
    if entry is None or not callable(entry.meta.get("sample")):
        raise ConfigError("--workers > 1 / --address sample on Ray: pip install dtx-runner-ray")
    return entry.meta["sample"]
