"""The first run's experience: one process unless more is asked for, each phase said, a time cap announced and its
early end warned, demo recipes budgeted in steps with bf16 chosen by the CPU, sampling progress on a terminal."""

from __future__ import annotations

import json
import sys

import pytest
from torch import nn

from dtx import plugins
from dtx.cli import main
from dtx.commands.train import choose_runner, resolve_train_config
from dtx.errors import ConfigError
from dtx.testing import fresh_plugin_host

pytest.importorskip("dtx_dit")

PROMISE_RECIPES = ("dit-digits", "hdit-digits", "latte-moving-digits", "gentron-digits")
SMALL = ["model.options.hidden_size=32", "model.options.depth=1", "model.options.num_heads=2", "data.batch_size=16",
         "sample.steps=2", "sample.n_per_class=1", "log_every=1", "ckpt_every=1000"]


@pytest.fixture(autouse=True)
def all_plugins():
    with fresh_plugin_host():
        yield


@pytest.mark.parametrize("name", PROMISE_RECIPES)
def test_demo_recipes_budget_by_steps_and_let_the_cpu_choose_bf16(name):
    pytest.importorskip({"hdit-digits": "dtx_hdit", "latte-moving-digits": "dtx_latte",
                         "gentron-digits": "dtx_gentron"}.get(name, "dtx_dit"))
    cfg = resolve_train_config(name)
    assert cfg.max_minutes == 0 and cfg.max_steps > 0  # no time cap that would end a slower CPU's run early
    assert cfg.cpu_bf16 == "auto"


def test_runner_auto_is_one_process_unless_more_is_asked_for(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_runner("auto", 1, None) == "local"
    assert choose_runner(None, None, None) == "local"
    assert choose_runner("ray", 1, None) == "ray" and choose_runner("local", 4, None) == "local"
    if "ray" in plugins.names("runner"):
        assert choose_runner("auto", 2, None) == "ray"
        assert choose_runner("auto", 1, "auto") == "ray"
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
        assert choose_runner("auto", 1, None) == "ray"
    monkeypatch.setattr(plugins, "names", lambda kind: ["local"])
    with pytest.raises(ConfigError, match="--workers 2 needs the ray runner: pip install dtx-runner-ray"):
        choose_runner("auto", 2, None)


def test_help_lists_the_time_cap_and_the_recipe_keys(capsys):
    try:
        assert main(["train", "--help"]) == 0
    except SystemExit as exc:
        assert exc.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-minutes" in text and "max_minutes (a time cap" in text and "--threads" in text
    assert "--runner" in text and "auto" in text


def test_a_time_cap_is_announced_and_its_early_end_warned(tmp_path, capfd, caplog):
    out = tmp_path / "run"
    assert main(["train", "dit-digits", "--out", str(out), "--max-steps", "400", "max_minutes=0.0001", *SMALL]) == 0
    captured = capfd.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["runner"] == "local" and summary["stopped_by"] == "max_minutes" and summary["step"] < 400
    err = captured.err
    assert "train: DiT" in err and "steps 0 -> 400" in err  # what runs, where
    assert "time cap: max_minutes=0.0001" in err  # announced before the first step
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"time cap max_minutes=0.0001 ended the run at step {summary['step']} of max_steps=400" in warned
    assert not (out / "ray").exists()


def test_compiling_is_announced(tmp_path, capfd, monkeypatch):
    """A compiled model's first step (minutes on CPU) is said before it starts and timed after."""
    from dtx.training import run_parts
    from dtx.training.compile import CompiledModel

    class Instant(CompiledModel):  # the compile wrapper without the compiler: the same first-call path
        def __init__(self, model: nn.Module) -> None:
            nn.Module.__init__(self)
            self.eager, self.compiled, self.eager_reason, self._proved = model, model, None, False

    monkeypatch.setattr(run_parts, "compile_model", lambda model, mode, device: (Instant(model), None))
    assert main(["train", "dit-digits", "--out", str(tmp_path / "run"), "--max-steps", "2", *SMALL]) == 0
    err = capfd.readouterr().err
    assert "train: compiling the model (first step; about a minute on CPU)" in err
    assert err.index("compiling the model") < err.index("train: compiled in")


def test_sampling_shows_progress_on_a_terminal_and_when_asked(tmp_path, capfd, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "dit-digits", "--out", str(run), "--max-steps", "1", *SMALL]) == 0
    capfd.readouterr()
    sample = ["sample", str(run), "--steps", "3", "--n-per-class", "1", "--classes", "1"]
    assert main([*sample, "--out", str(tmp_path / "a.png")]) == 0
    assert "3/3" not in capfd.readouterr().err  # not a terminal: quiet
    assert main([*sample, "--progress", "--out", str(tmp_path / "b.png")]) == 0
    assert "3/3" in capfd.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*sample, "--out", str(tmp_path / "c.png")]) == 0
    assert "3/3" in capfd.readouterr().err
    assert main([*sample, "--no-progress", "--out", str(tmp_path / "d.png")]) == 0
    assert "3/3" not in capfd.readouterr().err
