"""One AdamW step of a model's parameters: PyTorch's fused kernel against its default per-tensor loop (CPU).

    python benchmarks/adamw_step.py [--model DiT-S/2] [--threads 2] [--repeats 20]

Both optimizers step the same parameters with the same gradients, interleaved in one process (median of
``--repeats``); ``dtx.training.optim.build_optimizer`` takes the fused kernel wherever the parameters allow it.
Results are recorded in docs/perf/optimizer.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    import dtx
    from dtx.cpu import cpu_info
    from dtx.training.config import OptimConfig
    from dtx.training.optim import build_optimizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = dtx.create_model(args.model, input_size=32)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    n = sum(param.numel() for param in model.parameters()) / 1e6
    optimizers = {"fused": build_optimizer(model, OptimConfig(), fused=True),
                  "per-tensor": build_optimizer(model, OptimConfig(), fused=False)}
    times: dict[str, list[float]] = {k: [] for k in optimizers}
    for i in range(args.repeats + 2):
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    fused, loop = (1e3 * statistics.median(times[k]) for k in ("fused", "per-tensor"))
    print(f"CPU: {cpu_info().describe()}, {args.threads} threads; {args.model}, {n:.1f}M parameters")
    print(f"fused {fused:.1f} ms, per-tensor {loop:.1f} ms, per-tensor / fused {loop / fused:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
