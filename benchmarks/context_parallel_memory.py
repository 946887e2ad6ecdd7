"""Activation memory per rank under context parallelism, measured on CPU, and the longest clip each Latte variant
trains on one 80 GB GPU with and without it (an estimate from the measured per-token memory).

    python benchmarks/context_parallel_memory.py --out docs/perf/context_parallel_memory.md

For each Latte variant at Latte-XL/2's width (1152, 16 heads) on 32x32x4 latents (256 tokens per frame, 256 px
video), one clip per rank, bf16 autocast, attention through SDPA (a fused kernel that keeps no attention matrix,
as flash attention on a GPU): the MiB autograd keeps for the backward of one training forward (``dtx bench``'s
``activation_mb``) on one rank of N = 1, 2, 4 (``--context-parallel``: the other ranks stood in, shapes exact), for
models of 2 and 4 blocks and several frame counts. Activation memory is linear in the blocks and in the frames, so
the two depths give the memory per block pair and the rest, and the frame counts the memory per frame; the table
extrapolates to Latte-XL/2's 28 blocks. The GPU budget is 80 GB less the training state of Latte-XL/2 in float32
(weights, gradients, AdamW's two moments, the EMA copy: 20 bytes per parameter) and 4 GB of headroom.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

WIDTH = {"hidden_size": 1152, "num_heads": 16, "patch_size": 2}
STATE_BYTES_PER_PARAM = 20  # float32 weights 4 + gradients 4 + AdamW moments 8 + EMA copy 4
GPU_BYTES, HEADROOM = 80e9, 4e9


def measure(variant: int, depth: int, frames: int, n: int, precision: str = "bf16") -> float:
    """Per-rank activation MiB of one training forward, measured in a fresh process (each model's memory is
    returned to the system before the next)."""
    out = subprocess.run([sys.executable, __file__, "--measure", str(variant), str(depth), str(frames), str(n),
                          "--precision", precision],
                         check=True, capture_output=True, text=True, env={**os.environ, "DTX_ATTENTION": "sdpa"})
    return float(out.stdout.strip().splitlines()[-1])


def measure_here(variant: int, depth: int, frames: int, n: int, precision: str) -> float:
    from dtx.commands.bench import Setup, build_workload

    setup = Setup(batch=1, input_size=32, frames=frames, precision=precision, compile="off", context_parallel=n)
    work = build_workload("Latte", {**WIDTH, "depth": depth, "variant": variant, "num_classes": 0}, setup,
                          torch.device("cpu"))
    return work.activation_mb()


def latte_xl_params() -> int:
    from dtx.models import create_model

    with torch.device("meta"):
        model = create_model("Latte-XL/2", input_size=32, num_frames=16)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", type=Path, help="Markdown report (a PNG chart beside it)")
    p.add_argument("--measure", type=int, nargs=4, metavar=("VARIANT", "DEPTH", "FRAMES", "N"), help=argparse.SUPPRESS)
    p.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(measure_here(*args.measure, args.precision))
        return 0
    rows = []
    for variant in (1, 2, 3, 4):
        for n in args.ranks:
            for frames in args.frames:
                mib = {depth: measure(variant, depth, frames, n) for depth in (2, 4)}
                rows.append({"variant": variant, "ranks": n, "frames": frames, "mib_2": mib[2], "mib_4": mib[4]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    params = latte_xl_params()
    budget = GPU_BYTES - HEADROOM - STATE_BYTES_PER_PARAM * params
    fp32 = {n: measure(1, 2, 4, n, "fp32") for n in (1, max(args.ranks))}  # without autocast's weight copies
    report = render(rows, params, budget, args, fp32)
    print(report)
    if args.out:
        args.out.write_text(report)
        chart(rows, args.out.with_suffix(".png"))
    return 0


def full_depth_mib(rows: list[dict], variant: int, n: int) -> tuple[float, float]:
    """(MiB per frame, fixed MiB) of a 28-block model on one of n ranks, least squares over the frame counts."""
    pts = [(r["frames"], r["mib_2"] + 13 * (r["mib_4"] - r["mib_2"])) for r in rows
           if r["variant"] == variant and r["ranks"] == n]
    fs, ms = torch.tensor([f for f, _ in pts], dtype=torch.float64), torch.tensor([m for _, m in pts],
                                                                                  dtype=torch.float64)
    slope = float(((fs - fs.mean()) * (ms - ms.mean())).sum() / ((fs - fs.mean()) ** 2).sum())
    return slope, float(ms.mean() - slope * fs.mean())


def render(rows: list[dict], params: int, budget: float, args: argparse.Namespace, fp32: dict[int, float]) -> str:
    lines = ["# Context parallelism: activation memory per rank", "",
             f"Command: `python benchmarks/context_parallel_memory.py --out {args.out}` ({time.strftime('%Y-%m-%d')}; "
             f"CPU: {cpu_name()}, torch {torch.__version__}).", "",
             "Measured: MiB autograd keeps for the backward of one training forward of one 256 px clip (32x32x4 "
             "latents, 256 tokens per frame), bf16 autocast, SDPA attention, at Latte-XL/2's width (1152, 16 heads); "
             "`2 blocks` / `4 blocks` are models of that depth, on one of N ranks.", "",
             "| variant | N | frames | 2 blocks MiB | 4 blocks MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ranks']} | {r['frames']} | {r['mib_2']:.0f} | {r['mib_4']:.0f} |" for r in rows]
    lines += ["", f"## Longest clip per 80 GB GPU (estimate), Latte-XL/2 ({params / 1e6:.0f} M parameters, 28 blocks)",
              "", f"Budget for activations: 80 GB - {STATE_BYTES_PER_PARAM} B/parameter of training state "
              f"- 4 GB headroom = {budget / 1e9:.1f} GB; one clip per rank; memory per frame extrapolated linearly "
              "from the measurements (28 blocks = the 2-block model + 13 x the difference to the 4-block one).", "",
              "| variant | " + " | ".join(f"N = {n}: frames" for n in args.ranks) + " |",
              "|---|" + "---|" * len(args.ranks)]
    for variant in (1, 2, 3, 4):
        cells = []
        for n in args.ranks:
            per_frame, fixed = full_depth_mib(rows, variant, n)
            cells.append(str(int((budget / 2 ** 20 - fixed) // per_frame // n * n)))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "N ranks hold 1/N of every clip's token activations, so the longest clip grows about N-fold (frames "
              "rounded down to a multiple of N, as the split needs). What does not shrink with N is mostly the bf16 "
              "copy of every weight that autocast keeps for the backward (2 bytes per parameter on every rank; in "
              f"float32 the variant-1 2-block model's {fp32[1]:.0f} MiB for 4 frames at N = 1 fall to "
              f"{fp32[max(fp32)]:.0f} MiB at N = {max(fp32)}). Parameters and optimizer state are not split by "
              "context parallelism (FSDP2 shards them).", ""]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), sharey=True)
    for ax, variant in zip(axes, (1, 2, 3, 4)):
        for n in sorted({r["ranks"] for r in rows}):
            pts = [(r["frames"], r["mib_4"]) for r in rows if r["variant"] == variant and r["ranks"] == n]
            ax.plot([f for f, _ in pts], [m for _, m in pts], marker="o", label=f"N = {n}")
        ax.set_title(f"Latte variant {variant} (4 blocks)")
        ax.set_xlabel("frames (256 tokens each)")
    axes[0].set_ylabel("activation MiB per rank")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
