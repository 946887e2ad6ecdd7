"""Sampling time of GenTron-S/2 with its ``prepare_conditions`` hook (text projections once per run) against without
it (once per step), interleaved A/B in one process; prints the per-mode times and the ratio.

    python benchmarks/prepared_conditions.py                  # T2I, 2 condition sets (CFG)
    python benchmarks/prepared_conditions.py --frames 4       # T2V, 3 condition sets (motion-free guidance)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dtx.data.info import DataInfo
from dtx.testing import randomize_parameters
from dtx.training import objectives
from dtx.training.config import ObjectiveConfig
from dtx.training.objectives import build_objective
from dtx_gentron.model import build_gentron


def main() -> None:
    """Time ``objective.sample`` with and without the hook, alternating, and print the ratio of the medians."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=0)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--text-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = randomize_parameters(build_gentron(depth=12, hidden_size=384, num_heads=6, patch_size=2,
                                               input_size=args.size, in_channels=4, context_dim=384,
                                               text_length=args.text_length, num_frames=args.frames,
                                               learn_sigma=False)).to(args.device)
    b, n = args.batch, args.text_length
    gen = torch.Generator().manual_seed(1)
    text = {"context": torch.randn(b, n, 384, generator=gen), "context_mask": torch.ones(b, n, dtype=torch.bool),
            "pooled": torch.randn(b, 384, generator=gen)}
    null = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in text.items()}
    text, null = ({k: v.to(args.device) for k, v in d.items()} for d in (text, null))
    if args.frames:
        free, moving = (torch.full((b,), v, dtype=torch.bool, device=args.device) for v in (True, False))
        conds = [{**null, "motion_free": free}, {**null, "motion_free": moving}, {**text, "motion_free": moving}]
        scales, shape = [1.5, 7.5], (b, args.frames, 4, args.size, args.size)
    else:
        conds, scales, shape = [null, text], [4.0], (b, 4, args.size, args.size)
    info = DataInfo(channels=4, height=args.size, width=args.size, frames=args.frames or None)
    objective = build_objective(ObjectiveConfig(), model, info)
    hook = objectives.prepare_hook

    def run(prepared: bool) -> float:
        objectives.prepare_hook = hook if prepared else (lambda m: None)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            objective.sample(model, shape, conds, scales, "ddim", args.steps, torch.Generator().manual_seed(2))
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(True), run(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for prepared in (True, False):
            times[prepared].append(run(prepared))
    objectives.prepare_hook = hook
    with_hook, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"{'T2V' if args.frames else 'T2I'} GenTron-S/2 {args.size}x{args.size}x4"
          f"{f' x {args.frames} frames' if args.frames else ''}, text {n}, {len(conds)} condition sets, "
          f"{args.steps} steps, batch {b}, {args.device}")
    print(f"with prepare_conditions:    {with_hook:.3f} s (runs {', '.join(f'{t:.3f}' for t in times[True])})")
    print(f"without prepare_conditions: {without:.3f} s (runs {', '.join(f'{t:.3f}' for t in times[False])})")
    print(f"speedup (without / with): {without / with_hook:.3f}x")


if __name__ == "__main__":
    main()
