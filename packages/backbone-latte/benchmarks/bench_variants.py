"""Benchmark the four Latte variants side by side: forward time, training-step time and peak memory.

Every variant is built from one preset (same depth, width, heads and patch size), so the comparison is at equal
size. Parameter counts are equal by construction for variants 1, 2 and 4: 1 and 2 are the same DiT blocks in another
order, and a variant-4 block is a DiT block whose one attention gives half its heads to each axis. Variant 3 (spatial
MHA + temporal MHA + one MLP per block) has an extra attention and temporal modulation per block (Latte-S/2: 45.0M vs
32.6M). The counts are printed with the timings, and the table names the groups of equal counts.

Each variant runs in a fresh process of its own (this script with ``--child``), so one variant's allocations cannot
inflate another's peak, and the parent prints one JSON line per variant and a table. In a child: build the model,
``--warmup`` untimed iterations, then the median of ``--repeats`` timed ones of

- forward: ``model(x, t)`` under ``torch.no_grad``;
- train step: forward + backward of the mean squared output + ``AdamW.step`` (zeroing grads included);

by wall clock (``*_ms``) and process CPU time (``*_cpu_ms``, steadier on a shared CPU). Peak memory: on CUDA,
``torch.cuda.max_memory_allocated`` over the forward and over the training steps (model, gradients and optimizer
state included); on CPU, the growth of the process's peak resident set (``resource.getrusage``) from after the
imports and the input, so it counts the model, its gradients, AdamW's state and the largest activations.

    python packages/backbone-latte/benchmarks/bench_variants.py [--preset Latte-S/2] [--frames 8] [--input-size 32]
        [--batch 2] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from dtx.benchmarking import reset_rss_peak, rss_peak_mb, timed

VARIANTS = (1, 2, 3, 4)
NAMES = {1: "interleaved", 2: "late fusion", 3: "factorised MHA", 4: "split-head MHA"}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one variant in this process; returns its JSON-ready result."""
    import torch

    import dtx

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.frames, args.in_channels, args.input_size, args.input_size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    rss0 = reset_rss_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = dtx.create_model(args.preset, variant=args.variant, num_frames=args.frames, input_size=args.input_size,
                             in_channels=args.in_channels).to(device)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def forward() -> None:
        with torch.no_grad():
            model(x, t)

    model.eval()
    fwd_ms, fwd_cpu = timed(forward, sync, args.warmup, args.repeats)
    fwd_peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else rss_peak_mb() - rss0

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x, t).square().mean().backward()
        opt.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step_ms, step_cpu = timed(train_step, sync, args.warmup, args.repeats)
    step_peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else rss_peak_mb() - rss0
    return {"variant": args.variant, "name": NAMES[args.variant], "preset": args.preset, "frames": args.frames,
            "input_size": args.input_size, "in_channels": args.in_channels, "batch": args.batch,
            "device": str(device), "threads": torch.get_num_threads(), "repeats": args.repeats,
            "params": params, "trainable": trainable,
            "forward_ms": round(fwd_ms, 2), "forward_cpu_ms": round(fwd_cpu, 2),
            "train_step_ms": round(step_ms, 2), "train_step_cpu_ms": round(step_cpu, 2),
            "memory": "cuda max_memory_allocated" if cuda else "peak RSS growth",
            "forward_peak_mb": round(fwd_peak, 1), "train_peak_mb": round(step_peak, 1),
            "torch": torch.__version__}


def _child_command(args: argparse.Namespace, variant: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", "--variant", str(variant), "--preset", args.preset,
            "--frames", str(args.frames), "--input-size", str(args.input_size), "--in-channels",
            str(args.in_channels), "--batch", str(args.batch), "--repeats", str(args.repeats), "--warmup",
            str(args.warmup), "--device", args.device, "--threads", str(args.threads)]


def _table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["variant"] == 1), rows[0])
    head = (f"{'variant':<20} {'params':>12} {'fwd ms':>9} {'fwd cpu':>9} {'step ms':>9} {'step cpu':>9} "
            f"{'fwd MiB':>9} {'step MiB':>9} {'cpu vs V1':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r["train_step_cpu_ms"] / base["train_step_cpu_ms"] if base["train_step_cpu_ms"] else float("nan")
        lines.append(f"{str(r['variant']) + ' ' + r['name']:<20} {r['params']:>12,} {r['forward_ms']:>9.1f} "
                     f"{r['forward_cpu_ms']:>9.1f} {r['train_step_ms']:>9.1f} {r['train_step_cpu_ms']:>9.1f} "
                     f"{r['forward_peak_mb']:>9.1f} {r['train_peak_mb']:>9.1f} {ratio:>10.2f}")
    counts: dict[int, list[int]] = {}
    for r in rows:
        counts.setdefault(r["params"], []).append(r["variant"])
    same = [v for v in counts.values() if len(v) > 1]
    lines.append("equal parameter counts: " + ("; ".join("variants " + ", ".join(map(str, v)) for v in same)
                                               if same else "none"))
    lines.append(f"memory: {rows[0]['memory']}; times are medians of {rows[0]['repeats']} after warm-up; "
                 f"'cpu vs V1': training-step CPU time relative to the first row")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="Latte-S/2", help="registered Latte preset shared by every variant")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--input-size", type=int, default=32, help="latent side (pixels for pixel-space data)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--variants", type=int, nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", type=int, default=1, choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return 0
    rows = []
    for variant in args.variants:
        res = subprocess.run(_child_command(args, variant), capture_output=True, text=True)
        if res.returncode != 0:
            print(f"variant {variant} failed (exit {res.returncode}):\n{res.stderr[-3000:]}", file=sys.stderr)
            return 1
        row = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
