"""``dtx bench NAME``: forward and training-step speed, memory, FLOPs, TFLOP/s and MFU of any registered model or
recipe.

Each measurement is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones; FLOPs per sample come
from the model's cost (``dtx.costs``: its family's analytic counter, else measured), a training step counts three
forwards (forward + backward; activation recomputation is not counted) and MFU divides the achieved TFLOP/s by the
GPU's peak (``dtx.costs.GPU_PEAK_TFLOPS``; omitted on CPU). ``--compare A B`` builds two configurations (each a
comma-separated ``key=value`` list over the bench options or model options) and times them interleaved, round by
round, in one process, reporting B's time over A's. One JSON line per measurement, then a table (``--json``: only
the JSON lines).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..config import parse_device
from ..errors import ConfigError

MODES = ("forward", "train")
SETUP_KEYS = ("batch", "input_size", "frames", "precision", "compile", "recompute", "context_parallel")


@dataclass
class Setup:
    """One benchmarked configuration: bench options plus model options."""

    batch: int = 8
    input_size: int | list[int] | None = None
    frames: int | None = None
    precision: str = "auto"
    compile: str = "auto"
    recompute: int = 0
    context_parallel: int = 1  # ranks splitting each sample's tokens; one rank is measured (a stand-in group)
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="registered model or preset (see `dtx models`), or a recipe name / YAML file")
    p.add_argument("--batch", type=int, help="samples per step (default 8; a recipe's batch size; --quick: 2)")
    p.add_argument("--input-size", nargs="+", metavar=("H", "W"), help="input side H, or height and width")
    p.add_argument("--frames", type=int, metavar="F", help="frames of a video model")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[], help="model options, e.g. depth=2")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16 "
                                                         "(autocast)")
    p.add_argument("--compile", default="auto", help="auto (on for CUDA), on or off: torch.compile of the model")
    p.add_argument("--recompute", default="none",
                   help="recompute activations in the backward: none, all, or every-K (every K-th block)")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="measure one of N ranks splitting each sample's tokens (its share of the activations)")
    p.add_argument("--checkpointing", help=argparse.SUPPRESS)  # renamed: refused with the new name
    p.add_argument("--mode", choices=("forward", "train", "both"), default="both")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default 2; --quick: 1)")
    p.add_argument("--repeats", type=int, help="timed calls; the median is reported (default 5; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, one warm-up, one timed call")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two configurations timed interleaved, e.g. compile=off compile=on or "
                        "'recompute=none' 'recompute=all,batch=16'")
    p.add_argument("--json", action="store_true", help="only the JSON lines, no table")


# -- parsing ---------------------------------------------------------------------------------------------------

def _positive(value: Any, option: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise ConfigError(f"{option} must be a positive integer, got {value!r}")
    return n


def _precision(value: str, option: str) -> str:
    if value not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"{option}={value!r} is not one of auto, fp32, bf16")
    return value


def _setup_value(key: str, value: Any, option: str) -> Any:
    from ..training.compile import check_compile_mode
    from ..layers.blocks import recompute_policy
    from .flops import _input_size

    if key in ("batch", "frames", "context_parallel"):
        return _positive(value, option)
    if key == "input_size":
        return _input_size([str(value)] if not isinstance(value, list) else [str(v) for v in value])
    if key == "precision":
        return _precision(str(value), option)
    if key == "compile":
        return check_compile_mode(value, option)
    return recompute_policy(value, option)


def parse_config(text: str, base: Setup, option: str = "--compare") -> Setup:
    """``key=value[,key=value...]`` over ``base``: bench keys (``SETUP_KEYS``) or model options."""
    from ..config import parse_options

    changes: dict[str, Any] = {}
    options = dict(base.options)
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{option}: a configuration is a comma-separated key=value list, got {text!r}")
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option}: {item!r} is not key=value (in {text!r})")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in SETUP_KEYS:
            changes[key] = _setup_value(key, value.strip(), f"{option} {key}")
        else:
            options.update(parse_options([f"{key}={value}"]))
    return replace(base, **changes, options=options, label=text)


def _resolve_name(spec: str) -> tuple[str, dict[str, Any], int | None]:
    """(model name, model options, default batch) for a registered model or a recipe."""
    from ..errors import DtxError
    from ..models import model_entry
    from .train import recipe_source

    try:
        return model_entry(spec).name, {}, None  # also plugin:name
    except DtxError as exc:
        as_model = exc
    try:
        recipe_source(spec)
    except DtxError:
        raise ConfigError(f"{spec!r} is neither a registered model nor a recipe or YAML file ({as_model})") from None
    from ..training.model_setup import build_run_data, model_overrides
    from .train import resolve_train_config

    cfg = resolve_train_config(spec, out="unused")
    import torch

    info = build_run_data(cfg, torch.device("cpu")).info
    return cfg.model.name, model_overrides(cfg, info), cfg.data.batch_size


# -- one workload ----------------------------------------------------------------------------------------------

@dataclass
class Workload:
    """A built model with its inputs, optimizer and the two timed calls."""

    setup: Setup
    model: Any
    calls: dict[str, Callable[[], Any]]
    flops_per_sample: int
    flops_method: str
    input_shape: list[int]
    precision: str
    compiled: bool
    eager_reason: str | None
    activation_mb: Callable[[], float] | None = None  # this rank's saved activations of one training forward


def _random_inputs(model: Any, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch

    from ..costs import example_inputs

    (x, noise), conditions = example_inputs(model, batch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x.shape, generator=gen).to(x.device)
    if noise.dtype == torch.long:
        noise = torch.randint(0, int(getattr(model, "num_timesteps", 1000)), noise.shape, generator=gen)
    else:
        noise = torch.rand(noise.shape, generator=gen) + 0.1
    return (x, noise.to(x.device)), conditions


def build_workload(name: str, base_options: dict[str, Any], setup: Setup, device: Any) -> Workload:
    """The model of ``setup`` on ``device`` (recomputation, compile, precision applied), its cost, and its calls."""
    import torch

    from ..costs import model_cost, size_overrides
    from ..interface import interface_of
    from ..models import create_model
    from ..training.compile import compile_model
    from ..layers.blocks import set_recompute

    overrides = {**base_options, **setup.options, **size_overrides(name, setup.input_size, setup.frames)}
    cost = model_cost(name, **overrides)
    torch.manual_seed(0)
    model = create_model(name, **overrides).to(device)
    set_recompute(model, setup.recompute)
    if setup.context_parallel > 1:
        from ..layers.context_parallel import StandInGroup, set_context_parallel

        set_context_parallel(model, StandInGroup(setup.context_parallel))
    runner, reason = compile_model(model, setup.compile, device)
    precision = setup.precision if setup.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    args, kwargs = _random_inputs(model, setup.batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def autocast() -> Any:
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward() -> None:
        runner.eval()
        with torch.no_grad(), autocast():
            runner(*args, **kwargs)

    def train() -> None:
        runner.train()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        with autocast():
            loss = runner(*args, **kwargs).float().square().mean()
        loss.backward()
        if opt is not None:
            opt.step()

    def activations() -> float:
        """MiB autograd keeps for the backward of one training forward (this rank's activation memory)."""
        from ..benchmarking import saved_activations_mb

        runner.train()
        with autocast():
            return saved_activations_mb(lambda: runner(*args, **kwargs), exclude=list(model.parameters()))

    shape = interface_of(model).input_shape
    return Workload(setup, model, {"forward": forward, "train": train}, cost.flops, cost.method,
                    list(shape) if shape is not None else [], precision, reason is None, reason, activations)


# -- measuring -------------------------------------------------------------------------------------------------

def measurement_row(name: str, work: Workload, mode: str, times: list[tuple[float, float]], peak_mb: float,
                    device: Any, warmup: int) -> dict[str, Any]:
    """One JSON-ready measurement: medians, samples/s, memory, FLOPs, TFLOP/s, and MFU on a known GPU."""
    import torch

    from ..costs import achieved_tflops, device_peak_tflops, mfu

    wall = statistics.median(t[0] for t in times)
    cpu = statistics.median(t[1] for t in times)
    s = work.setup
    per_sample = work.flops_per_sample * (3 if mode == "train" else 1)
    flops = per_sample * s.batch
    row: dict[str, Any] = {
        "bench": "dtx", "model": name, "config": s.label or "default", "mode": mode, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": s.batch, "input_shape": work.input_shape,
        "precision": work.precision, "compile": "on" if work.compiled else "off", "eager_reason": work.eager_reason,
        "recompute": s.recompute, "context_parallel": s.context_parallel, "options": s.options, "warmup": warmup,
        "repeats": len(times),
        "ms": round(wall, 3), "cpu_ms": round(cpu, 3), "samples_per_s": round(s.batch / (wall / 1e3), 3),
        "peak_mem_mb": round(peak_mb, 1), "gflops_per_sample": per_sample / 1e9, "flops_method": work.flops_method,
        "tflops": achieved_tflops(flops, wall / 1e3)}
    if mode == "train" and work.activation_mb is not None:
        row["activation_mb"] = round(work.activation_mb(), 1)  # per rank: its share under context parallelism
    matmul = "tf32" if work.precision == "fp32" and device.type == "cuda" and \
        torch.backends.cuda.matmul.allow_tf32 else work.precision
    peak = device_peak_tflops(device, matmul)
    if peak is not None:
        row["peak_tflops"] = peak
        row["mfu"] = mfu(flops, wall / 1e3, peak)
    return row


def _table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    head = f"{'config':<24} {'mode':<8} {'batch':>5} {'ms':>10} {'samples/s':>10} {'peak MiB':>9} " \
           f"{'act MiB':>8} {'GFLOP/sample':>12} {'TFLOP/s':>8} {'MFU':>6}"
    print(head)
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        act = f"{r['activation_mb']:.0f}" if "activation_mb" in r else "-"
        print(f"{r['config'][:24]:<24} {r['mode']:<8} {r['batch']:>5} {r['ms']:>10.1f} {r['samples_per_s']:>10.2f} "
              f"{r['peak_mem_mb']:>9.0f} {act:>8} {r['gflops_per_sample']:>12.3g} {r['tflops']:>8.3g} {mfu:>6}")
    first = rows[0]
    notes = {r["eager_reason"] for r in rows if r["eager_reason"]}
    print(f"{first['model']} on {first['device_name']} ({first['threads']} threads), input {first['input_shape']}, "
          f"FLOPs {first['flops_method']}" + ("" if "mfu" in first else "; MFU omitted (no GPU peak)"))
    for note in sorted(notes):
        print(f"eager: {note}")
    for q in ratios:
        print(f"{q['mode']}: {q['b']!r} takes {q['ratio']:.3f}x the time of {q['a']!r} "
              f"(process CPU time {q['cpu_ratio']:.3f}x; median of {q['rounds']} interleaved rounds)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmarking import device_sync, interleaved, peak_memory_mb, round_ratio
    from ..training.compile import check_compile_mode
    from ..layers.blocks import recompute_policy
    from .flops import _input_size, _overrides

    # every check first: nothing is built before the input is known to be good
    if args.checkpointing is not None:
        raise ConfigError("--checkpointing was renamed: use --recompute (none, all or every-K)")
    device = parse_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(_positive(args.threads, "--threads"))
    warmup = 1 if args.quick else 2
    if args.warmup is not None:
        if args.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
        warmup = args.warmup
    repeats = _positive(args.repeats, "--repeats") if args.repeats is not None else (1 if args.quick else 5)
    name, recipe_options, recipe_batch = _resolve_name(args.name)
    batch = _positive(args.batch, "--batch") if args.batch is not None else (2 if args.quick else recipe_batch or 8)
    if args.frames is not None:
        _positive(args.frames, "--frames")
    base = Setup(batch=batch, input_size=_input_size(args.input_size), frames=args.frames,
                 precision=_precision(args.precision, "--precision"),
                 compile=check_compile_mode(args.compile, "--compile"),
                 recompute=recompute_policy(args.recompute, "--recompute"),
                 context_parallel=_positive(args.context_parallel, "--context-parallel"),
                 options=_overrides(args.set or []))
    setups = [parse_config(a, base) for a in args.compare] if args.compare else [base]
    modes = list(MODES) if args.mode == "both" else [args.mode]

    works = [build_workload(name, recipe_options, s, device) for s in setups]
    sync = device_sync(device)
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    for mode in modes:
        times = interleaved([w.calls[mode] for w in works], sync, warmup, repeats)
        for work, t in zip(works, times):
            peak = peak_memory_mb(work.calls[mode], device)
            rows.append(measurement_row(name, work, mode, t, peak, device, warmup))
            print(json.dumps(rows[-1]), flush=True)
        if len(works) == 2:
            a, b = times
            ratios.append({"bench": "dtx-compare", "model": name, "mode": mode, "a": setups[0].label,
                           "b": setups[1].label, "rounds": repeats,
                           "ratio": round_ratio([x[0] for x in b], [x[0] for x in a]),
                           "cpu_ratio": round_ratio([x[1] for x in b], [x[1] for x in a])})
            print(json.dumps(ratios[-1]), flush=True)
    if not args.json:
        _table(rows, ratios)
    return 0
