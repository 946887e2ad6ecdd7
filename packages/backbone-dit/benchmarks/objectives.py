"""DDPM, EDM and flow matching on the same network and budget: quality against sampling NFE for each objective's
samplers, from runs of the dit-digits recipe trained with each objective (same steps; their training wall times are
read from the runs and printed, so equal steps can be checked to be equal time).

Scores are those of ``steps_to_quality.py`` (digits classifier accuracy and Frechet distance in its features against
the real training digits; NFE counted by a forward hook). Writes JSON lines, a Markdown table and one chart.

    dtx train dit-digits --out runs/obj-edm
    dtx train dit-digits objective.kind=gaussian sample.sampler=ddim --out runs/obj-ddpm
    dtx train dit-digits-flow --out runs/obj-flow
    python packages/backbone-dit/benchmarks/objectives.py --run ddpm=runs/obj-ddpm --run edm=runs/obj-edm \\
        --run flow=runs/obj-flow --out-dir docs/perf
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from steps_to_quality import real_baseline, score  # noqa: E402

SAMPLERS = {"gaussian": ["ddim", "dpm-solver"], "karras": ["euler", "heun", "dpmpp-2m"],
            "flow": ["flow-euler", "flow-heun", "flow-sde"]}


def train_seconds(run: Path) -> float:
    """The run's training wall time: ``time_s`` of its last metrics row."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float([r for r in rows if "time_s" in r][-1]["time_s"])


def plot(rows: list[dict[str, Any]], path: Path, baseline: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_fd, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    styles = {"gaussian": ":", "karras": "--", "flow": "-"}
    for key in dict.fromkeys((r["objective"], r["label"], r["sampler"]) for r in rows):
        rs = sorted((r for r in rows if (r["objective"], r["label"], r["sampler"]) == key), key=lambda r: r["nfe"])
        label = f"{key[1]}: {key[2]}"
        ax_fd.plot([r["nfe"] for r in rs], [r["fd"] for r in rs], "o" + styles.get(key[0], "-"), label=label)
        ax_acc.plot([r["nfe"] for r in rs], [100 * r["accuracy"] for r in rs], "o" + styles.get(key[0], "-"),
                    label=label)
    ax_fd.axhline(baseline, color="grey", ls="--", label=f"real test digits ({baseline:.1f})")
    ax_acc.axhline(95, color="red", ls=":", label="95%")
    for ax, label in ((ax_fd, "Frechet distance (classifier features)"), (ax_acc, "accuracy (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("function evaluations (NFE)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_fd.set_yscale("log")
    ax_fd.legend(fontsize=7, ncol=2)
    fig.suptitle("dit-digits: DDPM vs EDM vs flow matching, same network and training steps")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="LABEL=PATH", help="a trained digits run")
    p.add_argument("--steps", default="2,4,5,8,10,16,25,50", help="sampler steps to try")
    p.add_argument("--cfg", type=float, default=1.25)
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dtx.benchmarking import pivot_table
    from dtx.training.sampling import load_for_sampling

    rows, times = [], {}
    for spec in args.run:
        label, path = spec.split("=", 1)
        setup = load_for_sampling(path, weights="ema", device="cpu")
        kind, times[label] = setup.objective.kind, train_seconds(Path(path))
        print(json.dumps({"run": path, "label": label, "objective": kind, "step": setup.step,
                          "train_seconds": times[label]}), flush=True)
        for sampler in SAMPLERS[kind]:
            for steps in (int(s) for s in args.steps.split(",")):
                row = {"label": label, "objective": kind,
                       **score(setup, sampler, steps, args.cfg, args.n_per_class, args.seed)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    baseline = real_baseline()
    for r in rows:
        r["run_sampler"] = f"{r['label']}: {r['sampler']}"
    table = pivot_table(rows, "run_sampler", "steps",
                        lambda r: f"{100 * r['accuracy']:.1f}% / {r['fd']:.1f} ({r['nfe']})")
    report = (f"DDPM vs EDM vs flow matching on dit-digits (guidance {args.cfg}, {10 * args.n_per_class} samples; "
              f"cells: accuracy / Frechet distance (NFE); real test digits: {baseline:.2f}); training wall time: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"\n\n{table}\n")
    print(report)
    if args.out_dir:
        (args.out_dir / "objectives.md").write_text(report)
        plot(rows, args.out_dir / "objectives.png", baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
