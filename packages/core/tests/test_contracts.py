"""The core contracts with toy models written here (no backbone package): video tensors with learned sigma, guidance
along the channel axis, a text conditioner with padding and caption dropout kept out of the optimizer, the EMA and
the checkpoint, the noise level each kind of model receives, and the writers behind ``dtx sample`` for video."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dtx
from dtx import plugins
from dtx.checkpoint import load_checkpoint
from dtx.cli import main
from dtx.conditioning import Conditioner, ConditioningConfig, ConditionerConfig, ConditioningStage, SampleRequest
from dtx.data.info import DataInfo
from dtx.training.config import SampleConfig
from dtx.diffusion.guidance import guided
from dtx.testing import fresh_plugin_host

C, F, H, W = 1, 3, 8, 8
CLASSES = 3


# -- toy models --------------------------------------------------------------------------------------------------------

class ToyVideo(nn.Module):
    """[B, F, C, H, W] -> [B, F, 2C, H, W] (eps and variance interpolation), mixing frames so that frames matter."""

    channel_dim = 2
    noise_input = "timestep"
    learn_sigma = True

    def __init__(self, num_frames: int = F, in_channels: int = C, input_size: int = H, num_classes: int = CLASSES):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, 2 * in_channels
        self.num_classes, self.null_class = num_classes, num_classes
        self.input_shape = (num_frames, in_channels, input_size, input_size)
        self.conv = nn.Conv3d(in_channels, 2 * in_channels, 3, padding=1)
        self.t_proj = nn.Linear(1, 2 * in_channels)
        self.y_emb = nn.Embedding(num_classes + 1, 2 * in_channels)

    def forward(self, x, t, y=None):
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)                      # [B, F, 2C, H, W]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c = self.t_proj(t[:, None] / 1000)                                    # [B, 2C]
        if y is not None:
            c = c + self.y_emb(y)
        return h + c[:, None, :, None, None]


class ToyText(Conditioner):
    """Characters through a seeded embedding; ``context`` padded to ``max_len`` with a mask, ``pooled`` the masked mean."""

    fields = ("text",)

    def __init__(self, dim: int = 8, max_len: int = 6, seed: int = 0) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(128, dim)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(128, dim, generator=torch.Generator().manual_seed(seed)))

    def encode(self, raw, device):
        ids = torch.zeros(len(raw["text"]), self.max_len, dtype=torch.long)
        mask = torch.zeros(len(raw["text"]), self.max_len, dtype=torch.bool)
        for i, caption in enumerate(raw["text"]):
            codes = [ord(ch) % 128 for ch in caption[: self.max_len]]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
            mask[i, : len(codes)] = True
        context = self.embed(ids.to(device))
        pooled = (context * mask[..., None].to(device)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(device)
        return {"context": context, "context_mask": mask.to(device), "pooled": pooled}

    def null_fields(self, n):
        return {"text": [""] * n}

    def subjects(self, request):
        return [{"text": [p]} for p in request.prompts] if request.prompts else None

    def guidance_null(self, request, n):
        return {"text": [request.negative_prompt or ""] * n}


class ToyTextModel(nn.Module):
    """An image model conditioned on (context, mask, pooled); records what it receives."""

    channel_dim = 1
    noise_input = "c_noise"

    def __init__(self, in_channels: int = C, input_size: int = H, dim: int = 8):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.input_shape = (in_channels, input_size, input_size)
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cond = nn.Linear(2 * dim + 1, in_channels)
        self.received: list[dict] = []

    def forward(self, x, c_noise, context, context_mask, pooled):
        self.received.append({"c_noise": c_noise, "context": context, "context_mask": context_mask, "pooled": pooled})
        m = context_mask[..., None].to(x.dtype)
        attended = (context * m).sum(1) / m.sum(1).clamp(min=1)             # masked mean: padding changes nothing
        c = self.cond(torch.cat([attended, pooled, c_noise[:, None].to(x.dtype)], dim=1))
        return self.conv(x) + c[:, :, None, None]


class NoiseProbe(nn.Module):
    """Returns zeros and records the noise level it is handed."""

    channel_dim = 1

    def __init__(self, noise_input: str):
        super().__init__()
        self.noise_input = noise_input
        self.in_channels = self.out_channels = C
        self.w = nn.Parameter(torch.zeros(()))
        self.levels: list[torch.Tensor] = []

    def forward(self, x, level, **kwargs):
        self.levels.append(torch.as_tensor(level).detach().clone())
        return x * self.w


# -- toy data ----------------------------------------------------------------------------------------------------------

class MovingBars(torch.utils.data.Dataset):
    """Clips [F, C, H, W]: a bright column moving right by one pixel per frame from a class-dependent start."""

    def __init__(self, n: int = 48):
        self.n = n
        self.info = DataInfo(channels=C, height=H, width=W, frames=F, num_classes=CLASSES, fields=("y",))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        y = i % CLASSES
        x = -torch.ones(F, C, H, W)
        for f in range(F):
            x[f, :, :, (2 * y + f) % W] = 1.0
        return {"x": x, "y": y}


class Captions(torch.utils.data.Dataset):
    """8x8 images with a bar on the side the caption names; captions of different lengths (padding in a batch)."""

    def __init__(self, n: int = 32):
        self.n = n
        self.info = DataInfo(channels=C, height=H, width=W, fields=("text",))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        left = i % 2 == 0
        x = -torch.ones(C, H, W)
        x[:, :, 1 if left else 6] = 1.0
        return {"x": x, "text": "left" if left else "at right"}


@pytest.fixture
def toys():
    """A plugin with the toy models, data and the toy text conditioner."""
    with fresh_plugin_host():
        plugins.register_plugin(_toy_plugin(), name="toys")
        yield


def _toy_plugin() -> types.ModuleType:
    module = types.ModuleType("dtx_contract_toys")

    @dtx.hookimpl
    def dtx_register_models(register):
        register("toy-video", ToyVideo, family="toy")
        register("toy-text", ToyTextModel, family="toy")

    @dtx.hookimpl
    def dtx_register_datasets(register):
        register("moving-bars", MovingBars)
        register("captions", Captions)

    @dtx.hookimpl
    def dtx_register_conditioners(register):
        register("toy-text", ToyText, default_for=("text",))

    module.dtx_register_models = dtx_register_models
    module.dtx_register_datasets = dtx_register_datasets
    module.dtx_register_conditioners = dtx_register_conditioners
    return module


def _recipe(path: Path, body: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(body))
    return str(path)


VIDEO_RECIPE = {
    "model": {"name": "toy-video"}, "data": {"name": "moving-bars", "batch_size": 8},
    "objective": {"kind": "gaussian", "diffusion_steps": 100},
    "optim": {"lr": 1e-2}, "sample": {"sampler": "ddim", "steps": 4, "n_per_class": 1, "cfg": 2.0},
    "max_steps": 200, "log_every": 25, "ckpt_every": 200,
}


# -- video, learned sigma, guidance along channels ---------------------------------------------------------------------

def test_learned_sigma_video_model_trains(toys, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", _recipe(tmp_path / "v.yaml", VIDEO_RECIPE), "--out", str(out), "--runner", "local"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < 0.7 * losses[0]  # the hybrid loss (MSE + VB on [B, F, 2C, H, W]) goes down
    state = load_checkpoint(next((out / "checkpoints").glob("step_*")))
    assert state["data_info"]["frames"] == F


def test_guidance_on_video_combines_channels_not_frames(toys):
    from dtx.training.config import ObjectiveConfig
    from dtx.training.objectives import build_objective

    torch.manual_seed(0)
    model = ToyVideo()
    with torch.no_grad():
        model.y_emb.weight.normal_()

    def probe(net, x, schedule, generator=None, progress=False):
        return net(x, torch.full((x.shape[0],), 7, dtype=torch.long))

    plugins.host().entries["sampler"]["probe"] = plugins.Entry("sampler", "probe", probe, "toys", {"kind": "gaussian"})
    info = MovingBars().info
    objective = build_objective(ObjectiveConfig(kind="gaussian", diffusion_steps=100), model, info)
    y, null = torch.tensor([0, 2]), torch.tensor([CLASSES, CLASSES])
    out = objective.sample(model, (2, F, C, H, W), [{"y": null}, {"y": y}], [3.0], "probe", 1,
                           torch.Generator().manual_seed(5))
    x = torch.randn((2, F, C, H, W), generator=torch.Generator().manual_seed(5))
    t = torch.full((2,), 7)
    with torch.no_grad():
        u, c = model(x, t, null), model(x, t, y)
    assert out.shape == (2, F, 2 * C, H, W)
    torch.testing.assert_close(out[:, :, :C], u[:, :, :C] + 3.0 * (c[:, :, :C] - u[:, :, :C]))  # eps: guided
    torch.testing.assert_close(out[:, :, C:], c[:, :, C:])  # variance channels: the conditional ones, every frame
    # the old channel_dim=1 narrowing would have guided frame 0 only and left the others conditional
    wrong = guided(lambda x_, t_, y: model(x_, t_, y), [{"y": null}, {"y": y}], [3.0], channels=C)(x, t)
    assert not torch.allclose(wrong, out)


def test_sample_writes_png_npz_gif_and_mp4_for_a_video_model(toys, tmp_path, capsys):
    import imageio.v3 as iio

    out = tmp_path / "run"
    recipe = {**VIDEO_RECIPE, "max_steps": 2, "ckpt_every": 2}
    assert main(["train", _recipe(tmp_path / "v.yaml", recipe), "--out", str(out), "--runner", "local"]) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--classes", "0,2", "--n-per-class", "2", "--steps", "3",
                 "--out", str(tmp_path / "s.png")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    arr = np.load(tmp_path / "s.npz")
    assert arr["arr_0"].shape == (4, F, H, W, C) and arr["arr_0"].dtype == np.uint8  # NFHWC
    assert arr["labels"].tolist() == [0, 0, 2, 2]
    grid = iio.imread(tmp_path / "s.png")
    assert grid.shape[0] > grid.shape[1] / F  # rows: videos, columns: frames
    videos = sorted(Path(p).name for p in report["videos"])
    assert videos == [f"sample_{i:03d}.{ext}" for i in range(4) for ext in ("gif", "mp4")]
    assert iio.imread(tmp_path / "s" / "sample_000.mp4", index=None).shape[0] == F
    assert (tmp_path / "s" / "sample_003.gif").stat().st_size > 0


# -- text conditioning -------------------------------------------------------------------------------------------------

TEXT_RECIPE = {
    "model": {"name": "toy-text"}, "data": {"name": "captions", "batch_size": 8},
    "conditioning": {"conditioners": {"caption": {"name": "toy-text", "dropout": 0.25,
                                                  "options": {"dim": 8, "max_len": 6, "seed": 3}}}},
    "objective": {"kind": "karras"}, "optim": {"lr": 1e-3},
    "sample": {"sampler": "euler", "steps": 3, "n_per_class": 1, "cfg": 1.5, "prompts": ["left"]},
    "max_steps": 6, "log_every": 3, "ckpt_every": 6,
}


def _stage(dropout: float) -> ConditioningStage:
    cfg = ConditioningConfig(conditioners={"caption": ConditionerConfig(name="toy-text", dropout=dropout,
                                                                        options={"seed": 3})})
    return ConditioningStage.build(cfg, ToyTextModel(), Captions().info)


def test_padding_changes_nothing_and_caption_dropout_uses_the_null_caption(toys):
    stage = _stage(0.25)
    kw = stage.encode({"text": ["left", "at right"]}, torch.device("cpu"))
    assert kw["context"].shape == (2, 6, 8) and kw["context_mask"].tolist()[0] == [True] * 4 + [False] * 2
    alone = stage.encode({"text": ["left"]}, torch.device("cpu"))
    torch.testing.assert_close(kw["pooled"][:1], alone["pooled"])  # a longer neighbour pads it; nothing changes
    model = ToyTextModel()
    x = torch.randn(1, C, H, W)
    padded = {k: v[:1] for k, v in kw.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.zeros(1), **padded), model(x, torch.zeros(1), **alone))
    raw = {"text": ["left"] * 4000}
    dropped = stage.drop(raw, torch.Generator().manual_seed(0))["text"]
    assert set(dropped) == {"left", ""} and dropped.count("") / 4000 == pytest.approx(0.25, abs=0.03)


def test_text_conditioner_trains_outside_optimizer_ema_and_checkpoint(toys, tmp_path):
    from dtx.training import LocalContext
    from dtx.training.config import load_train_config
    from dtx.training.trainer import Trainer

    cfg = load_train_config(TEXT_RECIPE, [f"out={tmp_path / 'run'}"])
    trainer = Trainer(cfg, LocalContext(cfg.out, device=torch.device("cpu")))
    encoder = [p for m in trainer.stage.members for p in m.conditioner.parameters()]
    assert encoder and all(not p.requires_grad for p in encoder)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in trainer.raw.parameters()} and not optimized & {id(p) for p in encoder}
    before = [p.clone() for p in encoder]
    summary = trainer.run()
    assert summary["step"] == 6 and math.isfinite(summary["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, encoder))  # frozen
    assert set(trainer.ema.state_dict()) == set(trainer.raw.state_dict())
    ckpt = Path(summary["checkpoint"])
    from dtx.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)
    for key in ("model", "ema"):
        assert set(state[key]) == set(trainer.raw.state_dict())  # no encoder tensor anywhere
    assert not any("embed" in k for k in state["model"])
    assert state["conditioners"] == [{"key": "caption", "name": "toy-text", "plugin": "toys",
                                      "options": {"dim": 8, "max_len": 6, "seed": 3}, "dropout": 0.25}]
    # the model received padded contexts, and with dropout some samples got the null (empty) caption
    masks = torch.cat([r["context_mask"] for r in trainer.raw.received])
    assert (masks.sum(1) == 0).any() and (masks.sum(1) == 4).any() and (masks.sum(1) == 6).any()


def test_sample_prompt_reproduces_the_conditioning_after_a_restart(tmp_path, capsys):
    out = tmp_path / "run"
    with fresh_plugin_host():
        plugins.register_plugin(_toy_plugin(), name="toys")
        assert main(["train", _recipe(tmp_path / "t.yaml", TEXT_RECIPE), "--out", str(out), "--runner", "local"]) == 0
    capsys.readouterr()
    arrays = []
    for _ in range(2):  # two "processes": the plugin host and every conditioner are rebuilt from the checkpoint
        with fresh_plugin_host():
            plugins.register_plugin(_toy_plugin(), name="toys")
            assert main(["sample", str(out), "--prompt", "left", "--prompt", "at right", "--n-per-class", "2",
                         "--cfg", "2", "--negative-prompt", "xx", "--seed", "1", "--out", str(tmp_path / "p.png")]) == 0
            arrays.append(np.load(tmp_path / "p.npz")["arr_0"])
    assert np.array_equal(arrays[0], arrays[1])
    assert (tmp_path / "p.prompts.txt").read_text().splitlines() == ["left", "left", "at right", "at right"]
    assert list(np.load(tmp_path / "p.npz")["prompts"]) == ["left", "left", "at right", "at right"]

    # what the model received: the toy encoder's embeddings, rebuilt from the recorded seed, written out here
    from dtx.training.sampling import generate, load_for_sampling

    with fresh_plugin_host():
        plugins.register_plugin(_toy_plugin(), name="toys")
        setup = load_for_sampling(out)
        setup.model.received.clear()
        generate(setup, SampleRequest(prompts=["left"], negative_prompt="xx"),
                 SampleConfig(sampler="euler", steps=1, cfg=2.0), per_subject=1)
    table = torch.randn(128, 8, generator=torch.Generator().manual_seed(3))
    ctx = setup.model.received[0]["context"]  # one batched forward: [negative; prompt]
    assert ctx.shape == (2, 6, 8)
    torch.testing.assert_close(ctx[1, :4], table[[ord(ch) for ch in "left"]])
    torch.testing.assert_close(ctx[0, :2], table[[ord("x")] * 2])


# -- the noise-level contract ------------------------------------------------------------------------------------------

def _karras(model):
    from dtx.training.config import ObjectiveConfig
    from dtx.training.objectives import build_objective

    return build_objective(ObjectiveConfig(kind="karras"), model, DataInfo(channels=C, height=H, width=W))


def _linear_sigmas():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # DiT's linear schedule, written out here
    abar = np.cumprod(1 - betas)
    return np.sqrt((1 - abar) / abar)


def test_continuous_model_receives_c_noise_and_timestep_model_a_ddpm_timestep(toys):
    sigma = torch.tensor([0.05, 1.0, 20.0])
    x = torch.randn(3, C, H, W)
    for kind, expected in (("c_noise", torch.log(sigma) / 4), ("sigma", sigma)):
        probe = NoiseProbe(kind)
        _karras(probe).denoiser(probe)(x, sigma)
        torch.testing.assert_close(probe.levels[-1].float(), expected)
    # a timestep model gets t with sigma_t = sigma on DiT's schedule; exact at the schedule's own sigmas
    sigmas = _linear_sigmas()
    probe = NoiseProbe("timestep")
    _karras(probe).denoiser(probe)(x, torch.tensor(sigmas[[10, 500, 990]], dtype=torch.float32))
    torch.testing.assert_close(probe.levels[-1].double(), torch.tensor([10.0, 500.0, 990.0], dtype=torch.float64),
                               atol=2e-3, rtol=0)
    _karras(probe).denoiser(probe)(x, torch.tensor([1e-4, 80.0, 1e4]))  # clamped into the embedding's range
    t = probe.levels[-1]
    assert t[0] == 0 and 0 < t[1] < 999 and t[2] == pytest.approx(999)
    lo = int(t[1])
    assert sigmas[lo] <= 80.0 <= sigmas[lo + 1]


def test_gaussian_objective_hands_continuous_models_their_sigma(toys):
    from dtx.training.config import ObjectiveConfig
    from dtx.training.objectives import build_objective

    probe = NoiseProbe("c_noise")
    objective = build_objective(ObjectiveConfig(kind="gaussian"), probe, DataInfo(channels=C, height=H, width=W))
    objective.loss(probe, torch.randn(64, C, H, W), {}, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))  # the objective's first draw
    expected = torch.log(torch.tensor(_linear_sigmas()[t.numpy()], dtype=torch.float32)) / 4
    torch.testing.assert_close(probe.levels[-1].float(), expected, rtol=1e-5, atol=1e-5)


# -- nested guidance and plugin-declared sample flags --------------------------------------------------------------

class MotionFlag(dtx.conditioning.FlagConditioner):
    """GenTron-style motion-free flag: null = motion-free (True)."""

    def __init__(self) -> None:
        super().__init__(field="motion_free", null=True, default=False)


class FlagTextModel(ToyTextModel):
    def forward(self, x, c_noise, context, context_mask, pooled, motion_free):
        self.received[-1:] = []
        out = super().forward(x, c_noise, context, context_mask, pooled)
        self.received[-1]["motion_free"] = motion_free
        return out + motion_free[:, None, None, None].to(x.dtype) * 0.5


def test_three_term_guidance_and_a_plugin_declared_flag(toys, capsys):
    from dtx.commands.sample import _request, configure
    from dtx.conditioning import GuidanceStep
    from dtx.training.config import ObjectiveConfig
    from dtx.training.objectives import build_objective
    from dtx.training.sampling import SamplingSetup, generate

    plugins.host().entries["conditioner"]["motion"] = plugins.Entry(
        "conditioner", "motion", MotionFlag, "toys", {"sample_flags": {"--motion-free": "sample without motion"}})

    def probe(net, x, schedule, generator=None, progress=False):
        return net(x, torch.ones(x.shape[0]))

    plugins.host().entries["sampler"]["probe-k"] = plugins.Entry("sampler", "probe-k", probe, "toys", {"kind": "karras"})
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["run", "--prompt", "left", "--motion-free", "--guide", "motion=1.2",
                              "--guide", "caption=7.5"])
    assert _request(args).flags == {"motion_free": True}
    assert [(g.keys, g.scale) for g in args.guide] == [(["motion"], 1.2), (["caption"], 7.5)]

    torch.manual_seed(0)
    model = FlagTextModel()
    info = DataInfo(channels=C, height=H, width=W, fields=("text", "motion_free"))
    cfg = ConditioningConfig(conditioners={"caption": ConditionerConfig(name="toy-text", options={"seed": 3}),
                                           "motion": ConditionerConfig(name="motion")})
    stage = ConditioningStage.build(cfg, model, info)
    objective = build_objective(ObjectiveConfig(kind="karras"), model, info)
    setup = SamplingSetup(model, objective, stage, info, None, "test")
    steps = [GuidanceStep(["motion"], 1.2), GuidanceStep(["caption"], 7.5)]
    out = generate(setup, SampleRequest(prompts=["left"]), SampleConfig(sampler="probe-k", steps=1, guidance=steps),
                   per_subject=1, seed=4).x
    got = model.received[-1]
    assert got["motion_free"].tolist() == [True, False, False]  # (0, 0), (0, c_M), (c_T, c_M)
    assert got["context_mask"].sum(1).tolist() == [0, 0, 4]
    # e0 + 1.2 (e1 - e0) + 7.5 (e2 - e1) of the denoiser, recomputed here term by term
    sigma = objective.cfg.sigma_max
    x = torch.randn((1, C, H, W), generator=torch.Generator().manual_seed(4)) * sigma
    den = objective.denoiser(model)
    kws = [stage.encode({"text": [t], "motion_free": torch.tensor([m])}, torch.device("cpu"))
           for t, m in (("", True), ("", False), ("left", False))]
    with torch.no_grad():
        e0, e1, e2 = (den(x, torch.ones(1), **kw) for kw in kws)
    torch.testing.assert_close(out, e0 + 1.2 * (e1 - e0) + 7.5 * (e2 - e1), rtol=1e-4, atol=1e-4)


def test_a_plugin_declared_guidance_scale_puts_its_term_before_cfg(toys):
    """``sample_scales`` (GenTron's ``--motion-cfg``): the conditioner's own term first, then CFG over the rest."""
    from dtx.commands.sample import configure, plugin_scales
    from dtx.errors import ConfigError

    plugins.host().entries["conditioner"]["motion"] = plugins.Entry(
        "conditioner", "motion", MotionFlag, "toys", {"sample_scales": {"--motion-cfg": "motion guidance scale"}})
    assert plugin_scales() == {"--motion-cfg": ("motion", "motion guidance scale")}
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    assert parser.parse_args(["run", "--motion-cfg", "1.3"]).scale_motion == 1.3

    model = FlagTextModel()
    info = DataInfo(channels=C, height=H, width=W, fields=("text", "motion_free"))
    cfg = ConditioningConfig(conditioners={"caption": ConditionerConfig(name="toy-text", options={"seed": 3}),
                                           "motion": ConditionerConfig(name="motion")})
    stage = ConditioningStage.build(cfg, model, info)
    steps = stage.guidance_steps(7.5, scales={"motion": 1.2})
    assert [(s.keys, s.scale) for s in steps] == [(["motion"], 1.2), (["caption"], 7.5)]
    assert [(s.keys, s.scale) for s in stage.guidance_steps(1.0, scales={"motion": 1.2})] == [(["motion"], 1.2)]
    with pytest.raises(ConfigError, match="'colour'"):
        stage.guidance_steps(7.5, scales={"colour": 2.0})
