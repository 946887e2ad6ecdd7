"""GenTron demo benchmark: sample a trained run on the held-out test prompts and score them compositionally.

    python packages/ext-gentron/benchmarks/compbench_demo.py runs/gentron-digits          # T2I, 200 test prompts
    python packages/ext-gentron/benchmarks/compbench_demo.py runs/gentron-moving-digits    # T2V, with and without MFG
    python packages/ext-gentron/benchmarks/compbench_demo.py RUN --n 400 --cfg 4 --motion-cfg 1.2

T2I prompts are the captions of the first ``--n`` items of ``captioned-digits``' test split: every one uses a
held-out (colour, digit, side) combination. T2V prompts are the captions of ``captioned-moving-digits``' test split;
a T2V run is sampled with plain text CFG and with motion-free guidance (``--motion-cfg``). Scores are those of
``dtx compbench-digits`` (digit, colour, position, all; videos: frame consistency, colour, direction, all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def sample(run: Path, prompts: list[str], cfg: float | None, steps: int | None, seed: int,
           scales: dict[str, float] | None = None):
    from dtx.conditioning import SampleRequest
    from dtx.training.sampling import generate, load_for_sampling

    setup = load_for_sampling(run, weights="ema", device="cpu")
    s = setup.cfg.sample
    t0 = time.perf_counter()
    out = generate(setup, SampleRequest(prompts=prompts), per_subject=1, sampler=s.sampler, steps=steps or s.steps,
                   cfg_scale=s.cfg if cfg is None else cfg, seed=seed, batch_size=100, guidance_scales=scales)
    return setup, out.x, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a gentron-digits or gentron-moving-digits run folder (or checkpoint)")
    p.add_argument("--n", type=int, default=200, help="test prompts (one sample each)")
    p.add_argument("--cfg", type=float, help="text guidance scale (default: the run's sample.cfg)")
    p.add_argument("--motion-cfg", type=float, default=1.2, help="motion-free guidance scale for T2V runs")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dtx.training.sampling import load_for_sampling
    from dtx_gentron.compbench import score_images, score_videos
    from dtx_gentron.data import CaptionedDigits, CaptionedMovingDigits

    video = load_for_sampling(args.run, weights="ema", device="cpu").info.frames is not None
    data = CaptionedMovingDigits("test") if video else CaptionedDigits("test")
    n = min(args.n, len(data))
    prompts = [data[i]["text"] for i in range(n)]
    scenes = [data.scene(i) for i in range(n)]
    runs = {"cfg": None, "mfg": {"motion": args.motion_cfg}} if video else {"cfg": None}
    result: dict[str, object] = {"run": str(args.run), "prompts": n}
    for label, scales in runs.items():
        setup, x, seconds = sample(args.run, prompts, args.cfg, args.steps, args.seed, scales)
        scores = (score_videos if video else score_images)(x, scenes).summary()
        result[label] = {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()},
                         "sample_s": round(seconds, 1)}
        result["step"] = setup.step
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
