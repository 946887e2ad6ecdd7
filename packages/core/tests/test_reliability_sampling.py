"""Issue 29, findings 7-9: sampler options checked by type and range before anything runs or is written; conditions
a model cannot use refused instead of ignored (prompts files split on newlines only); a plugin's bad sample flag or
raising checkpoint detector named against that plugin while everything else keeps working.

A tiny MLP denoiser, a class, a caption and an unconditional dataset and a caption conditioner are registered as a
run-time plugin; three one-step runs are trained once per module."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import types
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
import yaml
from torch import nn

from dtx import plugins
from dtx.cli import main
from dtx.conditioning import Conditioner, SampleRequest
from dtx.errors import ConfigError
from dtx.hookspecs import hookimpl
from dtx.testing import fresh_plugin_host

SIZE = 4


class Tiny(nn.Module):
    """MLP on flattened 1x4x4 images; class labels ``y`` (with a null class) and a caption ``context`` [B, 1]."""

    def __init__(self, input_size: int = SIZE, in_channels: int = 1, num_classes: int = 0) -> None:
        super().__init__()
        d = in_channels * input_size * input_size
        self.in_channels = self.out_channels = in_channels
        self.num_classes = num_classes
        if num_classes:
            self.null_class = num_classes
            self.y_embed = nn.Embedding(num_classes + 1, 16)
        self.inp, self.out = nn.Linear(d, 16), nn.Linear(16, d)
        self.t_proj, self.ctx = nn.Linear(1, 16), nn.Linear(1, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(x.flatten(1)) + self.t_proj(torch.as_tensor(t).float().expand(x.shape[0]).view(-1, 1) / 1000)
        if y is not None:
            h = h + self.y_embed(y)
        if context is not None:
            h = h + self.ctx(context)
        return self.out(torch.tanh(h)).view_as(x)


class Images(torch.utils.data.Dataset):
    """8 fixed 1x4x4 images; ``labels`` 3 classes, ``captions`` a text field, neither: unconditional."""

    channels, image_size, is_latent = 1, SIZE, False

    def __init__(self, kind: str = "labels") -> None:
        self.kind = kind
        self.num_classes = 3 if kind == "labels" else 0
        self.fields = {"labels": ("y",), "captions": ("text",), "none": ()}[kind]
        self.x = torch.linspace(-1, 1, 8 * SIZE * SIZE).view(8, 1, SIZE, SIZE)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"x": self.x[i]}
        if self.kind == "labels":
            item["y"] = torch.tensor(i % 3)
        elif self.kind == "captions":
            item["text"] = "a" * (1 + i % 3)
        return item


class Captions(Conditioner):
    """Captions ``text`` -> ``context`` [B, 1] (their length); the null caption is the empty one."""

    fields = ("text",)

    def encode(self, raw: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        return {"context": torch.tensor([[len(t) / 4.0] for t in raw["text"]], device=device)}

    def null_fields(self, n: int) -> dict[str, Any]:
        return {"text": [""] * n}

    def subjects(self, request: SampleRequest) -> list[dict[str, Any]] | None:
        return [{"text": [p]} for p in request.prompts] or None

    def guidance_null(self, request: SampleRequest, n: int) -> dict[str, Any]:
        return {"text": [request.negative_prompt or ""] * n}

    def request_parts(self) -> tuple[str, ...]:
        return ("prompts", "negative_prompt")


def _register() -> None:
    plugins.reset()
    plugins.register_plugin(types.SimpleNamespace(
        dtx_register_models=hookimpl(lambda register: register("rs-tiny", Tiny, family="test")),
        dtx_register_datasets=hookimpl(lambda register: register("rs-images", Images)),
        dtx_register_conditioners=hookimpl(lambda register: register("rs-captions", Captions, default_for=("text",))),
    ), "rs-test")


@pytest.fixture(autouse=True)
def tiny_plugin():
    with fresh_plugin_host():
        _register()
        yield


def write_recipe(path: Path, kind: str, **sample: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"name": "rs-tiny"}, "data": {"name": "rs-images", "options": {"kind": kind}, "batch_size": 4},
        "objective": {"kind": "gaussian", "diffusion_steps": 100}, "max_steps": 1, "ckpt_every": 1, "compile": False,
        "sample": {"sampler": "ddim", "steps": 2, "n_per_class": 1, **sample}}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One-step runs of a class model, a caption model (its recipe samples one prompt) and an unconditional one."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    with fresh_plugin_host():
        _register()
        for kind, sample in (("labels", {}), ("captions", {"prompts": ["recipe prompt"]}), ("none", {})):
            recipe = write_recipe(root / f"{kind}.yaml", kind, **sample)
            assert main(["train", str(recipe), "--runner", "local", "--out", str(root / kind)]) == 0, kind
            out[kind] = root / kind
    return out


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run ``dtx ARGV``: exit 2 with one ``dtx: error:`` line holding every fragment; returns that line."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtx: error: ")]
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


# -- finding 7: sampler options --------------------------------------------------------------------------------------

def _run_sampler(name: str, options: dict[str, Any]) -> torch.Tensor:
    """Sampler ``name`` for 3 steps on a toy model (eps 0.1·x, D(x; σ) = x / (1 + σ²), or the velocity x / t) from a
    seeded x_T."""
    from dtx.diffusion.karras import get_sigmas_karras
    from dtx.diffusion.respace import create_diffusion

    entry = plugins.get("sampler", name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, SIZE, SIZE, generator=gen)
    if entry.meta["kind"] == "gaussian":
        schedule = create_diffusion("3", learn_sigma=False, diffusion_steps=100)
        return entry.obj(lambda x, t, **_: 0.1 * x, x, schedule, generator=gen, **options)
    if entry.meta["kind"] == "flow":  # the velocity of point-mass data at 0 on the linear path: x / t
        from dtx.diffusion.flow import FlowPath, FlowSchedule, time_grid

        schedule = FlowSchedule(time_grid(3, interval=(0.0, 0.999)), FlowPath("linear"))
        return entry.obj(lambda x, t, **_: x / t.view(-1, 1, 1, 1), x, schedule, generator=gen, **options)
    sigmas = get_sigmas_karras(3, 0.002, 80.0)
    return entry.obj(lambda x, s, **_: x / (1 + s.view(-1, 1, 1, 1) ** 2), x * sigmas[0], sigmas, generator=gen,
                     **options)


def test_every_core_sampler_declares_its_options_and_their_ranges_keep_samples_finite():
    from dtx.diffusion.sampler_api import declared_options

    core = {name: e for name, e in plugins.host().table("sampler").items() if e.plugin == "core"}
    assert {"ddpm", "ddim", "ddim-diffusers", "dpm-solver", "euler", "heun", "dpmpp-2m-sde"} <= set(core)
    for name, entry in core.items():
        declared = declared_options(entry.obj)
        assert declared is not None, name
        for option in declared.values():
            values = list(option.choices) or [v for v in (option.low, option.high, 1e30) if v is not None]
            for value in values:
                if option.high is not None and not option.choices and value > option.high:
                    continue
                x = _run_sampler(name, {option.name: value})
                assert torch.isfinite(x).all(), (name, option.name, value)


def test_ddim_eta_above_one_is_out_of_range_because_it_samples_nan():
    """Why DDIM's eta stops at 1: beyond it the update's square root goes negative on coarse steps."""
    from dtx.diffusion.respace import create_diffusion
    from dtx.diffusion.sampler_api import check_options

    fn = plugins.get("sampler", "ddim").obj
    assert torch.isfinite(_run_sampler("ddim", {"eta": 1.0})).all()
    x = fn(lambda x, t, **_: 0.1 * x, torch.randn(2, 1, SIZE, SIZE),
           create_diffusion("3", learn_sigma=False, diffusion_steps=100), eta=2.0)
    assert torch.isnan(x).any()
    with pytest.raises(ConfigError, match=r"takes eta as a number in \[0, 1\], got 2.0"):
        check_options("ddim", fn, {"eta": 2.0}, "sample.sampler_options")


@pytest.mark.parametrize("sampler, options, fragment", [
    ("ddim", {"eta": math.inf}, "takes eta as a number in [0, 1], got inf"),
    ("ddim", {"eta": "abc"}, "takes eta as a number in [0, 1], got 'abc'"),
    ("ddim", {"eta": 1.5}, "got 1.5"),
    ("ddim", {"eta": True}, "got True"),
    ("ddim-diffusers", {"eta": -0.1}, "in [0, 1]"),
    ("dpm-solver", {"solver_order": 2.0}, "takes solver_order as one of 1, 2, 3, got 2.0"),
    ("dpm-solver", {"algorithm_type": "dpmsolver"}, "one of 'dpmsolver++', 'sde-dpmsolver++', got 'dpmsolver'"),
    ("euler", {"s_tmax": math.nan}, "takes s_tmax as a number in [0, inf], got nan"),
    ("euler", {"s_churn": 10**400}, "takes s_churn as a finite number >= 0"),
    ("heun", {"s_churn": -1}, "a finite number >= 0, got -1"),
    ("dpmpp-2m-sde", {"solver_type": 3}, "one of 'heun', 'midpoint', got 3"),
    ("dpmpp-3m-sde", {"s_noise": math.inf}, "takes s_noise as a number in [0, 100]"),
])
def test_bad_sampler_option_values_name_the_option_and_what_it_takes(sampler, options, fragment):
    from dtx.diffusion.sampler_api import check_options

    fn = plugins.get("sampler", sampler).obj
    (option,) = options
    with pytest.raises(ConfigError) as info:
        check_options(sampler, fn, options, "sample.sampler_options")
    assert f"bad value for config key 'sample.sampler_options.{option}': sampler {sampler!r}" in str(info.value)
    assert fragment in str(info.value)
    with pytest.raises(ConfigError, match=rf"bad value for --sampler-option {option}: "):
        check_options(sampler, fn, options, "--sampler-option")


def test_good_sampler_options_are_kept_and_typed():
    from dtx.diffusion.sampler_api import check_options

    assert check_options("euler", plugins.get("sampler", "euler").obj, {"s_tmax": math.inf, "s_churn": 0},
                         "x") == {"s_tmax": math.inf, "s_churn": 0.0}
    assert check_options("ddim", plugins.get("sampler", "ddim").obj, {"eta": 1}, "x") == {"eta": 1.0}


@pytest.mark.parametrize("argv, fragments", [
    (["--sampler-option", "eta=.inf"], ["bad value for --sampler-option eta: sampler 'ddim' takes eta as a number in "
                                        "[0, 1], got inf"]),
    (["--sampler-option", "eta=abc"], ["--sampler-option eta", "got 'abc'"]),
    (["--sampler-option", "etta=0"], ["--sampler-option: sampler 'ddim' has no option 'etta' (did you mean 'eta'?)",
                                      "options: eta"]),
    (["--sampler", "ddpm", "--sampler-option", "eta=0"], ["sampler 'ddpm' has no option 'eta'; options: none"]),
    (["--sampler", "dpm-solver", "--sampler-option", "solver_order=4"], ["--sampler-option solver_order",
                                                                         "one of 1, 2, 3, got 4"]),
])
def test_dtx_sample_checks_sampler_options_before_sampling(runs, tmp_path, capsys, argv, fragments):
    before = digest(runs["labels"])
    out = tmp_path / "s.png"
    refused(capsys, ["sample", str(runs["labels"]), "--steps", "2", "--out", str(out), *argv], *fragments)
    assert not list(tmp_path.iterdir()) and digest(runs["labels"]) == before


@pytest.mark.parametrize("options, fragments", [
    ("{eta: .inf}", ["config key 'sample.sampler_options.eta'", "takes eta as a number in [0, 1], got inf"]),
    ("{eta: abc}", ["config key 'sample.sampler_options.eta'", "got 'abc'"]),
    ("{eta: 0, s_noise: 1}", ["sample.sampler_options: sampler 'ddim' has no option 's_noise'", "options: eta"]),
])
def test_dtx_train_checks_sampler_options_before_writing(tmp_path, capsys, options, fragments):
    recipe = write_recipe(tmp_path / "r.yaml", "labels")
    refused(capsys, ["train", str(recipe), "--runner", "local", "--out", str(tmp_path / "run"),
                     f"sample.sampler_options={options}"], *fragments)
    assert not (tmp_path / "run").exists()


# -- finding 8: conditions a model cannot use ------------------------------------------------------------------------

@pytest.mark.parametrize("kind, argv, fragment", [
    ("labels", ["--prompt", "a cat"], "--prompt: this model takes class labels (--classes), not text prompts"),
    ("labels", ["--negative-prompt", "a dog"],
     "--negative-prompt: this model takes class labels (--classes), not a negative prompt"),
    ("labels", ["--set-flag", "motion-free"],
     "--set-flag motion_free: this model takes class labels (--classes), not the flag 'motion_free'"),
    ("labels", ["--prompts-file", "PROMPTS"], "--prompts-file: this model takes class labels (--classes), not text"),
    ("captions", ["--classes", "1"], "--classes: this model takes text prompts (--prompt), a negative prompt "
                                     "(--negative-prompt), not class labels"),
    ("none", ["--classes", "1"], "--classes: this model is unconditional: it takes no class labels"),
    ("none", ["--prompt", "a cat"], "--prompt: this model is unconditional: it takes no text prompts"),
])
def test_conditions_the_model_cannot_use_are_refused_naming_what_it_takes(runs, tmp_path, capsys, kind, argv,
                                                                           fragment):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    argv = [str(tmp_path / "prompts.txt") if a == "PROMPTS" else a for a in argv]
    before = digest(runs[kind])
    out = tmp_path / "out" / "s.png"
    refused(capsys, ["sample", str(runs[kind]), "--steps", "2", "--out", str(out), *argv], fragment)
    assert not out.parent.exists() and digest(runs[kind]) == before


def test_a_recipe_sampling_conditions_the_model_cannot_use_is_refused_before_writing(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", "labels", prompts=["a cat"])
    refused(capsys, ["train", str(recipe), "--runner", "local", "--out", str(tmp_path / "run")],
            "bad value for config key 'sample.prompts': this model takes class labels (sample.classes), not text")
    recipe = write_recipe(tmp_path / "r.yaml", "captions", classes=[1])
    refused(capsys, ["train", str(recipe), "--runner", "local", "--out", str(tmp_path / "run")],
            "bad value for config key 'sample.classes': this model takes text prompts (sample.prompts)")
    assert not (tmp_path / "run").exists()


def test_what_a_conditioner_reads_defaults_from_what_it_overrides():
    """A third-party conditioner that reads requests but does not declare ``request_parts`` turns the check off
    (None) rather than having its prompts refused; one that reads none of a request declares ()."""
    class Legacy(Conditioner):
        fields = ("text",)
        encode, null_fields, subjects = Captions.encode, Captions.null_fields, Captions.subjects

    class Silent(Conditioner):
        fields = ("text",)
        encode, null_fields = Captions.encode, Captions.null_fields

    assert Legacy().request_parts() is None and Silent().request_parts() == () and Captions().request_parts()


@pytest.mark.parametrize("text, fragment", [
    ("\n  \n\t\n", "holds no prompt (every line is blank)"),
    ("", "holds no prompt"),
    ("a cat\rsitting\n", "line 1 holds a carriage return (\\r) that does not end the line"),
    ("a cat\r\n\rb dog\n", "line 2 holds a carriage return"),
])
def test_a_prompts_file_without_prompts_or_with_a_lone_carriage_return_is_refused(runs, tmp_path, capsys, text,
                                                                                   fragment):
    path = tmp_path / "prompts.txt"
    path.write_bytes(text.encode())
    out = tmp_path / "out" / "s.png"
    refused(capsys, ["sample", str(runs["captions"]), "--prompts-file", str(path), "--steps", "2",
                     "--out", str(out)], f"--prompts-file {path}", fragment)
    assert not out.parent.exists()


def test_prompts_are_split_on_newlines_only(runs, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\r\n\r\n  a dog \nan\u2028owl\n".encode())
    out = tmp_path / "s.png"
    assert main(["sample", str(runs["captions"]), "--prompts-file", str(path), "--steps", "2", "--n-per-class", "1",
                 "--out", str(out)]) == 0
    import numpy as np

    assert np.load(out.with_suffix(".npz"))["prompts"].tolist() == ["a cat", "a dog", "an\u2028owl"]


# -- finding 9: plugin isolation -------------------------------------------------------------------------------------

def _plugin_records(capsys) -> dict[str, dict[str, Any]]:
    capsys.readouterr()
    assert main(["plugins", "--json"]) == 0
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


def test_a_plugin_flag_taking_a_core_option_is_refused_and_named_against_its_plugin(runs, tmp_path, capsys, caplog):
    plugins.register_plugin(types.SimpleNamespace(dtx_register_conditioners=hookimpl(lambda register: register(
        "rs-clash", Captions, sample_flags={"--steps": "clashes", "rs-bare": "no dashes", "--rs-flag": "fine"},
        sample_scales={"--cfg": "clashes too", "--rs-scale": "fine"}))), "rs-clash-plugin")
    with caplog.at_level(logging.WARNING, logger="dtx.plugins"):
        records = _plugin_records(capsys)
    assert records["core"]["error"] is None and not records["core"]["warnings"]
    warnings = records["rs-clash-plugin"]["warnings"]
    assert any("'--steps'" in w and "is a core option of dtx sample; refused" in w for w in warnings)
    assert any("'--cfg'" in w for w in warnings) and any("'rs-bare'" in w and "not a --long-option" in w
                                                         for w in warnings)
    assert "plugin 'rs-clash-plugin'" in caplog.text and "'--steps'" in caplog.text
    from dtx.commands.sample import plugin_flags, plugin_scales

    flags, scales = plugin_flags(), plugin_scales()  # the plugin's well-formed options are kept
    assert "--rs-flag" in flags and "--steps" not in flags and "--rs-scale" in scales and "--cfg" not in scales
    out = tmp_path / "s.png"
    assert main(["sample", str(runs["labels"]), "--steps", "2", "--n-per-class", "1", "--out", str(out)]) == 0
    assert out.is_file()
    refused(capsys, ["sample", str(runs["labels"]), "--rs-flag", "--out", str(tmp_path / "f.png")],
            "--rs-flag: this model takes class labels (--classes), not the flag 'rs_flag'")


def _good_format(path: Path, obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("kind") == "rs-tiny"


def _load_good(path: Path, obj: Any, name: Any = None, options: Any = None, **overrides: Any):
    from dtx.models import create_model

    model = create_model("rs-tiny", num_classes=3)
    model.load_state_dict(obj["weights"])
    return model, {}


def _raising_detect(path: Path, obj: Any) -> bool:
    raise RuntimeError("detector bug")


def test_a_checkpoint_format_whose_detect_raises_is_named_and_skipped(tmp_path, capsys, caplog):
    plugins.register_plugin(types.SimpleNamespace(dtx_register_checkpoint_formats=hookimpl(
        lambda register: register("rs-raising", _raising_detect, load=_load_good))), "rs-raising-plugin")
    plugins.register_plugin(types.SimpleNamespace(dtx_register_checkpoint_formats=hookimpl(
        lambda register: register("rs-good", _good_format, load=_load_good))), "rs-good-plugin")
    from dtx.models import create_model

    source = tmp_path / "foreign.pt"
    torch.save({"kind": "rs-tiny", "weights": create_model("rs-tiny", num_classes=3).state_dict()}, source)
    with caplog.at_level(logging.WARNING, logger="dtx.plugins"):
        assert main(["convert", str(source), str(tmp_path / "converted")]) == 0
    assert (tmp_path / "converted" / "model.safetensors").is_file()
    assert "plugin 'rs-raising-plugin'" in caplog.text and "checkpoint format 'rs-raising'" in caplog.text
    assert "RuntimeError: detector bug" in caplog.text
    plugins.reset()  # a new process: `dtx plugins` finds the raising detector by itself
    _register()
    plugins.register_plugin(types.SimpleNamespace(dtx_register_checkpoint_formats=hookimpl(
        lambda register: register("rs-raising", _raising_detect, load=_load_good))), "rs-raising-plugin")
    records = _plugin_records(capsys)
    assert any("detect() raised RuntimeError: detector bug" in w for w in records["rs-raising-plugin"]["warnings"])
    assert records["core"]["error"] is None
