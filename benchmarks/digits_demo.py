"""Demo benchmark: train a digits recipe on CPU (``dit-digits``, ``hdit-digits``, ``latte-moving-digits``), then
report the digits classifier's accuracy on class-conditional samples (for videos: the frame consistency, the fraction
of frames whose located digit is the requested one, and the fraction of moving clips) and the training time.

    python benchmarks/digits_demo.py                         # the shipped dit-digits recipe, 2 threads
    python benchmarks/digits_demo.py --eval-every 250        # accuracy at every 250 steps (one run)
    python benchmarks/digits_demo.py optim.lr=3e-3 max_steps=2000
    python benchmarks/digits_demo.py --recipe latte-moving-digits --n-per-class 10

Training time is the loop's own wall clock (checkpoint writing included, set-up and final sampling excluded); CPU
time is reported beside it, since on a shared machine wall time also counts other people's work. Accuracy uses the
EMA weights, ``--n-per-class`` samples of each digit and the recipe's sampler, steps and guidance scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def evaluate(run_or_ckpt: Path, n_per_class: int, seed: int, overrides: dict, use_ema: bool = True) -> dict:
    from dtx.conditioning import SampleRequest
    from dtx.evaluation.digits import digits_accuracy, frame_consistency
    from dtx.training.config import resolve_sample
    from dtx.training.sampling import generate, load_for_sampling

    setup = load_for_sampling(run_or_ckpt, weights="ema" if use_ema else "raw", device="cpu")
    s = resolve_sample(setup.cfg.sample, {k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    samples = generate(setup, SampleRequest(classes=list(range(10))), s, per_subject=n_per_class, seed=seed)
    scores = frame_consistency(samples.x, samples.fields["y"]) if samples.channel_dim == 2 else \
        {"accuracy": digits_accuracy(samples.x, samples.fields["y"])}
    if "frame_consistency" in scores:
        scores["accuracy"] = scores["frame_consistency"]
    return {"step": setup.step, **scores, "sample_time_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--recipe", default="dit-digits")
    p.add_argument("--out", help="run folder (default: a temporary one, removed afterwards)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2 cores)")
    p.add_argument("--eval-every", type=int, help="also score the checkpoints written every this many steps")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=1, help="sampling seed")
    p.add_argument("--sampler")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA ones")
    p.add_argument("--eval-only", type=Path, help="score an existing run folder or checkpoint, no training")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sample_opts = {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg}

    if args.eval_only:
        print(json.dumps(evaluate(args.eval_only, args.n_per_class, args.seed, sample_opts, not args.no_ema)))
        return 0

    from dtx.commands.train import resolve_train_config
    from dtx.training.context import LocalContext
    from dtx.training.trainer import train

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dtx-digits-"))
    if args.out and out.exists():
        shutil.rmtree(out)
    extra = list(args.overrides)
    if args.eval_every:
        extra += [f"ckpt_every={args.eval_every}", "keep_last=1000"]
    cfg = resolve_train_config(args.recipe, extra, out=str(out))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = train(cfg, LocalContext(out, device="cpu", resume=False))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    ckpts = sorted((out / "checkpoints").glob("step_*")) if args.eval_every else [out]
    rows = [evaluate(c, args.n_per_class, args.seed, sample_opts, not args.no_ema) for c in ckpts]
    for r in rows:
        moving = f"  moving {r['moving']:.3f}" if "moving" in r else ""
        print(f"step {r['step']:6d}  accuracy {r['accuracy']:.4f}{moving}  (sampling {r['sample_time_s']:.1f}s)")
    result = {"recipe": args.recipe, "overrides": args.overrides, "threads": args.threads, "steps": summary["step"],
              "train_time_s": round(summary["train_time_s"], 1), "train_cpu_s": round(cpu, 1),
              "run_wall_s": round(wall, 1), "steps_per_s": round(summary["step"] / summary["train_time_s"], 2),
              **{k: v for k, v in rows[-1].items() if k not in ("step", "sample_time_s")},
              "n_samples": 10 * args.n_per_class,
              "sampler": args.sampler or cfg.sample.sampler, "sampling_steps": args.steps or cfg.sample.steps,
              "cfg": cfg.sample.cfg if args.cfg is None else args.cfg}
    print(json.dumps(result))
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
