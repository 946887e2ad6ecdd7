"""Where ``attention(backend="auto")`` switches on CPU: explicit two-product attention against PyTorch's fused SDPA.

    python benchmarks/cpu_attention.py [--threads 2] [--repeats 20]

For each (heads, tokens, dtype) shape, forward + backward of ``dtx.attention.explicit_attention`` and of
``F.scaled_dot_product_attention`` are timed interleaved in one process (median of ``--repeats``); the ratio
fused / explicit above 1 means explicit is faster. ``dtx.attention.CPU_EXPLICIT_MAX_LOGITS`` holds the largest
logits-per-head count where explicit should win; results are recorded in docs/perf/cpu_attention.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dtx.attention import CPU_EXPLICIT_MAX_LOGITS, explicit_attention
from dtx.cpu import cpu_info

SHAPES = [(768, 64), (192, 128), (48, 256), (12, 512), (4, 1024)]  # (batch x heads, tokens): about equal work


def _fwd_bwd(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    with torch.autocast("cpu", torch.bfloat16, enabled=q.dtype == torch.bfloat16):
        fn(q, k, v).float().sum().backward()
    return time.perf_counter() - t0


def measure(heads: int, tokens: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """Median seconds of (explicit, fused) forward + backward at [1, heads, tokens, 64]."""
    q, k, v = (torch.randn(1, heads, tokens, 64, dtype=dtype) for _ in range(3))
    times: dict[str, list[float]] = {"explicit": [], "fused": []}
    for i in range(repeats + 2):
        for name, fn in (("explicit", explicit_attention), ("fused", F.scaled_dot_product_attention)):
            t = _fwd_bwd(fn, q, k, v)
            if i >= 2:  # two warm-up rounds
                times[name].append(t)
    return statistics.median(times["explicit"]), statistics.median(times["fused"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_info().describe()}, {args.threads} threads; switch points (logits per head): {CPU_EXPLICIT_MAX_LOGITS}")
    print("| dtype | heads | tokens | explicit ms | fused ms | fused / explicit |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for heads, tokens in SHAPES:
            e, f = measure(heads, tokens, dtype, args.repeats)
            print(f"| {str(dtype).split('.')[-1]} | {heads} | {tokens} | {1e3 * e:.1f} | {1e3 * f:.1f} | {f / e:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
