"""LoRA fine-tuning of a DiT (``finetune.method: lora``, through peft): step 0 is the base model exactly, only the
adapters train and are saved, resume continues bit for bit, merging equals the unmerged model, a PEFT adapter folder
round-trips, and class tables grow for data with more classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dtx
from dtx.adapters import adapter_state, is_adapter_key, load_adapter, merge_lora
from dtx.checkpoint import load_checkpoint
from dtx.cli import main
from dtx.errors import ConfigError
from dtx.finetune import FinetuneConfig, prepare

TINY = ["model.options.depth=2", "model.options.hidden_size=64", "model.options.num_heads=1", "data.batch_size=16",
        "sample.steps=3", "sample.n_per_class=1", "sample.every=0", "log_every=1", "optim.warmup_steps=0"]


def train(out: Path, *overrides: str) -> dict:
    from dtx.commands.train import resolve_train_config
    from dtx.training import LocalContext
    from dtx.training import train as run

    cfg = resolve_train_config("dit-digits", [*TINY, *overrides], out=str(out))
    return run(cfg, LocalContext(cfg.out, device="cpu"))


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    train(out, "max_steps=8", "ckpt_every=8")
    return out


def probe(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    with torch.no_grad():
        return model.eval()(x, torch.tensor([5.0, 200.0, 600.0, 990.0]), torch.tensor([0, 3, 7, 10]))


LORA = ["finetune.method=lora", "finetune.lora.rank=4", "finetune.lora.targets=[attention,mlp,adaln]",
        "optim.lr=1e-2"]


def test_the_lora_model_at_step_0_is_the_base_model(base):
    reference = dtx.load_model(base)
    model = dtx.create_model("DiT", **{k: v for k, v in reference.config.__dict__.items()})
    report = prepare(model, FinetuneConfig(source=str(base), method="lora"))
    assert report.adapted and report.trainable == sum(v.numel() for v in adapter_state(model).values())
    assert torch.equal(probe(model), probe(reference))


def test_a_lora_run_trains_and_saves_only_its_adapters_and_resumes_bit_for_bit(base, tmp_path):
    source = f"finetune.from={base}"
    train(tmp_path / "straight", source, *LORA, "max_steps=6", "ckpt_every=3")
    train(tmp_path / "resumed", source, *LORA, "max_steps=3", "ckpt_every=3")
    summary = train(tmp_path / "resumed", source, *LORA, "max_steps=6", "ckpt_every=3")
    assert summary["steps_run"] == 3
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    ckpt = tmp_path / "straight" / "checkpoints" / "step_00000006"
    state = load_checkpoint(ckpt)
    assert state["model"] and all(is_adapter_key(k) for k in state["model"]) and set(state["ema"]) == set(state["model"])
    saved = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    full = sum(p.stat().st_size for p in (base / "checkpoints" / "step_00000008").glob("*.safetensors"))
    print(f"LoRA checkpoint {saved / 1024:.0f} KiB vs the base run's {full / 1024:.0f} KiB")
    assert saved < full / 4
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    assert all(torch.equal(state["ema"][k], resumed["ema"][k]) for k in state["ema"])
    # the base did not move: every non-adapter tensor of the trained model is the base's
    tuned, reference = dtx.load_model(tmp_path / "straight"), dtx.load_model(base).state_dict()
    for key, value in tuned.state_dict().items():
        if not is_adapter_key(key):
            assert torch.equal(value, reference[key.replace(".base_layer", "")]), key
    assert any(v.abs().sum() > 0 for k, v in adapter_state(tuned).items() if ".lora_B." in k)


def test_merging_the_adapter_gives_the_unmerged_output_and_a_peft_folder_round_trips(base, tmp_path):
    train(tmp_path / "lora", f"finetune.from={base}", *LORA, "max_steps=4", "ckpt_every=4")
    tuned = dtx.load_model(tmp_path / "lora")
    unmerged = probe(tuned)
    assert (unmerged - probe(dtx.load_model(base))).abs().max() > 1e-4  # the adapter changes the output
    assert main(["convert", str(tmp_path / "lora"), str(tmp_path / "adapter"), "--adapter-only"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    applied = dtx.load_model(base)
    load_adapter(applied, tmp_path / "adapter")
    assert torch.equal(probe(applied), unmerged)
    torch.testing.assert_close(probe(merge_lora(tuned)), unmerged, atol=1e-5, rtol=0)
    assert main(["convert", str(tmp_path / "lora"), str(tmp_path / "merged"), "--merge"]) == 0
    torch.testing.assert_close(probe(dtx.load_model(tmp_path / "merged")), unmerged, atol=1e-5, rtol=0)


def test_a_class_table_grows_for_data_with_more_classes(tmp_path):
    small = dtx.create_model("DiT", input_size=8, in_channels=1, depth=1, hidden_size=64, num_heads=1, num_classes=5,
                             learn_sigma=False)
    torch.nn.init.normal_(small.y_embedder.embedding_table.weight)
    folder = dtx.models.save_model(small, tmp_path / "five")
    big = dtx.create_model("DiT", input_size=8, in_channels=1, depth=1, hidden_size=64, num_heads=1, num_classes=10,
                           learn_sigma=False)
    report = prepare(big, FinetuneConfig(source=str(folder), method="full"))
    old, new = small.y_embedder.embedding_table.weight, big.y_embedder.embedding_table.weight
    assert report.grown and "6 to 11 rows" in report.grown[0]
    assert torch.equal(new[:5], old[:5]) and torch.equal(new[-1], old[-1])
    assert all(torch.equal(new[i], old[-1]) for i in range(5, 10))  # new classes start at the null row


def test_bad_finetune_settings_are_refused_naming_the_key(base, tmp_path, capsys):
    assert main(["train", "dit-digits", *TINY, f"finetune.from={base}", "finetune.method=lora",
                 "finetune.lora.targets=[nothing]", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "finetune.lora.targets" in err and "'nothing'" in err and "attention" in err
    assert not (tmp_path / "x" / "checkpoints").exists()
    assert main(["train", "dit-digits", *TINY, "finetune.method=lora", "--out", str(tmp_path / "y")]) == 2
    assert "finetune.from" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        FinetuneConfig(source="x", lora=dtx.adapters.LoraSpec(rank=0)).validate()


def test_lora_trains_the_same_with_recomputed_activations(base, tmp_path):
    """Activation recomputation (``recompute: all``) around peft-wrapped blocks: the same losses and adapters."""
    source = f"finetune.from={base}"
    train(tmp_path / "plain", source, *LORA, "max_steps=3", "ckpt_every=3")
    train(tmp_path / "recomputed", source, *LORA, "max_steps=3", "ckpt_every=3", "recompute=all")
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "recomputed"), rel=1e-6)
    a = load_checkpoint(tmp_path / "plain" / "checkpoints" / "step_00000003")["model"]
    b = load_checkpoint(tmp_path / "recomputed" / "checkpoints" / "step_00000003")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
