"""The training loop, its pieces (EMA, AdamW groups, lr warm-up) and the ``train``/``sample`` commands.

conftest's tiny denoiser and its 24 images are registered as a run-time plugin, so these tests need no backbone.
Expected values come from closed forms or hand loops written here, never from the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dtx.cli import main

SIZE = 4  # the side of conftest's TinyData images


@pytest.fixture(autouse=True)
def tiny_plugin(tiny_denoiser):
    tiny_denoiser("tiny-test", "tiny-denoiser", {"tiny-data": {}, "tiny-nan": {"poison": True}})


def write_recipe(path: Path, **extra) -> Path:
    recipe = {
        "model": {"name": "tiny-denoiser", "options": {}},
        "data": {"name": "tiny-data", "batch_size": 8},
        "objective": {"kind": "gaussian", "diffusion_steps": 100},
        "optim": {"lr": 3e-3, "grad_clip": 1.0},
        "ema": {"kind": "warmup", "power": 0.75, "max_decay": 0.99},
        "sample": {"sampler": "ddim", "steps": 5, "n_per_class": 2, "cfg": 1.0},
        "max_steps": 6, "log_every": 1, "ckpt_every": 3,
    }
    for key, value in extra.items():
        section, _, leaf = key.partition("__")
        if leaf:
            recipe[section][leaf] = value
        else:
            recipe[key] = value
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def cfg_for(tmp_path: Path, out: str, *overrides: str, **extra):
    from dtx.commands.train import resolve_train_config

    return resolve_train_config(str(write_recipe(tmp_path / "recipe.yaml", **extra)), list(overrides),
                                out=str(tmp_path / out))


def run_local(cfg, **ctx_kw):
    from dtx.training import LocalContext, train

    return train(cfg, LocalContext(cfg.out, device="cpu", **ctx_kw))


def error_lines(stderr: str) -> str:
    """stderr without the progress bar: the lines the CLI's error handler wrote."""
    return "\n".join(line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("dtx: "))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


# -- the loop -------------------------------------------------------------------------------------------------------

def test_loop_overfits_a_tiny_batch(tmp_path):
    cfg = cfg_for(tmp_path, "run", "max_steps=300", "log_every=10", "ckpt_every=1000", "optim.lr=1e-2",
                  "objective.predict_xstart=true", "data.options={n: 8}",
                  "conditioning.conditioners={y: {name: class-label, dropout: 0.0}}")  # memorise every label
    summary = run_local(cfg)
    curve = losses(tmp_path / "run")
    first, last = curve[10], np.mean([curve[s] for s in (280, 290, 300)])
    assert summary["step"] == 300
    assert last < first / 10, (first, last)


def test_resume_gives_bitwise_identical_next_steps(tmp_path):
    straight = cfg_for(tmp_path, "straight")
    run_local(straight)
    interrupted = cfg_for(tmp_path, "resumed", "max_steps=3")
    run_local(interrupted)
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000003").is_dir()
    resumed = cfg_for(tmp_path, "resumed")  # same out, more steps: picks up step 3
    summary = run_local(resumed)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert summary["steps_run"] == 3
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    from dtx.checkpoint import load_checkpoint

    sa = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000006")
    sb = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    for key in ("model", "ema"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key])


def test_require_resume_without_checkpoint_is_an_error(tmp_path):
    from dtx.errors import CheckpointError

    with pytest.raises(CheckpointError, match="holds no valid checkpoint"):
        run_local(cfg_for(tmp_path, "empty"), require_resume=True)


def test_recomputation_keeps_the_loss_curve(tmp_path):
    plain = run_local(cfg_for(tmp_path, "plain", "max_steps=3"))
    ckpt = run_local(cfg_for(tmp_path, "ckpt", "max_steps=3", "recompute=all"))
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    assert plain["step"] == ckpt["step"] == 3
    assert all(math.isclose(a[s], b[s], rel_tol=1e-5) for s in (1, 2, 3))


