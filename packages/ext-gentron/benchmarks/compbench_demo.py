"""GenTron demo benchmark: sample a trained run on the held-out test prompts and score them compositionally.

    python packages/ext-gentron/benchmarks/compbench_demo.py runs/gentron-digits          # T2I, 200 test prompts
    python packages/ext-gentron/benchmarks/compbench_demo.py runs/gentron-moving-digits    # T2V: CFG alone, MFG
    python packages/ext-gentron/benchmarks/compbench_demo.py runs/gentron-moving-digits --n 120 \\
        --motion-cfg 1.0 1.1 1.2 1.3 --gif packages/ext-gentron/docs/mfg-ablation.gif --gif-rows 6

T2I prompts are the captions of the first ``--n`` items of ``captioned-digits``' test split: every one uses a
held-out (colour, digit, side) combination. T2V prompts are the captions of ``captioned-moving-digits``' test split,
every one a held-out (colour, digit, direction) combination. A T2V run is sampled with classic CFG ("cfg": text and
motion both null in the unconditional term) and with motion-free guidance at each ``--motion-cfg`` (the paper's lM;
text guidance lT = ``--cfg``; lM 1 is text CFG alone with motion on in both terms),
all from the same seed, so the same prompt gets the same initial noise in every setting; ``--gif`` writes the first
``--gif-rows`` prompts as a grid, one row per prompt and one column per setting. Scores are those of
``dtx compbench-digits`` (digit, colour, position, all; videos: frame consistency, colour, direction, all). One JSON
object per setting, then a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch


def sample(setup, prompts: list[str], cfg: float | None, steps: int | None, seed: int,
           scales: dict[str, float] | None, bf16: bool = False) -> tuple[torch.Tensor, float]:
    from dtx.conditioning import SampleRequest
    from dtx.training.config import resolve_sample
    from dtx.training.sampling import generate

    given = {k: v for k, v in (("cfg", cfg), ("steps", steps)) if v is not None}
    # the setting's own terms replace the run's: none for classic CFG, the motion scale for MFG
    s = dataclasses.replace(resolve_sample(setup.cfg.sample, given), guidance_scales=dict(scales or {}))
    t0 = time.perf_counter()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = generate(setup, SampleRequest(prompts=prompts), s, per_subject=1, seed=seed, batch_size=100)
    return out.x.float(), time.perf_counter() - t0


def settings(video: bool, motion_scales: list[float]) -> dict[str, dict[str, float] | None]:
    """Label -> guidance_scales: text CFG alone, then motion-free guidance at each motion scale (T2V)."""
    out: dict[str, dict[str, float] | None] = {"cfg": None}
    if video:
        out.update({f"mfg {m:g}": {"motion": m} for m in motion_scales})
    return out


def table(results: dict[str, dict[str, object]], video: bool) -> str:
    keys = (["frame_consistency", "colour", "direction", "all"] if video else ["digit", "colour", "position", "all"])
    lines = ["| guidance | " + " | ".join(keys) + " | sampling s |", "|---" * (len(keys) + 2) + "|"]
    for label, r in results.items():
        cells = [f"{100 * r[k]:.1f}%" if isinstance(r[k], float) else "n/a" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['sample_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a gentron-digits or gentron-moving-digits run folder (or checkpoint)")
    p.add_argument("--n", type=int, default=200, help="test prompts (one sample each)")
    p.add_argument("--cfg", type=float, help="text guidance scale (default: the run's sample.cfg)")
    p.add_argument("--motion-cfg", type=float, nargs="+", default=[1.2], help="motion-free guidance scales (T2V)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--split", choices=["test", "train"], default="test",
                   help="prompts of the held-out test split (default) or of the training split (seen combinations)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true",
                   help="sample under bfloat16 autocast (about 3x faster on CPUs with native bf16; dtx sample is fp32)")
    p.add_argument("--gif", type=Path, help="T2V: write a GIF grid of the first prompts, one column per setting")
    p.add_argument("--gif-rows", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dtx.training.sampling import load_for_sampling
    from dtx.writers import save_gif_grid
    from dtx_gentron.compbench import score_images, score_videos
    from dtx_gentron.data import CaptionedDigits, CaptionedMovingDigits

    setup = load_for_sampling(args.run, weights="ema", device="cpu")
    video = setup.info.frames is not None
    data = CaptionedMovingDigits(args.split, frames=setup.info.frames) if video else CaptionedDigits(args.split)
    n = min(args.n, len(data))
    prompts = [data[i]["text"] for i in range(n)]
    scenes = [data.scene(i) for i in range(n)]
    results: dict[str, dict[str, object]] = {}
    clips = []
    for label, scales in settings(video, args.motion_cfg).items():
        x, seconds = sample(setup, prompts, args.cfg, args.steps, args.seed, scales, args.bf16)
        scores = (score_videos if video else score_images)(x, scenes).summary()
        results[label] = {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()},
                          "sample_s": round(seconds, 1)}
        print(json.dumps({"run": str(args.run), "step": setup.step, "prompts": n, "guidance": label,
                          "cfg": setup.cfg.sample.cfg if args.cfg is None else args.cfg,
                          "precision": "bf16" if args.bf16 else "fp32", **results[label]}),
              flush=True)
        clips.append(x[:args.gif_rows])
    if video and args.gif is not None:
        grid = torch.stack(clips, 1).flatten(0, 1)  # [rows * settings, F, C, H, W]: row = prompt, column = setting
        save_gif_grid(grid, args.gif, per_row=len(clips), fps=setup.cfg.sample.fps)
        print(f"gif: {args.gif} (rows: {'; '.join(prompts[:args.gif_rows])}; columns: {', '.join(results)})")
    print(table(results, video))
    return 0


if __name__ == "__main__":
    sys.exit(main())
