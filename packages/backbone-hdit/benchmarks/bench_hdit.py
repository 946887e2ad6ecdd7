"""HDiT vs pixel-space DiT at matched parameter counts: forward and training-step time and peak memory per size.

The HDiT is k-diffusion's oxford-flowers configuration (widths 128/256/512, depths 2/2/4, neighborhood attention with
kernel 7 on the two outer levels, global attention inside, patch 4: 22.4M parameters), the configuration whose
k-diffusion reference times are quoted in the HDiT issue (93 / 396 / 6,191 ms forward at 64 / 128 / 256 px with
NATTEN's CPU path, no backward). The DiT has the same patch 4 on RGB pixels with width 320, depth 12 and 5 heads
(22.5M), unconditional, fixed variance.

For each size the two models are timed side by side in one process, interleaved round by round (so a busy machine
slows both alike), and the table prints the median of each and their ratio. Peak memory is measured in a fresh
process per model and size (``--memory``; peak RSS growth on CPU, ``max_memory_allocated`` on CUDA), since one
model's allocations would hide the other's in a shared process.

    python packages/backbone-hdit/benchmarks/bench_hdit.py [--sizes 64 128 256] [--batch 1] [--repeats 3]
        [--memory] [--device cpu|cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from dtx.benchmarking import reset_rss_peak, rss_peak_mb, timed

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "hdit": ("HDiT", {"patch_size": 4, "depths": [2, 2, 4], "widths": [128, 256, 512],
                      "self_attns": ["neighborhood:7", "neighborhood:7", "global"], "mapping_width": 256,
                      "mapping_depth": 2, "num_classes": 0}),
    "dit": ("DiT", {"patch_size": 4, "in_channels": 3, "hidden_size": 320, "depth": 12, "num_heads": 5,
                    "learn_sigma": False, "num_classes": 0}),
}


def build(kind: str, size: int, device: Any) -> Any:
    import torch

    import dtx

    name, options = MODELS[kind]
    torch.manual_seed(0)
    return dtx.create_model(name, input_size=size, **options).to(device)


def steps(model: Any, x: Any, noise_level: Any) -> tuple[Any, Any]:
    """(forward, train step) closures: eval forward under no_grad; forward + backward + AdamW step."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x, noise_level)

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        model(x, noise_level).square().mean().backward()
        opt.step()

    return forward, train_step


def side_by_side(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved medians of both models' forward and training step at one size."""
    import torch

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    x = torch.randn(args.batch, 3, size, size, device=device)
    levels = {"hdit": torch.full((args.batch,), 1.0, device=device),  # sigma
              "dit": torch.full((args.batch,), 500, device=device)}  # DDPM timestep
    models = {k: build(k, size, device) for k in MODELS}
    fns = {k: steps(models[k], x, levels[k]) for k in MODELS}
    times: dict[str, dict[str, list[float]]] = {k: {"forward": [], "train": []} for k in MODELS}
    for _ in range(args.repeats):  # one round: each model once, so load changes hit both
        for k, (forward, train_step) in fns.items():
            times[k]["forward"].append(timed(forward, sync, 1 if not times[k]["forward"] else 0, 1)[0])
            times[k]["train"].append(timed(train_step, sync, 1 if not times[k]["train"] else 0, 1)[0])
    row: dict[str, Any] = {"size": size, "batch": args.batch, "device": str(device),
                           "threads": torch.get_num_threads()}
    for k in MODELS:
        row[f"{k}_params"] = sum(p.numel() for p in models[k].parameters())
        row[f"{k}_forward_ms"] = round(statistics.median(times[k]["forward"]), 1)
        row[f"{k}_train_ms"] = round(statistics.median(times[k]["train"]), 1)
    row["forward_ratio_hdit_over_dit"] = round(row["hdit_forward_ms"] / row["dit_forward_ms"], 3)
    row["train_ratio_hdit_over_dit"] = round(row["hdit_train_ms"] / row["dit_train_ms"], 3)
    return row


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one model's forward and training step at one size, in this (fresh) process."""
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    level = torch.full((args.batch,), 1.0 if args.model == "hdit" else 500, device=device)
    rss0 = reset_rss_peak()
    model = build(args.model, args.size, device)
    forward, train_step = steps(model, x, level)
    forward()
    fwd = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else rss_peak_mb() - rss0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    train_step()
    train = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else rss_peak_mb() - rss0
    return {"model": args.model, "size": args.size, "params": sum(p.numel() for p in model.parameters()),
            "forward_peak_mb": round(fwd, 1), "train_peak_mb": round(train, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also measure peak memory (a fresh process per model/size)")
    p.add_argument("--child", choices=sorted(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        args.model = args.child
        print(json.dumps(memory_child(args)), flush=True)
        return 0
    for size in args.sizes:
        row = side_by_side(size, args)
        if args.memory:
            for k in MODELS:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", k, "--size", str(size), "--batch",
                       str(args.batch), "--device", args.device, "--threads", str(args.threads)]
                res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                row[f"{k}_forward_peak_mb"], row[f"{k}_train_peak_mb"] = res["forward_peak_mb"], res["train_peak_mb"]
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
