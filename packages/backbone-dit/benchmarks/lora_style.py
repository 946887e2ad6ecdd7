"""The LoRA demo's measurements: base (dit-digits) and adapted (dit-digits-lora) samples for the same classes and
seeds, scored by the shipped digits classifier and by the style's statistic, the mean ink (x + 1) / 2, against the
real test digits plain and thickened. Writes JSON lines and, with --grid, one PNG: base row above adapted row.

    dtx train dit-digits && dtx train dit-digits-lora
    python packages/backbone-dit/benchmarks/lora_style.py --base runs/dit-digits --lora runs/dit-digits-lora \\
        --grid docs/perf/lora_style.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def ink(x: torch.Tensor) -> float:
    """Mean ink of images in [-1, 1]: the mean of (x + 1) / 2."""
    return float(((x.clamp(-1, 1) + 1) / 2).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--lora", type=Path, required=True)
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=Path, help="PNG: 10 samples per model (one per digit), base above adapted")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dtx.conditioning import SampleRequest
    from dtx.data.digits import digits_arrays
    from dtx.evaluation.digits import digits_accuracy
    from dtx.evaluation.report import to_unit
    from dtx.training.sampling import generate, load_for_sampling
    from dtx.writers import quantize

    plain, labels = digits_arrays("test", 8)
    thick, _ = digits_arrays("test", 8, style="thick")
    print(json.dumps({"real": "test", "ink_plain": ink(plain), "ink_thick": ink(thick),
                      "accuracy_plain": digits_accuracy(plain, labels),
                      "accuracy_thick": digits_accuracy(thick, labels)}), flush=True)
    rows = []
    for label, run in (("base", args.base), ("lora", args.lora)):
        setup = load_for_sampling(run, weights="ema", device="cpu")
        out = generate(setup, SampleRequest(classes=list(range(10))), setup.cfg.sample,
                       per_subject=args.n_per_class, seed=args.seed)
        x = to_unit(quantize(out.x))
        row = {"model": label, "run": str(run), "n": len(x), "accuracy": digits_accuracy(x, out.fields["y"]),
               "ink": ink(x), "ink_vs_thick": ink(x) / ink(thick) - 1}
        print(json.dumps(row), flush=True)
        y = torch.as_tensor(out.fields["y"])
        rows.append(x[[int((y == c).nonzero()[0]) for c in range(10)]])  # the first of each digit: same seeds
    if args.grid:
        from PIL import Image

        grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)[0]  # [2*8, 10*8]
        img = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.kron(img, np.ones((8, 8), dtype=np.uint8))).save(args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