def test_cpu_bf16_runs_the_step_in_bfloat16_where_the_cpu_has_it_or_when_asked(tmp_path, monkeypatch):
    """cpu_bf16 (auto by default: the CPU's native bf16 flags; true/false force) turns on bf16 autocast on CPU (the
    matmuls see bfloat16), and only with precision bf16."""
    import dtx.cpu

    with_bf16, without = dtx.cpu.parse_cpuinfo("flags: avx512f avx512_bf16"), dtx.cpu.parse_cpuinfo("flags: avx2")
    seen: list[torch.dtype] = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.modules.linear.F, "linear",
                        lambda x, w, b=None: seen.append(x.dtype if not torch.is_autocast_enabled("cpu")
                                                         else torch.get_autocast_dtype("cpu")) or linear(x, w, b))
    for name, flags, info, dtype in (("auto-none", [], without, torch.float32),
                                     ("auto-native", [], with_bf16, torch.bfloat16),
                                     ("forced-off", ["cpu_bf16=false"], with_bf16, torch.float32),
                                     ("bf16", ["cpu_bf16=true"], without, torch.bfloat16),
                                     ("off", ["cpu_bf16=true", "precision=fp32"], with_bf16, torch.float32)):
        monkeypatch.setattr(dtx.cpu, "cpu_info", lambda info=info: info)
        seen.clear()
        summary = run_local(cfg_for(tmp_path, name, "max_steps=2", "sample.every=0", *flags))
        assert summary["step"] == 2 and math.isfinite(summary["loss"])
        assert seen and set(seen[:4]) == {dtype}, name  # the training forwards (sampling at the end runs fp32)


def test_karras_objective_trains_and_samples(tmp_path):
    summary = run_local(cfg_for(tmp_path, "edm", "objective.kind=karras", "sample.sampler=heun",
                                "objective.weighting=soft-min-snr"))
    assert summary["step"] == 6 and math.isfinite(summary["loss"])
    assert (tmp_path / "edm" / "samples" / "step_0000006.png").is_file()


# -- EMA, optimizer groups, lr -------------------------------------------------------------------------------------

def test_ema_constant_and_warmup_match_hand_computation():
    from dtx.training.config import EMAConfig
    from dtx.training.ema import EMA

    values = [1.0, 3.0, -2.0, 0.5]
    for cfg, decays in (
        (EMAConfig(kind="constant", decay=0.9), [0.0, 0.9, 0.9, 0.9]),
        (EMAConfig(kind="warmup", power=0.75, max_decay=0.6),
         [0.0, min(0.6, 1 - 2 ** -0.75), min(0.6, 1 - 3 ** -0.75), min(0.6, 1 - 4 ** -0.75)]),
    ):
        model = nn.Linear(1, 1, bias=False)
        ema = EMA(model, cfg)
        expected = 123.0
        for v, d in zip(values, decays):
            with torch.no_grad():
                model.weight.fill_(v)
            assert ema.update(model) == pytest.approx(d)
            expected = d * expected + (1 - d) * v
            assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6)
        assert not ema.model.training and not ema.model.weight.requires_grad


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)
        self.table = nn.Embedding(4, 3)
        self.pos_embed = nn.Parameter(torch.randn(1, 2, 3))
        self.gain = nn.Parameter(torch.ones(3, 3))
        self.mapping = nn.Linear(3, 3, bias=False)
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def param_group_fn(self, name: str, p: nn.Parameter):
        return {"lr_scale": 1 / 3} if name.startswith("mapping.") else None


def test_param_groups_follow_the_no_decay_rules_and_lr_tags():
    from dtx.training.optim import param_groups

    groups = param_groups(Grouped(), lr=0.3, weight_decay=0.1)
    by_name = {n: (g["weight_decay"], g["lr"]) for g in groups for n in g["param_names"]}
    assert by_name == {
        "proj.weight": (0.1, 0.3), "proj.bias": (0.0, 0.3), "norm.weight": (0.0, 0.3), "norm.bias": (0.0, 0.3),
        "table.weight": (0.0, 0.3), "pos_embed": (0.0, 0.3), "gain": (0.0, 0.3),
        "mapping.weight": (0.1, pytest.approx(0.1)),
    }


