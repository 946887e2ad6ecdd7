"""``dtx flops MODEL``: parameters and per-sample forward FLOPs of any registered model.

Counted by the model family's analytic counter when it registered one (e.g. DiT: the paper's "Gflops", which are
multiply-accumulates), else measured with ``torch.utils.flop_counter`` on meta tensors. ``--sweep 128,256,512``
gives one row per square input size and a log-log plot of GFLOPs against size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_PLOT = "flops_sweep.png"
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered architecture or preset, e.g. DiT-XL/2 (see `dtx models`)")
    p.add_argument("--input-size", nargs="+", metavar=("H", "W"),
                   help="input side H, or height and width (sets the model's input_size option)")
    p.add_argument("--frames", type=int, metavar="F", help="frames of a video model (sets its num_frames option)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[], help="model options, e.g. block=adaln")
    p.add_argument("--sweep", metavar="S1,S2,...", help="one row per square input size, e.g. 128,256,512, and a plot")
    p.add_argument("--plot", metavar="PATH", help=f"where --sweep writes its plot (default: ./{DEFAULT_PLOT})")
    p.add_argument("--measure", action="store_true",
                   help="also count with torch.utils.flop_counter on meta tensors (cross-checks an analytic counter)")
    p.add_argument("--json", action="store_true", help="print one JSON object (with --sweep: one line per size)")


def _input_size(tokens: list[str] | None) -> int | list[int] | None:
    if tokens is None:
        return None
    parts = [s for t in tokens for s in t.lower().split("x")]  # "32 48" or "32x48"
    try:
        sizes = [int(s) for s in parts]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 2 or any(s < 1 for s in sizes):
        raise ConfigError(f"--input-size takes one or two positive ints (H or H W), got {' '.join(tokens)!r}")
    return sizes[0] if len(sizes) == 1 else sizes


def _sweep(text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--sweep takes comma-separated positive sizes, e.g. 128,256,512, got {text!r}")
    return sorted(set(sizes))


def _overrides(items: list[str]) -> dict[str, Any]:
    from ..config import parse_options

    return parse_options(items)


def _g(value: float | None) -> str:
    """2 decimals from 1 up (118.62), 3 significant digits below (0.000123)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _g(value)
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def _row(name: str, overrides: dict[str, Any], measure: bool) -> dict[str, Any]:
    from ..costs import MEASURED, cost_of, counter_of, measure as measure_flops, meta_model
    from ..interface import interface_of

    model = meta_model(name, **overrides)
    cost = cost_of(model, counter_of(name))
    shape = interface_of(model).input_shape
    row: dict[str, Any] = {"model": name, "input_shape": list(shape) if shape is not None else None, **cost.row()}
    if measure:
        flops = cost.flops if cost.method == MEASURED else measure_flops(model)
        row["gflops_measured"] = flops / 1e9
    return row


def _print_one(row: dict[str, Any], extra_keys: list[str]) -> None:
    shape = f" on {_fmt(row['input_shape'])} inputs" if row["input_shape"] else ""
    how = ("analytic count (the family's registered counter)" if row["method"] == "analytic"
           else "measured by torch.utils.flop_counter on meta tensors")
    print(f"{row['model']}{shape}: {how}")
    print(f"parameters: {row['params']:,} ({row['trainable_params']:,} trainable)")
    macs = f"{_g(row['gflops_macs'])} Gflops as multiply-accumulates (as papers count), " \
        if row["gflops_macs"] is not None else ""
    print(f"forward per sample: {macs}{_g(row['gflops_real'])} GFLOPs real ({row['flops']:,} FLOPs)")
    for key in extra_keys:
        print(f"{key.replace('_', ' ')}: {_fmt(row[key])}")
    if "gflops_measured" in row:
        print(f"measured by torch.utils.flop_counter: {_g(row['gflops_measured'])} GFLOPs real")


def _plot(rows: list[dict[str, Any]], name: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io import atomic_write

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sizes = [r["size"] for r in rows]
    ax.plot(sizes, [r["gflops_real"] for r in rows], "o-", label="GFLOPs (real)")
    if all(r["gflops_macs"] is not None for r in rows):
        ax.plot(sizes, [r["gflops_macs"] for r in rows], "s--", label="Gflops (multiply-accumulates)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("input size (side)")
    ax.set_ylabel("forward cost per sample (G)")
    ax.set_title(f"{name} ({rows[0]['method']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp))


def run(args: argparse.Namespace) -> int:
    from ..costs import size_overrides
    from ..models import model_entry

    # every check first: nothing is built or written before the input is known to be good
    name = model_entry(args.model).name
    overrides = _overrides(args.set or [])
    input_size = _input_size(args.input_size)
    sweep = _sweep(args.sweep)
    if args.frames is not None and args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    if sweep and input_size is not None:
        raise ConfigError("--sweep sets the input size of every row; drop --input-size")
    if args.plot and not sweep:
        raise ConfigError("--plot is where --sweep writes its plot; add --sweep S1,S2,...")
    for flag, option, given in (("--input-size/--sweep", "input_size", input_size is not None or bool(sweep)),
                                ("--frames", "num_frames", args.frames is not None)):
        if given and option in overrides:
            raise ConfigError(f"{option} is set twice, by {flag} and --set; keep one")
    overrides.update(size_overrides(name, sweep[0] if sweep else input_size, args.frames))
    plot = Path(args.plot or DEFAULT_PLOT)
    if sweep and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(f"--plot {str(plot)!r}: the file name must end in {', '.join(PLOT_SUFFIXES)}")

    if not sweep:
        row = _row(name, overrides, args.measure)
        if args.json:
            print(json.dumps(row))
        else:
            core = {"model", "input_shape", "method", "params", "trainable_params", "macs", "flops", "gflops_macs",
                    "gflops_real", "gflops_measured"}
            _print_one(row, [k for k in row if k not in core])
        return 0

    rows = [{"size": size, **_row(name, {**overrides, "input_size": size}, args.measure)} for size in sweep]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        measured = "gflops_measured" in rows[0]
        print(f"{name}: forward cost per sample ({rows[0]['method']})")
        print(f"{'size':>6} {'params':>15} {'Gflops (MACs)':>14} {'GFLOPs (real)':>14}"
              + (f" {'measured':>10}" if measured else ""))
        for r in rows:
            print(f"{r['size']:>6} {r['params']:>15,} {_g(r['gflops_macs']):>14} {_g(r['gflops_real']):>14}"
                  + (f" {_g(r['gflops_measured']):>10}" if measured else ""))
    _plot(rows, name, plot)
    print(f"wrote {plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
