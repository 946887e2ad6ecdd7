"""Checkpoint detection and inference, incompatible files, fine-tuning loads, ``dtx convert``, DiT's figures through
the core's ``dtx flops``, plugin."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import dtx
from dtx.cli import main
from dtx.models import load_model_with_info
from dtx.testing import fresh_plugin_host
from dtx_dit import plugin
from dtx_dit.checkpoint import detect, infer_config, load_weights
from dtx_dit.flops import dit_counter
from dtx.testing import randomize_parameters

TINY = dict(input_size=8, depth=2, hidden_size=128, num_heads=2, num_classes=10)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return randomize_parameters(model, seed, std=0.05)


def saved_tiny(tmp_path, name: str = "tiny.pt", seed: int = 0, **kw):
    model = randomized(dtx.create_model("DiT", **{**TINY, **kw}), seed)
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return model, path


def probe(model: torch.nn.Module, hw=(8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, model.in_channels, *hw, generator=g)
    y = torch.tensor([0, model.num_classes - 1]) if model.num_classes else None
    model.eval()  # no label dropout
    with torch.no_grad():
        return model(x, torch.tensor([10, 900]), y)


@pytest.mark.parametrize("kw", [dict(block="adaln"), dict(block="cross-attention"), dict(block="in-context"),
                                dict(learn_sigma=False, num_classes=0), dict(class_dropout_prob=0.0, num_classes=1)])
def test_every_design_round_trips_through_shape_inference(tmp_path, kw):
    model, path = saved_tiny(tmp_path, **kw)
    loaded = dtx.load_model(path)
    assert loaded.config == model.config
    torch.testing.assert_close(probe(loaded), probe(model), atol=0, rtol=0)


def test_paper_configs_are_inferred_as_their_preset_names():
    for name, size in (("DiT-XL/2", 32), ("DiT-XL/2", 64), ("DiT-B/4", 32), ("DiT-S/8", 16)):
        with torch.device("meta"):
            state = dtx.create_model(name, input_size=size).state_dict()
        assert infer_config(state) == (name, {"input_size": size, "num_classes": 1000})


def test_incompatible_file_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    _, path = saved_tiny(tmp_path)
    with pytest.raises(dtx.CheckpointError, match=r"mis-shaped.*x_embedder\.proj\.weight"):
        dtx.load_model(path, "DiT-S/8")
    state = torch.load(path, weights_only=True)
    del state["blocks.0.mlp.fc2.bias"]
    state["blocks.1.attn.qkv.weight"] = torch.zeros(5, 128)
    state["blocks.1.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(dtx.CheckpointError) as info:
        dtx.load_model(tmp_path / "broken.pt")
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing: blocks.0.mlp.fc2.bias" in msg and "unexpected: blocks.1.extra.weight" in msg
    assert "blocks.1.attn.qkv.weight (5, 128) vs (384, 128)" in msg


def test_files_of_families_that_reuse_dit_key_names_are_not_claimed(tmp_path):
    model, path = saved_tiny(tmp_path)
    state = model.state_dict()
    assert detect(path, state) and detect(path, {"ema": state, "model": state, "opt": {}})
    latte_like = {**state, "temp_embed": torch.zeros(1, 16, 128)}  # Latte: DiT's keys plus a temporal table
    assert not detect(path, latte_like) and not detect(path, {"ema": latte_like, "model": latte_like})
    assert not detect(path, {"weight": torch.zeros(1)}) and not detect(path, [state])


def test_unsafe_pickles_are_refused(tmp_path):
    _, path = saved_tiny(tmp_path)
    state = torch.load(path, weights_only=True)
    torch.save({"model": state, "ema": state, "args": {"callback": print}}, tmp_path / "unsafe.pt")
    with pytest.raises(dtx.CheckpointError, match="refusing to unpickle"):
        dtx.load_model(tmp_path / "unsafe.pt")


def test_fine_tuning_with_a_new_class_count_keeps_everything_else(tmp_path):
    released, path = saved_tiny(tmp_path)
    model = dtx.create_model("DiT", **{**TINY, "num_classes": 5})
    with pytest.raises(dtx.CheckpointError, match="y_embedder.embedding_table.weight"):
        load_weights(model, path)
    fresh_table = model.y_embedder.embedding_table.weight.detach().clone()
    assert load_weights(model, path, skip=["y_embedder"]) == ["y_embedder.embedding_table.weight"]
    own, file = model.state_dict(), released.state_dict()
    assert torch.equal(own["y_embedder.embedding_table.weight"], fresh_table)
    assert all(torch.equal(own[k], file[k]) for k in own if not k.startswith("y_embedder"))


def test_convert_writes_safetensors_and_yaml_that_reload_equal(tmp_path, capsys):
    model, path = saved_tiny(tmp_path, input_size=[8, 12])
    with pytest.raises(dtx.CheckpointError, match="input_size"):
        dtx.load_model(path)
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out), "--set", "input_size=[8,12]"]) == 0
    assert "dit-official" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    assert set(load_file(str(out / "model.safetensors"))) == set(model.state_dict())
    text = (out / "config.yaml").read_text()
    assert "name: DiT" in text and "input_size:" in text
    reloaded, info = load_model_with_info(out)
    assert info["format"] == "dtx"
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    torch.testing.assert_close(probe(reloaded, (8, 12)), probe(model, (8, 12)), atol=0, rtol=0)


def test_convert_training_checkpoint_raw_weights(tmp_path, capsys):
    ema, _ = saved_tiny(tmp_path, seed=1)
    raw, _ = saved_tiny(tmp_path, seed=2)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}}, tmp_path / "train.pt")
    assert main(["convert", str(tmp_path / "train.pt"), str(tmp_path / "raw"), "--raw-weights"]) == 0
    assert main(["convert", str(tmp_path / "train.pt"), str(tmp_path / "ema")]) == 0
    capsys.readouterr()
    torch.testing.assert_close(probe(dtx.load_model(tmp_path / "raw")), probe(raw), atol=0, rtol=0)
    torch.testing.assert_close(probe(dtx.load_model(tmp_path / "ema")), probe(ema), atol=0, rtol=0)


@pytest.fixture
def flops_command():
    """A fresh plugin host, in which the core registers ``dtx flops``."""
    with fresh_plugin_host():
        yield



def test_flops_command_prints_the_paper_numbers(flops_command, capsys):
    assert main(["flops", "DiT-XL/2", "--input-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "675,129,632" in text and "118.62 Gflops" in text and "237.24 GFLOPs real" in text
    assert "analytic" in text and "tokens: 256" in text and "block: adaln-zero" in text
    assert main(["flops", "DiT-XL/2", "--input-size", "64", "--json", "--measure"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert round(row["gflops_macs"], 1) == 524.5 and row["gflops_measured"] == pytest.approx(row["gflops_real"])
    assert row["method"] == "analytic" and row["input_size"] == [64, 64] and row["tokens"] == 1024
    assert main(["flops", "DiT-B/4", "--set", "block=cross-attention", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["block"] == "cross-attention"


def test_flops_command_rejects_bad_sizes(flops_command, capsys):
    assert main(["flops", "DiT-XL/2", "--input-size", "31"]) == 2
    assert "not divisible by patch_size 2" in capsys.readouterr().err
    assert main(["flops", "DiT-XL/2", "--input-size", "big"]) == 2


def test_plugin_registers_formats_commands_and_every_recipe_file(tmp_path, monkeypatch):
    from dtx import plugins

    assert plugins.get("checkpoint_format", "dit-official").plugin == "dit"
    assert plugins.get("command", "convert").plugin == "core" and plugins.get("command", "flops").plugin == "core"
    assert "command" not in plugins.host().records["dit"].registers  # the core's generic commands serve DiT
    assert all(plugins.get("model", name).meta["flops"] is dit_counter for name in dtx.list_models("dit"))
    (tmp_path / "dit-a.yaml").write_text("# tiny DiT on digits\nmodel: {name: DiT-S/2}\n")
    (tmp_path / "dit-b.yaml").write_text("model: {name: DiT-B/4}\n")
    (tmp_path / "notes.txt").write_text("not a recipe")
    monkeypatch.setattr(plugin, "RECIPES", tmp_path)
    seen = {}
    plugin.dtx_register_recipes(lambda name, path, **meta: seen.setdefault(name, (path, meta)))
    assert sorted(seen) == ["dit-a", "dit-b"]
    assert seen["dit-a"] == (str(tmp_path / "dit-a.yaml"), {"description": "tiny DiT on digits"})
    assert seen["dit-b"][1] == {"description": ""}


def test_convert_a_training_run_takes_raw_or_ema_weights(tmp_path, capsys):
    """`--raw-weights` is a loader option: it reaches the run-folder reader (it used to travel as a model option and
    was lost, so a run's EMA weights came back either way)."""
    from dtx.checkpoint import load_training_state

    run = tmp_path / "run"
    assert main(["train", "dit-digits", "--out", str(run), "--max-steps", "3", "--runner", "local", "sample.every=0",
                 "ckpt_every=3", "log_every=1", "sample.steps=2", "sample.n_per_class=1", "model.options.depth=1",
                 "model.options.hidden_size=32", "model.options.num_heads=2"]) == 0
    assert main(["convert", str(run), str(tmp_path / "raw"), "--raw-weights"]) == 0
    assert main(["convert", str(run), str(tmp_path / "ema")]) == 0
    capsys.readouterr()
    _, state = load_training_state(run)
    for folder, key in (("raw", "model"), ("ema", "ema")):
        got = dtx.load_model(tmp_path / folder).state_dict()
        assert all(torch.equal(got[k], v) for k, v in state[key].items()), folder
    assert not all(torch.equal(state["model"][k], v) for k, v in state["ema"].items())
    # the converted folder keeps what sampling needs: it samples with the run's EDM objective and data facts
    stored = OmegaConf.to_container(OmegaConf.load(tmp_path / "ema" / "config.yaml"))
    assert stored["objective"]["kind"] == "karras" and stored["data_info"]["height"] == 8
    assert main(["sample", str(tmp_path / "ema"), "--classes", "4", "--n-per-class", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 8, 8, 1)
