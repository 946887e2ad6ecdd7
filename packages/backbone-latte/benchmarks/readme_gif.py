"""Write the README's animation: one sample clip per digit from a trained run, side by side in one looping GIF.

    python packages/backbone-latte/benchmarks/readme_gif.py RUN [--out packages/backbone-latte/docs/moving-digits.gif]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from dtx.conditioning import SampleRequest
    from dtx.training.config import resolve_sample
    from dtx.training.sampling import generate, load_for_sampling
    from dtx.writers import save_gif

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "moving-digits.gif"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", help="default: the run's sample.sampler")
    p.add_argument("--cfg", type=float, help="default: the run's sample.cfg")
    p.add_argument("--sigma-min", type=float, help="end of the EDM noise schedule (default: the run's objective)")
    args = p.parse_args(argv)
    setup = load_for_sampling(args.run)
    if args.sigma_min is not None:
        setup.objective.cfg = dataclasses.replace(setup.objective.cfg, sigma_min=args.sigma_min)
    s = resolve_sample(setup.cfg.sample, {k: v for k, v in (("sampler", args.sampler), ("cfg", args.cfg))
                                          if v is not None})
    clips = generate(setup, SampleRequest(classes=list(range(10))), s, per_subject=1,
                     seed=args.seed).x  # [10, F, C, H, W]
    pad = torch.full((*clips.shape[:3], clips.shape[3], 2), -1.0)
    row = torch.cat([torch.cat([c, p_], dim=-1) for c, p_ in zip(clips, pad)], dim=-1)  # [F, C, H, 10 * (W + 2)]
    print(save_gif(row, args.out, fps=s.fps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
