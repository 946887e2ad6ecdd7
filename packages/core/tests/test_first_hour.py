"""Issue 30, points 4-7 (core): numbers printed with their conditions, honest video metrics, one name per loss, the
diffusers refusal that says what to do, `dtx models` headers, `dtx recipes`, install hints for first-party names,
bench memory that counts tensors, written files that follow the umask, and sample grids at a viewable size."""

from __future__ import annotations

import os
import stat
import types

import pytest
import torch
from torch import nn

from dtx import plugins
from dtx.cli import main
from dtx.hookspecs import hookimpl


class TinyImageModel(nn.Module):
    """A timestep- and class-conditioned 1x8x8 denoiser small enough for a few training steps in a test."""

    def __init__(self, input_size: int = 8, in_channels: int = 1, num_classes: int = 10, hidden: int = 32) -> None:
        super().__init__()
        d = in_channels * input_size * input_size
        self.in_channels = self.out_channels = in_channels
        self.learn_sigma, self.null_class = False, num_classes
        self.inp, self.out = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.t_proj = nn.Linear(1, hidden)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0])[:, None] / 1000
        h = self.inp(x.flatten(1)) + self.t_proj(t)
        if y is not None:
            h = h + self.y_embed(y)
        return self.out(torch.relu(h)).view_as(x)


@pytest.fixture
def tiny_models(monkeypatch):
    """The plugin host with every installed plugin plus ``tiny-image`` (family ``test``)."""
    for name in ("DTX_PLUGINS", "DTX_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    plugins.reset()
    plugin = types.SimpleNamespace(dtx_register_models=hookimpl(
        lambda register: register("tiny-image", TinyImageModel, family="test", description="test denoiser")))
    plugins.register_plugin(plugin, "tiny-first-hour")
    yield
    plugins.reset()


def tiny_recipe(path, **extra) -> str:
    """A digits recipe for ``tiny-image``: a handful of DDPM steps, a checkpoint at the end."""
    import yaml

    recipe = {"model": {"name": "tiny-image", "options": {}},
              "data": {"name": "digits", "batch_size": 16, "options": {"image_size": 8}},
              "objective": {"kind": "gaussian", "diffusion_steps": 100},
              "sample": {"sampler": "ddim", "steps": 3, "n_per_class": 1, "cfg": 1.0},
              "max_steps": 4, "log_every": 2, "ckpt_every": 4, **extra}
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


# -- 7: written files follow the umask -----------------------------------------------------------------------------

def test_weights_and_configs_get_the_same_mode_from_the_umask(tmp_path, tiny_models):
    """safetensors' save_file creates 0600 files; every file dtx writes gets 0666 less the umask, like config.yaml."""
    from dtx.checkpoint import CheckpointManager
    from dtx.models import create_model, save_model

    old = os.umask(0o022)
    try:
        model = create_model("tiny-image")
        folder = save_model(model, tmp_path / "model")
        step = CheckpointManager(tmp_path / "ckpt").save(1, {"model": model.state_dict(), "step": 1})
        modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
                 for p in [*folder.iterdir(), *step.iterdir()]}
        assert modes and set(modes.values()) == {0o644}, modes
        os.umask(0o077)
        save_model(model, tmp_path / "private")
        assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "private").iterdir()} == {0o600}
    finally:
        os.umask(old)


# -- 7: listings with headers, recipes, install hints --------------------------------------------------------------

