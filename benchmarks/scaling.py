"""Scaling charts: training-step time and activation memory against sequence length for DiT (global attention) and HDiT
(neighborhood attention), and against frame count for the four Latte variants; JSON lines, a Markdown table and a
PNG chart per sweep. Each point is ``dtx bench``'s training step (``dtx.commands.bench.build_workload``: forward,
backward, AdamW), the median of ``--repeats`` calls; memory is what autograd saves for backward
(``dtx.benchmarking.saved_activations_mb``: exact on any device). Small widths keep it runnable on 2 CPU cores.

    python benchmarks/scaling.py --sweep tokens --out-dir docs/perf      # DiT vs HDiT
    python benchmarks/scaling.py --sweep frames --out-dir docs/perf      # Latte variants 1-4
    python benchmarks/scaling.py --sweep tokens --device cuda --width 384 --repeats 10   # a GPU, any width
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch


def _point(name: str, options: dict[str, Any], batch: int, device: torch.device, warmup: int,
           repeats: int) -> dict[str, Any]:
    from dtx.benchmarking import device_sync, interleaved, peak_memory_mb, saved_activations_mb
    from dtx.commands.bench import Setup, build_workload

    work = build_workload(name, options, Setup(batch=batch, compile="off"), device)
    (times,) = interleaved([work.calls["train"]], device_sync(device), warmup, repeats)
    ms = statistics.median(t[0] for t in times)
    return {"model": name, "options": options, "batch": batch, "train_ms": round(ms, 2),
            "peak_mem_mb": round(peak_memory_mb(work.calls["train"], device), 1),
            "activations_mb": round(saved_activations_mb(work.calls["train"], list(work.model.parameters())), 2),
            "gflops_per_sample": 3 * work.flops_per_sample / 1e9}


def tokens_sweep(sides: list[int], width: int, batch: int, device: torch.device, warmup: int,
                 repeats: int) -> list[dict[str, Any]]:
    """DiT (patch 2, global attention) and a two-level HDiT (patch 2, neighborhood k7 then global at 1/4 the
    tokens) at the same top-level token count (side/2)^2."""
    rows = []
    for side in sides:
        tokens = (side // 2) ** 2
        dit = {"input_size": side, "in_channels": 3, "patch_size": 2, "hidden_size": width, "depth": 4,
               "num_heads": max(1, width // 64), "num_classes": 0, "learn_sigma": False}
        hdit = {"input_size": side, "in_channels": 3, "patch_size": 2, "depths": [2, 2], "widths": [width, 2 * width],
                "self_attns": [{"type": "neighborhood", "d_head": 64, "kernel_size": 7},
                               {"type": "global", "d_head": 64}],
                "mapping_width": width, "mapping_depth": 1, "num_classes": 0}
        for family, name, options in (("DiT (global)", "DiT", dit), ("HDiT (neighborhood)", "HDiT", hdit)):
            row = {"sweep": "tokens", "series": family, "tokens": tokens, "side": side,
                   **_point(name, options, batch, device, warmup, repeats)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def frames_sweep(frames: list[int], width: int, batch: int, device: torch.device, warmup: int,
                 repeats: int) -> list[dict[str, Any]]:
    """The four Latte variants at 8x8 latents (patch 2: 16 tokens a frame) against the frame count."""
    rows = []
    for f in frames:
        for variant in (1, 2, 3, 4):
            options = {"input_size": 8, "num_frames": f, "patch_size": 2, "hidden_size": width, "depth": 4,
                       "num_heads": max(1, width // 64), "variant": variant, "num_classes": 0, "learn_sigma": False}
            row = {"sweep": "frames", "series": f"Latte variant {variant}", "frames": f,
                   **_point("Latte", options, batch, device, warmup, repeats)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def chart(rows: list[dict[str, Any]], x: str, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for series in dict.fromkeys(r["series"] for r in rows):
        rs = [r for r in rows if r["series"] == series]
        ax_t.plot([r[x] for r in rs], [r["train_ms"] for r in rs], "o-", label=series)
        ax_m.plot([r[x] for r in rs], [r["activations_mb"] for r in rs], "o-", label=series)
    for ax, label in ((ax_t, "training step (ms)"), (ax_m, "activations saved for backward (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per image" if x == "tokens" else "frames")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def table(rows: list[dict[str, Any]], x: str) -> str:
    from dtx.benchmarking import pivot_table

    return pivot_table(rows, "series", x, lambda r: f"{r['train_ms']:.0f} ms / {r['activations_mb']:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", choices=("tokens", "frames"), required=True)
    p.add_argument("--sides", default="16,32,64", help="tokens sweep: image sides (tokens = (side/2)^2)")
    p.add_argument("--frames", default="2,4,8,16", help="frames sweep: frame counts")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    common = (args.width, args.batch, device, args.warmup, args.repeats)
    if args.sweep == "tokens":
        rows, x = tokens_sweep([int(s) for s in args.sides.split(",")], *common), "tokens"
        title = f"DiT vs HDiT training step, width {args.width}, batch {args.batch}, {device}"
    else:
        rows, x = frames_sweep([int(s) for s in args.frames.split(",")], *common), "frames"
        title = f"Latte variants training step, width {args.width}, batch {args.batch}, {device}"
    md = table(rows, x)
    print(md)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        chart(rows, x, args.out_dir / f"scaling_{args.sweep}.png", title)
        (args.out_dir / f"scaling_{args.sweep}.md").write_text(f"{title}\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
