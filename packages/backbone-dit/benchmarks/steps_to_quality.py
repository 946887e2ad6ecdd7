"""Steps-to-quality of a trained digits run: classifier accuracy and feature-space Frechet distance against the
number of function evaluations (NFE) for every sampler of the run's objective, and against the guidance scale.

Scores are those of ``dtx eval`` (samples quantised to uint8 as archives store them; Frechet distance in the digits
classifier's feature space against the real training digits, where the real test digits score about 2.4). NFE is
counted, not assumed: a forward hook counts the model calls of one sampling batch (a guided step is one batched
forward). Writes JSON lines to stdout, a Markdown table and two PNG charts.

    python packages/backbone-dit/benchmarks/steps_to_quality.py --run runs/digits --out-dir docs/perf
    python packages/backbone-dit/benchmarks/steps_to_quality.py --run RUN --steps 5,10,25 --cfgs 1,1.5,2,3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s.strip()]


def samplers_for(kind: str) -> list[str]:
    """Registered samplers of an objective kind (``karras`` or ``gaussian``), in registry order."""
    from dtx import plugins

    return [name for name, e in plugins.host().table("sampler").items() if e.meta.get("kind") == kind]


def settings(setup: Any, sampler: str, steps: int, cfg: float) -> Any:
    """The run's sampling settings with this sampler, step count and guidance scale."""
    from dtx.training.config import resolve_sample

    return resolve_sample(setup.cfg.sample, {"sampler": sampler, "steps": steps, "cfg": cfg})


def count_nfe(setup: Any, sampler: str, steps: int, cfg: float) -> int:
    """Model calls of one sampling batch (one sample per class: a single batch)."""
    from dtx.conditioning import SampleRequest
    from dtx.training.sampling import generate

    calls = [0]
    handle = setup.model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        generate(setup, SampleRequest(classes=list(range(10))), settings(setup, sampler, steps, cfg), per_subject=1,
                 seed=0)
    finally:
        handle.remove()
    return calls[0]


def score(setup: Any, sampler: str, steps: int, cfg: float, n_per_class: int, seed: int) -> dict[str, Any]:
    """Accuracy and Frechet distance (vs the real training digits) of ``10 * n_per_class`` samples."""
    from dtx.conditioning import SampleRequest
    from dtx.evaluation.report import digits_scores
    from dtx.training.sampling import generate

    t0 = time.perf_counter()
    samples = generate(setup, SampleRequest(classes=list(range(10))), settings(setup, sampler, steps, cfg),
                       per_subject=n_per_class, seed=seed)
    return {"sampler": sampler, "steps": steps, "cfg": cfg, "nfe": count_nfe(setup, sampler, steps, cfg),
            **digits_scores(samples.x, samples.fields["y"]), "n": len(samples.x),
            "seconds": round(time.perf_counter() - t0, 2)}


def real_baseline() -> float:
    """Frechet distance of the real test digits to the training digits (the floor a sampler can reach)."""
    from dtx.evaluation.frechet import frechet_distance_from_stats
    from dtx.evaluation.report import reference_stats

    return frechet_distance_from_stats(*reference_stats("test"), *reference_stats("train"))


def markdown(rows: list[dict[str, Any]], key: str) -> str:
    """A table: one row per sampler (or cfg), cells ``accuracy / FD`` per column of ``key``."""
    from dtx.benchmarking import pivot_table

    return pivot_table(rows, "sampler", key,
                       lambda r: f"{100 * r['accuracy']:.1f}% / {r['fd']:.1f} (NFE {r['nfe']})")


def plot(rows: list[dict[str, Any]], x: str, path: Path, baseline: float, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_fd, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        rs = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r[x])
        ax_fd.plot([r[x] for r in rs], [r["fd"] for r in rs], "o-", label=sampler)
        ax_acc.plot([r[x] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=sampler)
    ax_fd.axhline(baseline, color="grey", ls="--", label=f"real test digits ({baseline:.1f})")
    ax_fd.axhline(10, color="red", ls=":", label="target 10")
    ax_acc.axhline(95, color="red", ls=":", label="target 95%")
    for ax, label in ((ax_fd, "Frechet distance (classifier features)"), (ax_acc, "accuracy (%)")):
        if x == "nfe":
            ax.set_xscale("log", base=2)
        ax.set_xlabel("function evaluations (NFE)" if x == "nfe" else "guidance scale")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_fd.set_yscale("log")
    ax_fd.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a trained digits run (EMA weights are used)")
    p.add_argument("--samplers", help="comma-separated (default: every sampler of the run's objective)")
    p.add_argument("--steps", default="2,4,8,16,32,64", help="sampler steps to try")
    p.add_argument("--cfgs", default="1,1.25,1.5,2,3,4", help="guidance scales for the guidance sweep")
    p.add_argument("--cfg", type=float, help="guidance scale of the NFE sweep (default: the run's)")
    p.add_argument("--guidance-sampler", help="sampler of the guidance sweep (default: the run's)")
    p.add_argument("--guidance-steps", type=int, help="steps of the guidance sweep (default: the run's)")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, help="where the tables (.md) and charts (.png) go")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dtx.training.sampling import load_for_sampling

    setup = load_for_sampling(args.run, weights="ema", device="cpu")
    s = setup.cfg.sample
    kind = setup.objective.kind
    samplers = args.samplers.split(",") if args.samplers else samplers_for(kind)
    cfg = s.cfg if args.cfg is None else args.cfg
    baseline = real_baseline()
    print(json.dumps({"run": str(args.run), "step": setup.step, "objective": kind, "fd_real_test": baseline}))
    nfe_rows = []
    for sampler in samplers:
        for steps in _ints(args.steps):
            nfe_rows.append(score(setup, sampler, steps, cfg, args.n_per_class, args.seed))
            print(json.dumps({"sweep": "nfe", **nfe_rows[-1]}), flush=True)
    g_sampler, g_steps = args.guidance_sampler or s.sampler, args.guidance_steps or s.steps
    cfg_rows = []
    for scale in _floats(args.cfgs):
        cfg_rows.append(score(setup, g_sampler, g_steps, scale, args.n_per_class, args.seed))
        print(json.dumps({"sweep": "cfg", **cfg_rows[-1]}), flush=True)
    report = (f"Steps to quality ({kind} objective, guidance {cfg}, {10 * args.n_per_class} samples; cells: "
              f"accuracy / Frechet distance (NFE); real test digits: {baseline:.2f})\n\n"
              f"{markdown(nfe_rows, 'steps')}\n\nGuidance ({g_sampler}, {g_steps} steps)\n\n"
              f"{markdown(cfg_rows, 'cfg')}\n")
    print(report)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "steps_to_quality.md").write_text(report)
        plot(nfe_rows, "nfe", args.out_dir / "steps_to_quality.png", baseline,
             f"dit-digits: quality vs NFE (guidance {cfg})")
        plot(cfg_rows, "cfg", args.out_dir / "guidance.png", baseline,
             f"dit-digits: quality vs guidance ({g_sampler}, {g_steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
