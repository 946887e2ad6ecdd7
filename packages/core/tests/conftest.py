"""Fixtures for the plugin-host and CLI tests: a fresh host, a run-time plugin, and installed-looking plugins; and
for the training and reliability tests, a tiny denoiser and its images registered as a run-time plugin."""

from __future__ import annotations

import dataclasses
import functools
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import dtx
from dtx import plugins
from dtx.errors import ConfigError
from dtx.layers import BlockStack, timestep_embedding
from dtx.testing import fresh_plugin_host


@pytest.fixture
def fresh_host():
    """Rediscover plugins from scratch, with no allow/deny list in the environment, and again afterwards."""
    with fresh_plugin_host():
        yield


@dataclasses.dataclass
class TinyConfig:
    width: int = 4
    depth: int = 1


def _tiny_mlp(width: int = 4, depth: int = 1) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


def _tiny_cfg(**overrides) -> torch.nn.Module:
    return _tiny_mlp(**dataclasses.asdict(TinyConfig(**overrides)))


_tiny_cfg.config_class = TinyConfig


def _hello_parser(p):
    p.add_argument("--name", default="world")
    p.add_argument("--fail", action="store_true")


def _hello_run(args) -> int:
    if args.fail:
        raise ConfigError("hello was asked to fail\nwith a second line")
    print(f"hello {args.name}")
    return 0


@pytest.fixture
def tiny_plugin(fresh_host):
    """A plugin registered at run time: two tiny model families and a ``hello`` command."""
    module = types.ModuleType("dtx_tiny_test_plugin")

    @dtx.hookimpl
    def dtx_register_models(register):
        register("tiny-mlp", _tiny_mlp, family="tiny", description="a stack of Linear(width, width)")
        register("tiny-cfg", _tiny_cfg, family="tiny-cfg", description="the same, options from a dataclass")

    @dtx.hookimpl
    def dtx_register_commands(register):
        register("hello", _hello_parser, run=_hello_run, help="say hello")

    module.dtx_register_models = dtx_register_models
    module.dtx_register_commands = dtx_register_commands
    plugins.register_plugin(module, name="tiny")
    return module


_DIST_PLUGINS = {  # distribution name: (entry point name, module name, module source)
    "dtx-good-test": ("good", "dtx_good_test_mod", """
        import torch
        import dtx

        @dtx.hookimpl
        def dtx_register_models(register):
            register("good-linear", lambda features=3: torch.nn.Linear(features, features), family="good")
    """),
    "dtx-broken-test": ("broken", "dtx_broken_test_mod", """
        raise RuntimeError("boom at import")
    """),
    "dtx-hookfail-test": ("hookfail", "dtx_hookfail_test_mod", """
        import dtx

        @dtx.hookimpl
        def dtx_register_samplers(register):
            register("hookfail-sampler", print)
            raise ValueError("sampler table is corrupt")
    """),
}


@pytest.fixture
def dist_plugins(tmp_path, monkeypatch, fresh_host):
    """Three plugins installed the way pip installs them (``*.dist-info`` with entry points) on sys.path:
    ``good`` registers a model, ``broken`` raises on import, ``hookfail`` raises inside its hook."""
    for dist, (ep_name, module, source) in _DIST_PLUGINS.items():
        info = tmp_path / f"{dist.replace('-', '_')}-0.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
        (info / "entry_points.txt").write_text(f"[dtx]\n{ep_name} = {module}\n")
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for _, module, _ in _DIST_PLUGINS.values():
        sys.modules.pop(module, None)


# -- the tiny denoiser: a model and images small enough that a CLI training run takes a moment ----------------------

TINY_SIZE, TINY_CLASSES = 4, 3


class Residual(nn.Sequential):
    """``x + layers(x)`` (a Sequential's state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x + super().forward(x)


class TinyDenoiser(nn.Module):
    """MLP on flattened 1x4x4 images, conditioned on a sinusoidal t/sigma embedding plus a class embedding, with
    ``depth`` residual blocks of ``width`` features."""

    def __init__(self, input_size: int = TINY_SIZE, in_channels: int = 1, num_classes: int = TINY_CLASSES,
                 width: int = 48, depth: int = 2, learn_sigma: bool = False) -> None:
        super().__init__()
        d = in_channels * input_size * input_size
        self.in_channels, self.learn_sigma, self.width = in_channels, learn_sigma, width
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.null_class = num_classes
        self.inp = nn.Linear(d, width)
        self.t_proj = nn.Linear(width, width)
        self.y_embed = nn.Embedding(num_classes + 1, width)
        self.blocks = BlockStack(Residual(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU())
                                 for _ in range(depth))
        self.out = nn.Linear(width, d * (2 if learn_sigma else 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0])
        h = self.inp(x.flatten(1)) + self.t_proj(timestep_embedding(t, self.width))
        if y is not None:
            h = h + self.y_embed(y)
        h = self.blocks(h)
        return self.out(h).view(x.shape[0], self.out_channels, *x.shape[2:])


class TinyData(torch.utils.data.Dataset):
    """``n`` fixed 1x4x4 images in [-1, 1] in three classes: class c lights up row c, with a little per-image jitter
    (``ramp``: one ramp from -1 to 1 over all pixels instead; ``poison``: every pixel NaN)."""

    num_classes, channels, image_size, is_latent = TINY_CLASSES, 1, TINY_SIZE, False

    def __init__(self, n: int = 24, ramp: bool = False, poison: bool = False) -> None:
        self.y, shape = torch.arange(n) % TINY_CLASSES, (n, 1, TINY_SIZE, TINY_SIZE)
        if ramp:
            self.x = torch.linspace(-1, 1, n * TINY_SIZE * TINY_SIZE).view(shape)
        else:
            g = torch.Generator().manual_seed(123)
            self.x = torch.full(shape, -0.8) + 0.1 * torch.rand(shape, generator=g)
            for i, c in enumerate(self.y.tolist()):
                self.x[i, 0, c] = 0.8
        if poison:
            self.x[:] = float("nan")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


@pytest.fixture
def tiny_denoiser(fresh_host, monkeypatch):
    """A function registering ``TinyDenoiser`` and ``TinyData`` variants (name: options) as a run-time plugin, under
    the names a test module's messages use; the host is fresh for each test, and one thread keeps runs light."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def register(plugin: str, model: str, datasets: dict[str, dict] | None = None) -> None:
        data = {name: functools.partial(TinyData, **options) for name, options in (datasets or {}).items()}
        module = types.SimpleNamespace(
            dtx_register_models=dtx.hookimpl(lambda register: register(model, TinyDenoiser, family="test")),
            dtx_register_datasets=dtx.hookimpl(lambda register: [register(k, v) for k, v in data.items()]))
        plugins.register_plugin(module, plugin)

    return register


@pytest.fixture
def write_tiny_recipe(tmp_path):
    """A function writing ``tmp_path/recipe.yaml``: the tiny model and data names given, DDPM with 100 steps, 2 DDIM
    sampling steps, checkpoints every 2 steps; ``extra`` top-level keys override (e.g. ``max_steps``)."""
    import yaml

    def write(model: str, data: str, sample: dict | None = None, **extra) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"name": model, "options": {}}, "data": {"name": data, "batch_size": 8},
            "objective": {"kind": "gaussian", "diffusion_steps": 100}, "optim": {"lr": 1e-3},
            "sample": {"sampler": "ddim", "steps": 2, "n_per_class": 1, **(sample or {})}, "log_every": 1,
            "ckpt_every": 2, **extra}))
        return path

    return write