def test_adamw_first_step_matches_closed_form():
    """Adam's first step moves each parameter by lr * g / (|g| + eps) after decoupled decay p * (1 - lr * wd)."""
    from dtx.training.config import OptimConfig
    from dtx.training.optim import build_optimizer

    torch.manual_seed(0)
    model = Grouped()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = sum((p * torch.arange(1, p.numel() + 1).view_as(p)).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.5, eps=1e-8))
    opt.step()
    for name, g in grads.items():
        lr = 0.01 / 3 if name.startswith("mapping.") else 0.01
        wd = 0.5 if name in ("proj.weight", "mapping.weight") else 0.0
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected, rtol=1e-5, atol=1e-7)


def test_lr_warmup_is_linear_then_constant():
    from dtx.training.config import OptimConfig
    from dtx.training.optim import lr_at

    cfg = OptimConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, OptimConfig(lr=0.5)) == 0.5


def test_lr_decays_linearly_over_the_last_decay_steps_to_decay_to():
    from dtx.training.config import OptimConfig
    from dtx.training.optim import lr_at

    cfg = OptimConfig(lr=2.0, warmup_steps=2, decay_steps=4, decay_to=0.5)
    # 10 steps: warm-up 1.0, 2.0; stable to step 5; steps 6..9 fall by (1 - 0.5) / 4 of lr each, ending at 0.5 x lr
    assert [lr_at(s, cfg, max_steps=10) for s in range(10)] == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.75, 1.5, 1.25, 1.0]
    assert lr_at(9, cfg) == 2.0  # no run length: no decay
    # warm-up and decay overlap: the smaller factor wins
    both = OptimConfig(lr=1.0, warmup_steps=4, decay_steps=4)
    assert [lr_at(s, both, max_steps=4) for s in range(4)] == [0.25, 0.5, 0.25, 0.0]
    # a run shorter than decay_steps (a smoke test of a recipe) decays over all of its steps
    assert [lr_at(s, OptimConfig(lr=1.0, decay_steps=1000), max_steps=4) for s in range(4)] == [0.75, 0.5, 0.25, 0.0]


def test_epoch_batches_split_a_permutation_by_rank_without_overlap():
    from dtx.training.data_stream import EpochBatches

    shards = [list(EpochBatches(23, 3, rank, 2, seed=7, epoch=0)) for rank in (0, 1)]
    assert [len(s) for s in shards] == [3, 3]  # 23 // (3 * 2) global batches, the rest dropped
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen)) == 18 and all(0 <= i < 23 for i in seen)
    resumed = list(EpochBatches(23, 3, 0, 2, seed=7, epoch=0, start=1))
    assert resumed == shards[0][1:]
    assert list(EpochBatches(23, 3, 0, 2, seed=7, epoch=1)) != shards[0]


# -- failures -------------------------------------------------------------------------------------------------------

def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    from dtx.checkpoint import CheckpointManager, load_checkpoint

    recipe = write_recipe(tmp_path / "recipe.yaml")
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--runner", "local", "--out", str(out), "--max-steps", "4",
                 "ckpt_every=2"]) == 0
    good = CheckpointManager(out / "checkpoints").latest()
    weights = load_checkpoint(good)["model"]
    capsys.readouterr()
    code = main(["train", str(recipe), "--runner", "local", "--out", str(out), "--max-steps", "10",
                 "data.name=tiny-nan", "max_nonfinite=3", "ckpt_every=2"])
    err = error_lines(capsys.readouterr().err)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "not finite at step 5" in err and "3 times in a row" in err and str(good) in err
    assert CheckpointManager(out / "checkpoints").latest() == good
    after = load_checkpoint(good)["model"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)


