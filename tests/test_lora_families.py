"""LoRA fine-tuning for every family: from a short base run of each shipped demo recipe (models shrunk, compile off),
30 steps with ``finetune.method=lora`` on the family's declared groups: the loss falls, only adapter tensors change
(every other tensor is the base run's, but for ``train_also``) and the run samples. The bases are barely trained,
so their zero-initialised adaLN-Zero gates and output layers are still near zero: the video families adapt their
modulation and train their output layer in full (``train_also``), or the adapters would have no effect."""

from __future__ import annotations

import json

import pytest
import torch

import dtx
from dtx.adapters import is_adapter_key
from dtx.cli import main

COMMON = ["sample.steps=3", "sample.n_per_class=1", "compile=false", "optim.warmup_steps=0", "optim.decay_steps=0",
          "log_every=5", "sample.every=0"]
CASES = {
    "hdit-digits": (["model.options.depths=[1,1]", "model.options.widths=[64,128]", "model.options.d_ffs=[96,192]",
                     "data.batch_size=16", "model.options.mapping_width=64"], "[attention,mlp]", []),
    "latte-moving-digits": (["model.options.depth=2", "model.options.hidden_size=64", "data.batch_size=4"],
                            "[attention,temporal,adaln]", ["final_layer"]),
    "gentron-moving-digits": (["model.init_from=null", "model.options.depth=2", "model.options.hidden_size=64",
                               "model.options.num_heads=2", "data.batch_size=4", "data.options.frames=4"],
                              "[adaln,cross-attention,temporal]", ["final_layer"]),
}


@pytest.mark.parametrize("recipe", list(CASES))
def test_each_family_fine_tunes_with_lora(recipe, tmp_path, capsys):
    options, targets, also = CASES[recipe]
    base = tmp_path / "base"
    assert main(["train", recipe, *COMMON, *options, "max_steps=2", "ckpt_every=2", "--out", str(base)]) == 0
    out = tmp_path / "lora"
    assert main(["train", recipe, *COMMON, *options, "max_steps=30", "ckpt_every=30", f"finetune.from={base}",
                 "finetune.method=lora", f"finetune.lora.targets={targets}", "optim.lr=5e-3",
                 f"finetune.train_also=[{','.join(also)}]",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["loss"] for r in rows if r.get("loss") is not None]
    assert sum(curve[-2:]) / 2 < 0.9 * curve[0], curve
    tuned, reference = dtx.load_model(out), dtx.load_model(base).state_dict()
    adapters = {k: v for k, v in tuned.state_dict().items() if is_adapter_key(k)}
    assert adapters and any(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_B." in k)
    for key, value in tuned.state_dict().items():
        if not is_adapter_key(key) and not any(key.startswith(a + ".") for a in also):
            assert torch.equal(value, reference[key.replace(".base_layer", "")]), key
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"]
