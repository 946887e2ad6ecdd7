"""GPU readiness: DiT-XL/2 bf16 training-step MFU on one CUDA device, the configuration the issue targets (>= 45% on
an H100): 256x256 images as pre-extracted 32x32x4 latents (no VAE in the step, as with ``dtx extract-latents``),
bf16 autocast, torch.compile, flash attention (flash-attn when installed, else SDPA's flash kernel), AdamW.

    python packages/backbone-dit/benchmarks/gpu_mfu.py                 # batch 256, compile on
    python packages/backbone-dit/benchmarks/gpu_mfu.py --batch 128 --compare   # also eager vs compiled, interleaved

Prints ``dtx bench``'s JSON lines and table (MFU against ``dtx.costs.GPU_PEAK_TFLOPS``); exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    import torch

    from dtx.cli import main as dtx_main

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compare", action="store_true", help="eager vs compiled, interleaved, with their ratio")
    p.add_argument("--recompute", default="none", help="activation recomputation: none, all or every-K")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_mfu.py: error: needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    argv = ["bench", args.model, "--device", "cuda", "--precision", "bf16", "--batch", str(args.batch),
            "--input-size", "32", "--warmup", "3", "--repeats", str(args.repeats), "--mode", "train",
            "--recompute", args.recompute]
    argv += ["--compare", "compile=off", "compile=on"] if args.compare else ["--compile", "on"]
    return dtx_main(argv)


if __name__ == "__main__":
    sys.exit(main())
