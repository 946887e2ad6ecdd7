"""Step caches on a trained demo run: for each cache setting, how many evaluations it skips, the sampling time against
the uncached sampler (the same process, rounds interleaved, median ratio) and the change on the family's judge.

    python benchmarks/step_caches.py --run runs/dit-digits --settings first-block teacache pab \\
        first-block:threshold=0.3 --out docs/perf/step_caches_dit.md
    python benchmarks/step_caches.py --run runs/gentron-digits --settings first-block teacache pab --bf16

A setting is ``NAME`` (the cache at its defaults: the family's calibrated ones where it declares them) or
``NAME:key=value,key=value``. Judges: class-conditional image runs (DiT) get digits-classifier accuracy and the
Frechet distance in its features (``dtx eval``'s scores, ``--n-per-class`` samples of each digit); class video runs
(Latte) get frame consistency; text runs (GenTron) are sampled on the first ``--prompts`` held-out test captions and
scored by ``dtx compbench-digits`` (all correct; videos also frame consistency and direction).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    from dtx.config import parse_options

    name, _, options = text.partition(":")
    parts = re.split(r",(?![^\[]*\])", options)  # commas between options, not inside a [list]
    return name, parse_options([o for o in parts if o]) if options else {}


def judge_for(setup: Any, args: argparse.Namespace) -> tuple[Any, Callable[[Any], dict[str, float]], str]:
    """(request, score function, name of the judged score) for the run's family."""
    from dtx.conditioning import SampleRequest

    if setup.stage.request_reads("prompts"):
        from dtx_gentron.compbench import score_images, score_videos
        from dtx_gentron.data import CaptionedDigits, CaptionedMovingDigits

        video = setup.info.frames is not None
        data = CaptionedMovingDigits("test", frames=setup.info.frames) if video else CaptionedDigits("test")
        n = min(args.prompts, len(data))
        scenes = [data.scene(i) for i in range(n)]
        score = score_videos if video else score_images

        def judge(samples: Any) -> dict[str, float]:
            return {k: v for k, v in score(samples.x, scenes).summary().items() if isinstance(v, float)}

        return SampleRequest(prompts=[data[i]["text"] for i in range(n)]), judge, "all"
    if setup.info.frames is not None:
        from dtx.evaluation.digits import frame_consistency
        from dtx.evaluation.report import quantize, to_unit

        def judge(samples: Any) -> dict[str, float]:
            out = frame_consistency(to_unit(quantize(samples.x)), samples.fields["y"])
            return {"frame_consistency": float(out["frame_consistency"])}

        return SampleRequest(classes=list(range(10))), judge, "frame_consistency"
    from dtx.evaluation.report import digits_scores

    return (SampleRequest(classes=list(range(10))), lambda s: digits_scores(s.x, s.fields["y"]), "accuracy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--settings", nargs="+", default=["first-block", "teacache", "pab"])
    p.add_argument("--n-per-class", type=int, default=50, help="samples of each class (class-conditional runs)")
    p.add_argument("--prompts", type=int, default=100, help="held-out test captions (text runs), one sample each")
    p.add_argument("--rounds", type=int, default=3,
                   help="timing rounds (uncached and cached interleaved); 0: one cached run against the first one")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="sample under bfloat16 autocast")
    p.add_argument("--out", type=Path, help="a Markdown table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dtx.training.config import resolve_sample
    from dtx.training.sampling import generate, load_for_sampling

    setup = load_for_sampling(args.run, weights="ema", device="cpu")
    base = setup.cfg.sample
    request, judge, key = judge_for(setup, args)
    per_subject = 1 if request.prompts else args.n_per_class

    def sample_once(settings: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16) if args.bf16 else contextlib.nullcontext():
            out = generate(setup, dataclasses.replace(request), settings, per_subject=per_subject, seed=args.seed)
        return out, time.perf_counter() - t0

    plain, t_plain = sample_once(base)
    ref = judge(plain)
    print(json.dumps({"run": str(args.run), "sampler": base.sampler, "steps": base.steps, "cfg": base.cfg,
                      "seconds": round(t_plain, 1), **ref}), flush=True)
    rows = []
    for text in args.settings:
        name, options = parse_setting(text)
        settings = resolve_sample(base, {"cache": name, "cache_options": options})
        ratios = []
        for _ in range(args.rounds):
            _, t0 = sample_once(base)
            cached, t1 = sample_once(settings)
            ratios.append(t0 / t1)
        if not ratios:  # --rounds 0: one cached run, timed against the first uncached one
            cached, t1 = sample_once(settings)
            ratios.append(t_plain / t1)
        row = {"setting": text, **(cached.cache or {}), "speedup": round(statistics.median(ratios), 3),
               **judge(cached)}
        row["drop_points"] = round(100 * (ref[key] - row[key]), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        keys = [k for k in ref if k in ("accuracy", "fd", "frame_consistency", "colour", "direction", "all")]
        lines = [f"Step caches on {args.run} ({base.sampler}, {base.steps} steps, guidance {base.cfg}, "
                 f"{'bf16' if args.bf16 else 'fp32'}). Uncached: "
                 + ", ".join(f"{k} {ref[k]:.4g}" for k in keys) + ".", "",
                 "| setting | full / skipped | unit | fewer full | speedup (wall, interleaved) | "
                 + " | ".join(keys) + " |", "|---" * (5 + len(keys)) + "|"]
        lines += [f"| {r['setting']} | {r.get('full')} / {r.get('skipped')} | {r.get('unit')} | "
                  f"{r.get('fewer_full_evaluations', 0):.2f}x | {r['speedup']:.2f}x | "
                  + " | ".join(f"{r[k]:.4g}" for k in keys) + " |" for r in rows]
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