def test_models_listing_has_column_headers(tiny_models, capsys):
    assert main(["models", "--family", "test"]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split() == ["model", "params", "family", "plugin", "description"]
    assert row.split()[:1] == ["tiny-image"] and "test" in row.split()


def test_recipes_lists_every_recipe_with_family_data_steps_and_time_cap(tiny_models, tmp_path, capsys):
    plugin = types.SimpleNamespace(dtx_register_recipes=hookimpl(lambda register: register(
        "tiny-recipe", tiny_recipe(tmp_path / "r.yaml", max_minutes=7.5), description="a test recipe")))
    plugins.register_plugin(plugin, "tiny-recipes")
    assert main(["recipes", "--json"]) == 0
    import json

    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(plugins.host().table("recipe"))
    assert rows["tiny-recipe"] == {"name": "tiny-recipe", "plugin": "tiny-recipes", "description": "a test recipe",
                                   "model": "tiny-image", "family": "test", "data": "digits", "batch_size": 16,
                                   "max_steps": 4, "max_minutes": 7.5}
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["recipe", "family", "model", "data", "batch", "max_steps", "max_minutes", "plugin"]
    assert next(line for line in lines if line.startswith("tiny-recipe")).split() == \
        ["tiny-recipe", "test", "tiny-image", "digits", "16", "4", "7.5", "tiny-recipes"]


@pytest.mark.parametrize("argv, name", [(["train", "dit-digits"], "recipe 'dit-digits'"),
                                        (["flops", "DiT-XL/2"], "model 'DiT-XL/2'"),
                                        (["train", "Dit-Digits"], "recipe 'Dit-Digits'")])
def test_a_first_party_name_without_its_package_names_the_install(argv, name, monkeypatch, tmp_path, capsys):
    """Core knows which first-party distribution registers a name: the error says what to pip install."""
    import importlib.metadata as md

    real = md.version

    def version(dist: str) -> str:
        if dist == "dtx-backbone-dit":
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(plugins.md, "version", version)
    monkeypatch.setenv("DTX_DISABLE_PLUGINS", "dit")
    plugins.reset()
    try:
        monkeypatch.chdir(tmp_path)
        assert main(argv) == 2
    finally:
        plugins.reset()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dtx: error: unknown {name}")
    assert "it comes with dtx-backbone-dit: pip install dtx-backbone-dit" in err
    assert list(tmp_path.iterdir()) == []


# -- 7: bench memory counts tensors ------------------------------------------------------------------------------

def test_cpu_peak_memory_counts_the_tensors_a_warm_call_holds_at_once():
    """384 tensors of 64 KiB alive together peak at 24 MiB, also in a call after a warm-up one: there the resident
    set hardly grows, because the C heap kept what the first call freed (below a small tensor that outlives it, as
    parameters and optimizer state do in a real step) and hands it out again."""
    from dtx.benchmarking import peak_memory_mb

    outlive = []

    def call() -> None:
        held = [torch.ones(2 ** 14) for _ in range(384)]
        outlive.append(torch.ones(16))
        del held

    call()
    assert 24 <= peak_memory_mb(call, "cpu") <= 24.01


# -- 7: sample grids at a viewable size ------------------------------------------------------------------------------

@pytest.fixture
def tiny_run(tiny_models, tmp_path):
    """A 4-step run of ``tiny-image`` on the 8x8 digits (local runner), with its checkpoint and sample grid."""
    out = tmp_path / "run"
    assert main(["train", tiny_recipe(tmp_path / "recipe.yaml"), "--runner", "local", "--out", str(out)]) == 0
    return out


def png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def test_sample_grids_enlarge_small_samples_to_a_viewable_size_by_default(tiny_run, tmp_path, capsys):
    """8x8 digits become 64 px tiles (factor 8, nearest) in `dtx sample`'s grid and in training's; 32x32 clip frames
    become 64 px; ``--scale`` picks the factor (1: actual size) and a bad one is refused before sampling."""
    from dtx.writers import save_frame_grid

    def grid(*extra: str) -> tuple[int, int]:
        out = tmp_path / f"grid{len(extra)}{''.join(extra)}.png"
        assert main(["sample", str(tiny_run), "--classes", "0,1,2", "--n-per-class", "2", "--steps", "2",
                     "--out", str(out), *extra]) == 0
        return png_size(out)

    assert grid() == (2 * 65 + 1, 3 * 65 + 1)  # 2 samples a row, one row per class, 1 px gaps
    assert grid("--scale", "1") == (2 * 9 + 1, 3 * 9 + 1)
    assert grid("--scale", "3") == (2 * 25 + 1, 3 * 25 + 1)
    assert [png_size(p)[0] % 65 for p in (tiny_run / "samples").glob("*.png")] == [1]
    clips = torch.zeros(2, 8, 1, 32, 32)
    assert png_size(save_frame_grid(clips, tmp_path / "clips.png")) == (8 * 65 + 1, 2 * 65 + 1)
    capsys.readouterr()
    assert main(["sample", str(tiny_run), "--scale", "0", "--out", str(tmp_path / "bad.png")]) == 2
    assert "--scale must be an integer in 1..64, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


# -- 4: every number with its conditions ---------------------------------------------------------------------------

def test_eval_prints_the_sample_count_with_every_metric(tmp_path, capsys):
    """`dtx eval` names how many samples each score comes from (and the reference's size), in the table and JSON."""
    import json

    from dtx.data.digits import digits_arrays
    from dtx.writers import save_npz

    x, y = digits_arrays("test", 8)
    archive = save_npz(x[:40], tmp_path / "s.npz", labels=y[:40])
    assert main(["eval", str(archive)]) == 0
    lines = capsys.readouterr().out.splitlines()
    metrics = {line.split()[0]: line for line in lines[1:]}
    assert set(metrics) == {"accuracy", "fd_digits", "fid"}
    assert "(40 samples; classifier on the 355 real test digits:" in metrics["accuracy"]
    assert "(40 samples vs 1442 real digits/train; the 355 real test digits score" in metrics["fd_digits"]
    assert "skipped" in metrics["fid"] or "(40 samples vs 1442 real digits/train)" in metrics["fid"]
    assert main(["eval", str(archive), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["num_samples"], result["reference_samples"], result["test_samples"]) == (40, 1442, 355)


def test_loss_means_one_thing_in_metrics_progress_and_summary(tiny_models, tmp_path, capsys):
    """``loss`` is the mean over the steps since the previous metrics line in metrics.jsonl, the progress bar and the
    final summary alike; ``batch_loss`` is the newest step's own, also in both files."""
    import json

    out = tmp_path / "run"
    assert main(["train", tiny_recipe(tmp_path / "recipe.yaml", max_steps=6, log_every=3), "--runner", "local",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    assert summary["loss"] == rows[-1]["loss"] and summary["batch_loss"] == rows[-1]["batch_loss"]
    assert rows[-1]["loss"] != rows[-1]["batch_loss"]  # steps 4-6 averaged against step 6 alone
    assert f"loss={summary['loss']:.4f}" in captured.err