@pytest.mark.parametrize("args, message", [
    (["dit-digts-nope"], "unknown recipe"),
    (["missing.yaml"], "config file not found"),
])
def test_bad_recipe_is_a_one_line_error(tmp_path, capsys, args, message):
    assert main(["train", *args, "--runner", "local", "--out", str(tmp_path / "x")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert message in err and len(err.splitlines()) == 1


def test_missing_dataset_path_and_unknown_model_are_one_line_errors(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml")
    missing = tmp_path / "no-such-folder"
    assert main(["train", str(recipe), "--runner", "local", "--out", str(tmp_path / "a"), "data.name=image-folder",
                 f"data.options={{root: {missing}}}"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert str(missing) in err and len(err.splitlines()) == 1
    assert main(["train", str(recipe), "--runner", "local", "--out", str(tmp_path / "b"),
                 "model.name=tiny-denoizer"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert "unknown model 'tiny-denoizer'" in err and "tiny-denoiser" in err


def test_resuming_with_another_architecture_is_a_checkpoint_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml")
    out = str(tmp_path / "run")
    assert main(["train", str(recipe), "--runner", "local", "--out", out, "--max-steps", "3"]) == 0
    capsys.readouterr()
    assert main(["train", str(recipe), "--runner", "local", "--out", out, "model.options={width: 32}"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert "was trained with model" in err and len(err.splitlines()) == 1


# -- commands -------------------------------------------------------------------------------------------------------

def test_train_and_sample_commands_write_the_run_folder_grid_and_npz(tmp_path, capsys):
    from PIL import Image

    recipe = write_recipe(tmp_path / "recipe.yaml", sample__every=2)
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--runner", "local", "--out", str(out), "--max-steps", "4", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "samples/step_0000002.png", "samples/step_0000004.png",
                 "checkpoints/step_00000004/manifest.json"):
        assert (out / name).is_file(), name
    assert "seed: 3" in (out / "config.yaml").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "steps_per_s", "samples_per_s"} <= set(rows[0])

    grid = tmp_path / "grid.png"
    assert main(["sample", str(out), "--steps", "4", "--sampler", "ddpm", "--cfg", "2.5", "--classes", "2,0",
                 "--n-per-class", "3", "--seed", "1", "--out", str(grid)]) == 0
    archive = np.load(tmp_path / "grid.npz")
    assert archive["arr_0"].dtype == np.uint8 and archive["arr_0"].shape == (6, SIZE, SIZE, 1)
    assert archive["labels"].dtype == np.int64 and archive["labels"].tolist() == [2, 2, 2, 0, 0, 0]
    zoom = math.ceil(64 / SIZE)  # tiles are enlarged to at least 64 px (dtx.writers.GRID_TILE_MIN), 1 px gaps
    assert Image.open(grid).size == (3 * (SIZE * zoom + 1) + 1, 2 * (SIZE * zoom + 1) + 1)

    again = tmp_path / "again.png"
    assert main(["sample", str(out / "checkpoints" / "step_00000004"), "--steps", "4", "--sampler", "ddpm",
                 "--cfg", "2.5", "--classes", "2,0", "--n-per-class", "3", "--seed", "1", "--out", str(again)]) == 0
    assert np.array_equal(np.load(tmp_path / "again.npz")["arr_0"], archive["arr_0"])

    # dtx.load_model on the run folder gives the newest checkpoint's EMA weights, in eval mode
    from safetensors.torch import load_file

    import dtx

    model = dtx.load_model(out)
    ema = load_file(str(out / "checkpoints" / "step_00000004" / "ema.safetensors"))
    assert not model.training and set(ema) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())


def test_sample_rejects_out_of_range_classes_and_foreign_folders(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml")
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--runner", "local", "--out", str(out), "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--classes", "0,7", "--out", str(tmp_path / "g.png")]) == 2
    assert "class 7 is out of range" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_pixel_data_is_encoded_by_a_frozen_vae_and_samples_are_decoded(tmp_path, capsys):
    from diffusers import AutoencoderKL

    from dtx.checkpoint import load_checkpoint

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=SIZE,
                        scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    recipe = write_recipe(tmp_path / "recipe.yaml", data__vae=str(tmp_path / "vae"))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--runner", "local", "--out", str(out), "--max-steps", "2"]) == 0
    state = load_checkpoint(out / "checkpoints" / "step_00000002")
    assert state["model_spec"]["in_channels"] == 4 and state["model_spec"]["input_size"] == SIZE // 2
    assert state["data_info"]["is_latent"] and state["data_info"]["latent_scale"] == 0.5
    assert (out / "samples" / "step_0000002.png").is_file()
    assert main(["sample", str(out), "--steps", "3", "--classes", "1", "--n-per-class", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert np.load(tmp_path / "g.npz")["arr_0"].shape == (2, SIZE, SIZE, 1)  # decoded back to pixels


def test_init_from_starts_a_fresh_run_from_another_run_but_never_a_resumed_one(tmp_path, capsys):
    from dtx.checkpoint import load_training_state

    source = cfg_for(tmp_path, "source", "max_steps=2", "ckpt_every=2")
    run_local(source)
    capsys.readouterr()
    fresh = cfg_for(tmp_path, "fresh", "max_steps=1", "ckpt_every=1", "optim.lr=1e-12",
                    f"model.init_from={tmp_path / 'source'}")
    run_local(fresh)
    assert "init from" in capsys.readouterr().err
    _, src = load_training_state(tmp_path / "source")
    _, got = load_training_state(tmp_path / "fresh")
    for key, value in src["ema"].items():  # started from the source's EMA weights (lr ~0: one step moves nothing)
        torch.testing.assert_close(got["model"][key], value, rtol=0, atol=1e-9)
    more = cfg_for(tmp_path, "fresh", "max_steps=2", "ckpt_every=1", "optim.lr=1e-12",
                   f"model.init_from={tmp_path / 'source'}")
    run_local(more)
    assert "init from" not in capsys.readouterr().err


def test_sampler_options_from_the_recipe_and_the_command_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml")
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--runner", "local", "--out", str(out), "--max-steps", "1",
                 "sample.sampler_options={eta: 1.0}"]) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--classes", "0", "--n-per-class", "2", "--sampler-option", "eta=0.5",
                 "--out", str(tmp_path / "e.png")]) == 0
    from dtx.conditioning import SampleRequest
    from dtx.training.config import SampleConfig
    from dtx.training.sampling import generate, load_for_sampling

    setup = load_for_sampling(out)
    draw = [generate(setup, SampleRequest(classes=[0]), SampleConfig(sampler="ddim", steps=5, sampler_options=opts),
                     per_subject=2, seed=3).x for opts in ({"eta": 0.0}, {"eta": 1.0}, {"eta": 1.0})]
    assert torch.equal(draw[1], draw[2]) and not torch.allclose(draw[0], draw[1])  # the option reaches DDIM
    capsys.readouterr()
    assert main(["sample", str(out), "--sampler-option", "etta=1", "--out", str(tmp_path / "x.png")]) == 2
    assert "has no option 'etta' (did you mean 'eta'?)" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    code = main(["train", str(recipe), "--runner", "local", "--out", str(tmp_path / "bad"), "--max-steps", "1",
                 "sample.sampler_options={etta: 1.0}"])
    assert code == 2 and "sample.sampler_options" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_dtx_sample_draws_what_the_trainer_drew_for_the_same_settings_and_seed(tmp_path):
    """The grid written at the end of training and ``dtx sample RUN`` with the run's settings and the grids' seed
    (0) come from one path: the same samples, bit for bit."""
    cfg = cfg_for(tmp_path, "run", "max_steps=2", "sample.n_per_class=2", "sample.steps=3")
    run_local(cfg)
    grid = np.load(tmp_path / "run" / "samples" / "step_0000002.npz")["arr_0"]
    out = tmp_path / "again.png"
    assert main(["sample", str(tmp_path / "run"), "--n-per-class", "2", "--seed", "0", "--out", str(out)]) == 0
    assert np.array_equal(np.load(out.with_suffix(".npz"))["arr_0"], grid)
    other = tmp_path / "other.png"
    assert main(["sample", str(tmp_path / "run"), "--n-per-class", "2", "--seed", "0", "--steps", "2",
                 "--out", str(other)]) == 0
    assert not np.array_equal(np.load(other.with_suffix(".npz"))["arr_0"], grid)  # the flag reached the sampler
