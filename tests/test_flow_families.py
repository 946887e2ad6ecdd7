"""Every family trains with ``objective.kind=flow`` unchanged: 50 steps of each shipped demo recipe (models shrunk,
compile off) with rectified flow, the loss falls, and the run samples with a flow sampler (GenTron's T2V with
motion-free guidance, so every guidance term goes through the flow objective)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtx.cli import main

FLOW = ["objective.kind=flow", "objective.t_sample=logit-normal", "sample.sampler=flow-euler", "sample.steps=4",
        "sample.n_per_class=1", "max_steps=50", "log_every=5", "ckpt_every=50", "compile=false", "optim.warmup_steps=5"]
CASES = {
    "hdit-digits": ["model.options.depths=[1,1]", "model.options.widths=[64,128]", "model.options.d_ffs=[96,192]", "data.batch_size=32",
                    "model.options.mapping_width=64"],
    "latte-moving-digits": ["model.options.depth=2", "model.options.hidden_size=64", "data.batch_size=8"],
    "gentron-digits": ["model.options.depth=2", "model.options.hidden_size=64", "model.options.num_heads=2",
                       "data.batch_size=16", "optim.decay_steps=0"],
    "gentron-moving-digits": ["model.init_from=null", "model.options.depth=2", "model.options.hidden_size=64",
                              "model.options.num_heads=2", "data.batch_size=4", "optim.decay_steps=0",
                              "data.options.frames=4"],
}


@pytest.mark.parametrize("recipe", list(CASES))
def test_each_family_trains_and_samples_with_flow_matching(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", recipe, *FLOW, *CASES[recipe], "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and r.get("step", 0) > 0]
    assert len(losses) >= 8
    first, last = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(summary["samples"]).is_file() and Path(summary["samples"]).parent.parent == out
