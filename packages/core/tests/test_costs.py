"""``dtx.costs`` and ``dtx flops``: measured FLOPs equal the hand-counted closed form of toy models, registered
analytic counters are used, sweeps write one row per size and a plot, and bad input fails before anything is
written."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

import dtx
from dtx import plugins
from dtx.cli import main
from dtx.costs import Cost, cost_of, measure, meta_model, model_cost, size_overrides
from dtx.errors import ConfigError, PluginError
from dtx.testing import fresh_plugin_host

# -- toy models, counted by hand -------------------------------------------------------------------------------


class ToyNet(nn.Module):
    """Conv2d(C -> W, 3x3) + per-pixel Linear(W -> C), class-conditional, fed EDM's c_noise."""

    noise_input = "c_noise"

    def __init__(self, input_size=8, in_channels: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.input_size = input_size
        self.in_channels = self.out_channels = in_channels
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.embed = nn.Embedding(num_classes, width)
        self.head = nn.Linear(width, in_channels)

    @property
    def input_shape(self):
        if self.input_size is None:
            return None
        h, w = (self.input_size, self.input_size) if isinstance(self.input_size, int) else self.input_size
        return (self.in_channels, h, w)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert sigma.dtype.is_floating_point and sigma.shape == (x.shape[0],)
        assert y is not None and y.dtype == torch.long and y.shape == (x.shape[0],)
        h = self.conv(x) * sigma.view(-1, 1, 1, 1) + self.embed(y)[:, :, None, None]
        return self.head(h.movedim(1, -1)).movedim(-1, 1)


def toy(input_size=8, in_channels: int = 3, width: int = 16, num_classes: int = 10) -> ToyNet:
    return ToyNet(input_size, in_channels, width, num_classes)


def toy_flops(h: int, w: int, c: int = 3, width: int = 16) -> int:
    conv_macs = h * w * width * c * 3 * 3  # every output pixel and channel: C x 3 x 3 multiply-adds
    linear_macs = h * w * width * c  # per pixel: W -> C
    return 2 * (conv_macs + linear_macs)  # biases, the embedding lookup and elementwise ops are not counted


class ToyVideo(nn.Module):
    """[B, F, C, H, W] videos: a 1x1 Conv2d per frame plus a Linear over a text-like context (example_conditions)."""

    channel_dim = 2
    noise_input = "timestep"

    def __init__(self, num_frames: int = 4, input_size: int = 8, in_channels: int = 2, width: int = 8,
                 context_len: int = 3, context_dim: int = 6) -> None:
        super().__init__()
        self.input_shape = (num_frames, in_channels, input_size, input_size)
        self.in_channels = in_channels
        self.context = (context_len, context_dim)
        self.conv = nn.Conv2d(in_channels, width, 1)
        self.ctx = nn.Linear(context_dim, width)

    def example_conditions(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"context": torch.zeros(batch, *self.context, device=device)}

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        assert t.dtype == torch.long and context is not None
        b, f = x.shape[:2]
        h = self.conv(x.flatten(0, 1)).unflatten(0, (b, f))
        return h + self.ctx(context).mean(1)[:, None, :, None, None]


def toy_video(num_frames: int = 4, input_size: int = 8) -> ToyVideo:
    return ToyVideo(num_frames, input_size)


def video_flops(f: int, s: int, c: int = 2, width: int = 8, context_len: int = 3, context_dim: int = 6) -> int:
    return 2 * (f * s * s * width * c + context_len * context_dim * width)


def analytic_counter(model: ToyNet) -> Cost:
    _, h, w = model.input_shape
    macs = 1000 * h * w  # deliberately not the measured figure: proves the counter, not the meter, answered
    params = dtx.count_parameters(model)
    return Cost(params=params, trainable_params=params, macs=macs, flops=2 * macs, method="analytic",
                extra={"pixels": h * w})


@pytest.fixture
def toys():
    """The toy models in a fresh plugin host, and the core ``flops`` command unless builtin already registers it."""
    with fresh_plugin_host():
        module = types.ModuleType("dtx_costs_test_plugin")

        @dtx.hookimpl
        def dtx_register_models(register):
            register("toy", toy, family="toy")
            register("toy-video", toy_video, family="toy-video")
            register("toy-analytic", toy, family="toy", flops=analytic_counter)
            register("toy-broken-counter", toy, family="toy", flops=lambda model: 123)

        module.dtx_register_models = dtx_register_models
        if "flops" not in plugins.names("command"):
            from dtx.commands import flops

            @dtx.hookimpl
            def dtx_register_commands(register):
                register("flops", flops.configure, run=flops.run, help="parameters and forward FLOPs of a model")

            module.dtx_register_commands = dtx_register_commands
        plugins.register_plugin(module, name="costs-test")
        yield


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtx: error: "), captured.err
    return lines[0]


# -- library ---------------------------------------------------------------------------------------------------


def test_measure_counts_the_closed_form_on_meta_tensors(toys):
    model = meta_model("toy")
    assert next(model.parameters()).is_meta
    assert measure(model) == toy_flops(8, 8)
    assert measure(model, batch=3) == 3 * toy_flops(8, 8)
    cost = model_cost("toy", input_size=[8, 12], width=4)
    assert cost.method == "measured" and cost.macs is None and cost.gmacs is None
    assert cost.flops == toy_flops(8, 12, width=4)
    assert cost.params == 3 * 4 * 9 + 4 + 10 * 4 + 4 * 3 + 3 == cost.trainable_params
    assert cost.gflops == cost.flops / 1e9


def test_video_model_gets_its_declared_layout_and_example_conditions(toys):
    assert model_cost("toy-video").flops == video_flops(4, 8)
    assert model_cost("toy-video", **size_overrides("toy-video", input_size=16, frames=7)).flops == video_flops(7, 16)


def test_registered_counter_is_used_and_must_return_a_cost(toys):
    cost = model_cost("toy-analytic", input_size=4)
    assert cost.method == "analytic" and cost.macs == 16_000 and cost.flops == 32_000
    assert cost.row()["pixels"] == 16 and cost.row()["method"] == "analytic"
    assert cost_of(meta_model("toy-analytic"), counter=None).macs == 64_000  # found through model.dtx_spec
    with pytest.raises(PluginError, match="costs-test.*returned int"):
        model_cost("toy-broken-counter")


def test_a_model_without_input_shape_asks_for_input_size(toys):
    with pytest.raises(ConfigError, match="declares no input_shape.*--input-size"):
        model_cost("toy", input_size=None)
    with pytest.raises(ConfigError, match="'toy'.*'num_frames'.*--frames"):
        size_overrides("toy", frames=4)
    assert size_overrides("toy", input_size=[8, 12]) == {"input_size": [8, 12]}


# -- dtx flops -------------------------------------------------------------------------------------------------


def test_flops_command_measures_a_model_without_counter(toys, capsys):
    assert main(["flops", "toy"]) == 0
    text = capsys.readouterr().out
    assert "measured" in text and "analytic" not in text
    assert f"({toy_flops(8, 8):,} FLOPs)" in text and "multiply-accumulates" not in text
    assert main(["flops", "toy", "--input-size", "8", "12", "--set", "width=4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["method"] == "measured" and row["flops"] == toy_flops(8, 12, width=4) and row["macs"] is None
    assert row["input_shape"] == [3, 8, 12] and row["model"] == "toy"


def test_flops_command_sets_frames_of_a_video_model(toys, capsys):
    assert main(["flops", "toy-video", "--frames", "6", "--input-size", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["input_shape"] == [6, 2, 4, 4] and row["flops"] == video_flops(6, 4)
    assert main(["flops", "toy-video", "--frames", "6"]) == 0
    assert f"({video_flops(6, 8):,} FLOPs)" in capsys.readouterr().out


def test_flops_command_uses_an_analytic_counter(toys, capsys):
    assert main(["flops", "toy-analytic", "--input-size", "10"]) == 0
    text = capsys.readouterr().out
    assert "analytic" in text and "measured" not in text
    assert "0.0001 Gflops as multiply-accumulates" in text and "0.0002 GFLOPs real (200,000 FLOPs)" in text
    assert "pixels: 100" in text
    assert main(["flops", "toy-analytic", "--input-size", "10", "--json", "--measure"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["method"] == "analytic" and row["macs"] == 100_000 and row["pixels"] == 100
    assert row["gflops_measured"] == toy_flops(10, 10) / 1e9  # --measure counts the real forward besides


def test_sweep_writes_one_row_per_size_and_a_plot(toys, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["flops", "toy", "--sweep", "16,8", "--plot", "tmp/p.png"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["8", "16"]
    assert lines[-1] == "wrote tmp/p.png"
    assert (tmp_path / "tmp" / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == ["p.png"]  # no temporary file left
    assert main(["flops", "toy", "--sweep", "8,16,32", "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["size"], r["flops"]) for r in rows] == [(s, toy_flops(s, s)) for s in (8, 16, 32)]
    assert captured.err == "wrote flops_sweep.png\n" and (tmp_path / "flops_sweep.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["toy", "--input-size", "8", "8", "8"], "--input-size takes one or two positive ints"),
    (["toy", "--input-size", "0"], "--input-size takes one or two positive ints"),
    (["toy", "--input-size", "big"], "--input-size takes one or two positive ints"),
    (["toy", "--sweep", "8,x"], "--sweep takes comma-separated positive sizes"),
    (["toy", "--frames", "4"], "model 'toy' has no option 'num_frames', so --frames cannot be set"),
    (["toy", "--set", "depth=2"], "model 'toy' has no option 'depth'"),
    (["toy", "--set", "input_size=null"], "declares no input_shape"),
    (["toy", "--sweep", "8", "--input-size", "8"], "drop --input-size"),
    (["toy", "--sweep", "8", "--set", "input_size=4"], "input_size is set twice"),
    (["toy", "--sweep", "8", "--plot", "out/p.txt"], "must end in .png"),
    (["toy", "--plot", "out/p.png"], "--plot is where --sweep writes its plot"),
    (["toy-analytic", "--sweep", "8,16", "--frames", "2"], "no option 'num_frames'"),
    (["toy-video", "--frames", "0"], "--frames must be >= 1"),
    (["no-such-model"], "unknown model 'no-such-model'"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(toys, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["flops", *argv, *([] if "--plot" in argv else ["--plot", "out/p.png"] if "--sweep" in argv
                                   else [])]) == 2
    assert message in error_line(capsys)
    assert list(tmp_path.iterdir()) == []
