"""GenTron through the CLI, shortened: train the T2I recipe with a tiny text encoder, sample prompts, score them;
start the T2V recipe from that run and sample with motion-free guidance. Checks that the frozen encoder stays out
of the optimizer, the EMA and the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dtx.cli import main

TINY = ["model.options.hidden_size=32", "model.options.depth=2", "model.options.num_heads=2",
        "model.options.context_dim=16", "model.options.text_length=20", "data.batch_size=4", "sample.steps=2",
        "sample.n_per_class=1", "log_every=2", "ckpt_every=2", "compile=false"]


pytestmark = pytest.mark.usefixtures("dtx_plugin_host")  # each test rediscovers the installed plugins


def text_options(encoder) -> list[str]:
    return [f"conditioning.conditioners.text.options.encoder={encoder}",
            "conditioning.conditioners.text.options.max_length=20"]


def test_t2i_train_sample_score_and_t2v_from_it(tmp_path, encoder, capsys):
    t2i = tmp_path / "t2i"
    assert main(["train", "gentron-digits", "--runner", "local", "--out", str(t2i), "--max-steps", "2",
                 "data.options.size=8", *TINY, *text_options(encoder)]) == 0
    from dtx.checkpoint import load_training_state

    _, state = load_training_state(t2i)
    model_keys = set(state["model"])
    assert model_keys == set(state["ema"]) and not any("tower" in k or "encoder" in k for k in model_keys)
    assert all(k.split(".")[0] in {"x_embedder", "t_embedder", "pooled_embedder", "y_proj", "pos_embed", "blocks",
                                   "final_layer"} for k in model_keys)
    n_optimised = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert n_optimised == sum(1 for k in model_keys if k != "pos_embed")  # the model's trainable tensors only
    assert [c["name"] for c in state["conditioners"]] == ["text"]

    grid = tmp_path / "t2i.png"
    capsys.readouterr()
    assert main(["sample", str(t2i), "--prompt", "a red 3 on the left and a blue 7 on the right", "--prompt",
                 "a green 5 on the right", "--n-per-class", "2", "--steps", "2", "--cfg", "3", "--out", str(grid),
                 "--negative-prompt", "a blue 1 on the left"]) == 0
    capsys.readouterr()
    archive = np.load(grid.with_suffix(".npz"))
    assert archive["arr_0"].shape == (4, 32, 32, 3) and len(archive["prompts"]) == 4
    assert grid.with_name("t2i.prompts.txt").read_text().splitlines()[0].startswith("a red 3")
    assert main(["compbench-digits", str(grid.with_suffix(".npz")), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"digit", "colour", "position", "all"} <= set(scores)

    t2v = tmp_path / "t2v"
    assert main(["train", "gentron-moving-digits", "--runner", "local", "--out", str(t2v), "--max-steps", "2",
                 f"model.init_from={t2i}", "data.options.frames=4", "data.options.size=8", *TINY,
                 *text_options(encoder)]) == 0
    _, state = load_training_state(t2v)
    assert any(".temp_attn." in k for k in state["model"])
    assert [c["name"] for c in state["conditioners"]] == ["text", "motion"]
    clips = tmp_path / "t2v.png"
    assert main(["sample", str(t2v), "--prompt", "a red 3 moving left", "--n-per-class", "1", "--steps", "2",
                 "--cfg", "3", "--motion-cfg", "1.2", "--out", str(clips)]) == 0
    videos = np.load(clips.with_suffix(".npz"))["arr_0"]
    assert videos.shape == (1, 4, 32, 32, 3)
    assert (tmp_path / "t2v").is_dir() and any((tmp_path / "t2v").glob("*.gif"))


def test_mfg_terms_are_nested_motion_then_text(encoder):
    """--motion-cfg puts the motion term before the text term: sets e(0,0), e(0,c_M), e(c_T,c_M)."""
    from dtx.conditioning import ConditionerConfig, ConditioningConfig, ConditioningStage, SampleRequest
    from dtx.data.info import DataInfo
    from dtx_gentron.model import build_gentron

    model = build_gentron(input_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2, context_dim=16,
                          text_length=20, num_frames=2)
    info = DataInfo(channels=3, height=8, width=8, frames=2, fields=("text", "motion_free"))
    cfg = ConditioningConfig(conditioners={"text": ConditionerConfig("text", {"encoder": str(encoder),
                                                                              "max_length": 20}),
                                           "motion": ConditionerConfig("motion")})
    stage = ConditioningStage.build(cfg, model, info)
    request = SampleRequest(prompts=["a red 3 moving left"])
    raw, n = stage.request_fields(request, per_subject=1)
    steps = stage.guidance_steps(7.5, scales={"motion": 1.2})
    sets, scales = stage.condition_sets(request, raw, steps, torch.device("cpu"))
    assert scales == [1.2, 7.5]
    assert [s["motion_free"].tolist() for s in sets] == [[True], [False], [False]]
    empty = stage.member("text").conditioner.encode({"text": [""]}, torch.device("cpu"))["context"]
    assert torch.equal(sets[0]["context"], empty) and torch.equal(sets[1]["context"], empty)
    assert not torch.equal(sets[2]["context"], empty)
