"""Training speed on a shared machine: steps/s of a recipe alone and beside one busy single-thread process, per CPU
thread policy. Each run is ``dtx train RECIPE --runner local`` for a fixed training time; its steps/s is the median
of the metrics.jsonl windows after the first (warm-up excluded). Runs of all policies and conditions are interleaved
per round, so slow drift of the machine affects every cell alike.

    python benchmarks/shared_machine.py --recipes dit-digits hdit-digits --seconds 40 --rounds 1 --out docs/perf/shared_machine.md

Policies (environment of the training process):
  default   dtx's default thread policy (``DTX_THREADS`` unset)
  t2        2 torch threads, OpenMP's default waiting (spin, then sleep)
  t2-passive 2 threads with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once when idle)
  t1        1 thread
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {
    "default": {},
    "t2": {"DTX_THREADS": "2", "OMP_WAIT_POLICY": None},
    "t2-passive": {"DTX_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "t1": {"DTX_THREADS": "1"},
}
CONDITIONS = {"idle": None, "busy-nice0": 0, "busy-nice10": 10}
BUSY = "while True: pass"


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_until_idle(limit: float = 0.08) -> None:
    """Block until the machine is quiet, so that a run measures only itself and its one competitor."""
    while (busy := cpu_busy_fraction()) > limit:
        print(f"  waiting: machine {busy:.0%} busy", file=sys.stderr, flush=True)
        time.sleep(5)


def run_once(dtx: str, recipe: str, policy: dict, nice: int | None, seconds: float) -> float:
    """Median steps/s of one timed training run under ``policy``, beside a busy process at ``nice`` (None: alone)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DTX_THREADS", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update({k: v for k, v in policy.items() if v is not None})
    env.setdefault("OMP_NUM_THREADS", env.get("DTX_THREADS", "2"))
    wait_until_idle()
    competitor = None
    if nice is not None:
        competitor = subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", BUSY])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [dtx, "train", recipe, "--runner", "local", "--out", tmp + "/run", "--max-steps", "100000",
                   f"max_minutes={seconds / 60}", "log_every=10", "ckpt_every=100000", "sample.every=0"]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r][1:-1] or [rows[-1]["steps_per_s"]]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["dit-digits", "hdit-digits"])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    p.add_argument("--seconds", type=float, default=40.0, help="training time of each run")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--dtx", default=str(Path(sys.executable).with_name("dtx")))
    p.add_argument("--out", help="write the Markdown table here as well")
    args = p.parse_args()
    results: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for recipe in args.recipes:
            for policy in args.policies:
                for cond in args.conditions:
                    rate = run_once(args.dtx, recipe, POLICIES[policy], CONDITIONS[cond], args.seconds)
                    results.setdefault((recipe, policy, cond), []).append(rate)
                    print(json.dumps({"recipe": recipe, "policy": policy, "condition": cond, "steps_per_s": rate}),
                          flush=True)
    lines = ["| recipe | policy | " + " | ".join(args.conditions) + " | busy-nice0 / idle |",
             "|---|---|" + "---|" * (len(args.conditions) + 1)]
    for recipe in args.recipes:
        for policy in args.policies:
            cells = [statistics.median(results[(recipe, policy, c)]) for c in args.conditions]
            idle = cells[args.conditions.index("idle")] if "idle" in args.conditions else float("nan")
            busy = cells[args.conditions.index("busy-nice0")] if "busy-nice0" in args.conditions else float("nan")
            lines.append(f"| {recipe} | {policy} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {busy / idle:.0%} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
