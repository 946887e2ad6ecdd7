"""Training throughput against the number of Ray Train workers on CPU: the same global batch of a small DiT on the
embedded digits, split over 1, 2, ... gloo workers (DDP or FSDP), each worker given ``cores / workers`` CPUs.
Throughput is the run's own samples/s over the logged windows after the first (Ray start-up and warm-up excluded).
Prints JSON lines and a Markdown table and draws a PNG (measured vs linear scaling from one worker).

    python benchmarks/ray_workers.py --workers 1,2 --out-dir docs/perf           # this machine: 2 cores
    python benchmarks/ray_workers.py --workers 1,2,4,8 --cores 16 --strategies ddp,fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback instance started by this script
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

MODEL = {"name": "DiT", "options": {"depth": 4, "hidden_size": 128, "num_heads": 4, "patch_size": 2,
                                    "learn_sigma": False}}


def measure(workers: int, strategy: str, cores: float, steps: int, batch: int, out: Path) -> dict[str, Any]:
    """One run of ``steps`` steps on ``workers`` workers; samples/s after the first logged window."""
    from dtx.training.config import load_train_config
    from dtx_ray.runner import RayOptions, run_with_options

    cfg = load_train_config({"model": MODEL, "data": {"name": "digits", "options": {"image_size": 8},
                                                      "batch_size": batch},
                             "objective": {"kind": "karras"}, "precision": "fp32", "sample": {"steps": 2, "sampler": "euler",
                                                                                               "n_per_class": 1}},
                            {"out": str(out), "max_steps": steps, "log_every": max(steps // 6, 1),
                             "ckpt_every": steps, "compile": False})
    summary = run_with_options(cfg, RayOptions(workers=workers, gpus_per_worker=0, cpus_per_worker=cores / workers,
                                               strategy=strategy, tensorboard=False))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]
    return {"workers": workers, "strategy": strategy, "cpus_per_worker": cores / workers, "batch": batch,
            "steps": summary["step"], "samples_per_s": round(statistics.median(rates), 1)}


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == strategy]
        ax.plot([r["workers"] for r in rs], [r["samples_per_s"] for r in rs], "o-", label=f"{strategy} (measured)")
        ax.plot([r["workers"] for r in rs], [rs[0]["samples_per_s"] * r["workers"] / rs[0]["workers"] for r in rs],
                ":", color="grey", label="linear from 1 worker" if strategy == rows[0]["strategy"] else None)
    ax.set_xlabel("Ray workers (same total cores)")
    ax.set_ylabel("training samples / s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("DiT (4 x 128) on digits, CPU workers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--strategies", default="ddp", help="comma-separated: ddp, fsdp")
    p.add_argument("--cores", type=float, default=float(os.cpu_count() or 2), help="CPUs shared by the workers")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=64, help="global batch (a multiple of every worker count)")
    p.add_argument("--out-dir", type=Path, help="write ray_workers.md and ray_workers.png here")
    args = p.parse_args(argv)
    import ray

    ray.init(num_cpus=int(args.cores), include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for strategy in args.strategies.split(","):
                for workers in (int(w) for w in args.workers.split(",")):
                    row = measure(workers, strategy, args.cores, args.steps, args.batch,
                                  Path(tmp) / f"{strategy}{workers}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    lines = ["| strategy | workers | CPUs each | samples/s | vs 1 worker |", "|---|---|---|---|---|"]
    for r in rows:
        first = next(q for q in rows if q["strategy"] == r["strategy"])
        lines.append(f"| {r['strategy']} | {r['workers']} | {r['cpus_per_worker']:g} | {r['samples_per_s']} | "
                     f"{r['samples_per_s'] / first['samples_per_s']:.2f}x |")
    print("\n".join(lines))
    if args.out_dir:
        (args.out_dir / "ray_workers.md").write_text("\n".join(lines) + "\n")
        chart(rows, args.out_dir / "ray_workers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
