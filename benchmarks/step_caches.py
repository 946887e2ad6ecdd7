"""Step caches on a trained digits run: for each cache and threshold, the fraction of block evaluations it skips,
the sampling time against the uncached sampler (the same process, rounds interleaved, median ratio) and the
quality change (digits-classifier accuracy and Frechet distance in its features, the scores of ``dtx eval``).

    python benchmarks/step_caches.py --run runs/dit-digits --caches first-block,teacache \\
        --thresholds 0.05,0.1,0.2,0.3,0.5 --out docs/perf/step_caches.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def sample_once(setup: Any, settings: Any, n_per_class: int, seed: int) -> tuple[Any, float]:
    from dtx.conditioning import SampleRequest
    from dtx.training.sampling import generate

    t0 = time.perf_counter()
    out = generate(setup, SampleRequest(classes=list(range(10))), settings, per_subject=n_per_class, seed=seed)
    return out, time.perf_counter() - t0


def scores(samples: Any) -> dict[str, float]:
    from dtx.evaluation.report import digits_scores

    return digits_scores(samples.x, samples.fields["y"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--caches", default="first-block,teacache")
    p.add_argument("--thresholds", default="0.05,0.1,0.2,0.3,0.5")
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (uncached and cached interleaved)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="a Markdown table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dtx.training.config import resolve_sample
    from dtx.training.sampling import load_for_sampling

    setup = load_for_sampling(args.run, weights="ema", device="cpu")
    base = setup.cfg.sample
    plain, _ = sample_once(setup, base, args.n_per_class, args.seed)
    ref = scores(plain)
    print(json.dumps({"run": str(args.run), "sampler": base.sampler, "steps": base.steps, "cfg": base.cfg, **ref}))
    rows = []
    for cache in args.caches.split(","):
        for threshold in (float(t) for t in args.thresholds.split(",")):
            settings = resolve_sample(base, {"cache": cache, "cache_options": {"threshold": threshold}})
            ratios = []
            for _ in range(args.rounds):
                _, t_plain = sample_once(setup, base, args.n_per_class, args.seed)
                cached, t_cached = sample_once(setup, settings, args.n_per_class, args.seed)
                ratios.append(t_plain / t_cached)
            row = {"cache": cache, "threshold": threshold, **cached.cache, "speedup": statistics.median(ratios),
                   **scores(cached)}
            row["accuracy_drop_points"] = 100 * (ref["accuracy"] - row["accuracy"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        lines = [f"Step caches on {args.run} ({base.sampler}, {base.steps} steps, guidance {base.cfg}, "
                 f"{10 * args.n_per_class} samples). Uncached: {100 * ref['accuracy']:.1f}% / FD {ref['fd']:.2f}.",
                 "", "| cache | threshold | fewer full evaluations | speedup (wall, interleaved) | accuracy | FD |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['cache']} | {r['threshold']:g} | {r['fewer_full_evaluations']:.2f}x | {r['speedup']:.2f}x | "
                  f"{100 * r['accuracy']:.1f}% | {r['fd']:.2f} |" for r in rows]
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
